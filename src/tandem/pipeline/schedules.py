"""Where the teacher and the student start: the rollback of a refinement (:func:`refine_schedule`) and the
timesteps of an edit (:func:`edit_timesteps`, :func:`teacher_edit_timesteps`).

Rollback conventions (``rollback_convention``):

* ``"paper"`` (default): Algorithm 1, x_sigma = sqrt(1 - sigma) * x + sqrt(sigma) * z. The teacher
  runs ``teacher_steps`` steps, starting at the timestep of its sampler whose alpha-bar is
  nearest to 1 - sigma (the sampler's full schedule is stretched so that its last
  ``teacher_steps`` steps start there); records give the realised sigma.
* ``"strength"``: the official code's img2img convention. ``rollback_sigma`` is diffusers'
  ``strength`` and ``teacher_steps`` the length of the full schedule, of which the last
  ``int(teacher_steps * strength)`` steps run.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np

from ..checks import finite_number, sampler_step_limit, sampler_steps

CONVENTIONS = ("paper", "strength")


@dataclass(frozen=True)
class RefineSchedule:
    num_inference_steps: int  # length of the teacher's full schedule
    strength: float           # diffusers img2img strength that runs ``steps`` of it
    steps: int                # teacher steps actually run
    start_timestep: int
    sigma: float              # realised rollback: 1 - alpha_bar(start_timestep)


def refine_schedule(scheduler, teacher_steps: int, rollback_sigma: float, convention: str = "paper") -> RefineSchedule:
    """Where the teacher starts refining, for ``scheduler`` (not modified) and a rollback value."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown rollback convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    rollback_sigma = rollback_sigma_value(rollback_sigma)
    teacher_steps = sampler_steps(teacher_steps, scheduler, "teacher_steps", "the teacher")
    sched = copy.deepcopy(scheduler)
    alphas = sched.alphas_cumprod
    order = getattr(sched, "order", 1)

    def start(n: int, run: int) -> int:
        sched.set_timesteps(n)
        return int(sched.timesteps[(n - run) * order])

    if convention == "strength":
        run = min(int(teacher_steps * rollback_sigma), teacher_steps)
        if run < 1:
            raise ValueError(f"strength {rollback_sigma} of {teacher_steps} steps runs no teacher step; "
                             "raise teacher_steps or the strength")
        t = start(teacher_steps, run)
        return RefineSchedule(teacher_steps, rollback_sigma, run, t, float(1 - alphas[t]))
    # Stretch the schedule: the more steps in all, the later its last ``teacher_steps`` start.
    target = 1.0 - rollback_sigma
    lo, hi = teacher_steps, sampler_step_limit(sched)  # longer schedules repeat timesteps
    if float(alphas[start(lo, teacher_steps)]) >= target:
        best = lo
    else:
        while hi - lo > 1:  # alpha_bar at the start grows with n; find the first n reaching the target
            mid = (lo + hi) // 2
            if float(alphas[start(mid, teacher_steps)]) >= target:
                hi = mid
            else:
                lo = mid
        best = min((lo, hi), key=lambda n: abs(float(alphas[start(n, teacher_steps)]) - target))
    t = start(best, teacher_steps)
    strength = min(1.0, (teacher_steps + 0.5) / best)  # int(best * strength) == teacher_steps
    return RefineSchedule(best, strength, teacher_steps, t, float(1 - alphas[t]))


def rollback_sigma_value(value) -> float:
    return finite_number(value, "rollback sigma (rollback_sigma)", low=0, low_open=True, high=1)


def edit_timesteps(scheduler, steps: int, strength: float) -> list[int]:
    """The student's img2img timesteps at ``strength`` (diffusers' convention; ``scheduler`` is not modified):
    an LCM scheduler picks ``steps`` of its skipping schedule truncated at ``strength``, any other runs the
    last ``int(steps * strength)`` steps of its ``steps``-step schedule."""
    sched = copy.deepcopy(scheduler)
    if "strength" in inspect.signature(sched.set_timesteps).parameters:
        try:
            sched.set_timesteps(steps, strength=strength)
        except ValueError:  # diffusers' LCM: the grid truncated at ``strength`` holds fewer than ``steps``
            grid = sched.config.get("original_inference_steps")
            fit = f" (at most {int(grid * strength)})" if grid else ""
            raise ValueError(f"{steps} student steps do not fit in the student's schedule at strength {strength:g}"
                             f"{fit}; lower the steps or raise the strength") from None
        ts = [int(t) for t in sched.timesteps]
    else:
        sched.set_timesteps(steps)
        run = min(int(steps * strength), steps)
        order = getattr(sched, "order", 1)
        ts = [int(t) for t in sched.timesteps[(steps - run) * order:]]
    if not ts:
        raise ValueError(f"strength {strength} of {steps} student steps runs no step; raise the steps or the strength")
    return ts


def teacher_edit_timesteps(scheduler, start: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from ``start`` (included) towards 0, for a teacher scheduler
    that accepts custom timesteps (DPM-Solver++; not DDIM or UniPC in diffusers)."""
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"editing needs a teacher scheduler that takes custom timesteps (dpm); "
                         f"{type(scheduler).__name__} does not")
    if steps > start:
        raise ValueError(f"{steps} teacher steps do not fit below timestep {start}; lower the steps "
                         "or raise the strength")
    ts = np.round(np.linspace(start, 0, steps + 1)[:-1]).astype(int)
    return [int(t) for t in ts]
