"""Oracles: learned image-quality scorers with one protocol.

    scorer(images, prompts) -> Tensor[B]   (float32 on the CPU, higher is better)

``images`` is a float tensor [B, 3, H, W] in [0, 1] (any device), a list of PIL images, or a
list of uint8 [H, W, 3] arrays. Every scorer also has ``name`` and ``fingerprint()`` (what makes
its scores: kind, source, weights digest), which calibrations check.

Adapters (each from a hub id or a local directory):

* ``clip:<id>``       CLIP score, 100 * max(cos(image, text), 0) (torchmetrics' convention).
* ``pickscore:<id>``  PickScore: logit_scale * cos(image, text) of the fine-tuned CLIP-H.
* ``imagereward:<id>`` ImageReward (optional dependency: ``pip install image-reward``).
* ``world-oracle[:<dir>]`` ShapesWorld's learned oracle (``tandem.world.oracle``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("world-oracle", "clip", "pickscore", "imagereward")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_image_tensor(images) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] from a tensor, a list of PIL images or uint8 [H, W, 3] arrays."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an image tensor [B, 3, H, W], got shape {tuple(images.shape)}")
        return images.float()
    arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    if not arrays:
        raise ValueError("no images")
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"image {i}: expected uint8 [H, W, 3], got {a.dtype} {a.shape}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _check_pair(x: torch.Tensor, prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(x):
        raise ValueError(f"got {len(x)} images and {len(prompts)} prompts (one prompt per image)")
    return prompts


def _source_fingerprint(source: str) -> dict:
    from .calibration import file_digest

    path = Path(source)
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        return {"source": str(path.resolve()), "weights": "+".join(file_digest(p) for p in weights)}
    return {"source": source, "weights": None}  # a hub id: its files are whatever the id names


def _require_source(source: str) -> None:
    if not source:
        raise ValueError("a scorer needs a hub id or a local directory")
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"scorer path {source!r} does not exist (expected a directory or a hub id 'org/name')")


class CLIPScorer:
    """CLIP score of a transformers ``CLIPModel``: ``scale * max(cos(image, text), 0)``."""

    kind = "clip"

    def __init__(self, model, tokenizer, source: str, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 scale: float = 100.0, device: str = "cpu", batch_size: int = 64):
        self.model, self.tokenizer, self.source = model.to(device).eval(), tokenizer, source
        self.mean = torch.tensor(image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std).view(1, 3, 1, 1)
        self.scale, self.device, self.batch_size = scale, device, batch_size
        self.size = model.config.vision_config.image_size
        self.name = f"{self.kind}:{source}"

    @classmethod
    def from_pretrained(cls, source: str, processor: str | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs):
        """``processor``: where the tokenizer and image statistics live [``source``]."""
        from transformers import AutoTokenizer, CLIPModel

        from .models import quiet_hub_libraries

        _require_source(source)
        quiet_hub_libraries()
        proc = processor or source
        try:
            model = CLIPModel.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(proc)
        except OSError as e:
            raise ValueError(f"cannot load {cls.kind} scorer {source!r}: {str(e).splitlines()[0]}") from e
        mean, std = _image_stats(proc)
        return cls(model, tokenizer, source, mean, std, device=device, **kwargs)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to the model's size (bicubic, antialiased), centre-crop, normalise."""
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            s = self.size / min(h, w)
            x = F.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))), mode="bicubic",
                              antialias=True, align_corners=False).clamp(0, 1)
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _similarity(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(x.to(self.device)).to(self.model.dtype)
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(**text)), dim=-1)
        return (img * txt).sum(-1)

    def _score(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * cos.clamp(min=0)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        x = to_image_tensor(images)
        prompts = _check_pair(x, prompts)
        out = [self._score(self._similarity(x[s:s + self.batch_size], prompts[s:s + self.batch_size])).cpu()
               for s in range(0, len(x), self.batch_size)]
        return torch.cat(out).float()

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **_source_fingerprint(self.source), "scale": self.scale}


class PickScoreScorer(CLIPScorer):
    """PickScore (Kirstain et al. 2023): the fine-tuned CLIP-H's ``logit_scale * cos``, unclipped."""

    kind = "pickscore"
    DEFAULT = "yuvalkirstain/PickScore_v1"
    PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT, processor: str | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs):
        if processor is None:
            processor = source if Path(source).is_dir() else cls.PROCESSOR
        scorer = super().from_pretrained(source, processor, device, dtype, **kwargs)
        scorer.scale = float(scorer.model.logit_scale.detach().exp())
        return scorer

    def _score(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * cos


def _features(out) -> torch.Tensor:
    """Projected CLIP features: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def _image_stats(source: str) -> tuple[tuple, tuple]:
    """image_mean/std from a local preprocessor_config.json, or the hub's, else CLIP's."""
    path = Path(source) / "preprocessor_config.json"
    config = None
    if path.exists():
        config = json.loads(path.read_text())
    elif not Path(source).exists():
        try:
            from huggingface_hub import hf_hub_download

            config = json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
        except Exception:  # noqa: BLE001 - offline or no such file: CLIP's statistics
            config = None
    if not config:
        return CLIP_MEAN, CLIP_STD
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023) through its own package (``pip install image-reward``).

    Scores one (prompt, image) pair per package call, on 8-bit PIL images as the package expects.
    """

    kind = "imagereward"
    DEFAULT = "ImageReward-v1.0"

    def __init__(self, model, source: str):
        self.model, self.source = model, source
        self.name = f"{self.kind}:{source}"

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT, device: str = "cpu", med_config: str | None = None, **_):
        try:
            import ImageReward as RM
        except ImportError:
            raise ImportError("the imagereward scorer needs the ImageReward package: pip install image-reward") from None
        kwargs = {"device": device}
        if med_config is not None:
            kwargs["med_config"] = med_config
        return cls(RM.load(source, **kwargs), source)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        from PIL import Image

        x = to_image_tensor(images)
        prompts = _check_pair(x, prompts)
        pil = [Image.fromarray(a) for a in (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()]
        return torch.tensor([float(self.model.score(p, im)) for p, im in zip(prompts, pil)], dtype=torch.float32)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **_source_fingerprint(self.source)}


def load_scorer(spec: str, device: str = "cpu"):
    """A scorer from ``kind[:source]``: world-oracle[:DIR], clip:ID, pickscore[:ID], imagereward[:ID]."""
    kind, _, source = spec.partition(":")
    if kind == "world-oracle":
        from .world.oracle import WorldOracleScorer

        return WorldOracleScorer.from_pretrained(source or None, device=device)
    if kind == "clip":
        if not source:
            raise ValueError("clip scorer needs a model: clip:<hub id or directory>")
        return CLIPScorer.from_pretrained(source, device=device)
    if kind == "pickscore":
        return PickScoreScorer.from_pretrained(source or PickScoreScorer.DEFAULT, device=device)
    if kind == "imagereward":
        return ImageRewardScorer.from_pretrained(source or ImageRewardScorer.DEFAULT, device=device)
    raise ValueError(f"unknown scorer {spec!r}; expected one of {', '.join(KINDS)} (as kind:source)")
