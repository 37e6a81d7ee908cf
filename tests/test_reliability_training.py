"""Reliability of the training commands (`tandem distill consistency`, `tandem world train`):
checkpoints never run code, run directories never swallow the user's files, bad options and
damaged runs are one-line errors before anything is written or loaded, temporary files never
follow a planted symlink, and a killed run is resumable (bitwise) or untouched.

Most cases run ``tandem.cli.main`` in-process (same exit status and stderr as the shell; see
tests/clitools.py) on the tiny world of conftest.py; the crash test runs real subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import ENV, assert_user_error, tandem_in_process
from safetensors.torch import load_file

from tandem.distill.consistency import ConsistencyConfig
from tandem.training.config import TrainerConfig
from tandem.world.control import ControlNetTrainConfig
from tandem.world.oracle import OracleTrainConfig, SampleRecipe
from tandem.world.train import CLIPTrainConfig, DecoderTrainConfig, TeacherTrainConfig, VAETrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# a run of 2 steps that checkpoints after each
DISTILL = ("--max-steps", 2, "--batch-size", 2, "--checkpoint-every", 1, "--threads", 1, "--lr", 1e-3, "--seed", 3)
STUDENT_WEIGHTS = Path("student") / "unet" / "diffusion_pytorch_model.safetensors"


def distill(capsys, monkeypatch, world, out, *args, max_steps: int | None = None):
    """``tandem distill consistency`` with the DISTILL settings (``max_steps`` replaces theirs)."""
    settings = list(DISTILL)
    if max_steps is not None:
        settings[1] = max_steps
    return tandem_in_process(capsys, monkeypatch, "distill", "consistency", "--teacher", world, "--out", out,
                             *settings, *args)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); symlinks as their targets."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def student_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / STUDENT_WEIGHTS)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, tensor in a.items():
        assert torch.equal(tensor, b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    """A finished 2-step distillation, started in an existing empty directory (which a new run accepts)."""
    from tandem.cli import main

    out = tmp_path_factory.mktemp("distilled") / "run"
    out.mkdir()
    args = ["distill", "consistency", "--teacher", tiny_world, "--out", out, *DISTILL]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_info:
        mp.setattr(sys, "argv", ["tandem", *map(str, args)])
        main()
    assert exit_info.value.code == 0
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 2
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


# ---------------------------------------------------------------------------------------------------
# 4. Checkpoints are never unpickled: a file whose loading would run code is refused, and not run


class _WritesMarker:
    """Unpickling this object writes ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant_payload(path: Path, marker: Path, form: str) -> None:
    payload = {"models": _WritesMarker(marker), "step": 1}
    if form == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def test_the_payload_runs_code_when_unpickled(tmp_path):
    """The control for the tests below: the planted files really do run code for an unpickler."""
    marker = tmp_path / "marker"
    _plant_payload(tmp_path / "evil.pt", marker, "torch.save")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name, form", [("state.pt", "torch.save"), ("state.pt", "pickle"),
                                        ("rng-0.pt", "torch.save")])
def test_distill_resume_refuses_a_checkpoint_that_would_run_code(name, form, tiny_world, run_copy, tmp_path,
                                                                  capsys, monkeypatch):
    marker = tmp_path / "marker"
    _plant_payload(run_copy / "checkpoint" / name, marker, form)
    before = snapshot(run_copy)
    result = distill(capsys, monkeypatch, tiny_world, run_copy, "--resume", max_steps=3)
    assert_user_error(result, f"checkpoint/{name}")
    assert "refuses" in result.stderr or "unreadable" in result.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    assert snapshot(run_copy) == before


def _world_trainer(out: Path, max_steps: int = 6):
    """The Trainer of a `tandem world train vae` run with the command's default config, opened by the library
    (its run directory written) without training anything."""
    from tandem.world.train import VAETraining, world_trainer

    cfg = VAETrainConfig(max_steps=max_steps)
    return world_trainer(VAETraining(cfg), cfg, out, resume=False)


def _world_run(out: Path, max_steps: int = 6, step: int | None = None) -> Path:
    """A `tandem world train vae` run directory (with a checkpoint at ``step``)."""
    trainer = _world_trainer(out, max_steps)
    if step is not None:
        trainer.save_checkpoint(step)
    return out


