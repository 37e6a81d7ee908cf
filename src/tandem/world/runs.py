"""A small run harness for the world's component trainings: resolved config beside the
weights, atomic periodic checkpoints, exact resume, JSONL logs and a progress bar.

(The general distillation ``Trainer`` of ``tandem.distill`` grows out of this.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..outputs import atomic_write_text

CHECKPOINT = "checkpoint.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class EMA:
    """Exponential moving average of a module's parameters (``decay`` per step)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


class Run:
    """One training run in ``out_dir``.

    A new run refuses a directory that already holds a checkpoint (pass ``resume=True``
    to continue it); a resumed run must have the same config as the one on disk.
    """

    def __init__(self, out_dir: str | Path, name: str, cfg: Any, resume: bool):
        self.dir = Path(out_dir)
        self.name = name
        self.cfg = cfg
        self.ckpt_path = self.dir / CHECKPOINT
        cfg_json = {"component": name, "config": config_dict(cfg)}
        cfg_path = self.dir / "train_config.json"
        if resume:
            if not self.ckpt_path.exists():
                raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {self.dir}")
            saved = json.loads(cfg_path.read_text())
            if _without_max_steps(saved) != _without_max_steps(cfg_json):
                raise ValueError(
                    f"--resume: config differs from the one in {cfg_path}; "
                    f"saved {saved['config']}, requested {cfg_json['config']}"
                )
            # training longer (or stopping earlier) is the one change a resume may make
            atomic_write_text(cfg_path, json.dumps(cfg_json, indent=2) + "\n")
        else:
            if self.ckpt_path.exists() or (self.dir / "done.json").exists():
                raise FileExistsError(
                    f"{self.dir} already holds a {name} run; pass --resume to continue it "
                    "or choose another --out"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, json.dumps(cfg_json, indent=2) + "\n")
        self.log_path = self.dir / "log.jsonl"

    def load(self, state: dict[str, Any]) -> int:
        """Restore every object in ``state`` (modules, optimizers, EMA) and torch's RNG; return the step."""
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        for key, obj in state.items():
            obj.load_state_dict(ckpt[key])
        torch.set_rng_state(ckpt["torch_rng"])
        return int(ckpt["step"])

    def save(self, step: int, state: dict[str, Any]) -> None:
        ckpt = {key: obj.state_dict() for key, obj in state.items()}
        ckpt["step"] = step
        ckpt["torch_rng"] = torch.get_rng_state()
        atomic_torch_save(ckpt, self.ckpt_path)

    def log(self, record: dict) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def loop(
        self,
        start: int,
        max_steps: int,
        step_fn: Callable[[int], dict[str, float]],
        state: dict[str, Any],
        checkpoint_every: int,
        log_every: int = 50,
    ) -> None:
        """Call ``step_fn(step)`` for steps ``start .. max_steps - 1`` with logs and checkpoints."""
        t0 = time.time()
        columns = (TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        with Progress(*columns, disable=not _show_progress()) as bar:
            task = bar.add_task(self.name, total=max_steps, completed=start, info="")
            for step in range(start, max_steps):
                losses = step_fn(step)
                if (step + 1) % log_every == 0 or step + 1 == max_steps:
                    record = {"step": step + 1, "time": round(time.time() - t0, 2), **losses}
                    self.log(record)
                    bar.update(task, info=" ".join(f"{k}={v:.4f}" for k, v in losses.items()))
                if (step + 1) % checkpoint_every == 0 or step + 1 == max_steps:
                    self.save(step + 1, state)
                bar.update(task, completed=step + 1)


def _without_max_steps(cfg_json: dict) -> dict:
    return {**cfg_json, "config": {k: v for k, v in cfg_json["config"].items() if k != "max_steps"}}


def _show_progress() -> bool:
    return os.environ.get("TANDEM_PROGRESS", "1") != "0"
