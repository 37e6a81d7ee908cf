"""Cascades: more than two levels, each gated by the oracle.

A cascade puts cheaper student levels before the pipeline's own student: every image is drawn by the
first level (e.g. the 1-step student); an image whose oracle score reaches that level's threshold is
kept, the others are drawn again, from the same initial noise, by the next level (e.g. the 4-step
student), and so on (a level whose threshold keeps no image is not drawn); after the pipeline's student
the usual routing sends the images still below tau to the teacher (refinement or regeneration). With Oracle II the scores are calibrated P(satisfied), so
the quality a set of thresholds buys can be estimated without a judge.

``CascadeTable`` holds what a cascade calibration measured on held-out prompts (``tandem calibrate
--cascade 1 --out cascade.json``): the oracle's score of every prompt's image at every level, the
teacher level included, and each level's cost in UNet evaluations. ``choose(budget)`` picks the
thresholds that maximise the mean score of the final images (the expected share satisfied, for a
calibrated oracle) at a mean cost within the budget, over a grid of percentiles of each level's
scores.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import CalibrationMismatch, diff_fingerprints
from .checks import count, finite_number
from .outputs import write_json_file

GRID = (*range(0, 101, 5),)  # the percentiles of each level's scores tried as its threshold


def check_levels(levels, student_steps: int | None = None, what: str = "cascade levels") -> list[int]:
    """The steps of a cascade's student levels, cheapest first: whole numbers >= 1, each level fewer steps than the
    next (so no level twice), all before ``student_steps`` (the pipeline's own student, the last level) where given;
    anything else is a ``ValueError`` that names ``what`` and the levels."""
    levels = [count(n, what) for n in levels]
    shown = ", ".join(map(str, levels))
    if not levels:
        raise ValueError(f"{what}: a cascade needs at least one student level")
    if any(a >= b for a, b in itertools.pairwise(levels)):
        raise ValueError(f"{what} must be cheapest first, each with fewer steps than the next and none twice; "
                         f"got {shown}")
    if student_steps is not None and levels[-1] >= student_steps:
        raise ValueError(f"{what} must each run fewer steps than the student the cascade ends with ({student_steps} "
                         f"steps); got {shown}")
    return levels


def threshold_array(thresholds) -> np.ndarray:
    """Thresholds as floats, None (a level that keeps no image) as +inf."""
    return np.array([np.inf if t is None else t for t in thresholds], float)


def final_levels(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Where each image's cascade ends, for the scores [L, n] of its L student levels and rows of thresholds
    [m, L]: the first level whose score reaches its threshold, or L (the teacher), as [m, n]."""
    keep = scores[None] >= thresholds[:, :, None]
    return np.concatenate([keep, np.ones_like(keep[:, :1])], 1).argmax(1)


def cascade_costs(final: np.ndarray, student_costs: np.ndarray, teacher_cost, thresholds: np.ndarray) -> np.ndarray:
    """The cost [m, n] of images ending at levels ``final`` [m, n] under rows of ``thresholds`` [m, L]: every
    student level drawn up to the one it ended at (``student_costs`` [L] or, per image, [L, n]), plus
    ``teacher_cost`` for those that went on to the teacher. A level before the last whose threshold keeps no
    image (+inf) is not drawn, so it costs nothing; the last (the pipeline's own student) always is."""
    student_costs = np.asarray(student_costs, float)
    levels = len(student_costs)
    per_level = student_costs.reshape(1, levels, -1)  # [1, L, 1] or [1, L, n]
    drawn = np.isfinite(thresholds) | (np.arange(levels) == levels - 1)
    charged = (np.arange(levels)[None, :, None] <= final[:, None, :]) & drawn[:, :, None]
    return (charged * per_level).sum(1) + np.where(final == levels, teacher_cost, 0)


@dataclass(frozen=True)
class Cascade:
    """The student levels before the pipeline's own student: ``steps[j]`` steps, keeping the images that score
    at least ``thresholds[j]``."""

    steps: tuple[int, ...]
    thresholds: tuple[float, ...]

    def __post_init__(self):
        if not self.steps or len(self.steps) != len(self.thresholds):
            raise ValueError(f"a cascade needs one threshold per level: got steps {list(self.steps)} and "
                             f"thresholds {list(self.thresholds)}")
        for n in self.steps:
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ValueError(f"cascade steps must be integers >= 1, got {n!r}")
        check_levels(self.steps, what="cascade steps")
        for t in self.thresholds:
            if not isinstance(t, int | float) or np.isnan(t):
                raise ValueError(f"cascade thresholds must be numbers, got {t!r}")


@dataclass
class CascadeTable:
    """A cascade calibration: per held-out prompt, the oracle's score at each level.

    Attributes:
        levels: the student steps of each student level, the pipeline's own student last (e.g. [1, 4]).
        scores: [len(levels) + 1, n]: the scores of each student level's image, then of the teacher level's.
        costs: UNet evaluations per image of each student level, then of the teacher level.
        oracle_cost: UNet-evaluation equivalents charged per oracle call (0: the table counts UNet calls).
        fingerprint: the pipeline's calibration fingerprint at its own student steps.
    """

    levels: list[int]
    scores: np.ndarray
    costs: list[float]
    fingerprint: dict
    teacher: dict = field(default_factory=dict)  # the teacher level's settings: strategy, steps, sigma, ...
    config: dict = field(default_factory=dict)
    oracle_cost: float = 0.0

    def __post_init__(self):
        self.scores = np.asarray(self.scores, np.float64)
        self.validate()

    def validate(self) -> None:
        """The one check of a table (made, loaded or saved): its levels cheapest first, every score and cost a
        finite number, each student level's cost at most the next's; a ``ValueError`` names what is wrong."""
        if not isinstance(self.levels, list | tuple):
            raise ValueError(f"a cascade table's levels must be a list of steps, got {self.levels!r}")  # noqa: TRY004
        self.levels = check_levels(self.levels, what="a cascade table's levels")
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.levels) + 1 \
                or len(self.costs) != len(self.levels) + 1:
            raise ValueError(f"a cascade table needs the scores and cost of each of its {len(self.levels)} student "
                             "levels and of the teacher level")
        if self.scores.shape[1] == 0:
            raise ValueError("a cascade table needs the scores of at least one prompt")
        if not np.isfinite(self.scores).all():
            raise ValueError("a cascade table's scores must be finite")
        self.costs = [finite_number(c, f"a cascade table's cost of level {j}", low=0) for j, c in enumerate(self.costs)]
        self.oracle_cost = finite_number(self.oracle_cost, "a cascade table's oracle_cost", low=0)
        student = self.costs[:-1]
        if any(a > b for a, b in itertools.pairwise(student)):
            raise ValueError(f"a cascade table's student levels must be cheapest first: levels "
                             f"{', '.join(map(str, self.levels))} cost {', '.join(f'{c:g}' for c in student)}")

    def simulate(self, thresholds) -> tuple[float, float]:
        """(mean final score, mean cost) of thresholds [t_0 .. t_L-1], one per student level (the last is tau)."""
        quality, cost = self._simulate(threshold_array(thresholds)[None])
        return float(quality[0]), float(cost[0])

    def _simulate(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised over rows of ``thresholds`` [m, L]."""
        final = final_levels(self.scores[:-1], thresholds)
        quality = self.scores[final, np.arange(self.scores.shape[1])]
        cost = cascade_costs(final, np.asarray(self.costs[:-1]) + self.oracle_cost, self.costs[-1], thresholds)
        return quality.mean(1), cost.mean(1)

    def front(self) -> list[dict]:
        """The grid's Pareto front: thresholds no other grid point beats in both quality and cost, by cost (a
        threshold None keeps no image at its level)."""
        cuts = [np.unique(np.concatenate([np.percentile(self.scores[level], GRID), [np.inf]]))
                for level in range(len(self.levels))]
        grid = np.array(list(itertools.product(*cuts)))
        quality, cost = self._simulate(grid)
        order = np.lexsort((-quality, cost))
        out, best = [], -np.inf
        for i in order:
            if quality[i] > best + 1e-12:
                best = quality[i]
                out.append({"thresholds": [float(t) if np.isfinite(t) else None for t in grid[i]],
                            "quality": float(quality[i]), "cost": float(cost[i])})
        return out

    def choose(self, budget: float) -> dict:
        """The front point of highest quality with a mean cost within ``budget``; a budget below the cheapest
        point (every image kept at the first level) is a ``ValueError``."""
        budget = finite_number(budget, "budget", low=0, low_open=True)
        front = self.front()
        within = [p for p in front if p["cost"] <= budget + 1e-9]
        if not within:
            raise ValueError(f"budget {budget:g} UNet evaluations per image is below this cascade's cheapest point "
                             f"({front[0]['cost']:g}: every image kept by its first level, the {self.levels[0]}-step "
                             "student)")
        return max(within, key=lambda p: p["quality"])

    def cascade(self, point: dict) -> tuple[Cascade, float]:
        """The ``Cascade`` of the earlier levels and the last level's tau of a front point."""
        t = threshold_array(point["thresholds"]).tolist()  # None: no image is kept at that level
        return Cascade(tuple(int(n) for n in self.levels[:-1]), tuple(t[:-1])), t[-1]

    def check(self, fingerprint: dict) -> None:
        diffs = diff_fingerprints(self.fingerprint, fingerprint)
        if diffs:
            raise CalibrationMismatch("this cascade table was made with another student, sampler or oracle: "
                                      + "; ".join(diffs))

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        self.validate()
        write_json_file(path, overwrite=overwrite, data={"kind": "tandem cascade table", "levels": self.levels, "costs": self.costs,
                               "oracle_cost": self.oracle_cost, "teacher": self.teacher,
                               "scores": self.scores.tolist(), "fingerprint": self.fingerprint,
                               "config": self.config, "front": self.front()})

    @classmethod
    def load(cls, path: str | Path) -> CascadeTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read cascade table {str(path)!r}: {error}") from error
        if not isinstance(data, dict) or data.get("kind") != "tandem cascade table":
            raise ValueError(f"{path} is not a cascade table (make one with pipe.calibrate_cascade(prompts, levels))")
        try:
            return cls(data["levels"], np.array(data["scores"], np.float64), data["costs"], data["fingerprint"],
                       data.get("teacher", {}), data.get("config", {}), data.get("oracle_cost", 0.0))
        except KeyError as error:
            raise ValueError(f"cascade table {path}: missing {error}") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"cascade table {path}: {error}") from None
