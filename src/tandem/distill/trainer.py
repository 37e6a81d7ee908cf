"""The one Trainer every distillation method shares, built on Hugging Face ``accelerate``.

A *method* (consistency distillation, later ADD, DMD2, ...) says what it trains and how a
loss is computed; the Trainer owns everything else:

- devices and processes (the same code on a CPU, one GPU, or ``torchrun`` / ``accelerate
  launch`` over many; DDP via ``accelerate``; FSDP through an accelerate config),
- mixed precision (``bf16``/``fp16`` where the device supports it),
- one optimizer per trainable network, each with its own update ratio (``every``),
- gradient accumulation and clipping, EMA copies (kept per network, by name),
- JSONL logs and a progress bar on the main process,
- periodic atomic checkpoints and exact resume: weights, optimizers, LR schedules, EMAs,
  every process's RNG states and the data position (the step).

Data comes from a :class:`~tandem.distill.data.BatchSource`: batch ``i`` is a pure function
of ``i``, so the data position is the step and a resumed run sees the batches an
uninterrupted run would have seen. Each optimisation step of each process reads batch
``(step * grad_accum + micro) * world_size + rank``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..generate import derive_seed
from ..outputs import atomic_write_text

CHECKPOINT_DIR = "checkpoint"
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class Trainable:
    """A network the method trains.

    Attributes:
        name: key under which the method reaches it (``ctx.model(name)``) and its losses are logged.
        module: the network (its parameters with ``requires_grad`` are optimised).
        lr: learning rate (constant after ``warmup_steps`` of linear warm-up).
        every: update ratio; the network is updated on steps where ``step % every == 0``.
        emas: EMA copies to keep, ``{ema_name: decay}``; reach them with ``ctx.ema(name, ema_name)``.
        make_optimizer: ``params -> Optimizer`` [AdamW(lr, betas, weight_decay)].
    """

    name: str
    module: nn.Module
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    every: int = 1
    emas: dict[str, float] = field(default_factory=dict)
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None


class Method(Protocol):
    """What a distillation method declares."""

    name: str
    uses_data: bool  # False for data-free methods: the Trainer then never reads a batch

    def trainables(self) -> list[Trainable]: ...

    def frozen(self) -> dict[str, nn.Module]:
        """Networks the method uses but never trains (e.g. the teacher); moved to the device, eval mode."""
        ...

    def step(self, batch: Any, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses for updating the trainable ``update``; the Trainer backpropagates ``losses["loss"]``."""
        ...


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int
    seed: int = 0
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int | None = None  # torch intra-op threads per process [torch's default]

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


