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

from .checks import cannot_read, finite_number, read_file_bytes
from .outputs import write_json_file

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
    budget = finite_number(budget, "budget", low=0, low_open=True)
    student_cost = finite_number(student_cost, "student cost", low=0)
    improve_cost = finite_number(improve_cost, "improvement cost", low=0, low_open=True)
    if budget < student_cost:
        raise ValueError(f"budget {budget:g} model evaluations per image is below the student's own cost "
                         f"({student_cost:g}); nothing is left for the teacher")
    return float(min(100.0, 100.0 * (budget - student_cost) / improve_cost))


# How to make a calibration, in the Python API's words (the command line shows its own command instead).
RECALIBRATE = "pipe.calibrate(prompts)"
RECALIBRATE_EDITS = "pipe.calibrate_edits(images, prompts, strength)"
TIE_TOLERANCE = 0.02  # a routed share this far (beyond one image) from k is worth a note


class CalibrationTieWarning(UserWarning):
    """Tied calibration scores make the share of images sent to the teacher differ from the k asked for."""


INFORMATIONAL = frozenset({"path"})  # the local directory a model was loaded from: its digests identify it


def diff_fingerprints(expected: dict, actual: dict, prefix: str = "", made: str = "calibration has") -> list[str]:
    """The keys (dotted paths) whose values differ between two fingerprints, each line saying what ``made`` (the
    holder of ``expected``: "calibration has", "routes have") and this call have. Keys in ``INFORMATIONAL``
    (local load paths, beside the digests of what was loaded there) are not compared, so a calibration
    made before a package was installed elsewhere still applies; a hub id (``source``) is compared."""
    out = []
    for key in sorted((set(expected) | set(actual)) - INFORMATIONAL):
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fingerprints(a, b, f"{prefix}{key}.", made)
        elif a != b:
            out.append(f"{prefix}{key}: {made} {a!r}, this call has {b!r}")
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
        if len(self.scores) > 1 and self.scores[0] == self.scores[-1]:
            raise ValueError(f"all {len(self.scores)} oracle scores are equal ({self.scores[0]:g}): the scorer does "
                             "not tell these student images apart, so no cut-off can route them; check the "
                             "scorer (scorer=...)")

    def threshold(self, k: float) -> float:
        """tau = the k-th percentile (linear interpolation) of the calibration scores."""
        return float(np.percentile(self.scores, finite_number(k, "percentile k", low=0, high=100)))

    def share_below(self, tau: float) -> float:
        """The share (0..1) of the calibration's scores strictly below ``tau``: of its prompts' student
        images, those that tau sends to the teacher."""
        return float(np.searchsorted(self.scores, tau, side="left") / len(self.scores))

    def tie_note(self, k: float) -> str | None:
        """None when tau = ``threshold(k)`` sends about k% of the calibration's images to the teacher (within
        one image and ``TIE_TOLERANCE``); else a sentence saying that tied scores send fewer. Without ties the
        share is k% to within one image; a scorer that gives many images one score (one that clamps or
        rounds) makes tau that score, and only images scoring *below* tau go to the teacher."""
        k = finite_number(k, "percentile k", low=0, high=100)
        tau = self.threshold(k)
        share = self.share_below(tau)
        if abs(share - k / 100) <= 1 / len(self.scores) + TIE_TOLERANCE:
            return None
        tied = int(np.count_nonzero(self.scores == tau))
        return (f"only {100 * share:.1f}% of the calibration's images score below tau ({tau:g}), not {k:g}%: "
                f"{tied} of its {len(self.scores)} scores equal tau, and only images scoring below it go to the "
                "teacher; a scorer with fewer ties routes the share asked for")

    def check(self, fingerprint: dict, remake: str = RECALIBRATE) -> None:
        """Raise ``CalibrationMismatch`` naming every difference from a call's fingerprint; ``remake`` says
        how to make a calibration that fits."""
        diffs = diff_fingerprints(self.fingerprint, fingerprint)
        if diffs:
            raise CalibrationMismatch(f"the calibration was made for other settings; recalibrate with {remake} ("
                                      + "; ".join(diffs) + ")")

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
        write_json_file(path, self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file written by ``save``; anything else is a ``ValueError`` naming the file
        and what is wrong with it (not JSON, another format, a missing or mistyped key, scores that do not
        match its own percentile table)."""
        path = Path(path)
        try:
            raw = read_file_bytes(path, "calibration")  # a regular file of bounded size
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file {path} does not exist; make one with `tandem calibrate`") from None
        except ValueError as e:
            raise cannot_read(e, path, "calibration") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a calibration JSON file (not UTF-8 text: byte {e.start} is "
                             f"0x{raw[e.start]:02x})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a calibration JSON file (invalid JSON at line {e.lineno} column "
                             f"{e.colno}: {e.msg})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a tandem calibration (expected format {FORMAT!r})")
        return cls._from_json(data, path)

    @classmethod
    def _from_json(cls, data: dict, path: Path) -> Calibration:
        """A calibration from the parsed contents of ``path``, checking each key's type."""
        def bad(problem: str) -> ValueError:
            return ValueError(f"calibration {path} is malformed: {problem}; remake it with `tandem calibrate`")

        for key, kind, what in (("scores", list, "a list of numbers"), ("fingerprint", dict, "an object")):
            if key not in data:
                raise bad(f"it has no {key!r}")
            if not isinstance(data[key], kind):
                raise bad(f"{key!r} must be {what}, got {_json_type(data[key])}")
        scores = data["scores"]
        if not scores:
            raise bad("'scores' is empty")
        for i, x in enumerate(scores):
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise bad(f"'scores'[{i}] must be a number, got {_json_type(x)}")
            if not np.isfinite(x):
                raise bad(f"'scores'[{i}] is {x} (scores must be finite)")
        config = data.get("config", {})
        if not isinstance(config, dict):
            raise bad(f"'config' must be an object, got {_json_type(config)}")
        n = data.get("n", len(scores))
        if isinstance(n, bool) or not isinstance(n, int) or n != len(scores):
            raise bad(f"'n' is {n!r} but 'scores' holds {len(scores)}")
        try:
            calibration = cls(np.asarray(scores, dtype=np.float64), data["fingerprint"], config)
        except ValueError as e:  # all scores equal: the file is well formed, its scorer is not
            raise ValueError(f"calibration {path}: {e}") from None
        table = data.get("percentiles", {})
        if not isinstance(table, dict):
            raise bad(f"'percentiles' must be an object, got {_json_type(table)}")
        for k, tau in table.items():  # the table is derived from the scores: an edited one would be ignored
            if not (isinstance(tau, int | float) and not isinstance(tau, bool) and k.isdigit() and int(k) <= 100):
                raise bad(f"'percentiles' entry {k!r}: {tau!r} (expected k in 0..100 and a number)")
            if not np.isclose(tau, calibration.threshold(int(k)), rtol=1e-9, atol=1e-12):
                raise bad(f"'percentiles'[{k!r}] is {tau!r} but its scores give {calibration.threshold(int(k))!r} "
                          "(edited by hand?)")
        return calibration


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
