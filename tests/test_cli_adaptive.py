"""``tandem calibrate``, ``tandem generate --mode adaptive`` and ``tandem world judge`` on the
shipped world (its student, teacher and oracle), run in-process on a handful of prompts."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from clitools import assert_user_error, ok, tandem_in_process
from PIL import Image

from tandem.world.checker import check

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle",
           "an orange triangle to the left of a large green circle", "a large purple circle at the bottom",
           "a yellow square above a small red triangle", "a white circle and a purple square", "a cyan triangle"]


def run(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    return tandem_in_process(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("adaptive")
    (path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def calibration(workdir, capsys, monkeypatch):
    path = workdir / "calib.json"
    if not path.exists():
        ok(run(capsys, monkeypatch, "calibrate", "--prompts", workdir / "prompts.txt", "--out", path))
    return path


def test_calibrate_writes_the_percentile_table_and_refuses_to_overwrite(calibration, workdir, capsys, monkeypatch):
    data = json.loads(calibration.read_text())
    assert data["n"] == len(PROMPTS) and len(data["scores"]) == len(PROMPTS)
    assert data["percentiles"]["50"] == pytest.approx(float(np.percentile(data["scores"], 50)))
    assert data["fingerprint"]["student_steps"] == 4 and data["fingerprint"]["scorer"]["kind"] == "world-oracle"
    before = calibration.read_text()
    assert_user_error(run(capsys, monkeypatch, "calibrate", "--prompts", workdir / "prompts.txt", "--out", calibration),
               "exists", "--overwrite")
    assert calibration.read_text() == before


@pytest.fixture
def adaptive_run(calibration, workdir, capsys, monkeypatch):
    out = workdir / "adaptive"
    if not out.exists():
        ok(run(capsys, monkeypatch, "generate", "--mode", "adaptive", "--prompts", workdir / "prompts.txt",
               "--calibration", calibration, "--percentile", 50, "--teacher-steps", 4, "--out", out))
    return out


def read_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_adaptive_generation_keeps_the_output_contract(adaptive_run, capsys, monkeypatch):
    out = adaptive_run
    records = read_records(out)
    assert [r["prompt"] for r in records] == PROMPTS
    assert sorted(p.name for p in out.glob("[0-9]*.png")) == [f"{i:05d}.png" for i in range(len(PROMPTS))]
    paths = [r["path"] for r in records]
    assert set(paths) <= {"accepted", "refined"} and "accepted" in paths and "refined" in paths
    tau = records[0]["tau"]
    assert all((r["student_score"] >= tau) == (r["path"] == "accepted") for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["percentile"] == 50 and config["accept_threshold"] == tau and config["strategy"] == "refine"
    assert config["summary"]["unet_evals_mean"] == pytest.approx(np.mean([r["unet_evals"]["total"] for r in records]))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]
    # The judge reads the directory back: its accuracy is the checker's on the PNGs.
    ok(run(capsys, monkeypatch, "world", "judge", out))
    judged = json.loads((out / "judge.json").read_text())
    expected = np.mean([check(np.asarray(Image.open(out / f"{i:05d}.png")), p).satisfied
                        for i, p in enumerate(PROMPTS)])
    assert judged["accuracy"] == pytest.approx(expected)
    assert judged["unet_evals_mean"] == pytest.approx(config["summary"]["unet_evals_mean"])
    # Side by side against itself: every prompt a tie, a win rate of exactly one half.
    ok(run(capsys, monkeypatch, "world", "judge", out, "--against", out))
    side = json.loads((out / "judge.json").read_text())["against"]
    assert (side["tie"], side["win_rate"], side["ci"]) == (1.0, 0.5, [0.5, 0.5])


def shape(value):
    """A JSON value's type, with a dict's keys and their types: what two records must share."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__


