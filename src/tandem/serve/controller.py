"""How much of the load the teacher may take: the cut-off policies of the server.

The adaptive paper routes a fixed share k of the student's images to the teacher (tau is the k-th percentile of
the calibration scores). Under load that share may be more teacher work than the server has time for, and
every request then waits. :class:`LoadAwarePolicy` re-chooses, every ``interval`` seconds, the largest teacher
share the load allows (the rule of DiffServe, MLSys 2025, with the stage costs of an offline
:class:`~tandem.serve.profile.Profile`), and caps each request's own share by it: at light load a request gets
exactly the share it asks for.

The rule (:func:`largest_share`), at a measured arrival rate of lambda images per second (offered: refused requests
count):

- *capacity*: the worker computes one batch at a time, so its busy fraction is
  rho(p) = lambda * (t_student + t_oracle + p * t_teacher), with t the seconds per image of each stage at its
  largest batch in the profile (times the server's measured slowdown against the profile, where it computes
  slower); the teacher's work must fit the capacity left: rho(p) <= ``utilization``;
- *latency*: by Little's law (L = lambda * W) a single-server queue at busy fraction rho holds an image for
  W = S / (1 - rho), S being the service time of a teacher-routed image (one batch of each stage at the batch
  the load forms, plus each stage's batching wait); W(p) <= the SLO.

Both bounds are linear in p, so the answer is closed-form; it is rounded down to ``step`` and clipped to [0, 1].

A request that asks for a budget alone takes a route of the pipeline's route table (its drafts, strategy and
share; :meth:`tandem.routes.RouteTable.choices`). Under load the policy re-chooses it on the same table
(:meth:`LoadAwarePolicy.choose`): of the routes that budget may take, the dearest whose work fits both bounds
(:func:`work_fits`), the work of a plan being its stages' seconds per image relative to the profile's plan
(:func:`plan_work`: N drafts draw and score N times, a teacher share q improving at c UNet evaluations costs
q * c / c_profile teacher images). So drafts, the teacher share and its settings follow the load together, through
the resolver a budget alone goes through offline.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from .profile import Profile

log = logging.getLogger("tandem.serve")


STAGE_NAMES = ("student", "oracle", "teacher")


def _bounds(profile: Profile, rate: float, slo_s: float, max_batch: int, max_wait: float, utilization: float,
            slowdown: dict | None, work: dict | None = None) -> tuple[dict, float]:
    """Each stage's seconds per image at its largest batch (times its slowdown and its ``work`` per image), and
    the bound on the busy fraction rho that both rules set (the latency rule's service time: one batch of each
    stage at the batch the load fills within the wait, a stage doing ``work`` images per image filling it
    faster; a teacher image ``work['teacher_cost']`` times the profile's)."""
    work = {"student": 1.0, "oracle": 1.0, "teacher": 1.0, "teacher_cost": 1.0, **(work or {})}
    slow = {s: max(1.0, (slowdown or {}).get(s) or 1.0) for s in STAGE_NAMES}
    per_image = {s: profile.seconds_per_image(s, max_batch) * slow[s] * work[s] for s in STAGE_NAMES}
    service = 3 * max_wait
    for s in STAGE_NAMES:
        many = work[s] if s != "teacher" else 1.0
        batch = max(1, min(max_batch, round(rate * many * max_wait)))  # the batch the load fills within the wait
        service += profile.batch_seconds(s, batch) * slow[s] * (work["teacher_cost"] if s == "teacher" else 1.0)
    return per_image, min(utilization, 1 - service / slo_s)


def largest_share(profile: Profile, rate: float, slo_s: float, max_batch: int, max_wait: float,
                  utilization: float = 0.9, step: float = 0.01, slowdown: dict | None = None) -> float:
    """The largest teacher share p in [0, 1] (a multiple of ``step``) that the load ``rate`` (images per second)
    allows under the SLO ``slo_s`` (seconds), by the module's rule; 0 when even the student alone does not fit.
    ``slowdown``: by stage, how much slower than the profile the server computes now (its batches' seconds over
    the profile's at the same size: the cores and the interpreter shared with the web server); above 1, the
    profile's times are multiplied by it."""
    if rate <= 0:
        return 1.0
    t, rho_cap = _bounds(profile, rate, slo_s, max_batch, max_wait, utilization, slowdown)
    p = (rho_cap / rate - t["student"] - t["oracle"]) / t["teacher"]
    if p < 0:
        return 0.0
    return min(1.0, math.floor(p / step + 1e-9) * step)


def plan_work(plan, reference) -> dict:
    """What one image of ``plan`` asks of each stage, in images of the profile's plan ``reference``: the student's
    UNet evaluations (all its drafts; none in teacher mode) over the reference's, the oracle's calls (one per
    draft, where the plan scores), the teacher's
    expected share (the route's, or the cut-off's percentile; 1 in teacher mode) times its UNet evaluations per
    improved image over the reference's; ``teacher_cost`` is the latter ratio alone."""
    if plan.mode == "teacher":
        share = 1.0
    elif plan.mode != "adaptive":
        share = 0.0
    elif plan.route is not None:
        share = plan.route.percentile / 100 if plan.route.strategy is not None else 0.0
    else:
        share = 1.0 if plan.cut.k is None else plan.cut.k / 100  # a tau given: at most every image
    cost = plan.improve_cost / reference.improve_cost
    drawn = plan.mode != "teacher"
    return {"student": plan.student_cost / reference.student_cost if drawn else 0.0,
            "oracle": float(plan.drafts) if drawn and plan.do_score else 0.0, "teacher": share * cost,
            "teacher_cost": cost}


def work_fits(profile: Profile, rate: float, slo_s: float, max_batch: int, max_wait: float, work: dict,
              utilization: float = 0.9, slowdown: dict | None = None) -> bool:
    """Whether images of this ``work`` (:func:`plan_work`) arriving at ``rate`` per second keep both of the
    module's bounds: rho <= ``utilization`` and the latency within ``slo_s``."""
    if rate <= 0:
        return True
    t, rho_cap = _bounds(profile, rate, slo_s, max_batch, max_wait, utilization, slowdown, work)
    return rate * sum(t.values()) <= rho_cap + 1e-12


class FixedPolicy:
    """Every request keeps its own cut-off (the adaptive paper's fixed percentile)."""

    name = "fixed"
    share = 1.0

    def arrived(self, images: int, now: float) -> None:
        pass

    def update(self, now: float, observed: dict | None = None) -> None:
        pass

    def cap(self, tau: float, k: float | None) -> tuple[float, float | None]:
        return tau, None

    def choose(self, plans: list) -> tuple[object, bool]:
        return plans[0], False

    def rate(self, now: float) -> float:
        return 0.0


class LoadAwarePolicy:
    """Caps the teacher's share by :func:`largest_share` at the arrival rate of the last ``window`` seconds,
    re-chosen every ``interval`` seconds; each change is logged (and kept in ``changes``). A request's cut-off
    tau becomes min(tau, the calibration's threshold at the cap), so at light load it is unchanged."""

    name = "load-aware"

    def __init__(self, profile: Profile, calibration, slo_s: float, max_batch: int, max_wait: float,
                 interval: float = 1.0, window: float = 10.0, utilization: float = 0.9, reference=None):
        if calibration is None:
            raise ValueError("the load-aware policy needs the student's calibration (a share of the teacher is a "
                             "percentile of its scores)")
        self.profile, self.calibration, self.slo_s = profile, calibration, slo_s
        self.max_batch, self.max_wait, self.utilization = max_batch, max_wait, utilization
        self.interval, self.window = interval, window
        self.arrivals: deque[tuple[float, int]] = deque()
        self.share, self.changes, self.slowdown, self.smoothing = 1.0, [], {}, 0.7
        self.reference, self.load = reference, 0.0  # the profile's plan; the rate the latest update saw
        self._next = self._first = None

    def arrived(self, images: int, now: float) -> None:
        self.arrivals.append((now, images))

    def rate(self, now: float) -> float:
        """Images per second over the last ``window`` seconds (over the time since the first arrival while that
        is shorter, at least one second: a load that starts is seen within a second, not after a window)."""
        if self._first is None and self.arrivals:
            self._first = self.arrivals[0][0]
        while self.arrivals and self.arrivals[0][0] < now - self.window:
            self.arrivals.popleft()
        seen = self.window if self._first is None else min(self.window, max(1.0, now - self._first))
        return sum(n for _, n in self.arrivals) / seen

    def update(self, now: float, observed: dict | None = None) -> None:
        """Re-choose the cap if ``interval`` has passed. ``observed``: each stage's latest batch as (images,
        compute seconds); its seconds over the profile's for that batch size, a moving average over the updates
        (weight ``1 - smoothing`` on the newest), is the stage's slowdown."""
        if self._next is not None and now < self._next:
            return
        self._next = now + self.interval
        for stage, (images, seconds) in (observed or {}).items():
            if seconds > 0:
                ratio, old = seconds / self.profile.batch_seconds(stage, images), self.slowdown.get(stage)
                self.slowdown[stage] = ratio if old is None else self.smoothing * old + (1 - self.smoothing) * ratio
        rate = self.load = self.rate(now)
        share = largest_share(self.profile, rate, self.slo_s, self.max_batch, self.max_wait, self.utilization,
                              slowdown=self.slowdown)
        if share != self.share:
            log.info("teacher share cap %.2f -> %.2f (arrivals %.2f images/s, SLO %.3g s)", self.share, share,
                     rate, self.slo_s)
            self.changes.append({"time": now, "rate": rate, "share": share})
            self.share = share

    def threshold(self) -> float:
        """The cut-off at the current cap: the calibration's percentile ``100 * share``."""
        return float(self.calibration.threshold(100 * self.share))

    def cap(self, tau: float, k: float | None) -> tuple[float, float]:
        if self.share >= 1.0:
            return tau, self.share
        return min(tau, self.threshold()), self.share

    def choose(self, plans: list) -> tuple[object, bool]:
        """Of ``plans`` (a budget's routes, the one it asks for first, then cheaper ones, dearest first), the first
        whose work fits the load the latest update saw, else the cheapest; and whether it is not the first."""
        if self.reference is None:
            raise RuntimeError("the load-aware policy chooses routes with the profile's plan: pass reference=")
        for i, plan in enumerate(plans):
            if work_fits(self.profile, self.load, self.slo_s, self.max_batch, self.max_wait,
                         plan_work(plan, self.reference), self.utilization, self.slowdown):
                return plan, i > 0
        return plans[-1], len(plans) > 1
