"""Routing before drawing: a predictor of the student's oracle score from the caption alone, so that a prompt the
student almost never satisfies goes straight to the teacher and no student draft is wasted on it.

A predictor is anything with ``p_below(prompts, features, tau) -> [n]`` (the probability that the student's score,
the best of its drafts where it draws several, falls below ``tau``) and ``fingerprint()``. :class:`ScorePredictor`
is tandem's: a ridge regression of the score on the prompt's text features (the pipeline's text encoder, pooled;
:meth:`~tandem.pipeline.TandemPipeline.text_features`) with a Gaussian residual, so that
``P(score < tau) = Phi((tau - mu(prompt)) / sigma)`` holds for any tau. It is fitted on held-out prompts' scores
(:meth:`~tandem.pipeline.TandemPipeline.fit_predictor`) and saved as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checks import finite_number, read_json_file
from .outputs import write_json_file

FORMAT = "tandem-predictor/1"


@dataclass
class ScorePredictor:
    """``mu(x) = bias + weights . (x - mean) / scale`` over text features x; residuals of standard deviation
    ``sigma`` on the prompts it was fitted on."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    sigma: float
    made_for: dict  # the calibration fingerprint of the scores it predicts (student, steps, oracle, drafts)
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weights, self.mean, self.scale = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.mean,
                                                                                          self.scale))
        if not (self.weights.shape == self.mean.shape == self.scale.shape and self.weights.ndim == 1):
            raise ValueError("a predictor's weights, mean and scale must be vectors of one length")
        finite_number(self.sigma, "sigma", low=0, low_open=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The expected score of each row of ``features``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.weights):
            raise ValueError(f"expected text features [n, {len(self.weights)}], got {list(x.shape)}")
        return self.bias + ((x - self.mean) / self.scale) @ self.weights

    def p_below(self, prompts: list[str], features: np.ndarray, tau: float) -> np.ndarray:
        """P(the student's score < ``tau``) for each prompt (its text ``features``)."""
        z = (tau - self.predict(features)) / (self.sigma * math.sqrt(2))
        return 0.5 * (1 + np.vectorize(math.erf)(z)) if len(z) else z

    def fingerprint(self) -> dict:
        return {"kind": "ridge", "made_for": self.made_for}

    def to_json(self) -> dict:
        return {"format": FORMAT, "weights": self.weights.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "sigma": self.sigma, "made_for": self.made_for, "config": self.config}

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        write_json_file(path, self.to_json(), overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ScorePredictor:
        """Read a predictor written by ``save``; anything else is a ``ValueError`` naming the file."""
        data = read_json_file(Path(path), "predictor")
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a predictor (expected format {FORMAT!r})")
        try:
            return cls(data["weights"], float(data["bias"]), data["mean"], data["scale"], float(data["sigma"]),
                       dict(data["made_for"]), dict(data.get("config", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed predictor ({e})") from None


def fit_score_predictor(features: np.ndarray, scores: np.ndarray, made_for: dict, ridge: float = 1.0,
                        config: dict | None = None) -> ScorePredictor:
    """The ridge regression (penalty ``ridge`` on standardized features) of ``scores`` on ``features`` [n, D], in
    closed form; sigma is the leave-one-out residuals' root mean square (an honest spread for new prompts)."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) < 3:
        raise ValueError(f"fitting needs features [n, D] and n scores, n >= 3; got {list(x.shape)} and "
                         f"{list(y.shape)}")
    finite_number(ridge, "ridge", low=0, low_open=True)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / scale
    bias = float(y.mean())
    gram = z @ z.T  # [n, n]: the dual form, as cheap as the primal for D >= n
    hat = gram @ np.linalg.inv(gram + ridge * np.eye(len(z)))
    fitted = bias + hat @ (y - bias)
    loo = (y - fitted) / np.clip(1 - np.diag(hat) - 1 / len(y), 1e-6, None)
    weights = z.T @ np.linalg.solve(gram + ridge * np.eye(len(z)), y - bias)
    return ScorePredictor(weights, bias, mean, scale, float(np.sqrt(np.mean(loo ** 2))), made_for,
                          {"n": len(y), "ridge": ridge, **(config or {})})
