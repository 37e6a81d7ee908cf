"""The checks every training config's numbers take (the Trainer's, each method's, each world training's), and
a config's JSON form.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..checks import count, finite_number


def require_number(value: Any, name: str, *, integer: bool = False, at_least: float | None = None,
                   above: float | None = None, below: float | None = None, at_most: float | None = None) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number (a whole number if
    ``integer``) within the given bounds: ``at_least <= value``, ``above < value``, ``value < below``,
    ``value <= at_most`` (the checks of :mod:`tandem.checks`)."""
    if integer:
        n = count(value, name, minimum=int(at_least) if at_least is not None else -(2**63))
        finite_number(n, name, high=at_most)
        return
    low, low_open = (above, True) if above is not None else (at_least, False)
    high, high_open = (below, True) if below is not None else (at_most, False)
    finite_number(value, name, low=low, high=high, low_open=low_open, high_open=high_open)


def require_decay(value: Any, name: str) -> None:
    """An EMA decay: a finite number in [0, 1)."""
    require_number(value, name, at_least=0.0, below=1.0)


def require_probability(value: Any, name: str) -> None:
    require_number(value, name, at_least=0.0, at_most=1.0)


def require_training_fields(cfg: Any) -> None:
    """The fields every world training config has: ``seed``, ``max_steps``, ``lr`` (0 is allowed: a run
    that must leave its warm start unchanged), ``warmup_steps``, ``checkpoint_every`` and ``threads``."""
    require_number(cfg.seed, "seed", integer=True, at_least=0)
    require_number(cfg.max_steps, "max_steps", integer=True, at_least=1)
    require_number(cfg.lr, "lr", at_least=0.0)
    require_number(cfg.warmup_steps, "warmup_steps", integer=True, at_least=0)
    require_number(cfg.checkpoint_every, "checkpoint_every", integer=True, at_least=1)
    require_number(cfg.threads, "threads", integer=True, at_least=1)


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
