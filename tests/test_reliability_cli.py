"""Bad input and interrupted runs, at the command line: every refusal is exit status 2 with one
stderr line naming the problem, and leaves every existing file as it was; a run directory is
complete or visibly unfinished, never half of one.

The table-driven test runs each case in-process against one workspace holding a finished run, a
calibration, a user's own files and broken inputs, and compares every byte of the workspace before
and after.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_user_error, ok, snapshot, tandem, tandem_in_process
from PIL import Image

from tandem.outputs import INCOMPLETE, RUN_RECORD, OutputDir, atomic_write_text

A = "a red circle"


@pytest.fixture
def run(capsys, monkeypatch):
    return lambda *args: tandem_in_process(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_world):
    """A finished `tandem generate` run, a user's files, broken runs and inputs."""
    ws = tmp_path_factory.mktemp("workspace")
    ok(tandem("generate", A, "--model", tiny_world, "--teacher-steps", 1, "--out", ws / "prev"))
    (ws / "mine").mkdir()
    (ws / "mine" / "train_config.json").write_text('{"my": "own notes"}\n')
    (ws / "mine" / "log.jsonl").write_text('{"step": 1}\n')
    (ws / "calib.json").write_text('{"user": "calibration"}\n')
    (ws / "prompts.txt").write_text(A + "\n")
    os.symlink(ws / "nowhere", ws / "dangling")
    (ws / "a-file").write_text("a file, not a directory\n")
    truncated = ws / "truncated-run"
    shutil.copytree(ws / "prev", truncated)
    png = (truncated / "00000.png").read_bytes()
    (truncated / "00000.png").write_bytes(png[: len(png) // 2])
    (ws / "truncated.png").write_bytes(png[: len(png) // 2])
    corrupt = ws / "corrupt-records"
    shutil.copytree(ws / "prev", corrupt)
    (corrupt / "records.jsonl").write_text('{"index": 0, "prompt": "a red circle"\n')
    unfinished = ws / "unfinished"
    shutil.copytree(ws / "prev", unfinished)
    (unfinished / INCOMPLETE).write_text("killed\n")
    (ws / "binary-calibration.json").write_bytes(bytes(range(256)))
    (ws / "no-scores.json").write_text('{"fingerprint": {}, "k": 50}\n')
    (ws / "null-fingerprint.json").write_text('{"fingerprint": null, "scores": [0.1, 0.2]}\n')
    return ws


# (arguments, words the error line must contain); "WS" stands for the workspace, "TINY" for the tiny world
CASES = {
    # numbers: NaN and infinity are refused before any model is loaded
    "guidance nan": (["generate", A, "--guidance-scale", "nan", "--out", "WS/prev", "--overwrite"],
                     ["--guidance-scale", "finite", "nan"]),
    "student guidance inf": (["generate", A, "--mode", "student", "--guidance-scale", "inf", "--out", "WS/new"],
                             ["--guidance-scale", "finite", "inf"]),
    "threshold nan": (["generate", A, "--mode", "adaptive", "--threshold", "nan", "--out", "WS/new"],
                      ["--threshold", "finite"]),
    "budget nan": (["generate", A, "--mode", "adaptive", "--budget", "nan", "--out", "WS/new"], ["--budget", "finite"]),
    "teacher guidance inf": (["generate", A, "--mode", "adaptive", "--teacher-guidance-scale", "inf",
                              "--out", "WS/new"], ["--teacher-guidance-scale", "finite"]),
    "rollback nan": (["generate", A, "--mode", "refine-all", "--rollback-sigma", "nan", "--out", "WS/new"],
                     ["--rollback-sigma", "finite"]),
    "calibrate guidance nan": (["calibrate", "--guidance-scale", "nan", "--out", "WS/new.json"],
                               ["--guidance-scale", "finite"]),
    "edit strength inf": (["edit", "--edits", "val", "--n", "1", "--strength", "inf", "--out", "WS/new"],
                          ["--strength", "finite"]),
    "distill lr nan": (["distill", "consistency", "--teacher", "TINY", "--lr", "nan", "--out", "WS/new"],
                       ["--lr", "finite"]),
    "distill w-range inf": (["distill", "consistency", "--teacher", "TINY", "--w-range", "1", "inf",
                             "--out", "WS/new"], ["--w-range", "finite"]),
    "train lr inf": (["world", "train", "teacher", "--lr", "inf", "--out", "WS/new"], ["--lr", "finite"]),
    "oracle channels not numbers": (["world", "train", "oracle", "--channels", "24,x", "--out", "WS/new"],
                                    ["--channels", "24,x"]),
    "oracle width not a multiple of heads": (["world", "train", "oracle", "--width", "30", "--out", "WS/new"],
                                             ["width 30", "heads"]),
    "oracle channels on the teacher": (["world", "train", "teacher", "--channels", "24,48", "--out", "WS/new"],
                                       ["--channels", "oracle only"]),
    "world add-student guidance nan": (["world", "add-student", "--student", "WS/mine", "--steps", "4",
                                        "--guidance-scale", "nan", "--world", "WS/new"], ["--guidance-scale"]),
    # other numbers
    "seed -1": (["generate", A, "--seed", "-1", "--out", "WS/new"], ["--seed", "-1"]),
    "eval seed -1": (["eval", "threshold", "--seed", "-1", "--out", "WS/new"], ["--seed", "-1"]),
    "percentile 150 over a finished run": (["generate", A, "--mode", "adaptive", "--percentile", "150",
                                            "--overwrite", "--out", "WS/prev"], ["percentile", "150"]),
    "teacher steps 1001": (["generate", A, "--model", "TINY", "--teacher-steps", "1001", "--out", "WS/new"],
                           ["1001"]),
    # devices
    "device cuda": (["generate", A, "--device", "cuda", "--out", "WS/new"], ["--device cuda", "cpu"]),
    "device bogus": (["generate", A, "--device", "bogus", "--out", "WS/new"], ["--device", "bogus"]),
    "calibrate device bogus": (["calibrate", "--device", "bogus", "--out", "WS/new.json"], ["--device", "bogus"]),
    "eval device cuda:7": (["eval", "threshold", "--device", "cuda:7", "--out", "WS/new"], ["--device cuda:7"]),
    # where results go
    "out a dangling symlink": (["generate", A, "--model", "TINY", "--out", "WS/dangling"], ["symlink", "nowhere"]),
    "out under a file": (["generate", A, "--model", "TINY", "--out", "WS/a-file/run"], ["not writable", "a-file"]),
    "out a file": (["generate", A, "--model", "TINY", "--out", "WS/a-file"], ["not a directory"]),
    "out not empty": (["generate", A, "--model", "TINY", "--out", "WS/prev"], ["not empty", "--overwrite"]),
    "edit out not empty": (["edit", "--edits", "val", "--n", "1", "--out", "WS/mine"], ["not empty"]),
    "render out not empty": (["world", "render", "--prompts", "WS/prompts.txt", "--out", "WS/prev"], ["not empty"]),
    "calibrate out exists": (["calibrate", "--out", "WS/calib.json"], ["calib.json", "exists"]),
    "calibrate out under a file": (["calibrate", "--out", "WS/a-file/c.json"], ["not writable", "a-file"]),
    "calibrate out a dangling symlink": (["calibrate", "--out", "WS/dangling"], ["symlink"]),
    "eval out under a file": (["eval", "threshold", "--out", "WS/a-file/e"], ["not writable", "a-file"]),
    "eval out not empty": (["eval", "threshold", "--out", "WS/mine"], ["not empty", "--resume"]),
    "report out exists": (["eval", "report", "WS/prev", "--out", "WS/calib.json"], ["exists"]),
    "prompts out exists": (["world", "prompts", "--split", "val", "--n", "3", "--out", "WS/calib.json"], ["exists"]),
    "distill into user files": (["distill", "consistency", "--teacher", "TINY", "--max-steps", "1",
                                 "--out", "WS/mine"], ["WS/mine"]),
    # broken inputs
    "judge truncated png": (["world", "judge", "WS/truncated-run"], ["00000.png", "truncated"]),
    "judge corrupt records": (["world", "judge", "WS/corrupt-records"], ["records.jsonl", "line 1"]),
    "judge unfinished run": (["world", "judge", "WS/unfinished"], ["unfinished"]),
    "judge not a directory": (["world", "judge", "WS/a-file"], ["not a directory"]),
    "edit truncated png": (["edit", "--image", "WS/truncated.png", "--prompt", A, "--out", "WS/new"],
                           ["truncated.png", "cannot read"]),
    "binary calibration": (["generate", A, "--mode", "adaptive", "--calibration", "WS/binary-calibration.json",
                            "--out", "WS/new"], ["binary-calibration.json"]),
    "calibration without scores": (["generate", A, "--mode", "adaptive", "--calibration", "WS/no-scores.json",
                                    "--out", "WS/new"], ["no-scores.json", "scores"]),
    "calibration null fingerprint": (["generate", A, "--mode", "adaptive", "--calibration",
                                      "WS/null-fingerprint.json", "--out", "WS/new"],
                                     ["null-fingerprint.json", "fingerprint"]),
    "long prompt": (["generate", "a purple hexagon " * 6000, "--out", "WS/new"], ["grammar"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, workspace, tiny_world, run):
    args, needles = CASES[case]
    fill = lambda a: a.replace("WS", str(workspace)).replace("TINY", str(tiny_world))
    before = snapshot(workspace)
    result = run(*map(fill, args))
    assert_user_error(result, *map(fill, needles))
    assert len(result.stderr) < 400, result.stderr  # a 100 KB prompt is not echoed whole
    assert snapshot(workspace) == before


def test_overwrite_replaces_the_whole_earlier_run(workspace, tiny_world, run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(workspace / "prev", out)
    for stale in ("judge.json", "grid.png", "00000_input.png", "00001.png"):
        (out / stale).write_text("from the earlier run\n")
    ok(run("generate", "a blue square", "--model", tiny_world, "--teacher-steps", 1, "--overwrite", "--out", out))
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD, "00000.png", "config.json", "records.jsonl"]
    assert json.loads((out / "records.jsonl").read_text())["prompt"] == "a blue square"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or replaced run left beside it


def _user_dir(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "notes.txt").write_text("x\n")
    return root / "d"


# every command that writes a run directory, with --overwrite into a directory of the user's own
OVERWRITE_USER_DIR = {
    "generate": ["generate", A, "--mode", "teacher", "--model", "TINY"],
    "generate adaptive": ["generate", A, "--mode", "adaptive"],
    "edit": ["edit", "--edits", "val", "--n", "1", "--mode", "student"],
    "world render": ["world", "render", "--prompts", "PROMPTS"],
    "world evaluate": ["world", "evaluate", "--model", "TINY", "--prompts", "PROMPTS"],
}


@pytest.mark.parametrize("case", OVERWRITE_USER_DIR)
def test_overwrite_never_replaces_a_directory_that_is_not_a_tandem_run(case, tiny_world, run, tmp_path):
    user = _user_dir(tmp_path)
    (tmp_path / "prompts.txt").write_text(A + "\n")
    before = snapshot(tmp_path)
    args = [str(a).replace("TINY", str(tiny_world)).replace("PROMPTS", str(tmp_path / "prompts.txt"))
            for a in OVERWRITE_USER_DIR[case]]
    assert_user_error(run(*args, "--out", user, "--overwrite"), str(user), "not a finished tandem run")
    assert snapshot(tmp_path) == before


def test_the_current_directory_is_never_a_run_directory(tiny_world, run, tmp_path, monkeypatch):
    ok(run("generate", A, "--teacher-steps", 1, "--model", tiny_world, "--out", tmp_path / "done"))
    monkeypatch.chdir(tmp_path / "done")  # even a finished run is not replaced while it is where the user stands
    before = snapshot(tmp_path)
    for out in ("", ".", ".."):
        for overwrite in ([], ["--overwrite"]):
            assert_user_error(run("generate", A, "--teacher-steps", 1, "--model", tiny_world, "--out", out,
                                  *overwrite), "--out", "current directory")
            assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
    assert_user_error(run("generate", A, "--teacher-steps", 1, "--model", tiny_world, "--out", ""),
                      "current directory")  # not even an empty one: the run would be renamed onto it
    assert not any((tmp_path / "empty").iterdir())


def test_overwrite_refuses_a_run_whose_inputs_lie_inside_it(tiny_world, run, tmp_path):
    out = tmp_path / "run"
    ok(run("generate", A, "--teacher-steps", 1, "--model", tiny_world, "--out", out))
    (out / "prompts.txt").write_text(A + "\n")
    before = snapshot(tmp_path)
    result = run("generate", "--prompts", out / "prompts.txt", "--teacher-steps", 1, "--model", tiny_world,
                 "--out", out, "--overwrite")
    assert_user_error(result, "--prompts", "lies inside --out")
    result = run("world", "render", "--prompts", out / "prompts.txt", "--out", out, "--overwrite")
    assert_user_error(result, "--prompts", "lies inside --out")
    assert snapshot(tmp_path) == before


def test_the_swap_never_touches_what_lies_beside_the_run(tiny_world, run, tmp_path):
    """Directories and files by the names earlier releases used for the staging and the replaced run are the
    user's: they stay as they were, and the run still lands."""
    out = tmp_path / "run"
    ok(run("generate", A, "--teacher-steps", 1, "--model", tiny_world, "--out", out))
    (tmp_path / "run.replaced").mkdir()
    (tmp_path / "run.replaced" / "mine.txt").write_text("user data\n")
    (tmp_path / "run.incomplete").write_text("a file of the user's\n")
    beside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run/") and k != "run"}
    ok(run("generate", "a blue square", "--teacher-steps", 1, "--model", tiny_world, "--out", out, "--overwrite"))
    assert json.loads((out / "records.jsonl").read_text())["prompt"] == "a blue square"
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run/") and k != "run"} == beside


def test_output_dir_is_complete_or_marked_unfinished(tmp_path):
    final = tmp_path / "run"
    output = OutputDir(final, info={"command": "test"})
    (staging,) = tmp_path.glob("run.incomplete-*")
    assert not final.exists() and (staging / INCOMPLETE).is_file()
    output.save_image(0, np.zeros((4, 4, 3), np.uint8))
    # a crash here leaves no `run/`; this process is gone in a killed run: pretend so, and the next run clears it
    marker = (staging / INCOMPLETE).read_text()
    (staging / INCOMPLETE).write_text(marker.replace(f'"pid": {os.getpid()}', f'"pid": {_dead_pid()}'))
    with OutputDir(final) as again:
        again.write_records([{"index": 0}])
    assert sorted(p.name for p in final.iterdir()) == [RUN_RECORD, "records.jsonl"]
    assert json.loads((final / RUN_RECORD).read_text())["files"] == ["records.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # an exception discards the new run and keeps the old one
    with pytest.raises(RuntimeError), OutputDir(final, overwrite=True) as failing:
        failing.write_records([{"index": 1}])
        raise RuntimeError("boom")
    assert json.loads((final / "records.jsonl").read_text()) == {"index": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert oct(final.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # a plain directory, not mkdtemp's 0700


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_runs_into_one_directory_at_once_keep_each_others_work(tmp_path):
    """The second run leaves the first's live staging alone; the first to finish lands; the second, without
    --overwrite, keeps its finished result in its staging directory and says where."""
    final = tmp_path / "run"
    first, second = OutputDir(final), OutputDir(final)
    assert first.staging != second.staging and first.staging.is_dir() and second.staging.is_dir()
    second.write_records([{"run": 2}])
    first.write_records([{"run": 1}])
    first.commit()
    with pytest.raises(FileExistsError, match="filled by another run"):
        second.commit()
    assert json.loads((final / "records.jsonl").read_text()) == {"run": 1}
    assert json.loads((second.staging / "records.jsonl").read_text()) == {"run": 2}


def test_output_dir_leaves_a_foreign_directory_by_the_old_staging_name_alone(tmp_path):
    (tmp_path / "run.incomplete").mkdir()
    (tmp_path / "run.incomplete" / "mine.txt").write_text("user data\n")
    with OutputDir(tmp_path / "run") as output:
        output.write_records([])
    assert (tmp_path / "run.incomplete" / "mine.txt").read_text() == "user data\n"


def test_records_refuse_nan(tmp_path):
    with OutputDir(tmp_path / "run") as output, pytest.raises(ValueError):
        output.write_records([{"score": float("nan")}])


def test_atomic_write_never_follows_a_link_beside_the_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "config.json"
    for name in ("config.json.tmp", ".config.json.tmp"):
        os.symlink(victim, tmp_path / name)
    atomic_write_text(target, "new\n")
    assert victim.read_text() == "precious\n" and target.read_text() == "new\n"
    assert not target.is_symlink()
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_edit_reads_16_bit_greyscale_at_full_range(run, tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    out = tmp_path / "out"
    ok(run("edit", "--image", tmp_path / "grey16.png", "--prompt", A, "--mode", "student", "--out", out))
    got = np.asarray(Image.open(out / "00000_input.png"))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got, np.stack([expected] * 3, axis=-1))
    assert len(np.unique(got)) > 200  # not clipped to black and white


# ---------------------------------------------------------------------------------------------
# Crash tests: each command killed with SIGKILL at random points leaves the previous state or a
# resumable one, never a directory or file that reads as a finished result.

def _killed_at(args: list, seconds: float) -> bool:
    """Run ``tandem ARGS`` and SIGKILL it after ``seconds``; True if it was killed before finishing."""
    import signal
    import subprocess
    import sys

    from clitools import ENV

    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _duration(args: list) -> float:
    import time

    t0 = time.perf_counter()
    ok(tandem(*args))
    return time.perf_counter() - t0


def _run_files(out: Path) -> dict[str, bytes]:
    """What a finished image run says: its images and records (config.json also holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".png" or p.name == "records.jsonl"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "edit"])
def test_a_killed_image_run_leaves_the_earlier_run_or_the_finished_one(command, tmp_path):
    rng = np.random.default_rng(18)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na small blue square at the top left\na green triangle\n"
                       "a white circle and a purple square\na cyan triangle in the center\n")
    base = (["generate", "--prompts", prompts, "--mode", "adaptive"] if command == "generate"
            else ["edit", "--edits", "val", "--n", "5"])
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    _duration([*base, "--seed", 0, "--out", earlier])
    seconds = _duration([*base, "--seed", 1, "--out", later])
    for trial in range(4):
        out = tmp_path / f"trial{trial}"
        shutil.copytree(earlier, out)
        killed = _killed_at([*base, "--seed", 1, "--overwrite", "--out", out], rng.uniform(0.5, seconds))
        for staging in tmp_path.glob(f"trial{trial}.incomplete-*"):
            assert killed and (staging / INCOMPLETE).is_file()
        state = _run_files(out)
        assert state in (_run_files(earlier), _run_files(later)), f"trial {trial}: a mixed directory"
        ok(tandem(*base, "--seed", 1, "--overwrite", "--out", out))  # the next run clears what was left
        assert _run_files(out) == _run_files(later) and not list(tmp_path.glob(f"trial{trial}.incomplete*"))


@pytest.mark.slow
def test_a_killed_calibration_leaves_no_file_or_the_earlier_one(tmp_path):
    rng = np.random.default_rng(18)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na small white circle\n")
    reference = tmp_path / "reference.json"
    seconds = _duration(["calibrate", "--prompts", prompts, "--out", reference])
    out = tmp_path / "calibration.json"
    out.write_text('{"earlier": true}\n')
    for _ in range(4):
        _killed_at(["calibrate", "--prompts", prompts, "--overwrite", "--out", out], rng.uniform(0.5, seconds))
        text = out.read_text()
        assert text == '{"earlier": true}\n' or json.loads(text)["scores"] == json.loads(reference.read_text())["scores"]
        out.write_text('{"earlier": true}\n')


@pytest.mark.slow
def test_a_killed_evaluation_resumes_to_the_uninterrupted_result(tmp_path):
    rng = np.random.default_rng(18)
    base = ["eval", "oracle", "--prompts", "val", "--n", 8, "--batch-size", 4]
    reference = tmp_path / "reference"
    seconds = _duration([*base, "--out", reference])
    expected = json.loads((reference / "results.json").read_text())["decisions"]
    for trial in range(4):
        out = tmp_path / f"trial{trial}"
        killed = _killed_at([*base, "--out", out], rng.uniform(0.5, seconds))
        if killed:
            assert not (out / "results.json").exists()  # nothing reads as a finished experiment
        ok(tandem(*base, "--resume", "--out", out))
        assert json.loads((out / "results.json").read_text())["decisions"] == expected