def test_every_generate_mode_writes_one_record_schema(adaptive_run, workdir, capsys, monkeypatch):
    """The teacher and the student run directly (no oracle) and the adaptive pipeline (oracle, calibration,
    refinement) write records with the same keys, in the same order, of the same types; only the oracle's
    score and tau are null where no oracle ran, and a refined image adds its rollback."""
    from tandem.pipeline import RECORD_FIELDS, RUN_RECORD_FIELDS

    runs = {"adaptive": read_records(adaptive_run)}
    for mode in ("teacher", "student"):
        out = workdir / f"alone-{mode}"
        steps = ["--teacher-steps", 4] if mode == "teacher" else []
        ok(run(capsys, monkeypatch, "generate", *PROMPTS[:2], "--mode", mode, *steps, "--out", out))
        assert "preset_fields" not in json.loads((out / "config.json").read_text())  # the direct path, not a preset's
        runs[mode] = read_records(out)
    assert {r["path"] for r in runs["adaptive"]} == {"accepted", "refined"}
    assert {r["path"] for r in runs["teacher"]} == {"teacher"} and {r["path"] for r in runs["student"]} == {"student"}
    for mode, records in runs.items():
        for r in records:
            refined = ["rollback_sigma", "teacher_steps_run"] if r["path"] == "refined" else []
            assert list(r) == [*RECORD_FIELDS, *refined, *RUN_RECORD_FIELDS], mode
    oracle = {"student_score", "tau"}  # floats where the oracle scored, null where none ran
    refine = {"rollback_sigma", "teacher_steps_run"}  # a refined image's own (checked above)
    want = {k: v for k, v in shape(runs["adaptive"][0]).items() if k not in oracle | refine}
    for mode, records in runs.items():
        for r in records:
            assert {k: v for k, v in shape(r).items() if k in want} == want, mode
            expected = "float" if mode == "adaptive" else "NoneType"
            assert {shape(r[k]) for k in oracle} == {expected}, mode
    assert want["unet_evals"] == {"student": "float", "teacher": "float", "total": "float"}
    assert want["vae"] == {"decode": "int", "encode": "int"} and want["oracle_calls"] == "int"
    # The costs are the runs' own: the shipped student takes 4 steps of one row, the teacher 4 guided steps of two.
    assert [r["unet_evals"] for r in runs["student"]] == [{"student": 4.0, "teacher": 0.0, "total": 4.0}] * 2
    assert [r["unet_evals"] for r in runs["teacher"]] == [{"student": 0.0, "teacher": 8.0, "total": 8.0}] * 2
    assert [r["oracle_calls"] for r in runs["adaptive"]] == [1] * len(PROMPTS)
    assert all(r["oracle_calls"] == 0 and r["vae"] == {"decode": 1, "encode": 0}
               for mode in ("teacher", "student") for r in runs[mode])


def test_a_calibration_for_other_settings_is_refused(calibration, workdir, capsys, monkeypatch):
    assert_user_error(run(capsys, monkeypatch, "generate", "--mode", "adaptive", "--prompts", workdir / "prompts.txt",
                   "--calibration", calibration, "--percentile", 50, "--student-steps", 2,
                   "--out", workdir / "mismatch"), "other settings", "student_steps")


@pytest.mark.parametrize("case", ["percentile with teacher", "two thresholds", "missing calibration",
                                  "teacher alone", "bad sigma"])
def test_adaptive_bad_input_is_one_line_and_exit_2(case, workdir, capsys, monkeypatch):
    prompts = ["--prompts", workdir / "prompts.txt", "--out", workdir / f"bad-{case}"]
    args, needles = {
        "percentile with teacher": (["--mode", "teacher", "--percentile", 50], ["--percentile", "adaptive"]),
        "two thresholds": (["--mode", "adaptive", "--percentile", 50, "--threshold", 0.1],
                           ["one of --percentile, --threshold or --budget"]),
        "missing calibration": (["--mode", "adaptive", "--calibration", workdir / "nope.json"], ["nope.json"]),
        "teacher alone": (["--mode", "adaptive", "--model", "org/model", "--threshold", 0.1], ["--student"]),
        "bad sigma": (["--mode", "refine-all", "--rollback-sigma", 1.5], ["rollback sigma"]),
    }[case]
    assert_user_error(run(capsys, monkeypatch, "generate", *args, *prompts), *needles)


def test_budget_exact_needs_no_calibration_and_keeps_the_budget(workdir, capsys, monkeypatch):
    # pd-2 ships no calibration: --budget alone needs one, --budget-exact does not
    args = ("generate", "--mode", "adaptive", "--student", "pd-2", "--prompts", workdir / "prompts.txt")
    assert_user_error(run(capsys, monkeypatch, *args, "--budget", 8, "--out", workdir / "b-plain"), "calibration")
    assert_user_error(run(capsys, monkeypatch, *args, "--budget-exact", "--out", workdir / "b-none"),
                      "--budget-exact goes with --budget alone")
    assert_user_error(run(capsys, monkeypatch, *args, "--budget-exact", "--budget", 8, "--percentile", 50,
                          "--out", workdir / "b-two"), "--budget-exact")
    out = workdir / "b-exact"
    ok(run(capsys, monkeypatch, *args, "--budget", 8, "--budget-exact", "--teacher-steps", 10, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    costs = [r["unet_evals"]["total"] for r in records]
    # 2 student calls (w-embedding) each; the budget's remaining 8 * (8 - 2) calls pay for as many refinements
    # (guided DPM steps from the rollback) as fit
    improved = [r for r in records if r["path"] != "accepted"]
    assert np.mean(costs) <= 8 and 0 < len(improved) == int(8 * (8 - 2) // np.max(np.array(costs) - 2))
    worst = sorted(records, key=lambda r: r["student_score"])[:len(improved)]
    assert {r["index"] for r in improved} == {r["index"] for r in worst}
    config = json.loads((out / "config.json").read_text())
    assert "budget-exact" in json.dumps(config)
