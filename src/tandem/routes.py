"""Routes: the adaptive pipeline's settings that gave the best quality at each cost on held-out prompts,
so that a budget alone (``tandem generate --mode adaptive --budget B``) picks them.

A route is one way to spend a budget: the improvement (regenerate with a teacher sampler and steps, or
refine at a rollback sigma) and the percentile k of the calibration below which images take it, with the
mean cost (UNet evaluations per image) and quality it reached on the held-out prompts. A route table is
made from a ``tandem eval budget`` run on held-out prompts (:meth:`RouteTable.from_budget`); it belongs to
one student (and its steps and guidance), teacher (and its guidance), oracle and calibration, and using it
with anything else is an error that names the difference. Given a budget, :meth:`RouteTable.choose`
returns the route of :meth:`RouteTable.choices` for it: monotone (a larger budget never gets a route that was
worse on the held-out prompts) and simple (the cheapest route within one standard error of the best affordable
one: a margin smaller than the held-out prompts' noise buys nothing). "Better" is the table's rule
(:data:`RULES`): the quality (share satisfied, or mean score), or the side-by-side win rate against a reference
teacher run (how often the route's image beats the teacher's on the same prompt, ties split).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .calibration import diff_fingerprints
from .checks import count, finite_number, read_json_file
from .models import SCHEDULERS
from .outputs import write_json_file

FORMAT = "tandem-routes/1"
RULES = ("quality", "win-rate")  # what a table's choices maximise
_REGENERATE = re.compile(r"([a-z]+)(\d+)")
_REFINE = re.compile(r"refine_([a-z]+)(\d+)_sigma([0-9.]+?)(?:_drafts(\d+))?")


class RoutesMismatch(ValueError):
    """A route table made for another student, teacher, oracle, calibration or settings."""


@dataclass(frozen=True)
class Route:
    strategy: str | None          # "regenerate", "refine", or None: the student alone (k = 0)
    teacher_scheduler: str | None
    teacher_steps: int | None
    rollback_sigma: float | None
    percentile: float
    cost: float                   # mean UNet evaluations per image on the held-out prompts
    quality: float                # the judge's quality there (share satisfied, or a mean score)
    se: float | None = None       # its standard error there (None: unknown, no margin is given)
    drafts: int = 1               # the student's drafts per prompt, the oracle's best kept
    tau: float | None = None      # drafts > 1: the cut-off itself, percentile k of the best-of-N calibration
    win_rate: float | None = None  # side by side against the table's reference teacher run there (ties split)
    win_rate_se: float | None = None  # its standard error over the prompts

    def settings(self) -> dict:
        """The pipeline arguments this route sets (several drafts: their tau, which the table carries, for k)."""
        out = {"strategy": self.strategy, "teacher_scheduler": self.teacher_scheduler,
               "teacher_steps": self.teacher_steps, "rollback_sigma": self.rollback_sigma}
        if self.drafts == 1:
            return {**out, "percentile": self.percentile}
        return {**out, "drafts": self.drafts, "accept_threshold": self.tau}


def quality(summary: dict) -> float:
    """The headline quality of a judged summary (an experiment's, a budget point's; what a route records): the
    share satisfied under an exact judge, else the mean score."""
    return summary["accuracy"] if "accuracy" in summary else summary["mean_score"]


def share_se(share: float, n: int) -> float:
    """The standard error of a share satisfied over ``n`` judged images (binomial)."""
    return float(np.sqrt(max(share * (1 - share), 0.0) / n))


def calibration_digest(calibration) -> str:
    """A digest of a calibration's scores: the percentiles a route's k refers to."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(calibration.scores, np.float64).tobytes()).hexdigest()


def check_route(route: Route) -> None:
    """A route's fields: a known strategy (None: the student alone, at k = 0, without teacher settings), the
    teacher's sampler and steps and, for a refinement, its rollback sigma in (0, 1]; k in [0, 100]; a cost and a
    quality that are finite numbers, the cost >= 0. A ``ValueError`` names the field and its allowed values."""
    finite_number(route.cost, "cost", low=0)
    finite_number(route.quality, "quality")
    if count(route.drafts, "drafts") > 1 and route.strategy is not None:
        finite_number(route.tau, "tau")  # a route of several drafts carries its cut-off
    if route.se is not None:
        finite_number(route.se, "se", low=0)
    if route.win_rate is not None:
        finite_number(route.win_rate, "win_rate", low=0, high=1)
        finite_number(route.win_rate_se, "win_rate_se", low=0)
    percentile = finite_number(route.percentile, "percentile", low=0, high=100)
    teacher = {"teacher_scheduler": route.teacher_scheduler, "teacher_steps": route.teacher_steps,
               "rollback_sigma": route.rollback_sigma}
    if route.strategy is None:
        given = [name for name, value in teacher.items() if value is not None]
        if given or percentile != 0:
            raise ValueError("the student alone (strategy null) takes percentile 0 and no teacher settings, got "
                             + ", ".join(f"{name} {getattr(route, name)!r}" for name in [*given, "percentile"]))
        return
    if route.strategy not in ("refine", "regenerate"):
        raise ValueError(f"strategy must be 'refine', 'regenerate' or null (the student alone), got {route.strategy!r}")
    if route.teacher_scheduler not in SCHEDULERS:
        raise ValueError(f"teacher_scheduler must be one of {', '.join(SCHEDULERS)}, got {route.teacher_scheduler!r}")
    count(route.teacher_steps, "teacher_steps")
    if route.strategy == "refine":
        finite_number(route.rollback_sigma, "rollback_sigma", low=0, low_open=True, high=1)
    elif route.rollback_sigma is not None:
        raise ValueError(f"a regeneration has no rollback_sigma, got {route.rollback_sigma!r}")


