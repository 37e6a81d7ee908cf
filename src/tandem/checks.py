"""Checks at the library's boundaries, each failing loudly with a ``ValueError`` that names the problem:
numbers that must be finite and in range, step counts a sampler can take, tensors a model produced,
JSON files that must hold an object, and user text quoted in an error message (cut to a readable length).

Imports no torch at module level: the caption grammar quotes with it, and the command line loads
the grammar before it knows whether it needs a model."""

from __future__ import annotations

import copy
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

QUOTE_LIMIT = 80  # characters of user text an error message quotes


class NonFiniteError(ValueError):
    """A model produced NaN or infinity (broken weights, an overflowing dtype or extreme settings):
    the run stops instead of returning black or garbled images."""


def quote(text, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, or for text longer than ``limit`` characters its first ``limit`` characters,
    an ellipsis and the full length: ``'a red circle a red ...'… (100000 characters)``."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _show(value) -> str:
    """A value for an error message: strings and long reprs cut by ``quote``."""
    return quote(value) if isinstance(value, str) else repr(value) if len(repr(value)) <= QUOTE_LIMIT \
        else quote(repr(value))


def _real(value, name: str) -> float:
    """``value`` as a float if it is one real number (not a bool, a string or a multi-element tensor)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array or torch tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a ValueError, as every bad argument is
        raise ValueError(f"{name} must be a number, got {_show(value)}")  # noqa: TRY004
    return float(value)


def finite_number(value, name: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` when it is not a real number, is NaN or
    infinite, or lies outside ``[low, high]`` (an end excluded where ``low_open``/``high_open``)."""
    x = _real(value, name)
    interval = _interval(low, high, low_open, high_open)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number{' ' + interval if interval else ''}, got {x}")
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    if below or above:
        raise ValueError(f"{name} must be {interval}, got {x:g}")
    return x


def _interval(low, high, low_open, high_open) -> str:
    """The allowed range in words: ">= 0", "> 0", "<= 1", "in (0, 1]"."""
    if low is None and high is None:
        return ""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def threshold_value(value, name: str = "accept_threshold") -> float:
    """A cut-off tau: any real number but NaN (every comparison with NaN is false, so no image would go
    to the teacher). +inf sends every image to the teacher, -inf none."""
    x = _real(value, name)
    if math.isnan(x):
        raise ValueError(f"{name} must be a number, got nan (no score is below a NaN threshold)")
    return x


def count(value, name: str, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (steps, batch sizes, seeds): ints and whole floats (4.0) pass;
    NaN, infinity, 2.5, bools and strings are a ``ValueError`` naming ``name``."""
    whole = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral)
        or isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if not whole:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {_show(value)}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _runs(scheduler, steps: int) -> bool:
    """Whether ``scheduler`` (modified) takes ``steps`` steps at distinct timesteps inside its training range."""
    if steps > scheduler.config.num_train_timesteps:  # never: and a linspace of 10**9 steps would fill the memory
        return False
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, IndexError, ZeroDivisionError):
        return False
    ts = scheduler.timesteps
    ts = np.asarray(ts.cpu() if hasattr(ts, "cpu") else ts)
    total = scheduler.config.num_train_timesteps
    # second-order samplers (Heun) repeat each timestep by design: count distinct ones
    return len(np.unique(ts)) >= steps and ts.min() >= 0 and ts.max() < total


def sampler_step_limit(scheduler) -> int:
    """The most steps ``scheduler`` (not modified) can take: an LCM scheduler's distillation grid
    (``original_inference_steps``), any other at most its ``num_train_timesteps``, fewer where its
    spacing rounds two steps onto one timestep (DPM-Solver++ and UniPC with linspace spacing: 999 of 1000)."""
    sched = copy.deepcopy(scheduler)
    lo, hi = 0, int(sched.config.num_train_timesteps)
    if _runs(sched, hi):
        return hi
    while hi - lo > 1:  # _runs holds below the limit and fails above it
        mid = (lo + hi) // 2
        if _runs(sched, mid):
            lo = mid
        else:
            hi = mid
    return lo


def sampler_steps(value, scheduler, name: str, who: str = "the sampler") -> int:
    """``value`` as a step count that ``scheduler`` can take, checked before any model runs: a
    ``ValueError`` naming ``name`` and the limit (``who`` says whose sampler it is: "the teacher")."""
    steps = count(value, name)
    if _runs(copy.deepcopy(scheduler), steps):
        return steps
    limit = sampler_step_limit(scheduler)
    total = scheduler.config.num_train_timesteps
    original = scheduler.config.get("original_inference_steps")
    why = (f"its distillation grid has {original} timesteps" if original is not None and limit == min(original, total)
           else f"more would repeat or overrun its {total} training timesteps")
    raise ValueError(f"{name} must be at most {limit} for {who}'s {type(scheduler).__name__} ({why}), got {steps}")


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (``what`` it is: "run config", "preset file"); a missing file is a
    ``FileNotFoundError``, anything else that is not a JSON object a ``ValueError``, each naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                         "it is damaged, or it is not tandem's") from None
    if not isinstance(data, dict):  # bad file content, not a bad argument: a ValueError, which the CLI reports
        raise ValueError(f"{what} {path} does not hold a JSON object; it is not tandem's")  # noqa: TRY004
    return data


def check_finite(x, what: str, indices: Sequence[int] | None = None) -> None:
    """Raise ``NonFiniteError`` if any row of ``x`` [B, ...] holds NaN or infinity.

    Args:
        x: a model's output (a tensor or array [B, ...]), one row per image.
        what: what it is, as the subject of the message ("the student's latents").
        indices: the prompt index of each row (default 0 .. B-1), named in the message.
    """
    import torch

    t = torch.as_tensor(x)
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1) if t.ndim else ~torch.isfinite(t).reshape(1)
    if not bool(bad.any()):
        return
    rows = [int(i) for i in torch.nonzero(bad).flatten()]
    prompts = [int(indices[r]) if indices is not None else r for r in rows]
    shown = ", ".join(map(str, prompts[:10])) + (f" and {len(prompts) - 10} more" if len(prompts) > 10 else "")
    raise NonFiniteError(f"{what} are not finite (NaN/inf) for prompt{'s' if len(prompts) > 1 else ''} {shown}: "
                         "the model's weights, dtype or settings produce NaN; no image is returned")