class EMACopy:
    """An exponential moving average of a module, kept as a module (so a method can run it)."""

    def __init__(self, module: nn.Module, decay: float, device: torch.device | str = "cpu"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        for mine, theirs in zip(self.module.state_dict().values(), source.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - self.decay)
            else:
                mine.copy_(theirs)


class StepContext:
    """What ``Method.step`` sees: the prepared networks, EMAs, a per-step generator, the accelerator."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer
        self.step = 0
        self.micro = 0
        self.batch_index = 0
        self.generator = torch.Generator()  # a CPU generator; methods move their draws to ctx.device

    @property
    def accelerator(self):
        return self._trainer.accelerator

    @property
    def device(self) -> torch.device:
        return self._trainer.accelerator.device

    def model(self, name: str) -> nn.Module:
        """The trainable ``name`` as prepared for this run (DDP-wrapped when distributed): call it for forwards."""
        return self._trainer._prepared[name]

    def unwrapped(self, name: str) -> nn.Module:
        return self._trainer.accelerator.unwrap_model(self._trainer._prepared[name])

    def ema(self, name: str, ema_name: str) -> nn.Module:
        return self._trainer._emas[name][ema_name].module

    def frozen(self, name: str) -> nn.Module:
        return self._trainer._frozen[name]


class Trainer:
    """Train ``method`` into ``out_dir``.

    A new run refuses a directory that already holds a run (``resume=True`` continues it,
    and then the run's saved configuration must match, except for ``max_steps``).
    """

    def __init__(self, method: Method, source, cfg: TrainerConfig, out_dir: str | Path,
                 resume: bool = False, run_config: dict | None = None, cpu: bool | None = None):
        from accelerate import Accelerator

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.method, self.source, self.cfg = method, source, cfg
        self.dir = Path(out_dir)
        self.resume = resume
        self.run_config = {"method": method.name, "trainer": dataclasses.asdict(cfg), **(run_config or {})}
        if cpu is None:
            cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
        self._check_run_dir()
        torch.manual_seed(cfg.seed)
        self.trainables = {t.name: t for t in method.trainables()}
        if not self.trainables:
            raise ValueError(f"method {method.name} declares no trainable networks")
        self._frozen = {}
        for name, module in method.frozen().items():
            self._frozen[name] = module.to(self.accelerator.device).eval().requires_grad_(False)
        # EMA copies are taken before prepare(), which may wrap or shard the modules (DDP, FSDP)
        device = self.accelerator.device
        self._emas = {t.name: {e: EMACopy(t.module, d, device) for e, d in t.emas.items()}
                      for t in self.trainables.values()}
        self._optimizers, self._schedulers, self._prepared = {}, {}, {}
        for t in self.trainables.values():
            params = [p for p in t.module.parameters() if p.requires_grad]
            opt = (t.make_optimizer(params) if t.make_optimizer is not None
                   else torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay))
            warmup = t.warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, w=warmup: min(1.0, (s + 1) / w) if w else 1.0)
            # the LR schedule stays unprepared: accelerate would step it once per process
            module, opt = self.accelerator.prepare(t.module, opt)
            self._prepared[t.name], self._optimizers[t.name], self._schedulers[t.name] = module, opt, sched
        self.ctx = StepContext(self)
        self.start_step = self._load() if resume else 0

    # -- run directory -------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _check_run_dir(self) -> None:
        cfg_path = self.dir / "train_config.json"
        if self.resume:
            if not (self.dir / CHECKPOINT_DIR).is_dir() and not (self.dir / (CHECKPOINT_DIR + ".old")).is_dir():
                raise FileNotFoundError(f"--resume: no checkpoint in {self.dir}")
            saved = json.loads(cfg_path.read_text())
            if _without_max_steps(saved) != _without_max_steps(_jsonable(self.run_config)):
                raise ValueError(f"--resume: the configuration differs from the one saved in {cfg_path}:\n"
                                 f"  saved     {_without_max_steps(saved)}\n"
                                 f"  requested {_without_max_steps(_jsonable(self.run_config))}")
        elif any(self.dir.joinpath(n).exists() for n in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", "done.json")):
            raise FileExistsError(f"{self.dir} already holds a training run; pass --resume to continue it "
                                  "or choose another --out")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, json.dumps(_jsonable(self.run_config), indent=2) + "\n")
        self.accelerator.wait_for_everyone()

    # -- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        unwrap = self.accelerator.unwrap_model
        return {
            "models": {n: unwrap(m).state_dict() for n, m in self._prepared.items()},
            "optimizers": {n: o.state_dict() for n, o in self._optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self._schedulers.items()},
            "emas": {n: {e: c.module.state_dict() for e, c in emas.items()} for n, emas in self._emas.items()},
        }

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint/`` atomically: every process writes into a temporary directory, then
        the main process swaps it in by renames (the previous checkpoint survives a crash)."""
        acc = self.accelerator
        tmp, final, old = (self.dir / f"{CHECKPOINT_DIR}{s}" for s in (".tmp", "", ".old"))
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if self.is_main:
            torch.save(self._state(), tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "num_processes": acc.num_processes}) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load(self) -> int:
        acc = self.accelerator
        ckpt = self.dir / CHECKPOINT_DIR
        if not ckpt.is_dir():  # a crash between the two renames of save_checkpoint
            ckpt = self.dir / (CHECKPOINT_DIR + ".old")
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["num_processes"] != acc.num_processes:
            raise ValueError(f"--resume: the checkpoint was written by {meta['num_processes']} processes; "
                             f"resume it with the same number (this run has {acc.num_processes})")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        for n, m in self._prepared.items():
            acc.unwrap_model(m).load_state_dict(state["models"][n])
        for n, o in self._optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self._schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        for n, emas in self._emas.items():
            for e, c in emas.items():
                c.module.load_state_dict(state["emas"][n][e])
        _set_rng_state(torch.load(ckpt / f"rng-{acc.process_index}.pt", map_location="cpu", weights_only=False))
        return int(meta["step"])

    # -- training ------------------------------------------------------------------------------------

    def _batches(self, step: int) -> Iterator[tuple[int, int, Any]]:
        """``(micro, batch index, batch)`` for this process's micro-batches of ``step``."""
        acc, cfg = self.accelerator, self.cfg
        for micro in range(cfg.grad_accum):
            index = (step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index
            yield micro, index, (self.source.batch(index, cfg.batch_size) if self.method.uses_data else None)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step of every trainable that is due; returns losses averaged over processes."""
        acc, cfg, ctx = self.accelerator, self.cfg, self.ctx
        logged: dict[str, float] = {}
        ctx.step = step
        for name, t in self.trainables.items():
            if step % t.every:
                continue
            model, opt = self._prepared[name], self._optimizers[name]
            sums: dict[str, float] = {}
            for micro, index, batch in self._batches(step):
                # randomness follows the batch index: n processes x 1 micro-batch draw exactly what
                # 1 process x n micro-batches draws, so the two runs compute the same update
                ctx.micro, ctx.batch_index = micro, index
                ctx.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, index, _name_key(name)))
                last = micro == cfg.grad_accum - 1
                with nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model):
                    with acc.autocast():
                        losses = self.method.step(batch, name, ctx)
                    if "loss" not in losses:
                        raise KeyError(f"method {self.method.name}: step() must return a 'loss' for {name}")
                    acc.backward(losses["loss"] / cfg.grad_accum)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if t.grad_clip is not None:
                sums["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), t.grad_clip))
            opt.step()
            self._schedulers[name].step()
            opt.zero_grad(set_to_none=True)
            for e in self._emas[name].values():
                e.update(acc.unwrap_model(model))
            for k, v in sums.items():
                logged[f"{name}/{k}" if len(self.trainables) > 1 else k] = v
        if acc.num_processes > 1 and logged:
            keys = sorted(logged)
            values = acc.reduce(torch.tensor([logged[k] for k in keys], device=acc.device), reduction="mean")
            logged = dict(zip(keys, values.tolist()))
        return logged

    def train(self) -> int:
        """Run from the start (or the resumed) step to ``max_steps``; returns the final step."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        log_path = self.dir / "log.jsonl"
        t0 = time.time()
        columns = (TextColumn(f"[bold]{self.method.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        show = self.is_main and os.environ.get("TANDEM_PROGRESS", "1") != "0"
        with Progress(*columns, disable=not show) as bar:
            task = bar.add_task(self.method.name, total=cfg.max_steps, completed=self.start_step, info="")
            for step in range(self.start_step, cfg.max_steps):
                losses = self.train_step(step)
                done = step + 1
                if self.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
                    record = {"step": done, "time": round(time.time() - t0, 2), **losses,
                              "lr": {n: s.get_last_lr()[0] for n, s in self._schedulers.items()}}
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.update(task, info=" ".join(f"{k}={v:.4f}" for k, v in losses.items()))
                if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                    self.save_checkpoint(done)
                bar.update(task, completed=done)
        return cfg.max_steps

    def export(self, name: str, ema: str | None = None) -> nn.Module:
        """The trained network ``name`` (or its EMA copy ``ema``), unwrapped, on the training device."""
        return self._emas[name][ema].module if ema else self.accelerator.unwrap_model(self._prepared[name])

    def finish(self, summary: dict) -> None:
        if self.is_main:
            atomic_write_text(self.dir / "done.json", json.dumps(_jsonable(summary), indent=2) + "\n")
        self.accelerator.wait_for_everyone()


def _name_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") & (2**62 - 1)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _without_max_steps(cfg: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    out.get("trainer", {}).pop("max_steps", None)
    return out

