"""Oracle-chosen drafts (best of N) against references drawn one draft at a time: each draft is the image a
one-draft call draws from that draft's generator, the kept draft is the best by a toy oracle whose scores are
set by hand, tau is the hand-computed percentile of the best-of-N scores, and the teacher refines exactly the
prompts whose best draft scores below it, from that draft. One draft is today's call (the shipped world's
digests in test_bit_identity.py run with drafts unset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from worldtools import PROMPTS, world_pipeline

from tandem.calibration import CalibrationMismatch
from tandem.generate import derive_seed, prompt_generator
from tandem.pipeline.drafts import best_drafts, draft_generators
from tandem.routes import RouteTable, calibration_digest
from tandem.world.edits import load_edits

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 5
# the toy oracle's score of draft d of prompt i, set by hand; best: 0.9 (draft 1), 0.7 (0), 0.6 (2), 0.3 (1: tied
# with draft 2, the earlier kept)
HAND = {(0, 0): 0.2, (0, 1): 0.9, (0, 2): 0.5, (1, 0): 0.7, (1, 1): 0.1, (1, 2): 0.3,
        (2, 0): 0.4, (2, 1): 0.4, (2, 2): 0.6, (3, 0): 0.05, (3, 1): 0.3, (3, 2): 0.3}
BEST, KEPT = [0.9, 0.7, 0.6, 0.3], [1, 0, 2, 1]


def generator(i: int, d: int) -> torch.Generator:
    """Draft d of prompt i's generator, as the drafts module documents it (draft 0: a one-draft call's)."""
    return prompt_generator(SEED, i) if d == 0 else torch.Generator().manual_seed(derive_seed(SEED, i, d))


class HandOracle:
    """Scores an image by the hand-set score of the reference draft it is (the nearest, pixel for pixel)."""

    name = "hand"

    def __init__(self, references: dict):
        self.references = references

    def __call__(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            pixels = (image.permute(1, 2, 0).numpy() * 255).round()
            i = PROMPTS.index(prompt)
            d = min(range(3), key=lambda d: np.abs(pixels - self.references[i, d]).max())
            assert np.abs(pixels - self.references[i, d]).max() <= 1  # it is that draft (float rounding aside)
            out.append(HAND[i, d])
        return torch.tensor(out)

    def fingerprint(self):
        return {"kind": "hand"}


@pytest.fixture(scope="module")
def pipe():
    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=4, teacher_guidance_scale=4.5,
                          teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.6)
    references = {(i, d): pipe([PROMPTS[i]], mode="student", generator=[generator(i, d)]).images[0].astype(float)
                  for i in range(4) for d in range(3)}
    pipe.scorer = HandOracle(references)
    pipe.references = references
    return pipe


def test_each_prompt_keeps_its_best_draft(pipe):
    out = pipe(PROMPTS[:4], mode="student", drafts=3, seed=SEED, batch_size=5)
    assert [r["draft"] for r in out.records] == KEPT
    assert [r["student_score"] for r in out.records] == pytest.approx(BEST)
    assert [r["draft_scores"] for r in out.records] == [pytest.approx([HAND[i, d] for d in range(3)])
                                                        for i in range(4)]
    for i, image in enumerate(out.images):
        assert np.abs(image.astype(float) - pipe.references[i, KEPT[i]]).max() <= 1
    # every draft is paid for: 3 drafts x 2 steps of the student, 3 decodes, 3 oracle calls per prompt
    assert [r["unet_evals"]["student"] for r in out.records] == [6.0] * 4
    assert [(r["vae"]["decode"], r["oracle_calls"]) for r in out.records] == [(3, 3)] * 4
    assert out.summary["settings"]["drafts"] == 3 and out.summary["student_cost"] == 6


def test_drafts_with_their_own_generators_and_refine_all(pipe):
    given = pipe(PROMPTS[:4], mode="student", drafts=3, generator=draft_generators(SEED, range(4), 3))
    seeded = pipe(PROMPTS[:4], mode="student", drafts=3, seed=SEED)
    assert all(np.array_equal(a, b) for a, b in zip(given.images, seeded.images, strict=True))
    without_seed = lambda records: [{k: v for k, v in r.items() if k != "prompt_seed"} for r in records]
    assert without_seed(given.records) == without_seed(seeded.records)  # given generators: no seed to record
    # the sweep of an experiment draws prompts 2..3 of a run in a chunk of their own: the same drafts
    chunk = pipe(PROMPTS[2:4], mode="student", drafts=3, generator=draft_generators(SEED, [2, 3], 3))
    assert [r["draft"] for r in chunk.records] == KEPT[2:]
    every = pipe(PROMPTS[:4], mode="refine-all", drafts=3, seed=SEED)
    assert [r["path"] for r in every.records] == ["refined"] * 4 and [r["draft"] for r in every.records] == KEPT


def test_draft_zero_is_the_one_draft_image(pipe):
    one = pipe(PROMPTS[:4], mode="student", seed=SEED, score=True)
    assert "draft" not in one.records[0] and "drafts" not in one.summary["settings"]
    assert [r["student_score"] for r in one.records] == pytest.approx([HAND[i, 0] for i in range(4)])
    assert [g.initial_seed() for g in draft_generators(SEED, range(2), 2)] == [
        generator(0, 0).initial_seed(), generator(0, 1).initial_seed(),
        generator(1, 0).initial_seed(), generator(1, 1).initial_seed()]


def test_best_of_n_calibration_and_routing(pipe):
    calibration = pipe.calibrate(PROMPTS[:4], drafts=3, seed=SEED)
    assert list(calibration.scores) == pytest.approx(sorted(BEST))
    assert calibration.fingerprint["drafts"] == 3
    # by hand: sorted best scores 0.3 0.6 0.7 0.9; the 50th percentile lies halfway between 0.6 and 0.7
    assert calibration.threshold(50) == pytest.approx(0.65)
    assert calibration.threshold(25) == pytest.approx(0.3 + 0.75 * 0.3)
    pipe.draft_calibrations[3] = calibration
    try:
        out = pipe(PROMPTS[:4], percentile=50, drafts=3, seed=SEED, batch_size=4)
        # a budget counts every draft in the student's cost: 6 + half an improvement asks for k = 50
        by_budget = pipe(PROMPTS[:4], budget=6 + out.summary["improve_cost"] / 2, drafts=3, seed=SEED)
    finally:
        del pipe.draft_calibrations[3]
    assert by_budget.summary["settings"]["percentile"] == pytest.approx(50)
    assert [r["path"] for r in by_budget.records] == [r["path"] for r in out.records]
    assert [r["path"] for r in out.records] == ["accepted", "accepted", "refined", "refined"]
    assert [r["tau"] for r in out.records] == [pytest.approx(0.65)] * 4
    assert [r["draft"] for r in out.records] == KEPT
    assert [r["unet_evals"]["teacher"] for r in out.records[2:]] == [out.summary["improve_cost"]] * 2
    for i in (2, 3):  # the teacher refined the kept draft, its generator going on as in a one-draft call
        ref = pipe([PROMPTS[i]], mode="refine-all", generator=[generator(i, KEPT[i])]).images[0]
        assert np.abs(out.images[i].astype(int) - ref.astype(int)).max() <= 1


def test_a_one_draft_calibration_is_refused_for_drafts(pipe):
    pipe.calibration = pipe.calibrate(PROMPTS[:4], seed=SEED)
    try:
        with pytest.raises(CalibrationMismatch, match=r"drafts=3"):
            pipe(PROMPTS[:2], percentile=50, drafts=3)
    finally:
        pipe.calibration = None
    with pytest.raises(ValueError, match=r"best-of-3 calibration"):
        pipe(PROMPTS[:2], percentile=50, drafts=3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "teacher", "drafts": 2}, "they apply to mode='adaptive', 'student' or 'refine-all'"),
    ({"mode": "student", "drafts": 0}, "drafts must be >= 1"),
    ({"mode": "student", "drafts": 1.5}, "drafts must be a whole number"),
    ({"mode": "student", "drafts": 2, "generator": [torch.Generator()] * 2},
     r"2 prompts of 2 drafts \(one per draft, 4, prompt-major\)"),
    ({"mode": "student", "drafts": 2, "cascade": object()}, "do not combine"),
])
def test_bad_drafts_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(PROMPTS[:2], **kwargs)


def test_best_drafts_by_hand():
    assert best_drafts(np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.3]), 3) == [1, 3]
    assert best_drafts(np.array([0.4, 0.2]), 1) == [0, 1]


def test_the_budget_curves_of_drafts_are_what_the_pipeline_gives(tmp_path):
    """``tandem eval budget`` with a best-of-2 calibration: its drafts points, composed from a student run and a
    refine-all run, are what real calls with ``drafts=2`` give on the same prompts and seed (cost and accuracy)."""
    from tandem.eval.experiments import BudgetConfig, budget
    from tandem.eval.judges import ExactJudge, Measures
    from tandem.world.checker import check_batch

    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_guidance_scale=4.5)
    pipe.calibration = pipe.calibrate(PROMPTS, seed=7)
    pipe.draft_calibrations[2] = pipe.calibrate(PROMPTS, seed=7, drafts=2)
    cfg = BudgetConfig(teacher_steps={"dpm": (4,)}, student_steps=(2,), refine_sigmas=(0.6,), refine_steps=3,
                       regenerate={}, ks=(0, 50, 100), references=("dpm4",), mixed_teacher_probs=(),
                       mixed_teacher_first=False, drafts=(2,))
    results = budget(pipe, PROMPTS, tmp_path / "budget", seed=3, cfg=cfg, batch_size=4, log=str,
                     measures=Measures(ExactJudge()))
    points = {p["label"]: p for p in results["points"]}
    assert results["draft_calibrations"] == {"2": calibration_digest(pipe.draft_calibrations[2])}
    alone = points["student2_drafts2"]
    out = pipe(PROMPTS, mode="student", drafts=2, seed=3)
    assert alone["unet_evals_mean"] == 4.0  # two drafts of two steps
    assert alone["accuracy"] == pytest.approx(np.mean([c.satisfied for c in check_batch(out.images, PROMPTS)]))
    teacher = [c.score for c in check_batch(pipe(PROMPTS, mode="teacher", teacher_steps=4, teacher_scheduler="dpm",
                                                 seed=3).images, PROMPTS)]
    for k in (50, 100):
        point = points[f"adaptive refine sigma 0.6 drafts 2 k={k}"]
        out = pipe(PROMPTS, percentile=k, drafts=2, seed=3, strategy="refine", rollback_sigma=0.6, teacher_steps=3,
                   teacher_scheduler="dpm")
        assert point["unet_evals_mean"] == pytest.approx(out.summary["unet_evals_mean"])
        assert point["accuracy"] == pytest.approx(np.mean([c.satisfied for c in check_batch(out.images, PROMPTS)]))
        assert point["share_improved"] == pytest.approx(out.summary["share_improved"])
        # side by side against the 4-step teacher, by hand: a win 1, a tie 1/2, per prompt
        mine = [c.score for c in check_batch(out.images, PROMPTS)]
        wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(mine, teacher)]
        assert point["win_rate"]["dpm4"]["rate"] == pytest.approx(np.mean(wins))
        assert point["win_rate"]["dpm4"]["se"] == pytest.approx(np.std(wins) / np.sqrt(len(wins)))
    assert RouteTable.from_budget(results, pipe, rule="win-rate").config["win_rate_vs"] == "dpm4"
    # a route table from these curves takes routes of two drafts, carrying their cut-off; at a budget alone a run
    # reaches exactly the chosen route's recorded cost and quality
    table = RouteTable.from_budget(results, pipe)
    two = [r for r in table.routes if r.drafts == 2]
    assert {r.strategy for r in two} == {None, "refine"} and all(r.tau is not None for r in two if r.strategy)
    assert table.config["draft_calibrations"] == {"2": calibration_digest(pipe.draft_calibrations[2])}
    pipe.routes = RouteTable(two, table.fingerprint, table.config)
    try:
        for budget_value in (4.0, 8.0, 30.0):
            route = pipe.routes.choose(budget_value)
            out = pipe(PROMPTS, budget=budget_value, seed=3, batch_size=4)
            assert out.summary["settings"]["drafts"] == 2 and out.summary["settings"]["route"]["drafts"] == 2
            assert out.summary["unet_evals_mean"] == pytest.approx(route.cost)
            assert np.mean([c.satisfied for c in check_batch(out.images, PROMPTS)]) == pytest.approx(route.quality)
    finally:
        pipe.routes = None


def test_the_command_line_calibrates_and_generates_with_drafts(tmp_path, capsys, monkeypatch):
    from clitools import assert_user_error, ok, tandem_in_process

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cal = tmp_path / "cal2.json"
    ok(tandem_in_process(capsys, monkeypatch, "calibrate", "--prompts", prompts, "--drafts", 2, "--out", cal))
    assert json.loads(cal.read_text())["fingerprint"]["drafts"] == 2
    out = tmp_path / "gen"
    ok(tandem_in_process(capsys, monkeypatch, "generate", *PROMPTS[:3], "--mode", "adaptive", "--drafts", 2,
                         "--calibration", cal, "--percentile", 50, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["draft"] in (0, 1) and len(r["draft_scores"]) == 2 for r in records] == [True] * 3
    assert json.loads((out / "config.json").read_text())["drafts"] == 2
    # another student's one-draft calibration does not fit two drafts (its preset ships no best-of-N calibration,
    # unlike the world's own): the error says how to make one that does
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", PROMPTS[0], "--mode", "adaptive",
                                        "--student", "cd", "--drafts", 2, "--percentile", 50, "--out", tmp_path / "g2"),
                      "`tandem calibrate --drafts 2`, then --calibration FILE", "drafts")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", PROMPTS[0], "--mode", "teacher",
                                        "--drafts", 2, "--out", tmp_path / "g3"),
                      "--drafts applies to --mode adaptive or student")


def test_the_server_refuses_drafts_without_their_calibration():
    from tandem.serve.requests import RequestError, Tandem, plan_request

    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0)
    with pytest.raises(RequestError, match=r"needs a best-of-2 calibration"):
        plan_request(pipe, Tandem(drafts=2, percentile=50), 1)
    assert plan_request(pipe, Tandem(drafts=2, threshold=0.5), 1).drafts == 2  # a tau given needs none


def test_a_saved_pipeline_comes_back_with_its_draft_calibrations_and_predictor(tmp_path):
    import dataclasses

    from tandem import TandemPipeline
    from tandem.presets import read_preset_file
    from tandem.world.prompts import load_prompts

    pipe = TandemPipeline.from_pretrained("world")
    val = load_prompts("val")[:12]
    pipe.draft_calibrations = {2: pipe.calibrate(val, drafts=2)}  # in place of the world's three
    pipe.predictor = pipe.fit_predictor(val, drafts=2)
    features = pipe.text_features(PROMPTS)
    p = pipe.predictor.p_below(PROMPTS, features, float(pipe.draft_calibrations[2].threshold(50)))
    # a tandem that draws two drafts and pre-routes the upper half of these prompts
    pipe.defaults.update(drafts=2, preroute=float(np.sort(p)[len(p) // 2]), preroute_steps=10)
    pipe.save_pretrained(tmp_path / "saved")
    again = TandemPipeline.from_pretrained(tmp_path / "saved")
    assert np.array_equal(again.draft_calibrations[2].scores, pipe.draft_calibrations[2].scores)
    assert np.array_equal(again.predictor.predict(features), pipe.predictor.predict(features))
    assert again.defaults == pipe.defaults
    want, got = pipe(PROMPTS, seed=3), again(PROMPTS, seed=3)
    assert json.dumps(got.records) == json.dumps(want.records) and all(np.array_equal(a, b) for a, b in zip(got.images, want.images))
    assert {r["pre_routed"] for r in got.records} == {True, False} and all("draft" in r for r in got.records)
    # a preset file's keys are numbers of drafts
    preset = json.loads((tmp_path / "saved" / "tandem_pipeline.json").read_text())
    assert preset["draft_calibrations"] == {"2": "calibration-drafts-2.json"} and preset["predictor"] == "predictor.json"
    (tmp_path / "saved" / "bad.json").write_text(json.dumps({**preset, "draft_calibrations": {"one": preset["calibration"]}}))
    with pytest.raises(ValueError, match="draft_calibrations key 'one' is not a number of drafts"):
        read_preset_file(tmp_path / "saved" / "bad.json")
    (tmp_path / "saved" / "gone.json").write_text(json.dumps({**preset, "predictor": "nowhere.json"}))
    with pytest.raises(ValueError, match="'predictor' names .*nowhere.json, which does not exist"):
        read_preset_file(tmp_path / "saved" / "gone.json")
    assert dataclasses.asdict(read_preset_file(tmp_path / "saved" / "tandem_pipeline.json"))["draft_calibrations"]


def test_draft_calibrations_on_the_command_line_are_checked(tmp_path, capsys, monkeypatch):
    from clitools import assert_user_error, tandem_in_process

    from tandem.presets import world_calibration_path

    one = world_calibration_path()
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "winners", "--draft-calibration", one, "--out",
                                        tmp_path / "w"), "--draft-calibration applies to eval budget and eval routes")
    run = tmp_path / "budget"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"experiment": "budget", "made_by": {"prompts": "val"}}))
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "routes", run, "--draft-calibration", one,
                                        "--out", tmp_path / "r.json"), "is a one-draft calibration")
    assert not (tmp_path / "r.json").exists()


def test_edits_keep_the_best_of_their_drafts():
    """Edit drafts against one-draft edits made one at a time with each draft's generator (the shipped world and
    its edit student): the kept draft is the best-scoring, its image is that edit's, and the teacher edits that
    draft's noised input where even the best scores below tau."""
    from tandem import TandemPipeline
    from tandem.pipeline.drafts import draft_generator

    pipe = TandemPipeline.from_pretrained("world")
    source = pipe(["a red circle", "a blue square"], mode="student", seed=1).images
    prompts = ["a blue circle", "a green square"]

    def one(i, d, mode):
        return pipe.edit(source[i], [prompts[i]], mode=mode, generator=[draft_generator(SEED, i, d)], score=True,
                         accept_threshold=None if mode != "adaptive" else 2.0)

    alone = {(i, d): one(i, d, "student") for i in range(2) for d in range(3)}
    out = pipe.edit(source, prompts, mode="student", drafts=3, seed=SEED)
    for i, rec in enumerate(out.records):
        scores = [alone[i, d].records[0]["student_score"] for d in range(3)]
        assert rec["draft_scores"] == pytest.approx(scores, abs=1e-5)
        assert rec["draft"] == int(np.argmax(scores))
        assert np.abs(out.images[i].astype(int) - alone[i, rec["draft"]].images[0].astype(int)).max() <= 1
    assert out.records[0]["unet_evals"]["student"] == 3 * alone[0, 0].records[0]["unet_evals"]["student"]
    # tau above every score: the teacher edits each kept draft's own noised input
    tandem = pipe.edit(source, prompts, drafts=3, seed=SEED, accept_threshold=2.0)
    for i, rec in enumerate(tandem.records):
        assert rec["path"] == "regenerated" and rec["draft"] == out.records[i]["draft"]
        ref = pipe.edit(source[i], [prompts[i]], mode="teacher", generator=[draft_generator(SEED, i, rec["draft"])])
        assert np.abs(tandem.images[i].astype(int) - ref.images[0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="needs a best-of-3 edit calibration"):
        pipe.edit(source, prompts, drafts=3, seed=SEED, percentile=50)
    calibration = pipe.calibrate_edits(source, prompts, drafts=3, seed=SEED)
    assert calibration.fingerprint["drafts"] == 3
    assert sorted(calibration.scores) == pytest.approx(sorted(max(r["draft_scores"]) for r in out.records), abs=1e-5)
    with pytest.raises(ValueError, match="drafts are the student's"):
        pipe.edit(source, prompts, mode="teacher", drafts=2)


def test_the_command_line_edits_with_drafts(tmp_path, capsys, monkeypatch):
    from clitools import assert_user_error, ok, tandem_in_process

    cal = tmp_path / "edit-cal2.json"
    val = tmp_path / "edits-val-40.jsonl"  # the first 40 of the validation edits: a table of 40 best-of-2 scores
    val.write_text("".join(case.to_json() + "\n" for case in load_edits("val")[:40]))
    ok(tandem_in_process(capsys, monkeypatch, "calibrate", "--edits", val, "--drafts", 2, "--out", cal))
    assert json.loads(cal.read_text())["fingerprint"]["drafts"] == 2
    out = tmp_path / "edits"
    ok(tandem_in_process(capsys, monkeypatch, "edit", "--edits", "test", "--n", 3, "--drafts", 2, "--calibration", cal,
                         "--percentile", 50, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["draft"] in (0, 1) and len(r["draft_scores"]) == 2 for r in records] == [True] * 3
    assert_user_error(tandem_in_process(capsys, monkeypatch, "edit", "--edits", "test", "--n", 1, "--drafts", 2,
                                        "--percentile", 50, "--out", tmp_path / "e2"),
                      "needs a best-of-2 edit calibration: make one with `tandem calibrate --edits val --strength 0.6 "
                      "--drafts 2`, then --calibration FILE")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "edit", "--edits", "test", "--n", 1, "--mode", "teacher",
                                        "--drafts", 2, "--out", tmp_path / "e3"), "--drafts applies to --mode adaptive")