@pytest.mark.parametrize("name, form", [("state.pt", "torch.save"), ("state.pt", "pickle"),
                                        ("rng-0.pt", "torch.save")])
def test_world_resume_refuses_a_checkpoint_that_would_run_code(name, form, tmp_path, capsys, monkeypatch):
    run = _world_run(tmp_path / "run", step=2)
    marker = tmp_path / "marker"
    _plant_payload(run / "checkpoint" / name, marker, form)
    before = snapshot(run)
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "vae", "--out", run, "--resume")
    assert_user_error(result, f"checkpoint/{name}")
    assert "refuses" in result.stderr or "unreadable" in result.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    assert snapshot(run) == before


def test_no_source_file_unpickles():
    """No ``torch.load`` without ``weights_only=True``, no pickle, no ``allow_pickle=True`` anywhere in src/."""
    import re

    src = Path(__file__).resolve().parents[1] / "src"
    offences = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                offences.append(f"{path.name}: {call.group(0)}")
        for pattern in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\b", r"weights_only\s*=\s*False"):
            if re.search(pattern, text):
                offences.append(f"{path.name}: {pattern}")
    assert not offences, offences


# ---------------------------------------------------------------------------------------------------
# 5. Temporary files are fresh: a symlink planted at the old fixed name is never followed


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("the user's precious file\n")
    return path


def _write_world_checkpoint(tmp_path: Path, victim: Path) -> None:
    from tandem.training.checkpoints import load_checkpoint_file

    trainer = _world_trainer(tmp_path / "run", max_steps=3)
    (trainer.dir / "checkpoint.tmp").symlink_to(victim)
    trainer.save_checkpoint(2)
    assert json.loads((trainer.dir / "checkpoint" / "meta.json").read_text())["step"] == 2
    assert set(load_checkpoint_file(trainer.dir / "checkpoint" / "state.pt")["models"]) == {"vae"}


def _write_oracle_weights(tmp_path: Path, victim: Path) -> None:
    from tandem.world.models import CLIPArchConfig, build_clip
    from tandem.world.oracle import OracleArch, WorldOracle
    from tandem.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    clip = build_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                      CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1, heads=2,
                                     patch_size=8, projection_dim=16))
    model = WorldOracle(clip.config.to_dict(), OracleArch(fusion_layers=1, heads=2, ff=64, head_hidden=16))
    out = tmp_path / "oracle"
    out.mkdir()
    (out / "model.safetensors.tmp").symlink_to(victim)
    model.save_pretrained(out)
    loaded = WorldOracle.from_pretrained(out).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v.half().float()), k


def _write_oracle_data(tmp_path: Path, victim: Path) -> None:
    from tandem.world.oracle import SampleRecipe, build_split, draw_prompts

    data = tmp_path / "data"
    data.mkdir()
    (data / "render.tmp.npz").symlink_to(victim)
    recipe = SampleRecipe(student_steps=(), teacher_steps=(), refine_strengths=(), corrupt=True)  # no models needed
    build_split(data, 101, 3, recipe, tmp_path, set(), log=lambda message: None)
    with np.load(data / "render.npz") as cached:
        assert np.array_equal(cached["images"], draw_prompts(101, 3, set())[1])


