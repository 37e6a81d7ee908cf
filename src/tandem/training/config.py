"""What a training is told: the Trainer's config and, for each network a method trains, its optimiser,
LR schedule, update ratio and EMAs (:class:`Trainable`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .checks import require_decay, require_number
from .schedules import LR_SCHEDULES, LRStage

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class Trainable:
    """A network the method trains.

    Attributes:
        name: key under which the method reaches it (``ctx.model(name)``) and its losses are logged.
        module: the network (its parameters with ``requires_grad`` are optimised).
        lr: peak learning rate, reached after ``warmup_steps`` of linear warm-up (0: the network never moves).
        lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` (decays to 0 at ``max_steps``);
            see :func:`~tandem.training.schedules.lr_factor`.
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
        raise ValueError("mixed_precision='fp16' needs a GPU (on the CPU it would compute in fp32 and record fp16); "
                         "use 'bf16' or 'no'")
