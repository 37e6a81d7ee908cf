"""Hostile inputs of the kinds a second campaign found (issue "Reliability II"): files that are not regular or
never end, oversized images, a precision the device would not compute in, a run directory that is the current
one, an experiment's cache outside --out. Each is refused with exit status 2 and one stderr line naming the
problem, and every byte of the workspace stays as it was; or, for what is accepted, the user is told."""

from __future__ import annotations

import json
import os

import pytest
from clitools import assert_refused_changing_nothing, assert_user_error, ok, snapshot, tandem_in_process
from PIL import Image

A = "a red circle"


@pytest.fixture
def run(capsys, monkeypatch):
    return lambda *args: tandem_in_process(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    ws = tmp_path_factory.mktemp("hostile")
    os.mkfifo(ws / "fifo")  # opening it for reading would wait forever for a writer
    (ws / "a-dir").mkdir()
    Image.new("1", (5000, 5000)).save(ws / "huge.png")  # 25 M pixels, a few KB on disk
    Image.new("RGB", (64, 48), (255, 0, 0)).save(ws / "small.png")
    (ws / "prompts.txt").write_text(A + "\n")
    return ws


# (arguments, words the error line must contain); "WS" stands for the workspace
CASES = {
    "prompts /dev/zero": (["generate", "--prompts", "/dev/zero", "--out", "WS/new"], ["/dev/zero", "not a regular"]),
    "prompts a fifo": (["generate", "--prompts", "WS/fifo", "--out", "WS/new"], ["fifo", "not a regular"]),
    "prompts a directory": (["world", "render", "--prompts", "WS/a-dir", "--out", "WS/new"], ["a-dir", "regular"]),
    "calibration /dev/zero": (["generate", A, "--mode", "adaptive", "--calibration", "/dev/zero", "--out", "WS/new"],
                              ["/dev/zero", "regular"]),
    "calibration a fifo": (["generate", A, "--mode", "adaptive", "--calibration", "WS/fifo", "--out", "WS/new"],
                           ["fifo", "regular"]),
    "calibrate prompts /dev/zero": (["calibrate", "--prompts", "/dev/zero", "--out", "WS/c.json"], ["/dev/zero"]),
    "edits /dev/zero": (["edit", "--edits", "/dev/zero", "--out", "WS/new"], ["/dev/zero"]),
    "image over the pixel limit": (["edit", "--image", "WS/huge.png", "--prompt", A, "--out", "WS/new"],
                                   ["huge.png", "5000x5000", "limit"]),
    "image a directory": (["edit", "--image", "WS/a-dir", "--prompt", A, "--out", "WS/new"], ["a-dir", "regular"]),
    "distill fp16 on the CPU": (["distill", "knowledge", "--mixed-precision", "fp16", "--max-steps", "1",
                                 "--out", "WS/new"], ["fp16", "GPU", "--mixed-precision"]),
    "lr stages not adding up": (["distill", "knowledge", "--lr-stages", "5,5", "--max-steps", "7", "--out", "WS/new"],
                                ["--lr-stages", "10", "7"]),
    "lr stages with a warm-up": (["distill", "knowledge", "--lr-stages", "5,5", "--warmup-steps", "3",
                                  "--out", "WS/new"], ["--lr-stages", "--warmup-steps"]),
    "lr stages malformed": (["distill", "knowledge", "--lr-stages", "5:sawtooth", "--out", "WS/new"],
                            ["stage 1", "sawtooth"]),
    "snapshots of progressive": (["distill", "progressive", "--snapshot-every", "1", "--max-steps", "2",
                                  "--out", "WS/new"], ["progressive", "snapshot"]),
    "snapshots every 0 steps": (["distill", "knowledge", "--snapshot-every", "0", "--out", "WS/new"],
                                ["snapshot_every"]),
    # the second release's ADD and DDIL options
    "add hinge": (["distill", "adversarial", "--hinge", "per-batch", "--out", "WS/new"], ["hinge", "per-batch"]),
    "add augment": (["distill", "adversarial", "--augment", "color,blur", "--out", "WS/new"], ["augment", "blur"]),
    "add schedule": (["distill", "adversarial", "--student-schedule", "cosine", "--out", "WS/new"],
                     ["student_schedule", "cosine"]),
    "add prediction on the teacher's schedule": (["distill", "adversarial", "--prediction-type", "sample",
                                                  "--out", "WS/new"], ["prediction_type", "zero-snr"]),
    "add real images": (["distill", "adversarial", "--real-images", "renders", "--out", "WS/new"],
                        ["real_images", "renders"]),
    "ddil replay without a buffer": (["distill", "progressive", "--ddil", "frwd=0.85,student=0.15,phase2=10",
                                      "--out", "WS/new"], ["replay", "buffer"]),
    "reflect static scope": (["distill", "consistency", "--reflect", "static:sideways", "--out", "WS/new"],
                             ["--reflect", "static:sideways"]),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(case, hostile, run):
    assert_refused_changing_nothing(run, hostile, *CASES[case])


def test_a_control_image_of_another_size_is_used_and_the_user_is_told(hostile, run, tmp_path):
    result = run("generate", A, "--control", "mask", "--mode", "student", "--control-image",
                 hostile / "small.png", "--out", tmp_path / "out")
    ok(result)
    assert "small.png is 64x48; it is resized to 32x32" in result.stderr


def test_eval_students_writes_its_caches_under_out_whatever_the_student_is_called(tmp_path):
    """A student named by an absolute path (or 'teacher', the teacher's own cache) gets a cache of its own name
    under --out; plain names keep theirs."""
    from tandem.eval.students import cache_name

    names = {cache_name(n) for n in ("/abs/dir", "../up", "teacher", "pd", "cd-ddil", "runs/kd/student")}
    assert {"pd", "cd-ddil"} <= names and len(names) == 6
    for name in names:
        assert "/" not in name and name not in ("teacher", "..", ".")
        assert (tmp_path / "cache" / name).resolve().parent == (tmp_path / "cache").resolve()


def test_a_student_path_gets_its_cache_under_out(tmp_path, capsys, monkeypatch):
    from tandem.models import world_dir

    student = world_dir() / "student"  # the shipped cd, named by its path
    out = tmp_path / "students"
    before = snapshot(student)
    ok(tandem_in_process(capsys, monkeypatch, "eval", "students", "--student", student, "--calibration",
                         f"{student}={world_dir() / 'calibration-cd.json'}", "--prompts", "val", "--n", 2,
                         "--choose-on", "none", "--batch-size", 2, "--out", out))
    assert snapshot(student) == before  # nothing written beside the student
    caches = sorted(p.name for p in (out / "cache").iterdir())
    assert any(name.startswith("student-") for name in caches), caches
    assert json.loads((out / "results.json").read_text())["experiment"] == "students"


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A read-only filesystem (a tmpfs mounted ro; root only): where permission bits would not stop root."""
    import subprocess

    where = tmp_path_factory.mktemp("ro")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], check=False,
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=False)


READ_ONLY_CASES = {
    "generate": ["generate", A, "--out", "RO/run"],
    "edit": ["edit", "--edits", "val", "--n", "1", "--out", "RO/run"],
    "calibrate": ["calibrate", "--prompts", "PROMPTS", "--out", "RO/c.json"],
    "world render": ["world", "render", "--prompts", "PROMPTS", "--out", "RO/run"],
    "world prompts": ["world", "prompts", "--split", "val", "--n", "2", "--out", "RO/p.txt"],
    "world oracle-data": ["world", "oracle-data", "--train", "1", "--eval", "0", "--cal", "0", "--out", "RO/data"],
    "eval": ["eval", "threshold", "--n", "2", "--out", "RO/eval"],
    "preset save": ["preset", "save", "--model", "world", "--out", "RO/preset.json"],
    "distill": ["distill", "knowledge", "--max-steps", "1", "--out", "RO/kd"],
    "world train": ["world", "train", "vae", "--max-steps", "1", "--out", "RO/vae"],
}


@pytest.mark.parametrize("case", READ_ONLY_CASES)
def test_a_read_only_out_is_refused_before_work_starts(case, read_only, hostile, run):
    args = [a.replace("PROMPTS", str(hostile / "prompts.txt")).replace("RO/", f"{read_only}/")
            for a in READ_ONLY_CASES[case]]
    assert_user_error(run(*args), "not writable", "Read-only file system")