def _write_sweep_part(tmp_path: Path, victim: Path) -> None:
    from tandem.eval.sweep import _save_npz

    path = tmp_path / "part.npz"
    (tmp_path / "part.tmp.npz").symlink_to(victim)
    _save_npz(path, {"x": np.arange(5)})
    with np.load(path) as saved:
        assert saved["x"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("write", [_write_world_checkpoint, _write_oracle_weights, _write_oracle_data,
                                   _write_sweep_part], ids=lambda f: f.__name__.removeprefix("_write_"))
def test_writes_never_follow_a_planted_tmp_symlink(write, tmp_path, victim):
    before = victim.read_bytes()
    write(tmp_path, victim)
    assert victim.read_bytes() == before


def test_distill_checkpoint_never_follows_planted_symlinks(tiny_world, run_copy, tmp_path, capsys, monkeypatch):
    """``checkpoint.tmp`` and ``checkpoint.old`` are the Trainer's own names: whatever lies there is replaced
    (a symlink unlinked, never followed into the directory it points to)."""
    victims = tmp_path / "victims"
    for name in ("tmp", "old"):
        (victims / name).mkdir(parents=True)
        (victims / name / "keep.txt").write_text(f"user data {name}\n")
        (run_copy / f"checkpoint.{name}").symlink_to(victims / name, target_is_directory=True)
    before = snapshot(victims)
    result = distill(capsys, monkeypatch, tiny_world, run_copy, "--resume", max_steps=3)
    assert result.returncode == 0, result.stderr
    assert snapshot(victims) == before
    assert json.loads((run_copy / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert not (run_copy / "checkpoint.tmp").exists() and not (run_copy / "checkpoint.old").is_symlink()


# ---------------------------------------------------------------------------------------------------
# 6. A new run never writes into a directory of user files; bad options fail before anything is written


def _user_files(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "train_config.json").write_text('{"my": "own config"}\n')
    (out / "log.jsonl").write_text('{"my": "own log"}\n')
    (out / "notes.txt").write_text("thesis draft\n")
    return snapshot(out)


@pytest.mark.parametrize("command", [
    ("distill", "consistency"), ("world", "train", "vae"), ("world", "train", "vae-decoder"), ("world", "train", "clip"),
    ("world", "train", "teacher"), ("world", "train", "controlnet", "--control", "mask"), ("world", "train", "oracle"),
], ids=" ".join)
def test_a_new_run_refuses_a_directory_of_user_files(command, tiny_world, tmp_path, capsys, monkeypatch):
    import tandem.models
    from tandem.world import control, oracle, train

    out = tmp_path / "mine"
    before = _user_files(out)
    # refused before any model loads
    monkeypatch.setattr(tandem.models, "load_teacher_pipeline", _never)
    for method in (train.VAETraining, train.DecoderTraining, train.CLIPTraining, train.TeacherTraining,
                   control.ControlNetTraining, oracle.OracleTraining):
        monkeypatch.setattr(method, "__init__", _never)
    monkeypatch.setattr(oracle.WorldOracle, "from_clip", _never)
    extra = ["--teacher", tiny_world, "--max-steps", 1, "--batch-size", 2] if command[0] == "distill" else []
    result = tandem_in_process(capsys, monkeypatch, *command, "--out", out, *extra)
    assert_user_error(result, str(out), "not empty")
    assert snapshot(out) == before


def test_a_new_run_refuses_a_directory_holding_a_run(tiny_world, run_copy, capsys, monkeypatch):
    before = snapshot(run_copy)
    assert_user_error(distill(capsys, monkeypatch, tiny_world, run_copy), "already holds", "--resume")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("args, names", [
    (["--lr", "nan"], ("lr must be a finite number",)),
    (["--lr", "-1"], ("lr must be > 0",)),
    (["--lr", "inf"], ("lr must be a finite number",)),
    (["--target-ema", "2"], ("target_ema",)),
    (["--target-ema", "nan"], ("target_ema", "--target-ema")),
    (["--sampling-ema", "1.5"], ("sampling_ema",)),
    (["--w-range", "nan", "2"], ("w_min", "--w-range")),
    (["--w-range", "1", "inf"], ("w_max", "--w-range")),
    (["--threads", "0"], ("threads must be >= 1",)),
    (["--batch-size", "0"], ("batch_size",)),
    (["--grad-accum", "0"], ("grad_accum",)),
    (["--checkpoint-every", "0"], ("checkpoint_every",)),
    (["--warmup-steps", "-1"], ("warmup_steps",)),
    (["--seed", "-1"], ("seed must be",)),
    (["--ddim-steps", "0"], ("num_ddim_timesteps",)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_distill_options_fail_before_anything_is_written(args, names, tiny_world, tmp_path, capsys,
                                                               monkeypatch):
    """Exit status 2, one line naming the option (as its flag or its config field), and no --out."""
    out = tmp_path / "run"
    result = tandem_in_process(capsys, monkeypatch, "distill", "consistency", "--teacher", tiny_world,
                               "--out", out, "--max-steps", 1, *args)
    assert_user_error(result)
    assert any(name in result.stderr for name in names), result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args", [["--threads", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--warmup-steps", "-1"]],
                         ids=" ".join)
def test_bad_world_train_options_fail_before_anything_is_written(args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "teacher", "--out", out, *args)
    assert_user_error(result, args[0])
    assert not out.exists()


BAD_VALUES = [
    (ConsistencyConfig(), "huber_c", 0.0), (ConsistencyConfig(), "grad_clip", math.nan),
    (ConsistencyConfig(), "weight_decay", -0.1), (ConsistencyConfig(), "lr", math.inf),
    (TrainerConfig(max_steps=1), "threads", 0), (TrainerConfig(max_steps=1), "log_every", 0),
    (VAETrainConfig(), "threads", 0), (VAETrainConfig(), "kl_weight", math.nan), (VAETrainConfig(), "lr", -1.0),
    (DecoderTrainConfig(), "edge_weight", -1.0), (DecoderTrainConfig(), "max_steps", 0),
    (CLIPTrainConfig(), "weight_decay", math.inf), (CLIPTrainConfig(), "batch_size", 0),
    (TeacherTrainConfig(), "ema_decay", 1.0), (TeacherTrainConfig(), "cond_dropout", 1.5),
    (TeacherTrainConfig(), "lr", math.nan), (TeacherTrainConfig(), "lr_schedule", "linear"),
    (TeacherTrainConfig(), "min_snr_gamma", 0.0), (TeacherTrainConfig(), "checkpoint_every", 0),
    (ControlNetTrainConfig(), "ema_decay", -0.5), (ControlNetTrainConfig(), "grad_clip", 0.0),
    (ControlNetTrainConfig(), "control", "depth"), (ControlNetTrainConfig(), "threads", 0),
    (OracleTrainConfig(), "rank_sharpness", math.inf), (OracleTrainConfig(), "n_eval", 0),
    (OracleTrainConfig(), "tower_lr_scale", math.nan), (OracleTrainConfig(), "seed", -3),
    (SampleRecipe(), "refine_strengths", (0.5, 1.5)), (SampleRecipe(), "teacher_steps", (0,)),
]


@pytest.mark.parametrize("config, field, value", BAD_VALUES,
                         ids=[f"{type(c).__name__}.{f}={v}" for c, f, v in BAD_VALUES])
def test_every_config_refuses_bad_values_when_made(config, field, value):
    """Each training config checks its values when it is made (so before any run writes anything)."""
    dataclasses.replace(config)  # the defaults are valid
    with pytest.raises(ValueError) as error:
        dataclasses.replace(config, **{field: value})
    message = str(error.value)
    assert "\n" not in message
    hint = {"refine_strengths": "refine strength", "teacher_steps": "steps", "control": "control"}.get(field, field)
    assert hint in message, message


def test_a_trainable_with_a_bad_ema_fails_before_the_run_config_is_written(tmp_path):
    from tandem.training.config import Trainable, TrainerConfig
    from tandem.training.trainer import Trainer

    class BadEMA:
        name, uses_data = "bad-ema", False

        def trainables(self):
            return [Trainable("net", torch.nn.Linear(2, 2), emas={"slow": 1.5})]

        def frozen(self):
            return {}

    with pytest.raises(ValueError, match="EMA 'slow' decay"):
        Trainer(BadEMA(), None, TrainerConfig(max_steps=1), tmp_path / "run", cpu=True)
    assert not (tmp_path / "run" / "train_config.json").exists()


# ---------------------------------------------------------------------------------------------------
# 7. A checkpoint past --max-steps is refused, never exported under the wrong step


def test_distill_resume_refuses_a_checkpoint_past_max_steps(tiny_world, run_copy, capsys, monkeypatch):
    before = snapshot(run_copy)
    result = distill(capsys, monkeypatch, tiny_world, run_copy, "--resume", max_steps=1)
    assert_user_error(result, f"the checkpoint in {run_copy} is at step 2, past --max-steps 1")
    assert snapshot(run_copy) == before


def test_world_resume_refuses_a_checkpoint_past_max_steps(tmp_path, capsys, monkeypatch):
    run = _world_run(tmp_path / "run", step=6)
    before = snapshot(run)
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "vae", "--out", run, "--resume",
                               "--max-steps", 1)
    assert_user_error(result, f"the checkpoint in {run} is at step 6, past --max-steps 1")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------
# 13. An unwritable --out fails before any model is loaded


def _unwritable(tmp_path: Path, where: str) -> Path:
    if where == "under a file":
        (tmp_path / "a-file").write_text("not a directory\n")
        return tmp_path / "a-file" / "run"
    path = Path("/sys/tandem-reliability-test-run")  # sysfs refuses new directories, even to root
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("/sys accepts new directories here")


def _never(*args, **kwargs):
    raise AssertionError("a model was loaded before --out was checked")


@pytest.mark.parametrize("where", ["under a file", "read-only filesystem"])
def test_an_unwritable_out_fails_before_models_load(where, tiny_world, tmp_path, capsys, monkeypatch):
    out = _unwritable(tmp_path, where)
    import tandem.models
    import tandem.world.train

    monkeypatch.setattr(tandem.models, "load_teacher_pipeline", _never)
    monkeypatch.setattr(tandem.world.train, "build_vae", _never)
    result = tandem_in_process(capsys, monkeypatch, "distill", "consistency", "--teacher", tiny_world,
                               "--out", out, "--max-steps", 1)
    assert_user_error(result, str(out), "not writable")
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "vae", "--out", out)
    assert_user_error(result, str(out), "not writable")


# ---------------------------------------------------------------------------------------------------
# 16, 17. Damaged runs are one-line errors naming the file


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, needle", [
    (lambda run: _truncate(run / "checkpoint" / "state.pt"), "checkpoint/state.pt is unreadable (truncated?)"),
    (lambda run: (run / "checkpoint" / "state.pt").write_bytes(b""), "checkpoint/state.pt is unreadable"),
    (lambda run: (run / "checkpoint" / "rng-0.pt").unlink(), "checkpoint/rng-0.pt is missing"),
    (lambda run: (run / "checkpoint" / "meta.json").write_text("{"), "checkpoint/meta.json is not valid JSON"),
    (lambda run: (run / "train_config.json").write_text('{"method": "consist'), "train_config.json is not valid JSON"),
    (lambda run: shutil.rmtree(run / "checkpoint"), "no checkpoint in"),
], ids=["truncated state", "empty state", "missing rng", "corrupt meta", "corrupt config", "finished, no checkpoint"])
def test_a_damaged_distill_run_is_a_one_line_error(damage, needle, tiny_world, run_copy, capsys, monkeypatch):
    import tandem.models

    damage(run_copy)
    before = snapshot(run_copy)
    monkeypatch.setattr(tandem.models, "load_teacher_pipeline", _never)  # the damage is found first
    result = distill(capsys, monkeypatch, tiny_world, run_copy, "--resume", max_steps=3)
    assert_user_error(result, needle)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("damage, needle", [
    (lambda run: _truncate(run / "checkpoint" / "state.pt"), "checkpoint/state.pt is unreadable (truncated?)"),
    (lambda run: (run / "checkpoint" / "rng-0.pt").unlink(), "checkpoint/rng-0.pt is missing"),
    (lambda run: (run / "train_config.json").write_text("{'component': "), "train_config.json is not valid JSON"),
], ids=["truncated checkpoint", "missing rng", "corrupt config"])
def test_a_damaged_world_run_is_a_one_line_error(damage, needle, tmp_path, capsys, monkeypatch):
    run = _world_run(tmp_path / "run", step=2)
    damage(run)
    before = snapshot(run)
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "vae", "--out", run, "--resume")
    assert_user_error(result, str(run), needle)
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------
# Resuming what a crash leaves


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tiny_world, finished_run, run_copy,
                                                                       capsys, monkeypatch):
    """Killed after it wrote its config but before its first checkpoint: the directory is no longer
    empty (a new run refuses it), so --resume starts it again, and ends where an uninterrupted run does."""
    for name in ("checkpoint", "student"):
        shutil.rmtree(run_copy / name)
    (run_copy / "done.json").unlink()
    (run_copy / "log.jsonl").write_text('{"step": 1, "time": 0.1, "loss": 0.5}\n{"step": 2, "ti')
    assert_user_error(distill(capsys, monkeypatch, tiny_world, run_copy), "not empty")
    result = distill(capsys, monkeypatch, tiny_world, run_copy, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_weights(student_tensors(run_copy), student_tensors(finished_run))
    log = [json.loads(line) for line in (run_copy / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]  # the stale records went; the final step was logged again


def test_resume_drops_log_records_past_the_checkpoint(tiny_world, finished_run, tmp_path, capsys, monkeypatch):
    """A 1-step run continued to 2 steps equals the 2-step run; records its log holds past the checkpoint
    (and a line a crash cut short) are dropped, so the resumed run's log reads as an uninterrupted one's."""
    run = tmp_path / "run"
    result = distill(capsys, monkeypatch, tiny_world, run, max_steps=1)
    assert result.returncode == 0, result.stderr
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 2, "time": 9.9, "loss": 1.0}\n{"step": 3, "tim')
    result = distill(capsys, monkeypatch, tiny_world, run, "--resume")
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[1]["loss"] != 1.0, log
    assert_same_weights(student_tensors(run), student_tensors(finished_run))
    assert json.loads((run / "done.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------------
# The crash test: SIGKILL at random points


def _cli_run(world: Path, out: Path, *args, max_steps: int) -> subprocess.Popen:
    settings = list(DISTILL)
    settings[1] = max_steps
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", "distill", "consistency", "--teacher",
                             str(world), "--out", str(out), *map(str, settings), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen) -> float:
    """Seconds until ``path`` exists (or the process ends)."""
    t0 = time.monotonic()
    while not path.exists() and process.poll() is None:
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.mark.slow
def test_a_killed_distillation_is_resumable_or_untouched(tiny_world, tmp_path):
    """SIGKILL `tandem distill consistency` at random points (from the moment its --out appears, or, for
    two kills in three, from the moment its Trainer starts); then the directory is either untouched
    (absent, or holding nothing a new run refuses) or resumable, and the run ends bitwise where the
    uninterrupted run does. A ``done.json`` only ever sits beside a complete result."""
    steps = 4
    reference = tmp_path / "reference"
    process = _cli_run(tiny_world, reference, max_steps=steps)
    _wait_for(reference, process)
    t_out = time.monotonic()
    _wait_for(reference / "train_config.json", process)
    t_trainer = time.monotonic()
    _wait_for(reference / "done.json", process)
    end = time.monotonic()
    spans = {"out": end - t_out, "trainer": end - t_trainer}  # where a kill can leave an unfinished run
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    expected = student_tensors(reference)
    rng = random.Random(20240611)
    outcomes = []
    for trial in range(12):
        out = tmp_path / f"trial-{trial}"
        process = _cli_run(tiny_world, out, max_steps=steps)
        watch = "out" if trial % 3 == 0 else "trainer"
        _wait_for(out if watch == "out" else out / "train_config.json", process)
        time.sleep(rng.uniform(0, spans[watch]))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=600)
        killed = process.returncode == -signal.SIGKILL
        if (out / "done.json").exists():
            assert_same_weights(student_tensors(out), expected)  # done.json: the result is complete
            outcomes.append("killed after done.json" if killed else "finished")
            continue
        started = (out / "train_config.json").exists()
        if started:
            meta = [out / name / "meta.json" for name in ("checkpoint", "checkpoint.old")]
            step = next((json.loads(m.read_text())["step"] for m in meta if m.exists()), 0)
            outcomes.append(f"resumed from step {step}")
            fresh = _cli_run(tiny_world, out, "--resume", max_steps=steps)
        else:
            # untouched: a new run takes the directory (nothing but a crash's hidden temporary files in it)
            leftovers = [p.name for p in out.iterdir()] if out.exists() else []
            assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
            outcomes.append("restarted")
            fresh = _cli_run(tiny_world, out, max_steps=steps)
        _, err = fresh.communicate(timeout=600)
        assert fresh.returncode == 0, (trial, outcomes[-1], err)
        assert_same_weights(student_tensors(out), expected)
        assert json.loads((out / "done.json").read_text())["steps"] == steps
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [steps], log
    assert any(o.startswith("resumed") for o in outcomes), outcomes  # the kills reached the training
