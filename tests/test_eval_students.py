"""`tandem eval students` (which student makes the best tandem at equal cost) and shipping a named
student's calibration: the choice on one prompt list and report on another by hand, the shared teacher
runs against a real adaptive run of each student, and the command's errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clitools import assert_user_error, ok, tandem_in_process

from tandem.calibration import Calibration
from tandem.eval.students import best_within, compare
from tandem.models import world_dir
from tandem.world.checker import check_batch
from tandem.world.prompts import load_prompts


def _point(config: str, accuracy: float, cost: float, share: float = 0.5) -> dict:
    return {"config": config, "accuracy": accuracy, "mean_score": accuracy, "unet_evals_mean": cost,
            "share_improved": 0.0 if config == "student" else share}


def test_each_cost_level_chooses_on_one_list_and_reports_the_other():
    choice = {"a": [_point("student", 0.5, 4), _point("x k=10", 0.6, 9), _point("x k=50", 0.7, 20)],
              "b": [_point("student", 0.55, 4), _point("y k=10", 0.58, 7), _point("y k=50", 0.65, 19)]}
    # on the reported prompts the choices come out differently: what is reported is the chosen config's number
    reported = {"a": [_point("student", 0.52, 4), _point("x k=10", 0.57, 9.5), _point("x k=50", 0.66, 21)],
                "b": [_point("student", 0.50, 4), _point("y k=10", 0.62, 7.2), _point("y k=50", 0.60, 18)]}
    teacher = {"config": "teacher dpm25", "accuracy": 0.61, "unet_evals_mean": 50}
    result = compare(reported, choice, (4, 8, 10, 30, 3), teacher)
    levels = {level["cost"]: level for level in result["levels"]}
    assert 3 not in levels  # nothing costs that little
    assert {n: s["config"] for n, s in levels[4]["students"].items()} == {"a": "student", "b": "student"}
    assert levels[4]["best"] == ["a"]  # 0.52 against 0.50 as reported, although b won on the choice list
    assert {n: s["config"] for n, s in levels[8]["students"].items()} == {"a": "student", "b": "y k=10"}
    assert levels[10]["students"]["a"]["config"] == "x k=10" and levels[10]["students"]["a"]["accuracy"] == 0.57
    assert levels[10]["students"]["a"]["choice_quality"] == 0.6 and levels[10]["best"] == ["b"]
    assert levels[30]["students"]["b"]["config"] == "y k=50" and levels[30]["best"] == ["a"]
    # the reference is reached by an adaptive point of the reported curve, never by the student alone
    assert result["reaching_reference"]["a"]["point"]["config"] == "x k=50"
    assert result["reaching_reference"]["a"]["factor"] == pytest.approx(50 / 21)
    assert result["reaching_reference"]["b"]["point"]["config"] == "y k=10"
    tie = compare({"a": [_point("student", 0.5, 4)], "b": [_point("student", 0.5, 4)]},
                  {"a": [_point("student", 0.5, 4)], "b": [_point("student", 0.5, 4)]}, (4,), teacher)
    assert tie["levels"][0]["best"] == ["a", "b"] and tie["reaching_reference"]["a"]["point"] is None
    assert best_within([_point("s", 0.5, 4), _point("t", 0.5, 3)], 4)["config"] == "t"  # the cheaper of a tie


@pytest.fixture(scope="module")
def small_lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    (root / "choice.txt").write_text("\n".join(load_prompts("val")[:5]) + "\n")
    (root / "report.txt").write_text("\n".join(load_prompts("test")[:6]) + "\n")
    return root / "choice.txt", root / "report.txt"


@pytest.mark.slow  # 30 s: a whole experiment; the default suite keeps its choice rule and refusals
def test_eval_students_shares_the_teacher_runs_and_matches_real_adaptive_runs(small_lists, tmp_path, capsys,
                                                                               monkeypatch):
    from tandem.pipeline import load_preset
    from tandem.presets import compose

    choice, report = small_lists
    out = tmp_path / "students"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ok(tandem_in_process(capsys, monkeypatch, "eval", "students", "--student", "pd", "--student", "dmd2",
                             "--prompts", report, "--choose-on", choice, "--batch-size", 6, "--out", out))
        results = json.loads((out / "results.json").read_text())
        assert results["made_by"]["students"] == ["pd", "dmd2"] and results["n_choice_prompts"] == 5
        # the teacher drew once per prompt list, each student only its own runs
        assert sorted(p.name for p in (out / "cache" / "teacher").glob("*.npz")) == [
            "dpm10.npz", "dpm15.npz", "dpm25.npz", "dpm5.npz"]
        assert not list((out / "cache" / "dmd2").glob("dpm*.npz")) and (out / "cache-choice" / "teacher").is_dir()
        assert (out / "students.png").stat().st_size > 0 and "| cost ≤ | pd | dmd2 |" in (out / "report.md").read_text()
        prompts = report.read_text().splitlines()
        for name, strategy, label in (("dmd2", "regenerate", "regenerate dpm25 k=50"),
                                      ("pd", "refine", "refine sigma 0.7 k=50")):
            pipe = load_preset(compose("world", student=name))
            real = pipe(prompts, seed=0, percentile=50, strategy=strategy, teacher_steps=25 if strategy ==
                        "regenerate" else 10, teacher_scheduler="dpm", rollback_sigma=0.7, batch_size=6)
            point = next(p for p in results["points"][name] if p["config"] == label)
            satisfied = [r.satisfied for r in check_batch(real.images, prompts)]
            assert point["accuracy"] == pytest.approx(sum(satisfied) / len(prompts))
            assert point["unet_evals_mean"] == pytest.approx(
                sum(r["unet_evals"]["total"] for r in real.records) / len(prompts))
            assert point["share_improved"] == pytest.approx(
                sum(r["path"] != "accepted" for r in real.records) / len(prompts))
        for level in results["levels"]:  # the configuration chosen at each level is affordable where it was chosen
            assert all(s["config"] in {p["config"] for p in results["points"][n]} for n, s in level["students"].items())
    finally:
        torch.set_num_threads(threads)


def test_eval_students_refuses_what_it_cannot_compare(small_lists, tmp_path, capsys, monkeypatch):
    choice, _ = small_lists
    run = lambda *args: tandem_in_process(capsys, monkeypatch, "eval", "students", "--out", tmp_path / "x", *args)
    assert_user_error(run("--student", "pd-2"), "pd-2 has no calibration", "--calibration pd-2=")
    assert_user_error(run("--student", "pd", "--calibration", "cd=" + str(choice)), "not among the --student")
    assert_user_error(run("--student", "pd", "--calibration", "pd"), "NAME=FILE")
    assert_user_error(run("--student", "pd", "--student", "pd"), "each student once")
    assert_user_error(run("--prompts", "val"), "--choose-on val is the reported list itself")
    assert not (tmp_path / "x").exists()


def test_a_named_student_ships_only_its_own_calibration(tmp_path, capsys, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(world_dir(), world)
    cal = tmp_path / "cal.json"
    ok(tandem_in_process(capsys, monkeypatch, "calibrate", "--model", world, "--student", "pd-1",
                         "--scorer", f"world-oracle:{world / 'oracle'}", "--prompts", _few_prompts(tmp_path),
                         "--out", cal))
    before = (world / "tandem.json").read_text()
    # another student's table, and a student that already ships one, are refused and nothing changes
    assert_user_error(tandem_in_process(capsys, monkeypatch, "world", "add-calibration", "--world", world,
                                        "--student", "pd-2", "--calibration", cal), "pd-2", "student_steps")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "world", "add-calibration", "--world", world,
                                        "--student", "pd", "--calibration", cal), "already ships")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "world", "add-calibration", "--world", world,
                                        "--student", "nope", "--calibration", cal), "no student named 'nope'")
    assert (world / "tandem.json").read_text() == before and not (world / "calibration-pd-2.json").exists()
    ok(tandem_in_process(capsys, monkeypatch, "world", "add-calibration", "--world", world, "--student", "pd-1",
                         "--calibration", cal))
    assert json.loads((world / "tandem.json").read_text())["students"]["pd-1"]["calibration"] == "calibration-pd-1.json"
    assert Calibration.load(world / "calibration-pd-1.json").scores.tolist() == Calibration.load(cal).scores.tolist()
    assert_user_error(tandem_in_process(capsys, monkeypatch, "world", "add-calibration", "--world", world,
                                        "--student", "pd-1", "--calibration", cal), "--overwrite")
    from tandem.presets import compose

    assert compose(str(world), student="pd-1").calibration == str(world / "calibration-pd-1.json")


def _few_prompts(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("\n".join(load_prompts("val")[:8]) + "\n")
    return path
