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


def test_adaptive_generation_keeps_the_output_contract(calibration, workdir, capsys, monkeypatch):
    out = workdir / "adaptive"
    ok(run(capsys, monkeypatch, "generate", "--mode", "adaptive", "--prompts", workdir / "prompts.txt",
           "--calibration", calibration, "--percentile", 50, "--teacher-steps", 4, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
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
