"""Cut-off thresholds for the adaptive pipeline (appendix C of the adaptive teacher-student paper).

The threshold tau is the k-th percentile of the oracle's scores on student samples of held-out
prompts: a student image scoring below tau goes to the teacher, so about k% of images do and the
average cost is ``student + (k / 100) * improvement`` model evaluations per image.

A calibration is only valid for the student, sampler settings, resolution and scorer that made
its scores; it stores a fingerprint of all of them, and using it with anything else is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "tandem-calibration/1"
PERCENTILES = tuple(range(101))


class CalibrationMismatch(ValueError):
    """A calibration used with a student, sampler or scorer other than the one that made it."""


def file_digest(path: str | Path, full_limit: int = 256 * 2**20) -> str:
    """sha256 of a weights file; files over ``full_limit`` bytes hash their size, first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(2**20))
        f.seek(size - 2**20)
        h.update(f.read(2**20))
    return "sha256-partial:" + h.hexdigest()


def module_digest(module) -> str:
    """A digest of a diffusers/transformers module's weights: its files when it was loaded from a local
    directory, else (a hub id or an in-memory model) a hash of its parameters."""
    source = getattr(getattr(module, "config", None), "_name_or_path", None)
    if source and Path(source).is_dir():
        weights = sorted(p for p in Path(source).iterdir() if p.suffix in (".safetensors", ".bin"))
        if weights:
            return "+".join(file_digest(p) for p in weights)
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return "params:" + h.hexdigest()


def percentile_k_for_budget(budget: float, student_cost: float, improve_cost: float) -> float:
    """The percentile k whose average cost ``student + (k/100) * improve`` equals ``budget``
    (paper: 5 + 0.5 * 20 = 15). Raises if the budget is below the student's own cost; a budget
    above refine-all's cost gives k = 100."""
    if improve_cost <= 0:
        raise ValueError(f"improvement cost must be > 0, got {improve_cost}")
    if budget < student_cost:
        raise ValueError(f"budget {budget:g} model evaluations per image is below the student's own cost "
                         f"({student_cost:g}); nothing is left for the teacher")
    return float(min(100.0, 100.0 * (budget - student_cost) / improve_cost))


INFORMATIONAL = frozenset({"path"})  # the local directory a model was loaded from: its digests identify it


def diff_fingerprints(expected: dict, actual: dict, prefix: str = "") -> list[str]:
    """The keys (dotted paths) whose values differ between two fingerprints. Keys in ``INFORMATIONAL``
    (local load paths, beside the digests of what was loaded there) are not compared, so a calibration
    made before a package was installed elsewhere still applies; a hub id (``source``) is compared."""
    out = []
    for key in sorted((set(expected) | set(actual)) - INFORMATIONAL):
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fingerprints(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: calibration has {a!r}, this call has {b!r}")
    return out


@dataclass
class Calibration:
    """Oracle scores of student samples on held-out prompts, and what produced them."""

    scores: np.ndarray
    fingerprint: dict
    config: dict = field(default_factory=dict)  # how it was made: prompts, seed, command (not checked)

    def __post_init__(self):
        self.scores = np.sort(np.asarray(self.scores, dtype=np.float64))
        if self.scores.ndim != 1 or len(self.scores) == 0:
            raise ValueError("a calibration needs at least one score")
        if not np.isfinite(self.scores).all():
            raise ValueError("calibration scores must be finite")

    def threshold(self, k: float) -> float:
        """tau = the k-th percentile (linear interpolation) of the calibration scores."""
        if not 0 <= k <= 100:
            raise ValueError(f"percentile k must be in [0, 100], got {k}")
        return float(np.percentile(self.scores, k))

    def check(self, fingerprint: dict) -> None:
        """Raise ``CalibrationMismatch`` naming every difference from a call's fingerprint."""
        diffs = diff_fingerprints(self.fingerprint, fingerprint)
        if diffs:
            raise CalibrationMismatch("the calibration was made for other settings; recalibrate with "
                                      "`tandem calibrate` (" + "; ".join(diffs) + ")")

    def convergence(self, sizes=(50, 100, 250, 500, 1000), ks=(30, 50, 70), resamples: int = 200,
                    seed: int = 0, replace: bool = True) -> list[dict]:
        """How tau settles with the number of calibration prompts (paper Table 2): for each n, the mean
        and standard deviation of tau over ``resamples`` calibrations of n prompts drawn from these
        scores -- with replacement by default (a bootstrap, so n may reach the calibration's own size: its
        row is the sampling spread of this very threshold), or without (``replace=False``: subsets of a
        larger pool). ``share_below_mean``/``_std``: the share of all these scores below each resampled
        tau, in percent: the images it would send to the teacher."""
        rng = np.random.default_rng(seed)
        rows = []
        for n in sizes:
            if n > len(self.scores):
                continue
            subsets = [rng.choice(self.scores, n, replace=replace) for _ in range(resamples)]
            for k in ks:
                taus = np.array([np.percentile(s, k) for s in subsets])
                shares = 100 * np.searchsorted(self.scores, taus, side="left") / len(self.scores)
                rows.append({"n": n, "k": k, "tau_mean": float(taus.mean()), "tau_std": float(taus.std()),
                             "share_below_mean": float(shares.mean()), "share_below_std": float(shares.std())})
        return rows

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "n": len(self.scores),
            "percentiles": {str(k): self.threshold(k) for k in PERCENTILES},
            "convergence": self.convergence(),
            "config": self.config,
            "scores": self.scores.tolist(),
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        from .outputs import atomic_write_text

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file {path} does not exist; make one with `tandem calibrate`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read calibration {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tandem calibration (expected format {FORMAT!r})")
        return cls(np.asarray(data["scores"]), data["fingerprint"], data.get("config", {}))
