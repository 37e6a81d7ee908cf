"""Learning-rate schedules of the Trainer: a linear warm-up, then constant or a cosine decay to 0 at
``max_steps``; or stages, each with its own length, peak, warm-up and shape (a training in several
warm-started stages)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .checks import require_number

LR_SCHEDULES = ("constant", "cosine")


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


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str,
              stages: tuple[LRStage, ...] = ()) -> Callable[[int], float]:
    """``lr_factor`` (or ``staged_lr_factor``) as ``LambdaLR`` calls it (a plain function: ``LambdaLR`` keeps no
    state of it in checkpoints, so a run resumed with a new ``max_steps`` decays to the new one)."""
    def factor(step: int) -> float:
        if stages:
            return staged_lr_factor(step, stages)
        return lr_factor(step, warmup_steps, max_steps, schedule)
    return factor