@dataclass
class RouteTable:
    routes: list[Route]
    fingerprint: dict
    config: dict

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The one check of a table, made, loaded or saved: at least one route, each valid (:func:`check_route`),
        and a fingerprint and config that are JSON objects; a ``ValueError`` names the route and the field."""
        if not isinstance(self.routes, list) or not self.routes:
            raise ValueError("a route table needs at least one route")
        if not isinstance(self.fingerprint, dict) or not isinstance(self.config, dict):
            raise ValueError("a route table's fingerprint and config must be JSON objects")  # noqa: TRY004
        if self.rule not in RULES:
            raise ValueError(f"a route table's rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for i, route in enumerate(self.routes):
            if not isinstance(route, Route):
                raise ValueError(f"route {i} is not a Route, got {type(route).__name__}")  # noqa: TRY004
            try:
                check_route(route)
            except ValueError as e:
                raise ValueError(f"route {i}: {e}") from None

    @property
    def rule(self) -> str:
        return self.config.get("rule", "quality")

    @classmethod
    def from_budget(cls, results: dict, pipe, rule: str = "quality", win_rate_vs: str | None = None) -> RouteTable:
        """The routes of a ``tandem eval budget`` ``results`` (its adaptive points and the student alone),
        made with ``pipe``'s models and calibration: checked against them (weights digests, and each
        point's tau against the calibration's percentile). ``rule`` (:data:`RULES`): what the table's choices
        maximise; "win-rate" against the reference run ``win_rate_vs`` [the results' last reference]."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
        if results.get("experiment") != "budget":
            raise ValueError(f"expected the results.json of `tandem eval budget`, got {results.get('experiment')!r}")
        made = diff_fingerprints(results["models"], pipe.fingerprint())
        if made:
            raise RoutesMismatch("the budget results were made with other models: " + "; ".join(made))
        if pipe.calibration is None:
            raise ValueError("the pipeline has no calibration: a route's percentile needs the one the budget "
                             "results were made with")
        steps = int(results["student_steps"])
        refine_steps = int(results["config"]["refine_steps"])
        judged = int(results["n_prompts"]) * len(results["config"].get("seeds") or [0])

        def se(point: dict) -> float | None:  # a share's binomial error; a mean score's is not in the results
            return share_se(point["accuracy"], judged) if "accuracy" in point else None

        references = [r for r in results["config"].get("references", []) if any(
            r in p.get("win_rate", {}) for p in results["points"])]
        vs = win_rate_vs or (references[-1] if references else None)
        if rule == "win-rate" and vs is None:
            raise ValueError("the budget results hold no win rates against a reference teacher run (made before "
                             "they were recorded): run `tandem eval budget` again (its runs are cached), or use "
                             "rule 'quality'")

        def sides(point: dict) -> dict:
            side = point.get("win_rate", {}).get(vs)
            if side is None and rule == "win-rate":
                raise ValueError(f"{point['label']}: no win rate against {vs!r} in the budget results")
            return {} if side is None else {"win_rate": side["rate"], "win_rate_se": side["se"]}

        routes = []
        drafts_used = sorted({int(p["drafts"]) for p in results["points"] if p.get("drafts", 1) > 1})
        missing = [n for n in drafts_used if n not in pipe.draft_calibrations]
        if missing:
            raise ValueError(f"the budget results have curves of {', '.join(map(str, missing))} drafts: their "
                             "percentiles need the best-of-N calibrations they were made with "
                             "(draft_calibrations: pipe.draft_calibrations[N] = Calibration.load(FILE))")
        for n in drafts_used:
            made_with = results.get("draft_calibrations", {}).get(str(n))
            if made_with != calibration_digest(pipe.draft_calibrations[n]):
                raise RoutesMismatch(f"the curves of {n} drafts were made with another best-of-{n} calibration")
        for p in results["points"]:
            if not p["family"].startswith("adaptive") or not 0 < p["k"] <= 100 or "preroute" in p:
                continue  # (route tables do not pre-route)
            n = int(p.get("drafts", 1))
            calibration = pipe.calibration if n == 1 else pipe.draft_calibrations[n]
            if not np.isclose(p["tau"], calibration.threshold(p["k"])):
                raise RoutesMismatch(f"{p['label']}: tau {p['tau']:.6g} is not the calibration's percentile "
                                     f"{p['k']:g} ({calibration.threshold(p['k']):.6g}): the budget results "
                                     "were made with another calibration")
            if p["share_improved"] == 0:
                continue  # the student alone at that k: its own route below
            tau = float(p["tau"]) if n > 1 else None
            if m := _REFINE.fullmatch(p["improved"]):
                if int(m[2]) != refine_steps:
                    raise ValueError(f"{p['label']}: refinement of {m[2]} steps, the results' config says "
                                     f"{refine_steps}")
                route = Route("refine", m[1], int(m[2]), float(m[3]), float(p["k"]), p["unet_evals_mean"],
                              quality(p), se(p), n, tau, **sides(p))
            elif m := _REGENERATE.fullmatch(p["improved"]):
                route = Route("regenerate", m[1], int(m[2]), None, float(p["k"]), p["unet_evals_mean"], quality(p),
                              se(p), **sides(p))
            else:
                raise ValueError(f"{p['label']}: unknown improvement {p['improved']!r}")
            routes.append(route)
        alone = next(p for p in results["points"] if p["family"] == "student" and p["label"] == f"student{steps}")
        routes.append(Route(None, None, None, None, 0.0, alone["unet_evals_mean"], quality(alone), se(alone),
                            **sides(alone)))
        for n in drafts_used:  # the best of n drafts alone
            best = next(p for p in results["points"] if p["label"] == f"student{steps}_drafts{n}")
            routes.append(Route(None, None, None, None, 0.0, best["unet_evals_mean"], quality(best), se(best), n,
                                **sides(best)))
        fingerprint = pipe.route_fingerprint(steps)
        made_by = results.get("made_by", {})
        config = {"from": "tandem eval budget", "rule": rule, "win_rate_vs": vs, "prompts": made_by.get("prompts"),
                  "n": results["n_prompts"],
                  "draft_calibrations": {str(n): calibration_digest(pipe.draft_calibrations[n]) for n in drafts_used},
                  "seed": results["seed"], "judge": results.get("judge"), "budget_command": made_by.get("command"),
                  "budget_made_by": {k: made_by.get(k) for k in ("model", "student", "scorer", "calibration",
                                                                 "batch_size", "tandem_version")}}
        return cls(sorted(routes, key=lambda r: (r.cost, -r.quality)), fingerprint, config)

    def choose(self, budget: float) -> Route | None:
        """The route a budget alone takes (:meth:`choices`); None if no route is that cheap."""
        budget = finite_number(budget, "budget", low=0, low_open=True)
        chosen = [c["route"] for c in self.choices() if c["from_cost"] <= budget + 1e-9]
        return chosen[-1] if chosen else None

    def choices(self) -> list[dict]:
        """What each budget takes, cheapest first: from ``from_cost`` on (a route's cost), ``route``: of the
        routes costing at most that, the cheapest whose value under the table's rule (quality, or win rate) is
        within one standard error (``se``, or ``win_rate_se``) of the best one's (``best``; ``simpler`` True where a
        cheaper route was taken for it), unless an earlier choice was better, which is then kept: a larger budget
        never takes a route worse on the held-out prompts."""
        if self.rule == "win-rate":
            value, error = (lambda r: r.win_rate), (lambda r: r.win_rate_se)
            missing = [i for i, r in enumerate(self.routes) if r.win_rate is None]
            if missing:
                raise ValueError(f"a win-rate table's routes need their win rates; route {missing[0]} has none")
        else:
            value, error = (lambda r: r.quality), (lambda r: r.se)
        out: list[dict] = []
        current = None
        for cost in sorted({r.cost for r in self.routes}):
            affordable = [r for r in self.routes if r.cost <= cost + 1e-9]
            best = max(affordable, key=lambda r: (value(r), -r.cost))
            near = [r for r in affordable if value(r) >= value(best) - (error(best) or 0.0) - 1e-12]
            pick = min(near, key=lambda r: (r.cost, -value(r)))
            if current is None or value(pick) > value(current):
                current = pick
                out.append({"from_cost": cost, "route": pick, "best": best, "simpler": pick != best})
        return out

    def check(self, fingerprint: dict) -> None:
        """Refuse a table made for other settings than ``fingerprint`` (a pipeline's ``route_fingerprint``)."""
        diffs = diff_fingerprints(self.fingerprint, fingerprint, made="routes have")
        if diffs:
            raise RoutesMismatch("the route table was made for other settings; give the adaptive settings "
                                 "yourself (strategy, teacher_steps, ...) or make a table for these ("
                                 + "; ".join(diffs) + ")")

    def to_json(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "config": self.config,
                "routes": [asdict(r) for r in self.routes]}

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        try:
            self.validate()
        except ValueError as e:
            raise ValueError(f"route table {path} not written: {e}") from None
        write_json_file(path, self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | Path) -> RouteTable:
        """Read a table written by ``save``; anything else is a ``ValueError`` naming the file and the problem."""
        data = read_json_file(Path(path), "route table")
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a route table (expected format {FORMAT!r})")
        try:
            routes = [Route(**r) for r in data["routes"]]
            fingerprint, config = dict(data["fingerprint"]), dict(data.get("config", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed route table ({e})") from None
        try:
            return cls(routes, fingerprint, config)
        except ValueError as e:
            raise ValueError(f"route table {path}: {e}") from None
