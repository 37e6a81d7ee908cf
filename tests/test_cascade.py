"""Cascades (tandem.cascade): the table's simulation and front against brute force, a cascade run against the
plain student and teacher runs of the same seeds, a table's budget reaching exactly its recorded cost and
quality on the prompts it was made on, the budget experiment's cascade composition, and the command line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from worldtools import PROMPTS, world_pipeline

from tandem.cascade import Cascade, CascadeTable
from tandem.eval.sweep import compose_cascade

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(rng, n=40) -> CascadeTable:
    scores = rng.random((3, n))
    return CascadeTable([1, 4], scores, [1.0, 4.0, 20.0], {"kind": "test"}, {"strategy": "refine"})


def test_simulation_follows_each_image_through_the_levels():
    table = CascadeTable([1, 4], np.array([[0.9, 0.2, 0.2], [0.1, 0.8, 0.3], [0.5, 0.6, 0.7]]),
                         [1.0, 4.0, 20.0], {})
    # image 0 stays at level 1 (0.9 >= 0.5); image 1 at level 4 (0.8 >= 0.5); image 2 goes to the teacher
    quality, cost = table.simulate([0.5, 0.5])
    assert quality == pytest.approx((0.9 + 0.8 + 0.7) / 3) and cost == pytest.approx((1 + 5 + 25) / 3)
    # None keeps nothing; a student level before the last that keeps nothing is not drawn, so costs nothing
    assert table.simulate([None, None]) == pytest.approx(((0.5 + 0.6 + 0.7) / 3, 24.0))
    assert table.simulate([None, 0.5]) == pytest.approx(((0.5 + 0.8 + 0.7) / 3, (24 + 4 + 24) / 3))
    assert table.simulate([0.5, None]) == pytest.approx(((0.9 + 0.6 + 0.7) / 3, (1 + 25 + 25) / 3))


def test_front_is_the_pareto_front_of_the_grid_and_choose_respects_the_budget():
    table = _table(np.random.default_rng(0))
    front = table.front()
    costs, qualities = [p["cost"] for p in front], [p["quality"] for p in front]
    assert costs == sorted(costs) and qualities == sorted(qualities)  # cheaper points are worse
    cuts = [np.unique(np.concatenate([np.percentile(table.scores[j], range(0, 101, 5)), [np.inf]])) for j in (0, 1)]
    brute = [table.simulate(t) for t in itertools.product(*cuts)]
    for budget in (2.0, 8.0, 15.0, 30.0):
        point = table.choose(budget)
        best = max(q for q, c in brute if c <= budget + 1e-9)
        assert point["cost"] <= budget and point["quality"] == pytest.approx(best)


def test_compose_cascade_matches_the_simulation_on_oracle_scores():
    rng = np.random.default_rng(1)
    table = _table(rng)
    runs = [{"oracle": table.scores[j], "evals": np.full(40, c), "score": table.scores[j] * 0 + j,
             "satisfied": rng.random(40) < 0.5} for j, c in enumerate([1.0, 4.0])]
    improved = {"evals": np.full(40, 24.0), "score": np.full(40, 2.0), "satisfied": rng.random(40) < 0.5}
    point = table.choose(10.0)
    composed = compose_cascade(runs, improved, point["thresholds"], improved_includes_student=True)
    assert composed["evals"].mean() == pytest.approx(point["cost"])
    assert np.array_equal(composed["score"], composed["level"])  # each image's values come from its own level
    chosen = [runs[0], runs[1], improved]
    assert all(composed["satisfied"][i] == chosen[lvl]["satisfied"][i] for i, lvl in enumerate(composed["level"]))


@pytest.fixture(scope="module")
def pipe():
    return world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=4, teacher_guidance_scale=4.5,
                          teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.6)


def test_a_cascade_keeps_the_images_its_gates_pass_and_redraws_the_rest_from_the_same_noise(pipe):
    one = pipe(PROMPTS, mode="student", num_inference_steps=1, seed=5, score=True)
    two = pipe(PROMPTS, mode="student", seed=5, score=True)
    refined = pipe(PROMPTS, mode="refine-all", seed=5)
    s1 = np.array([r["student_score"] for r in one.records])
    s2 = np.array([r["student_score"] for r in two.records])
    t1, tau = float(np.median(s1)), float(np.median(s2))
    out = pipe(PROMPTS, cascade=Cascade((1,), (t1,)), accept_threshold=tau, seed=5)
    for i, r in enumerate(out.records):
        if s1[i] >= t1:
            assert r["cascade_levels"] == [1] and r["path"] == "accepted"
            assert np.array_equal(out.images[i], one.images[i]) and r["unet_evals"]["total"] == 1
        elif s2[i] >= tau:
            assert r["cascade_levels"] == [1, 2] and r["path"] == "accepted"
            assert np.array_equal(out.images[i], two.images[i]) and r["unet_evals"]["total"] == 3
        else:
            assert r["cascade_levels"] == [1, 2] and r["path"] == "refined"
            assert np.abs(out.images[i].astype(int) - refined.images[i]).max() <= 1
            assert r["unet_evals"]["teacher"] == refined.records[i]["unet_evals"]["teacher"]
    assert out.summary["settings"]["cascade"]["steps"] == [1]
    # a level whose threshold keeps no image is not drawn: the run is the plain adaptive run, at its cost
    skipped = pipe(PROMPTS, cascade=Cascade((1,), (float("inf"),)), accept_threshold=tau, seed=5)
    plain = pipe(PROMPTS, accept_threshold=tau, seed=5)
    assert np.array_equal(skipped.images, plain.images)
    assert [r["unet_evals"] for r in skipped.records] == [r["unet_evals"] for r in plain.records]
    assert all(r["cascade_levels"] == [2] for r in skipped.records)
    assert skipped.summary["settings"]["cascade"]["thresholds"] == [None]
    with pytest.raises(ValueError, match="cascade table"):
        pipe(PROMPTS, cascade=Cascade((1,), (t1,)), budget=5.0)
    with pytest.raises(ValueError, match="mode='adaptive'"):
        pipe(PROMPTS, mode="student", cascade=Cascade((1,), (t1,)))


def test_a_table_at_a_budget_reaches_its_recorded_cost_and_quality_on_its_own_prompts(pipe):
    table = pipe.calibrate_cascade(PROMPTS, [1], seed=2)
    assert table.levels == [1, 2] and table.costs[:2] == [1.0, 2.0]
    for budget in (2.5, 6.0, 30.0):
        point = table.choose(budget)
        out = pipe(PROMPTS, cascade=table, budget=budget, seed=2)
        assert out.summary["unet_evals_mean"] == pytest.approx(point["cost"])
        assert pipe.score(list(out.images), PROMPTS).mean() == pytest.approx(point["quality"], abs=1e-6)
    with pytest.raises(ValueError, match="budget alone"):
        pipe(PROMPTS, cascade=table, budget=6.0, percentile=50)


def test_cli_makes_a_cascade_table_and_generates_at_a_budget(tmp_path, capsys, monkeypatch):
    from clitools import assert_user_error, tandem_in_process

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    table = tmp_path / "cascade.json"
    made = tandem_in_process(capsys, monkeypatch, "calibrate", "--cascade", "1", "--prompts", prompts, "--out", table)
    assert made.returncode == 0, made.stderr
    data = json.loads(table.read_text())
    assert data["kind"] == "tandem cascade table" and data["levels"] == [1, 4] and data["front"]
    out = tmp_path / "gen"
    run = tandem_in_process(capsys, monkeypatch, "generate", "--mode", "adaptive", "--cascade", table,
                            "--budget", 10, "--prompts", prompts, "--out", out)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    point = CascadeTable.load(table).choose(10)
    first = 1 if point["thresholds"][0] is not None else 4  # a level that keeps nothing is not drawn
    assert all(r["cascade_levels"][0] == first for r in records)
    assert np.mean([r["unet_evals"]["total"] for r in records]) == pytest.approx(point["cost"])
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", "--mode", "adaptive", "--cascade", table,
                                        "--prompts", prompts, "--out", tmp_path / "x"), "--cascade", "--budget")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "calibrate", "--cascade", "1", "--prompts", prompts,
                                        "--out", table), "exists")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "oracle", "--cascade", table,
                                        "--out", tmp_path / "e"), "--cascade", "eval budget")
