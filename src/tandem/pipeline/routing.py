"""Routing: which images the teacher improves. One resolver (:func:`resolve_cutoff`) turns a call's
``accept_threshold`` / ``percentile`` / ``budget`` / ``routing`` into a :class:`Cutoff` (tau, or the
budget-exact count); :func:`route_for_budget` picks a route table's settings for a budget alone and
:func:`resolve_cascade` a cascade's levels."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..calibration import RECALIBRATE, RECALIBRATE_EDITS, Calibration, CalibrationTieWarning, percentile_k_for_budget
from ..cascade import Cascade, CascadeTable, check_levels
from ..checks import finite_number, threshold_value

# how an adaptive call picks the images to improve: every image scoring below tau (from accept_threshold,
# percentile or budget), or exactly the lowest-scoring images that ``budget`` pays for ("budget-exact")
ROUTINGS = ("threshold", "budget-exact")


# Messages name the call's arguments as Python spells them (the command line shows its options for them).
NOT_ADAPTIVE = "accept_threshold, percentile and budget apply to mode='adaptive', not {mode!r}"


def budget_exact_count(n: int, budget, student_cost: float, improve_cost: float, accept_threshold=None,
                       percentile=None) -> int:
    """How many of ``n`` images a budget of ``budget`` UNet evaluations per image pays the teacher for,
    when each costs ``student_cost`` and an improved one ``improve_cost`` more: the largest m with
    ``n * student_cost + m * improve_cost <= n * budget`` (so the batch's mean cost never exceeds it)."""
    if budget is None or accept_threshold is not None or percentile is not None:
        raise ValueError("routing='budget-exact' takes budget and neither accept_threshold nor percentile")
    percentile_k_for_budget(budget, student_cost, improve_cost)  # the budget's own checks, named
    return min(n, int(np.floor(n * (budget - student_cost) / improve_cost + 1e-9)))


def lowest_scores(scores: np.ndarray, m: int) -> list[int]:
    """The indices of the ``m`` lowest ``scores`` (the earlier image first among equal scores), in index order."""
    order = np.lexsort((np.arange(len(scores)), scores))
    return sorted(int(i) for i in order[:m])


@dataclass(frozen=True)
class Cutoff:
    """How a call picks the images the teacher improves (:meth:`TandemPipeline._cutoff`): in adaptive mode
    those scoring below ``tau`` (given, or the calibration's percentile ``k``; ``note`` where tied scores send
    another share), or under budget-exact routing exactly the ``exact`` lowest-scoring."""

    routing: str
    tau: float | None = None
    k: float | None = None
    note: str | None = None
    exact: int | None = None

    def improved(self, scores: np.ndarray) -> list[int]:
        if self.exact is not None:
            return lowest_scores(scores, self.exact)
        return [i for i, score in enumerate(scores) if score < self.tau]


def resolve_routing(defaults: dict, routing: str | None, mode: str) -> str:
    """The call's routing (:data:`ROUTINGS`), checked: a routing other than the default is adaptive only."""
    given = routing is not None
    routing = routing if given else defaults.get("routing", "threshold")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; expected one of {', '.join(ROUTINGS)}")
    if given and routing != "threshold" and mode != "adaptive":
        raise ValueError(f"routing={routing!r} applies to mode='adaptive', not {mode!r}")
    return routing


def resolve_cutoff(pipe, mode: str, routing: str | None, n: int, accept_threshold, percentile, budget, steps: int,
                   guidance: float, student_cost: float, improve_cost: float, calibration: Calibration | None = None,
                   task: dict | None = None, drafts: int = 1) -> Cutoff:
    """The :class:`Cutoff` of a call of ``n`` images to ``pipe`` (generation, or an edit's ``task``): its routing
    checked, and in adaptive mode tau (:func:`resolve_threshold`) or the budget-exact count; the adaptive arguments
    given in another mode are refused."""
    routing = resolve_routing(pipe.defaults, routing, mode)
    if mode != "adaptive":
        if any(v is not None for v in (accept_threshold, percentile, budget)):
            raise ValueError(NOT_ADAPTIVE.format(mode=mode))
        return Cutoff(routing)
    if routing == "budget-exact":
        return Cutoff(routing, exact=budget_exact_count(n, budget, student_cost, improve_cost, accept_threshold,
                                                        percentile))
    return Cutoff(routing, *resolve_threshold(pipe, accept_threshold, percentile, budget, steps, guidance,
                                              student_cost, improve_cost, calibration=calibration, task=task,
                                              drafts=drafts))


def resolve_threshold(pipe, accept_threshold, percentile, budget, steps, guidance, student_cost, improve_cost,
                      calibration: Calibration | None = None, task: dict | None = None, drafts: int = 1):
    """(tau, k, note): the cut-off of an adaptive call, the percentile it came from (None for a given
    tau), and a sentence when tied calibration scores send another share than k to the teacher. With
    ``drafts`` N > 1 the calibration must be of the best-of-N scores."""
    given = [name for name, v in (("accept_threshold", accept_threshold), ("percentile", percentile),
                                  ("budget", budget)) if v is not None]
    if not given and pipe.defaults.get("percentile") is not None:
        percentile, given = pipe.defaults["percentile"], ["percentile"]
    if len(given) != 1:
        raise ValueError("adaptive mode needs exactly one of accept_threshold (tau), percentile (k) or budget; "
                         f"got {', '.join(given) if given else 'none'}")
    if accept_threshold is not None:
        return threshold_value(accept_threshold, "accept_threshold"), None, None
    if percentile is not None:
        percentile = finite_number(percentile, "percentile", low=0, high=100)
    if budget is not None:
        budget = finite_number(budget, "budget", low=0, low_open=True)
    if calibration is None and task is not None and drafts > 1:
        strength = task["edit_strength"]
        raise ValueError(f"{', '.join(given)} with drafts={drafts} needs a best-of-{drafts} edit calibration: pass "
                         f"calibration=pipe.calibrate_edits(images, prompts, strength={strength:g}, drafts={drafts}), "
                         "or pass accept_threshold")
    if calibration is None:
        calibration = pipe.calibration if task is None else pipe.edit_calibrations.get(task["edit_strength"])
    if calibration is None:
        if task:
            strength = task["edit_strength"]
            make = (f"an edit calibration for strength {strength:g}: make one with pipe.edit_calibrations"
                    f"[{strength:g}] = pipe.calibrate_edits(images, prompts, strength={strength:g})")
        elif drafts > 1:
            make = (f"a best-of-{drafts} calibration: make one with pipe.draft_calibrations[{drafts}] = "
                    f"pipe.calibrate(prompts, drafts={drafts})")
        else:
            make = "a calibration: make one with pipe.calibration = pipe.calibrate(prompts)"
        raise ValueError(f"{', '.join(given)} needs {make}, or pass accept_threshold")
    calibration.check(pipe.calibration_fingerprint(steps, guidance, task, drafts),
                      RECALIBRATE_EDITS if task else RECALIBRATE if drafts == 1 else
                      f"pipe.calibrate(prompts, drafts={drafts}) (kept in pipe.draft_calibrations[{drafts}])")
    k = percentile if percentile is not None else percentile_k_for_budget(budget, student_cost, improve_cost)
    note = calibration.tie_note(k)
    if note is not None:
        note = (f"percentile {k:g}: {note}" if budget is None else
                f"budget {budget:g} asks for percentile {k:.1f}: {note}; the run spends less than the budget")
        warnings.warn(note, CalibrationTieWarning, stacklevel=6)  # the caller of __call__ or edit (torch.no_grad adds a frame)
    return calibration.threshold(k), float(k), note


def resolve_cascade(pipe, cascade, mode: str, steps: int, guidance: float, budget, routing,
                    given: dict) -> tuple[object, dict | None]:
    """The cascade of a call: None, a ``Cascade`` as given, or a ``CascadeTable``'s best point at ``budget``
    (then also returned: its last tau and teacher settings, for a call that set none of them)."""
    if cascade is None:
        return None, None
    if mode != "adaptive":
        raise ValueError(f"a cascade applies to mode='adaptive', not {mode!r}")
    if isinstance(cascade, Cascade):
        if budget is not None:
            raise ValueError("a budget needs a cascade table (tandem.cascade.CascadeTable: "
                             "pipe.calibrate_cascade(prompts, levels)), which knows what each level costs; a Cascade "
                             "takes thresholds")
        check_levels(cascade.steps, steps, "cascade steps")
        return cascade, None
    if not isinstance(cascade, CascadeTable):
        raise TypeError(f"cascade must be a Cascade or a CascadeTable, got {type(cascade).__name__}")
    set_ = [name for name, value in given.items() if value is not None]
    if budget is None or set_ or routing not in (None, "threshold"):
        raise ValueError("a cascade table takes a budget alone (it chooses the thresholds and the teacher's "
                         "settings)" + (f"; this call also set {', '.join(set_)}" if set_ else ""))
    cascade.check(pipe.calibration_fingerprint(steps, guidance))
    if cascade.levels[-1] != steps:
        raise ValueError(f"this cascade table ends at the {cascade.levels[-1]}-step student; this call's "
                         f"student runs {steps} steps")
    point = cascade.choose(budget)
    plan, tau = cascade.cascade(point)  # tau +inf: every image that reaches this student goes to the teacher
    return plan, {**point, "tau": tau, "teacher": cascade.teacher, "budget": budget}
