"""The one Trainer every training shares, built on Hugging Face ``accelerate``.

A *method* (a distillation method: consistency, progressive, knowledge distillation; or one of
the world's component trainings: VAE, CLIP, teacher, ControlNet, oracle) says what it trains
and how a loss is computed; the Trainer owns everything else:

- devices and processes (the same code on a CPU, one GPU, or ``torchrun`` / ``accelerate
  launch`` over many; DDP via ``accelerate``; FSDP through an accelerate config),
- mixed precision (``bf16``/``fp16`` where the device supports it),
- one optimizer per trainable network, each with its own update ratio (``every``) and LR
  schedule (linear warm-up, then constant or a cosine decay to 0 at ``max_steps``; or stages, each
  with its own length, peak, warm-up and shape, as a training in several warm-started stages has),
- gradient accumulation and clipping, EMA copies (kept per network, by name),
- JSONL logs (every loss the method returns, the gradient norm and the LR) and a progress bar
  on the main process,
- snapshots of what the method exports at chosen steps (``snapshot_every``: accuracy against training
  steps from one run),
- periodic atomic checkpoints and exact resume: weights, optimizers, LR schedules, EMAs,
  every process's RNG states and the data position (the step). Checkpoints hold tensors and
  plain data only and are read with ``torch.load(weights_only=True)``: resuming never runs code
  from a file, and a file that would is refused.

A run directory holds ``train_config.json`` (the run's configuration), ``log.jsonl``,
``checkpoint/`` (``state.pt``, ``rng-<process>.pt``, ``meta.json``), what the method exports and,
once the run has finished, ``done.json``. A new run needs a new or empty ``--out`` (checked,
created and probed for writability before any model is loaded; ``keep`` names entries it may
already hold, such as a data cache), and ``--resume`` continues the run whose
``train_config.json`` matches (except ``max_steps`` and ``threads``), from its last checkpoint
(or step 0 when it stopped before its first one), never from a checkpoint past ``max_steps``.

Data comes from a :class:`~tandem.distill.data.BatchSource`: batch ``i`` is a pure function
of ``i``, so the data position is the step and a resumed run sees the batches an
uninterrupted run would have seen. Each optimisation step of each process reads batch
``(step * grad_accum + micro) * world_size + rank``. A data-free method (``uses_data = False``)
draws its own batch from that index (``ctx.batch_index``), as the world's trainings draw theirs
from the world's stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
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

from ..checks import first_difference, read_json_file
from ..generate import derive_seed
from ..outputs import atomic_write_text, make_writable_dir, staged_dir
from ..world.runs import (
    RUN_CONFIG,
    check_new_run_dir,
    load_checkpoint_file,
    require_decay,
    require_number,
    restore_entry,
    trim_log,
)

CHECKPOINT_DIR = "checkpoint"
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
_STATE_PARTS = ("models", "optimizers", "schedulers", "emas")  # of checkpoint/state.pt
SNAPSHOT_DIR = "snapshots"


@dataclass(frozen=True)
class LRStage:
    """One stage of a staged LR schedule: ``steps`` long, a linear warm-up of ``warmup`` steps to ``peak``
    (a factor of the trainable's ``lr``), then ``shape``: ``"constant"`` or ``"cosine"`` (to 0 at the
    stage's end)."""

    steps: int
    shape: str = "constant"
    peak: float = 1.0
    warmup: int = 0

    def __post_init__(self):
        require_number(self.steps, "LR stage: steps", integer=True, at_least=1)
        if self.shape not in LR_SCHEDULES:
            raise ValueError(f"LR stage: shape must be one of {LR_SCHEDULES}, got {self.shape!r}")
        require_number(self.peak, "LR stage: peak (a factor of the learning rate)", above=0.0)
        require_number(self.warmup, "LR stage: warmup", integer=True, at_least=0)
        if self.warmup >= self.steps:
            raise ValueError(f"LR stage: the warm-up ({self.warmup} steps) must be shorter than the stage "
                             f"({self.steps} steps)")


def parse_lr_stages(text: str) -> tuple[LRStage, ...]:
    """``"STEPS[:SHAPE[:PEAK[:WARMUP]]],..."`` as :class:`LRStage` s; e.g. the world teacher's three stages,
    ``"7250:constant:1:500,3600:cosine:0.5:100,3000:cosine:0.2:100"``. A ValueError names the bad stage."""
    stages = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        fields = part.split(":")
        if not part or len(fields) > 4:
            raise ValueError(f"LR stage {i + 1} {part!r}: expected STEPS[:SHAPE[:PEAK[:WARMUP]]]")
        try:
            steps = int(fields[0])
            shape = fields[1] if len(fields) > 1 else "constant"
            peak = float(fields[2]) if len(fields) > 2 else 1.0
            warmup = int(fields[3]) if len(fields) > 3 else 0
        except ValueError:
            raise ValueError(f"LR stage {i + 1} {part!r}: STEPS and WARMUP must be integers, PEAK a number") from None
        try:
            stages.append(LRStage(steps, shape, peak, warmup))
        except ValueError as e:
            raise ValueError(f"LR stage {i + 1} {part!r}: {e}") from None
    return tuple(stages)


@dataclass
class Trainable:
    """A network the method trains.

    Attributes:
        name: key under which the method reaches it (``ctx.model(name)``) and its losses are logged.
        module: the network (its parameters with ``requires_grad`` are optimised).
        lr: peak learning rate, reached after ``warmup_steps`` of linear warm-up (0: the network never moves).
        lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` (decays to 0 at ``max_steps``);
            see :func:`lr_factor`.
        every: update ratio; the network is updated on steps where ``step % every == 0``.
        emas: EMA copies to keep, ``{ema_name: decay}``; reach them with ``ctx.ema(name, ema_name)``.
        make_optimizer: ``params -> Optimizer`` [AdamW(lr, betas, weight_decay)]; it may build parameter groups
            with learning rates of their own (the LR schedule scales every group's).
        lr_stages: a staged schedule instead (its lengths add up to the run's ``max_steps``; each stage has its
            own warm-up, so ``warmup_steps`` must be 0 and ``lr_schedule`` constant).
    """

    name: str
    module: nn.Module
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    every: int = 1
    emas: dict[str, float] = field(default_factory=dict)
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    lr_stages: tuple[LRStage, ...] = ()

    def __post_init__(self):
        if not self.name:
            raise ValueError("a trainable needs a name")
        require_number(self.lr, f"{self.name}: lr", at_least=0.0)
        if len(self.betas) != 2:
            raise ValueError(f"{self.name}: betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            require_decay(beta, f"{self.name}: betas")
        require_number(self.weight_decay, f"{self.name}: weight_decay", at_least=0.0)
        require_number(self.warmup_steps, f"{self.name}: warmup_steps", integer=True, at_least=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{self.name}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.grad_clip is not None:
            require_number(self.grad_clip, f"{self.name}: grad_clip", above=0.0)
        require_number(self.every, f"{self.name}: every", integer=True, at_least=1)
        for ema_name, decay in self.emas.items():
            require_decay(decay, f"{self.name}: EMA {ema_name!r} decay")
        if self.lr_stages and (self.warmup_steps or self.lr_schedule != "constant"):
            raise ValueError(f"{self.name}: a staged LR schedule carries its own warm-ups and shapes; "
                             f"warmup_steps ({self.warmup_steps}) and lr_schedule ({self.lr_schedule!r}) do not apply")


def staged_lr_factor(step: int, stages: tuple[LRStage, ...]) -> float:
    """The LR factor at ``step`` of a staged schedule: within stage ``s`` starting at ``start``, with
    ``k = step - start``, ``peak (k + 1) / warmup`` during the warm-up, then ``peak`` (constant) or
    ``peak (1 + cos(pi p)) / 2`` with ``p = (k - warmup) / (steps - warmup)`` (cosine). Past the last stage
    the last stage's end value holds."""
    start = 0
    for stage in stages:
        k = step - start
        if k < stage.steps or stage is stages[-1]:
            k = min(k, stage.steps)
            if k < stage.warmup:
                return stage.peak * (k + 1) / stage.warmup
            if stage.shape == "constant":
                return stage.peak
            return stage.peak * 0.5 * (1 + math.cos(math.pi * (k - stage.warmup) / (stage.steps - stage.warmup)))
        start += stage.steps
    raise ValueError("a staged LR schedule needs at least one stage")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "constant") -> float:
    """The factor on the peak LR for optimisation step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps; then 1
    (``"constant"``) or ``(1 + cos(pi * p)) / 2`` with ``p = (step - warmup_steps) / (max_steps -
    warmup_steps)`` clipped to 1 (``"cosine"``: SGDR's decay without restarts, Loshchilov & Hutter 2017).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))))


class Method(Protocol):
    """What a training method declares."""

    name: str
    uses_data: bool  # False for data-free methods: the Trainer then never reads a batch

    def trainables(self) -> list[Trainable]: ...

    def frozen(self) -> dict[str, nn.Module]:
        """Networks the method uses but never trains (e.g. the teacher); moved to the device, eval mode,
        without gradients."""
        ...

    def step(self, batch: Any, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses for updating the trainable ``update``; the Trainer backpropagates ``losses["loss"]``.
        Only ``update``'s optimizer steps on it: gradients the loss leaves on other trainables (a generator
        loss backpropagated through a critic) are discarded, never added to their next update."""
        ...

    # Optional: a method with state of its own (a replay buffer, a stage, counters) defines
    # ``state_dict() -> dict`` (tensors and plain data) and ``load_state_dict(state)``; the Trainer keeps
    # it in every checkpoint and restores it on resume. ``state_dict()`` returning None means no state in this
    # run (an option that keeps state is off), and its checkpoints hold none.


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
    snapshot_every: int | None = None  # export the method's result every N steps into snapshots/step-N

    def __post_init__(self):
        require_number(self.max_steps, "max_steps", integer=True, at_least=1)
        require_number(self.seed, "seed", integer=True, at_least=0)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        require_number(self.grad_accum, "grad_accum", integer=True, at_least=1)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        require_number(self.checkpoint_every, "checkpoint_every", integer=True, at_least=1)
        require_number(self.log_every, "log_every", integer=True, at_least=1)
        if self.threads is not None:
            require_number(self.threads, "threads", integer=True, at_least=1)
        if self.snapshot_every is not None:
            require_number(self.snapshot_every, "snapshot_every", integer=True, at_least=1)


def check_precision(mixed_precision: str, cpu: bool | None = None) -> None:
    """Refuse a precision the device would not compute in: fp16 autocast needs a GPU (on the CPU accelerate
    computes in fp32 while the run would record fp16). ``cpu``: the run is on the CPU [when no GPU is here]."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if mixed_precision == "fp16" and cpu:
        raise ValueError("mixed_precision fp16 needs a GPU (on the CPU it would compute in fp32 and record fp16); "
                         "use 'bf16' or 'no' (--mixed-precision)")


class EMACopy:
    """An exponential moving average of a module, kept as a module (so a method can run it)."""

    def __init__(self, module: nn.Module, decay: float, device: torch.device | str = "cpu"):
        require_decay(decay, "EMA decay")
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


def check_run_dir(out_dir: str | Path, resume: bool, max_steps: int, num_processes: int | None = None,
                  keep: tuple[str, ...] = ()) -> Path | None:
    """Check that ``out_dir`` can hold this run before any model is loaded, and create it.

    A new run needs a new or empty directory (``keep``: names it may already hold, such as a data
    cache an earlier run left for this one); a resumed one a ``train_config.json`` (read as JSON
    here) and, if it checkpointed, a checkpoint at most at ``max_steps`` (written by ``num_processes``
    processes, when given). Either way the directory is created and proved writable; nothing is
    written in it.

    Returns:
        the checkpoint directory a resumed run continues from (``None`` for a new run, or for a run
        stopped before its first checkpoint, which starts again at step 0).
    """
    path = Path(out_dir)
    if not resume:
        check_new_run_dir(path, (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", "done.json"), keep)
        make_writable_dir(path)
        return None
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {path} (no {RUN_CONFIG}: no run there)")
    read_json_file(path / RUN_CONFIG, "run config")
    ckpt = _checkpoint_dir(path)
    if ckpt is None and (path / "done.json").exists():  # finished, then its checkpoint was removed
        raise FileNotFoundError(f"--resume: no checkpoint in {path} (the run finished; its checkpoint is gone)")
    if ckpt is not None:
        meta = _checkpoint_meta(ckpt)
        if meta["step"] > max_steps:
            raise ValueError(f"the checkpoint in {path} is at step {meta['step']}, past --max-steps {max_steps}; "
                             f"resume with --max-steps {meta['step']} or more")
        if num_processes is not None and meta["num_processes"] != num_processes:
            raise ValueError(f"--resume: the checkpoint was written by {meta['num_processes']} processes; "
                             f"resume it with the same number (this run has {num_processes})")
        # read (tensors memory-mapped, so cheaply) now rather than after the models load: a damaged or
        # foreign checkpoint file is refused first
        for name in ("state.pt", *(f"rng-{i}.pt" for i in range(meta["num_processes"]))):
            load_checkpoint_file(ckpt / name, mmap=True)
    make_writable_dir(path)
    return ckpt


def _checkpoint_dir(run_dir: Path) -> Path | None:
    """``checkpoint/``, or ``checkpoint.old/`` after a crash between the two renames of a save; None if neither."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
            return run_dir / name
    return None


def _checkpoint_meta(ckpt: Path) -> dict:
    meta = read_json_file(ckpt / "meta.json", "checkpoint")
    if not all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ("step", "num_processes")):
        raise ValueError(f"checkpoint {ckpt / 'meta.json'} lacks its step or number of processes; it is damaged")
    return meta


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class Trainer:
    """Train ``method`` into ``out_dir``.

    A new run needs a new or empty directory (``keep``: names it may already hold); ``resume=True``
    continues the run in it, and then the run's saved configuration must match, except for ``max_steps``
    and ``threads``.
    ``source`` is the data (a ``BatchSource``; ``None`` for a data-free method); ``run_config`` is saved
    in ``train_config.json`` beside the method's name and the Trainer's config; ``cpu`` forces the CPU
    [default: the GPU where there is one].
    """

    def __init__(self, method: Method, source, cfg: TrainerConfig, out_dir: str | Path,
                 resume: bool = False, run_config: dict | None = None, cpu: bool | None = None,
                 keep: tuple[str, ...] = (), snapshot: Callable[[Path], None] | None = None):
        from accelerate import Accelerator

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.method, self.source, self.cfg = method, source, cfg
        self.dir = Path(out_dir)
        self.resume, self.keep, self.snapshot = resume, keep, snapshot
        if cfg.snapshot_every is not None and snapshot is None:
            raise ValueError(f"method {method.name}: snapshot_every is set but nothing exports a snapshot")
        self.run_config = {"method": method.name, "trainer": dataclasses.asdict(cfg), **(run_config or {})}
        if cpu is None:
            cpu = not torch.cuda.is_available()
        check_precision(cfg.mixed_precision, cpu)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
        checkpoint = self._check_run_dir()
        torch.manual_seed(cfg.seed)
        self.trainables = {t.name: t for t in method.trainables()}  # each checked by Trainable.__post_init__
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
            if t.lr_stages and sum(stage.steps for stage in t.lr_stages) != cfg.max_steps:
                raise ValueError(f"{t.name}: the LR stages add up to {sum(s.steps for s in t.lr_stages)} steps, "
                                 f"not the run's max_steps {cfg.max_steps}")
            params = [p for p in t.module.parameters() if p.requires_grad]
            opt = (t.make_optimizer(params) if t.make_optimizer is not None
                   else torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps, cfg.max_steps, t.lr_schedule,
                                                                    t.lr_stages))
            # the LR schedule stays unprepared: accelerate would step it once per process
            module, opt = self.accelerator.prepare(t.module, opt)
            self._prepared[t.name], self._optimizers[t.name], self._schedulers[t.name] = module, opt, sched
        self.ctx = StepContext(self)
        self.start_step = self._load(checkpoint) if checkpoint is not None else 0
        self.steps_done = self.start_step  # what an export records as the steps trained
        self._open_run()

    # -- run directory -------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _check_run_dir(self) -> Path | None:
        """Every check of the run directory, in every process, before anything is loaded or written."""
        ckpt = check_run_dir(self.dir, self.resume, self.cfg.max_steps, self.accelerator.num_processes, self.keep)
        if self.resume:
            cfg_path = self.dir / RUN_CONFIG
            saved = _without_resumable_changes(read_json_file(cfg_path, "run config"))
            requested = _without_resumable_changes(_jsonable(self.run_config))
            if saved != requested:
                raise ValueError(f"--resume: the configuration differs from the one saved in {cfg_path} "
                                 f"({first_difference(saved, requested)}); a resumed run may change only "
                                 f"{', '.join(RESUMABLE_CHANGES)}")
        self.accelerator.wait_for_everyone()
        return ckpt

    def _open_run(self) -> None:
        """Write the run's config (a resumed run: once its checkpoint has loaded, with its log trimmed to the
        checkpoint's step and the previous ``done.json`` removed until the run finishes again)."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if self.resume:
                trim_log(self.dir / "log.jsonl", self.start_step)
                (self.dir / "done.json").unlink(missing_ok=True)
            atomic_write_text(self.dir / RUN_CONFIG, json.dumps(_jsonable(self.run_config), indent=2) + "\n")
        self.accelerator.wait_for_everyone()

    # -- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        unwrap = self.accelerator.unwrap_model
        return {
            "models": {n: unwrap(m).state_dict() for n, m in self._prepared.items()},
            "optimizers": {n: o.state_dict() for n, o in self._optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self._schedulers.items()},
            "emas": {n: {e: c.module.state_dict() for e, c in emas.items()} for n, emas in self._emas.items()},
            **({"method": state} if (state := _method_state(self.method)) is not None else {}),
        }

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint/`` atomically: every process writes into a temporary directory, then
        the main process swaps it in by renames (the previous checkpoint survives a crash). Whatever
        lies at the temporary and old names (a symlink included) is removed, never followed."""
        acc = self.accelerator
        tmp, final, old = (self.dir / f"{CHECKPOINT_DIR}{s}" for s in (".tmp", "", ".old"))
        if self.is_main:
            _remove(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if self.is_main:
            torch.save(self._state(), tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "num_processes": acc.num_processes}) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            if final.exists() or final.is_symlink():
                _remove(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        acc.wait_for_everyone()

    def _load(self, ckpt: Path) -> int:
        """Restore weights, optimizers, LR schedules, EMAs and this process's RNG states from ``ckpt``."""
        acc = self.accelerator
        meta = _checkpoint_meta(ckpt)
        state_path = ckpt / "state.pt"
        state = load_checkpoint_file(state_path)
        if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in _STATE_PARTS):
            raise ValueError(f"checkpoint {state_path} is not a tandem Trainer checkpoint")
        for n, m in self._prepared.items():
            restore_entry(acc.unwrap_model(m), state, ("models", n), state_path)
        for n, o in self._optimizers.items():
            restore_entry(o, state, ("optimizers", n), state_path)
        for n, s in self._schedulers.items():
            configured = list(s.base_lrs)  # this run's peak LRs: a resume may lower them (a run that diverged)
            restore_entry(s, state, ("schedulers", n), state_path)
            s.base_lrs = configured
            for group, base_lr in zip(s.optimizer.param_groups, configured):
                group["initial_lr"] = base_lr
            # the next step's LR under this run's schedule, not the one saved with the optimizer: they differ
            # when a run resumes with another max_steps (a cosine decays to the new end); else the same bits
            for group, base_lr, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base_lr * factor(s.last_epoch)
            s._last_lr = [group["lr"] for group in s.optimizer.param_groups]
        for n, emas in self._emas.items():
            for e, c in emas.items():
                restore_entry(c.module, state, ("emas", n, e), state_path)
        if _method_state(self.method) is not None:
            restore_entry(self.method, state, ("method",), state_path)
        rng_path = ckpt / f"rng-{acc.process_index}.pt"
        _set_rng_state(load_checkpoint_file(rng_path), rng_path)
        return meta["step"]

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
            self._zero_grads()  # networks that train against each other never see each other's gradients
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
                    self._check_finite(losses, name, step)
                    acc.backward(losses["loss"] / cfg.grad_accum)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if t.grad_clip is not None:
                sums["grad_norm"] = float(acc.clip_grad_norm_(self._clipped(name), t.grad_clip))
            opt.step()
            self._schedulers[name].step()
            self._zero_grads()
            for e in self._emas[name].values():
                e.update(acc.unwrap_model(model))
            for k, v in sums.items():
                logged[f"{name}/{k}" if len(self.trainables) > 1 else k] = v
        if acc.num_processes > 1 and logged:
            keys = sorted(logged)
            values = acc.reduce(torch.tensor([logged[k] for k in keys], device=acc.device), reduction="mean")
            logged = dict(zip(keys, values.tolist()))
        return logged

    def _check_finite(self, losses: dict, name: str, step: int) -> None:
        """Stop the run at the first non-finite loss, naming it (before it reaches any weight); the method's
        ``divergence_hint`` says what to try."""
        from ..checks import NonFiniteError

        for key, value in losses.items():
            if not bool(torch.isfinite(value.detach()).all()):
                lower = getattr(self.method, "divergence_hint", "a lower --lr")
                ckpt = _checkpoint_dir(self.dir)
                if ckpt is not None:
                    hint = (f"resume from its last checkpoint (step {_checkpoint_meta(ckpt)['step']}) with --resume "
                            f"and {lower}")
                else:
                    hint = f"it wrote no checkpoint yet, so nothing of it is kept: start it again with {lower}"
                raise NonFiniteError(f"{self.method.name} diverged: the {name}'s {key} is {float(value.detach())} at "
                                     f"step {step}; {hint}")

    def _clipped(self, name: str) -> list[nn.Parameter]:
        """The parameters whose gradients ``name``'s clipping measures: those its optimizer steps, in the
        optimizer's order (the order the norm sums in; parameter groups may reorder the network's), or, under
        FSDP, the prepared network's own (accelerate clips a sharded network through it)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return list(self._prepared[name].parameters())
        return [p for group in self._optimizers[name].param_groups for p in group["params"]]

    def _zero_grads(self) -> None:
        """Drop the gradients of every trainable network (each optimizer holds one network's parameters)."""
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)

    def train(self) -> int:
        """Run from the start (or the resumed) step to ``max_steps``; returns the final step. A new run that fails
        before its first checkpoint removes what it wrote (:meth:`_forget_unsaved_run`)."""
        try:
            self._train_loop()
        except Exception:
            self._forget_unsaved_run()
            raise
        return self.cfg.max_steps

    def _forget_unsaved_run(self) -> None:
        """A new run that fails before its first checkpoint (bad data, divergence) keeps nothing to resume: remove
        what it wrote (its config, log and snapshots), so that the corrected run may start in the same ``--out``."""
        if self.resume or not self.is_main or _checkpoint_dir(self.dir) is not None:
            return
        for name in (RUN_CONFIG, "log.jsonl", SNAPSHOT_DIR):
            _remove(self.dir / name)

    def _train_loop(self) -> None:
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
                done = self.steps_done = step + 1
                if self.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
                    record = {"step": done, "time": round(time.time() - t0, 2), **losses,
                              "lr": {n: s.get_last_lr()[0] for n, s in self._schedulers.items()}}
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.update(task, info=" ".join(f"{k}={v:.4f}" for k, v in losses.items()))
                if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.max_steps:
                    self.save_snapshot(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                    self.save_checkpoint(done)
                bar.update(task, completed=done)

    def save_snapshot(self, step: int) -> None:
        """Export the method's result as it stands into ``snapshots/step-<step>`` (main process; written beside it
        and swapped into place by :func:`tandem.outputs.staged_dir`, so a snapshot is whole or absent; one a crashed
        run wrote before its checkpoint is replaced by the resumed run's, which is the same)."""
        if self.is_main:
            with staged_dir(self.dir / SNAPSHOT_DIR / f"step-{step}") as staging:
                self.snapshot(staging)
        self.accelerator.wait_for_everyone()

    def export(self, name: str, ema: str | None = None) -> nn.Module:
        """The trained network ``name`` (or its EMA copy ``ema``), unwrapped, on the training device."""
        return self._emas[name][ema].module if ema else self.accelerator.unwrap_model(self._prepared[name])

    def finish(self, summary: dict) -> None:
        if self.is_main:
            atomic_write_text(self.dir / "done.json", json.dumps(_jsonable(summary), indent=2) + "\n")
        self.accelerator.wait_for_everyone()


def _lr_lambda(warmup_steps: int, max_steps: int, schedule: str,
               stages: tuple[LRStage, ...] = ()) -> Callable[[int], float]:
    """``lr_factor`` (or ``staged_lr_factor``) as ``LambdaLR`` calls it (a plain function: ``LambdaLR`` keeps no
    state of it in checkpoints, so a run resumed with a new ``max_steps`` decays to the new one)."""
    def factor(step: int) -> float:
        if stages:
            return staged_lr_factor(step, stages)
        return lr_factor(step, warmup_steps, max_steps, schedule)
    return factor


def _method_state(method) -> dict | None:
    """The method's own state to checkpoint, or None (no ``state_dict``, or it returns None)."""
    return method.state_dict() if hasattr(method, "state_dict") else None


def _name_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") & (2**62 - 1)


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain data (what ``torch.load(weights_only=True)`` reads)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Any, path: Path) -> None:
    """Restore what :func:`_rng_state` saved (read from ``path``)."""
    try:
        numpy_state, python_state = state["numpy"], state["python"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
        raise ValueError(f"checkpoint {path} holds no valid RNG state; it is damaged or not tandem's") from None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# what a resume may change: how long, on how many threads, how often it snapshots, and its learning rates (lower
# ones, after a divergence)
RESUMABLE_CHANGES = ("max_steps", "threads", "snapshot_every", "lr", "disc_lr", "critic_lr")


def _without_resumable_changes(cfg: dict) -> dict:
    """The run config less what a resume may change (:data:`RESUMABLE_CHANGES`: a longer run, another
    thread count), wherever a section records it."""
    out = json.loads(json.dumps(cfg))
    for section in out.values():
        if isinstance(section, dict):
            for key in RESUMABLE_CHANGES:
                section.pop(key, None)
    return out
