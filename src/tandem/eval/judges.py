"""The judge of an evaluation: what decides which of two images is the better one.

In ShapesWorld the judge is exact: the checker says whether an image satisfies its caption and
gives a soft score (``ExactJudge``); an experiment's quality is then the share of captions
satisfied. On real models no exact judge exists, and a learned scorer (ImageReward, PickScore,
CLIP score) takes its place (``ScorerJudge``); quality is then the scorer's mean. Use a different
scorer from the pipeline's oracle where you can: an oracle judged by itself looks better than it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..scorers import CLIPScorer, load_scorer
from .features import ImageFeatures, InceptionFeatures, renderings, world_clip_scorer


class Judge(Protocol):
    exact: bool  # True: per-image "satisfied" beside the score (quality = share satisfied)

    def __call__(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per-image ``score`` [N] (higher is better) and, for an exact judge, ``satisfied`` [N]."""
        ...

    def describe(self) -> dict: ...


class ExactJudge:
    """ShapesWorld's exact checker: ``satisfied`` and the soft score in [0, 1]."""

    exact = True

    def __call__(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        from ..world.checker import check_batch  # defers scipy (world.checker)

        results = check_batch(list(images), prompts)
        return {"satisfied": np.array([r.satisfied for r in results]),
                "score": np.array([r.score for r in results], np.float64)}

    def describe(self) -> dict:
        return {"kind": "world", "exact": True, "quality": "captions satisfied"}


class ScorerJudge:
    """A learned scorer (any ``tandem.scorers.Scorer``) as the judge: its per-image score."""

    exact = False

    def __init__(self, scorer, spec: str):
        self.scorer, self.spec = scorer, spec

    def __call__(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        images = list(images) if isinstance(images, np.ndarray) else images
        return {"score": self.scorer(images, prompts).double().numpy()}

    def describe(self) -> dict:
        return {"kind": "scorer", "exact": False, "spec": self.spec, "quality": f"mean {self.spec.split(':')[0]} score",
                "scorer": self.scorer.fingerprint()}


def load_judge(spec: str, device: str = "cpu") -> ExactJudge | ScorerJudge:
    """``world`` (the exact checker) or a scorer spec of ``tandem.scorers.load_scorer``
    (``imagereward[:PATH]``, ``pickscore[:ID_OR_DIR]``, ``clip:ID_OR_DIR``, ``world-oracle[:DIR]``)."""
    if spec == "world":
        return ExactJudge()

    return ScorerJudge(load_scorer(spec, device=device), spec)


def _exact(results: dict) -> bool:
    return results.get("judge", {}).get("exact", True)  # results made before judges were named: the checker


def quality_label(results: dict) -> str:
    """The axis label of ``quality`` in an experiment's results."""
    return "captions satisfied (%)" if _exact(results) else results["judge"]["quality"]


def format_quality(value: float, results: dict) -> str:
    return f"{100 * value:.1f}%" if _exact(results) else f"{value:.4f}"


def plotted_quality(value: float, results: dict) -> float:
    return 100 * value if _exact(results) else value


@dataclass
class Measures:
    """How an experiment measures images: the ``judge`` (quality), a ``features`` network (Fréchet
    distance, diversity, student-teacher distance), a ``clip_scorer`` (the CLIP score column), the
    ``reference`` images of the Fréchet distance (``reference(prompts, seed)`` -> uint8 images),
    whether the captions are ShapesWorld's (``world``: factors read from the caption's parse), and the
    Inception network and reference images of the FID proper (``fid_features``, ``fid_reference``).
    Without features or a reference, the metrics that need them are left out."""

    judge: Judge
    features: object | None = None       # tandem.eval.features.ImageFeatures
    clip_scorer: object | None = None    # tandem.scorers.CLIPScorer
    reference: Callable[[list[str], int], np.ndarray] | None = None
    world: bool = False
    spec: dict = field(default_factory=dict)  # how each part was chosen, for results.json
    fid_features: object | None = None   # tandem.eval.features.InceptionFeatures: the FID proper
    fid_reference: Callable[[list[str], int], np.ndarray] | None = None  # its reference images

    @classmethod
    def for_world(cls, judge: Judge | None = None, judge_spec: str = "world") -> Measures:
        """The exact checker (or ``judge``), the world CLIP's features and CLIP score, and exact
        renderings of the same prompts as the Fréchet reference."""
        return cls(judge or ExactJudge(), ImageFeatures.world(), world_clip_scorer(), renderings, world=True,
                   spec={"judge": judge_spec, "features": "world clip", "clip_score": "world clip",
                         "reference": "renderings of the same prompts"})

    @classmethod
    def from_specs(cls, judge: str, features: str | None = None, clip_score: str | None = None,
                   reference: str | Path | None = None, device: str = "cpu", fid: str | None = None) -> Measures:
        """Real tier: a judge spec (``load_judge``), a CLIP or DINOv2 for features (hub id or directory),
        a CLIP for the CLIP score, a directory of reference images for the Fréchet distance, and ``fid``
        ('inception' or 'inception:WEIGHTS_FILE') for the Inception FID against the same reference."""
        if reference is not None and features is None and fid is None:
            raise ValueError("a Fréchet reference needs a feature network (features=... or fid=...)")
        if fid is not None and reference is None:
            raise ValueError("the FID needs reference images (reference=DIR)")
        inception = None
        if fid is not None:
            kind, _, weights = fid.partition(":")
            if kind != "inception":
                raise ValueError(f"unknown FID network {fid!r}; expected 'inception' or 'inception:WEIGHTS_FILE'")
            inception = InceptionFeatures.torchmetrics(weights or None)
        feats = ImageFeatures.from_pretrained(features) if features is not None else None
        clip = None
        if clip_score is not None:
            clip = CLIPScorer.from_pretrained(clip_score, device=device)
        images = fid_images = None
        if reference is not None and feats is not None:
            stored = reference_images(reference, feats.image_size)
            images = lambda _prompts, _seed: stored  # one fixed set, whatever the prompts
        if inception is not None:
            stored_fid = reference_images(reference, inception.image_size)
            fid_images = lambda _prompts, _seed: stored_fid
        return cls(load_judge(judge, device), feats, clip, images, world=False,
                   spec={"judge": judge, "features": features, "clip_score": clip_score,
                         "reference": str(reference) if reference is not None else None, "fid": fid},
                   fid_features=inception, fid_reference=fid_images)

    def describe(self) -> dict:
        return {**self.spec, "judge": self.judge.describe()}


def reference_images(directory: str | Path, size: int) -> np.ndarray:
    """The PNG/JPEG images of a directory (sorted by name), RGB, resized to ``size`` x ``size``:
    uint8 [N, size, size, 3]."""
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"reference images: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"reference images: {directory} holds {len(files)} images; the Fréchet distance needs >= 2")
    out = []
    for p in files:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)
