"""Oracles: learned image-quality scorers behind one protocol (``Scorer``).

    scorer(images, prompts) -> Tensor[B]   (float32 on the CPU, higher is better)

``images`` is a float tensor [B, 3, H, W] in [0, 1] on any device, a list of PIL images, or a list
(or array) of uint8 [H, W, 3] arrays. ``scorer.fingerprint()`` names everything that makes its
scores (kind, source, weight digests or hub revision, constants); calibrations compare it.

    load_scorer("clip:openai/clip-vit-large-patch14")   # 100 * max(cos, 0), torchmetrics' CLIP score
    load_scorer("pickscore")                           # PickScore_v1: logit_scale * cos
    load_scorer("imagereward")                         # ImageReward-v1.0 (pip install image-reward)
    load_scorer("blip")                                # BLIP's image-text matching: P(match), in [0, 1]
    load_scorer("world-oracle")                        # ShapesWorld's learned oracle (tandem.world.oracle)

A scorer kind is a factory in a registry (:func:`register_scorer`): the kinds above are this module's, and a module
outside the core registers its own when it is imported (:data:`SCORER_PLUGINS` names which module provides which
kind, so that naming the kind is enough to load it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .calibration import file_digest
from .checks import MissingPackageError, check_weights, load_pretrained, quote
from .hub import quiet_hub_libraries

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel statistics, transformers' defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PROCESSOR_SUFFIXES = (".json", ".txt")  # tokenizer vocabulary/merges and the preprocessor config
RESAMPLING = {2: "bilinear", 3: "bicubic"}  # PIL's codes in processor configs -> F.interpolate's modes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@runtime_checkable
class Scorer(Protocol):
    name: str  # short id, e.g. "clip:openai/clip-vit-large-patch14"

    def __call__(self, images, prompts: list[str]) -> torch.Tensor: ...

    def fingerprint(self) -> dict: ...


def to_image_tensor(images) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1] (on the input's device) from such a tensor, a list of PIL images, or a
    list or array of uint8 [H, W, 3] arrays. Raises ``ValueError`` (``TypeError`` for a wrong container)
    naming what is malformed."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an image tensor [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected a float image tensor in [0, 1], got {images.dtype} (divide 8-bit images by 255)")
        x = images.float()
    else:
        if isinstance(images, Image.Image):
            raise TypeError("expected a list of images, got one PIL image (pass [image])")
        try:
            items = list(images)
        except TypeError:
            raise TypeError(f"expected images as a tensor or a list of PIL images or uint8 arrays, "
                             f"got {type(images).__name__}") from None
        arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in items]
        for i, a in enumerate(arrays):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"image {i}: expected uint8 [H, W, 3], got {a.dtype} {a.shape}")
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) > 1:
            raise ValueError(f"images differ in size ({', '.join(f'{h}x{w}' for h, w in sizes)}); give one size")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 if arrays else torch.empty(0)
    if len(x) == 0:
        raise ValueError("no images")
    if not ((x >= 0) & (x <= 1)).all():  # NaN fails too
        raise ValueError(f"image values must lie in [0, 1], got [{x.min().item():g}, {x.max().item():g}]")
    return x


def clip_preprocess(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """CLIP's image transform on [B, 3, H, W] in [0, 1]: resize the shorter side to ``size`` (bicubic,
    antialiased; the longer side rounds down, as in transformers' processors), centre-crop to
    ``size`` x ``size``, normalise with ``mean``/``std``. It differs from the processors' PIL path
    only in resampling details and in skipping their 8-bit rounding."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        long = int(size * max(h, w) / min(h, w))
        x = F.interpolate(x, size=(long, size) if w <= h else (size, long), mode="bicubic", antialias=True,
                          align_corners=False)
        x = x.clamp(0, 1)  # bicubic overshoots; the processors' 8-bit resize cannot
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def source_fingerprint(source: str | Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES, key: str = "weights") -> dict:
    """``{"path": resolved path, key: {file: sha256}}`` for a local file or directory (its files with
    these suffixes; ``calibration.file_digest``; the path itself is not compared, see
    ``calibration.INFORMATIONAL``); ``{"source": id, "revision": commit or None}`` for a hub id."""
    path = Path(source)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        return {"path": str(path.resolve()), key: {p.name: file_digest(p) for p in files}}
    return {"source": str(source), "revision": _hub_revision(str(source))}


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot of a hub repository (no network), None if unknown."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        cached = try_to_load_from_cache(repo_id, filename)
        match = re.search(r"snapshots/([0-9a-f]{40})/", Path(cached).as_posix()) if isinstance(cached, str) else None
        if match:
            return match.group(1)
    return None


def _check_source(kind: str, source: str) -> None:
    if not source:
        raise ValueError(f"the {kind} scorer needs a model: {kind}:<hub id or local directory>")
    if not Path(source).exists() and not HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"{kind} scorer: {quote(source)} does not exist (expected a local path or a hub id "
                                "'org/name')")


def _check_prompts(prompts, n_images: int) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image, got a single string")
    prompts = list(prompts)
    if len(prompts) != n_images:
        raise ValueError(f"got {n_images} images and {len(prompts)} prompts (one prompt per image)")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    return prompts


def _load_failure(kind: str, source: str, e: Exception) -> ValueError:
    return ValueError(f"cannot load {kind} scorer {quote(source)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


# -- CLIP and PickScore ------------------------------------------------------------------------------


class CLIPScorer:
    """CLIP score (Hessel et al. 2021) with torchmetrics' convention: ``scale * max(cos(image, text), 0)``,
    scale 100, for any transformers ``CLIPModel``."""

    kind = "clip"

    def __init__(self, model, tokenizer, source: str, processor: str | None = None, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, scale: float = 100.0, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.source, self.processor = str(source), str(processor or source)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.scale, self.device, self.batch_size = float(scale), torch.device(device), batch_size
        self.image_size = model.config.vision_config.image_size
        self.max_tokens = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        self.name = f"{self.kind}:{self.source}"

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        *, processor: str | None = None, batch_size: int = 32, **kwargs) -> CLIPScorer:
        """Load a ``CLIPModel`` from a hub id or local directory.

        Args:
            name_or_path: the model (hub id or directory).
            processor: where the tokenizer and ``preprocessor_config.json`` live [``name_or_path``];
                image mean/std come from that config when it exists, else CLIP's.
            kwargs: constructor arguments (``scale``).
        """
        from transformers import AutoTokenizer, CLIPModel

        processor = processor or name_or_path
        _check_source(cls.kind, name_or_path)
        _check_source(cls.kind, processor)
        quiet_hub_libraries()
        try:
            if Path(name_or_path).is_dir():  # damaged, pickled or missing weights named (checks.load_pretrained)
                model = load_pretrained(CLIPModel.from_pretrained, name_or_path, f"{cls.kind} scorer", dtype=dtype)
            else:
                model = CLIPModel.from_pretrained(name_or_path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(processor)
            config = _image_processor_config(processor)
        except OSError as e:
            raise _load_failure(cls.kind, name_or_path, e) from e
        if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
            # transformers makes an empty tokenizer of a directory without vocabulary files
            raise ValueError(f"{cls.kind} scorer: {processor!r} holds no tokenizer vocabulary; pass the directory "
                             "that has the model's tokenizer files (processor=...)")
        size = model.config.vision_config.image_size
        crop = config.get("crop_size")
        crop = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width")) if crop else None
        if crop is not None and crop != (size, size):
            raise ValueError(f"{processor!r} crops images to {crop[0]}x{crop[1]} but the model {name_or_path!r} "
                             f"expects {size}x{size}")
        return cls(model, tokenizer, name_or_path, processor, config.get("image_mean", OPENAI_CLIP_MEAN),
                   config.get("image_std", OPENAI_CLIP_STD), device=device, batch_size=batch_size, **kwargs)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's normalised pixels [B, 3, S, S] (``clip_preprocess``)."""
        return clip_preprocess(x, self.image_size, self.image_mean, self.image_std)

    def cosine(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image embedding, text embedding) [B] for images [B, 3, H, W] in [0, 1]."""
        pixels = self.preprocess(x.to(self.device)).to(self.model.dtype)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt").to(self.device)
        image_embeds = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        text_embeds = self.model.get_text_features(**text).pooler_output.float()
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)

    def score_from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * cos.clamp(min=0)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> torch.Tensor:
        """Scores [B] (float32, CPU) of images [B, 3, H, W] in [0, 1] (or PIL / uint8 lists) and their prompts."""
        x = to_image_tensor(images)
        prompts = _check_prompts(prompts, len(x))
        chunks = range(0, len(x), self.batch_size)
        return torch.cat([self.score_from_cosine(self.cosine(x[s:s + self.batch_size], prompts[s:s + self.batch_size]))
                          .float().cpu() for s in chunks])

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **source_fingerprint(self.source),
                "processor": source_fingerprint(self.processor, PROCESSOR_SUFFIXES, key="files"),
                "image_size": self.image_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "scale": self.scale, "dtype": str(self.model.dtype).removeprefix("torch.")}


class PickScoreScorer(CLIPScorer):
    """PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on human preferences:
    ``logit_scale.exp() * cos(image, text)``, not clipped (its published convention)."""

    kind = "pickscore"
    DEFAULT = "yuvalkirstain/PickScore_v1"
    PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor PickScore was trained with

    def __init__(self, model, tokenizer, source: str, processor: str | None = None, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, device: str | torch.device = "cpu", batch_size: int = 32):
        scale = float(model.logit_scale.detach().float().exp())
        super().__init__(model, tokenizer, source, processor, image_mean, image_std, scale, device, batch_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, *, processor: str | None = None,
                        batch_size: int = 32) -> PickScoreScorer:
        """``processor`` defaults to ``name_or_path`` when it is a directory holding a tokenizer, else to
        ``PROCESSOR`` (the hub PickScore_v1 repository ships no processor)."""
        if processor is None:
            has_tokenizer = any((Path(name_or_path) / f).exists() for f in ("tokenizer.json", "vocab.json"))
            processor = name_or_path if has_tokenizer else cls.PROCESSOR
        return super().from_pretrained(name_or_path, device, dtype, processor=processor, batch_size=batch_size)

    def score_from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * cos


def _preprocessor_config(source: str) -> dict:
    """The ``preprocessor_config.json`` of a local directory or hub id; {} when it has none."""
    path = Path(source)
    if path.exists():
        file = path / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
    except RemoteEntryNotFoundError:
        return {}


# -- BLIP image-text matching ------------------------------------------------------------------------


def blip_preprocess(x: torch.Tensor, size: tuple[int, int], mean, std, resample: str = "bicubic") -> torch.Tensor:
    """BLIP's image transform on [B, 3, H, W] in [0, 1]: resize to ``size`` (height, width) without
    keeping the aspect ratio or cropping (antialiased ``resample``), normalise with ``mean``/``std``.
    Like ``clip_preprocess`` it differs from transformers' PIL path only in resampling details and in
    skipping its 8-bit rounding; images already of ``size`` pass unresized."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode=resample, antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _image_processor_config(source: str) -> dict:
    """The image processor's settings: ``preprocessor_config.json``, else the ``image_processor`` entry
    of ``processor_config.json`` (what ``BlipProcessor.save_pretrained`` writes); {} when neither exists."""
    config = _preprocessor_config(source)
    if config:
        return config
    path = Path(source)
    if path.exists():
        file = path / "processor_config.json"
        return json.loads(file.read_text()).get("image_processor", {}) if file.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, "processor_config.json")).read_text()).get("image_processor", {})
    except RemoteEntryNotFoundError:
        return {}


class BLIPScorer:
    """BLIP (Li et al. 2022) image-text matching, the backbone ImageReward builds on: the probability that
    image and prompt match, ``softmax(itm_score)[:, 1]`` in [0, 1], of a transformers
    ``BlipForImageTextRetrieval`` run with its ITM head (``use_itm_head=True``: the text encoder
    cross-attends to the image and a linear head classifies [no match, match]). Prompts are tokenized as
    transformers' ``BlipProcessor`` does (the [CLS] token first, no token type ids)."""

    kind = "blip"
    DEFAULT = "Salesforce/blip-itm-base-coco"

    def __init__(self, model, tokenizer, source: str, processor: str | None = None,
                 image_size: tuple[int, int] | None = None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 resample: str = "bicubic", device: str | torch.device = "cpu", batch_size: int = 32):
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.source, self.processor = str(source), str(processor or source)
        size = model.config.vision_config.image_size
        self.image_size = tuple(image_size) if image_size is not None else (size, size)
        self.image_mean, self.image_std, self.resample = tuple(image_mean), tuple(image_std), resample
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_tokens = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        self.name = f"{self.kind}:{self.source}"

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, *, processor: str | None = None,
                        batch_size: int = 32) -> BLIPScorer:
        """Load a ``BlipForImageTextRetrieval`` from a hub id or local directory.

        Args:
            name_or_path: the model (hub id or directory) [``Salesforce/blip-itm-base-coco``].
            processor: where the tokenizer and the image processor config (``preprocessor_config.json``
                or ``processor_config.json``) live [``name_or_path``]; image size, mean/std and resampling
                come from that config when it exists, else the model's image size and CLIP's statistics
                (BLIP's, as in transformers' ``BlipImageProcessor``).
        """
        from transformers import AutoTokenizer, BlipForImageTextRetrieval, PretrainedConfig

        processor = processor or name_or_path
        _check_source(cls.kind, name_or_path)
        _check_source(cls.kind, processor)
        quiet_hub_libraries()
        try:
            model_config = PretrainedConfig.get_config_dict(name_or_path)[0]
            if not model_config:  # transformers 5 reads a directory without config.json as {}
                raise FileNotFoundError("no config.json")
            model_type = model_config.get("model_type")
            if model_type != "blip":
                raise ValueError(f"{cls.kind} scorer: {name_or_path!r} holds a {model_type} model, not a BLIP "
                                 "image-text matching model (BlipForImageTextRetrieval)")
            if Path(name_or_path).is_dir():
                check_weights(name_or_path, f"{cls.kind} scorer")  # cut short, or pickled: named, never unpickled
            model, info = BlipForImageTextRetrieval.from_pretrained(name_or_path, dtype=dtype,
                                                                    output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(processor)
            config = _image_processor_config(processor)
        except OSError as e:
            raise _load_failure(cls.kind, name_or_path, e) from e
        missing = sorted({key.split(".")[0] for key in info["missing_keys"]})
        if missing:  # another BLIP (captioning, VQA, contrastive only): transformers would draw these at random
            raise ValueError(f"{cls.kind} scorer: {name_or_path!r} is not a BLIP image-text matching model: it has no "
                             f"weights for {', '.join(missing)} (use an ITM checkpoint such as {cls.DEFAULT})")
        if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
            raise ValueError(f"{cls.kind} scorer: {processor!r} holds no tokenizer vocabulary; pass the directory "
                             "that has the model's tokenizer files (processor=...)")
        model_size = model.config.vision_config.image_size
        size = config.get("size", {"height": model_size, "width": model_size})
        size = (size, size) if isinstance(size, int) else (size.get("height"), size.get("width"))
        if size != (model_size, model_size):
            raise ValueError(f"{cls.kind} scorer: {processor!r} resizes images to "
                             f"{'x'.join(map(str, size)) if None not in size else config['size']} but the model "
                             f"{name_or_path!r} expects {model_size}x{model_size}")
        unsupported = [k for k in ("do_resize", "do_rescale", "do_normalize") if config.get(k, True) is False]
        if abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
            unsupported.append(f"rescale_factor {config['rescale_factor']}")
        resample = RESAMPLING.get(config.get("resample", 3))
        if resample is None:
            unsupported.append(f"resample {config['resample']}")
        if unsupported:
            raise ValueError(f"{cls.kind} scorer: {processor!r} sets {', '.join(unsupported)}; this scorer "
                             "resizes (bilinear or bicubic), rescales by 1/255 and normalises")
        return cls(model, tokenizer, name_or_path, processor, size, config.get("image_mean", OPENAI_CLIP_MEAN),
                   config.get("image_std", OPENAI_CLIP_STD), resample, device=device, batch_size=batch_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's normalised pixels [B, 3, S, S] (``blip_preprocess``)."""
        return blip_preprocess(x, self.image_size, self.image_mean, self.image_std, self.resample)

    def match_logits(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The ITM head's logits [B, 2] (no match, match) for images [B, 3, H, W] in [0, 1]."""
        pixels = self.preprocess(x.to(self.device)).to(self.model.dtype)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                              return_token_type_ids=False, return_tensors="pt").to(self.device)
        return self.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels,
                          use_itm_head=True).itm_score.float()

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> torch.Tensor:
        """P(match) [B] (float32, CPU) of images [B, 3, H, W] in [0, 1] (or PIL / uint8 lists) and their prompts."""
        x = to_image_tensor(images)
        prompts = _check_prompts(prompts, len(x))
        chunks = range(0, len(x), self.batch_size)
        return torch.cat([self.match_logits(x[s:s + self.batch_size], prompts[s:s + self.batch_size])
                          .softmax(-1)[:, 1].cpu() for s in chunks])

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **source_fingerprint(self.source),
                "processor": source_fingerprint(self.processor, PROCESSOR_SUFFIXES, key="files"),
                "image_size": list(self.image_size), "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "resample": self.resample, "score": "softmax(itm)[1]",
                "dtype": str(self.model.dtype).removeprefix("torch.")}


# -- ImageReward -------------------------------------------------------------------------------------


def _import_image_reward():
    """The ImageReward package, or a one-line :class:`~tandem.checks.MissingPackageError` (an ``ImportError``
    and a ``ValueError``) naming it and how to install it."""
    try:
        import ImageReward
    except ImportError as e:
        if e.name == "ImageReward":
            raise MissingPackageError("the imagereward scorer needs the ImageReward package, which is not installed: "
                                      "pip install image-reward", name="ImageReward") from None
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingPackageError(f"the ImageReward package is installed but fails to import: {why} (image-reward "
                                  "1.5 imports helpers that transformers 5 removed)", name="ImageReward") from e
    return ImageReward


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023): BLIP's image-grounded text encoder and an MLP, standardised by the
    package's reward mean/std. Runs the package's batched ``score_gard`` on images preprocessed in torch as
    its torchvision transform does (224 px, CLIP statistics), without the 8-bit round trip of its ``score``."""

    kind = "imagereward"
    DEFAULT = "ImageReward-v1.0"  # a name the package downloads itself (THUDM/ImageReward)
    PACKAGE_CACHE = Path("~/.cache/ImageReward")  # where the package puts DEFAULT's files
    CHECKPOINT, MED_CONFIG = "ImageReward.pt", "med_config.json"
    IMAGE_SIZE, MAX_TOKENS = 224, 35  # the package's _transform(224) and tokenizer max_length

    def __init__(self, model, source: str, files: list[Path], device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.model, self.source, self.files = model, str(source), files
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = f"{self.kind}:{self.source}"

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, *, med_config: str | None = None,
                        batch_size: int = 32) -> ImageRewardScorer:
        """Load through the ImageReward package (``pip install image-reward``).

        Args:
            name_or_path: ``ImageReward-v1.0`` (the package downloads it), a directory or hub id holding
                ``ImageReward.pt`` and ``med_config.json``, or a checkpoint file.
            med_config: BLIP's text-encoder config [``med_config.json`` beside the checkpoint, else the
                package downloads it].
        """
        package = _import_image_reward()
        checkpoint, med_config = cls._resolve(name_or_path, med_config)
        with contextlib.redirect_stdout(sys.stderr):  # the package prints while it loads
            model = package.load(str(checkpoint), device=str(device),
                                 med_config=str(med_config) if med_config is not None else None)
        model = model.to(device=device, dtype=dtype).eval()
        cache = cls.PACKAGE_CACHE.expanduser()  # where the package downloads what it is not given
        files = [cache / cls.CHECKPOINT if name_or_path == cls.DEFAULT else Path(checkpoint),
                 Path(med_config) if med_config is not None else cache / cls.MED_CONFIG]
        return cls(model, name_or_path, files, device, batch_size)

    @classmethod
    def _resolve(cls, source: str, med_config: str | None) -> tuple[str | Path, str | Path | None]:
        """(checkpoint, med_config) to hand to ``ImageReward.load``."""
        if source == cls.DEFAULT:
            return source, med_config
        _check_source(cls.kind, source)
        path = Path(source)
        if path.is_file():
            sibling = path.parent / cls.MED_CONFIG
            return path, med_config or (sibling if sibling.is_file() else None)
        if path.is_dir():
            if not (path / cls.CHECKPOINT).is_file():
                raise FileNotFoundError(f"imagereward scorer: no {cls.CHECKPOINT} in {source!r}")
            sibling = path / cls.MED_CONFIG
            return path / cls.CHECKPOINT, med_config or (sibling if sibling.is_file() else None)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(source, cls.CHECKPOINT), med_config or hf_hub_download(source, cls.MED_CONFIG)
        except OSError as e:
            raise _load_failure(cls.kind, source, e) from e

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> torch.Tensor:
        """Rewards [B] (float32, CPU) of images [B, 3, H, W] in [0, 1] (or PIL / uint8 lists) and their prompts."""
        x = to_image_tensor(images)
        prompts = _check_prompts(prompts, len(x))
        dtype = next(self.model.parameters()).dtype
        out = []
        for s in range(0, len(x), self.batch_size):
            pixels = clip_preprocess(x[s:s + self.batch_size].to(self.device), self.IMAGE_SIZE, OPENAI_CLIP_MEAN,
                                     OPENAI_CLIP_STD).to(dtype)
            text = self.model.blip.tokenizer(prompts[s:s + self.batch_size], padding="max_length", truncation=True,
                                             max_length=self.MAX_TOKENS, return_tensors="pt").to(self.device)
            rewards = self.model.score_gard(text.input_ids, text.attention_mask, pixels)
            out.append(rewards.float().reshape(-1).cpu())
        return torch.cat(out)

    def fingerprint(self) -> dict:
        local = self.source != self.DEFAULT and Path(self.source).exists()
        where = {"path": str(Path(self.source).resolve())} if local else {"source": self.source}
        return {"kind": self.kind, **where,
                "weights": {p.name: file_digest(p) if p.is_file() else None for p in self.files},
                "image_size": self.IMAGE_SIZE, "reward_mean": float(self.model.mean),
                "reward_std": float(self.model.std),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}


# -- registry ----------------------------------------------------------------------------------------

ScorerFactory = Callable[[str, str | torch.device], Scorer]  # (source, "" when the spec names none; device)
_FACTORIES: dict[str, ScorerFactory] = {}
# The scorer kinds that modules outside the core provide, and the module that registers each (its
# register_scorer call runs when it is imported): what a package's entry points would say, kept here, in one
# place, because tandem's own outer layers are the only providers. load_scorer imports the module the first
# time its kind is named; the core imports nothing from it otherwise.
SCORER_PLUGINS = {"world-oracle": "tandem.world.oracle"}


def register_scorer(kind: str, factory: ScorerFactory) -> None:
    """Make ``load_scorer("KIND[:SOURCE]")`` return ``factory(source, device)`` (``source`` is ``""`` when the
    spec names none). A kind holds one factory: registering another under a taken kind is a ``ValueError``
    (registering the same function again, as a reloaded module does, replaces it)."""
    if not kind or not isinstance(kind, str) or ":" in kind:
        raise ValueError(f"a scorer kind is a non-empty name without ':', got {kind!r}")
    known = _FACTORIES.get(kind)
    if known is not None and (known.__module__, known.__qualname__) != (factory.__module__, factory.__qualname__):
        raise ValueError(f"scorer kind {kind!r} is already registered (by {known.__module__}.{known.__qualname__})")
    _FACTORIES[kind] = factory


def scorer_kinds() -> list[str]:
    """Every kind ``load_scorer`` knows: the plugins' (loaded or not) and this module's."""
    return [*SCORER_PLUGINS, *(kind for kind in _FACTORIES if kind not in SCORER_PLUGINS)]


def load_scorer(spec: str, device: str | torch.device = "cpu") -> Scorer:
    """A scorer from ``kind[:source]``.

    Args:
        spec: ``world-oracle[:DIR]``, ``clip:ID_OR_DIR``, ``pickscore[:ID_OR_DIR]`` (default
            ``yuvalkirstain/PickScore_v1``), ``imagereward[:NAME_OR_PATH]`` (default ``ImageReward-v1.0``) or
            ``blip[:ID_OR_DIR]`` (default ``Salesforce/blip-itm-base-coco``), or a kind another module registered
            (:func:`register_scorer`).
        device: where the model runs.
    """
    kind, _, source = spec.partition(":")
    if kind not in _FACTORIES and kind in SCORER_PLUGINS:
        importlib.import_module(SCORER_PLUGINS[kind])  # registers the kind (see SCORER_PLUGINS)
        if kind not in _FACTORIES:
            raise ValueError(f"{SCORER_PLUGINS[kind]} was imported for scorer kind {kind!r} but registered no such "
                             "kind (register_scorer)")
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ValueError(f"unknown scorer kind {quote(kind)} in {quote(spec)}; expected one of "
                         f"{', '.join(scorer_kinds())} (as kind:source)")
    return factory(source, device)


def _clip(source: str, device: str | torch.device) -> CLIPScorer:
    return CLIPScorer.from_pretrained(source, device=device)


def _pickscore(source: str, device: str | torch.device) -> PickScoreScorer:
    return PickScoreScorer.from_pretrained(source or PickScoreScorer.DEFAULT, device=device)


def _imagereward(source: str, device: str | torch.device) -> ImageRewardScorer:
    return ImageRewardScorer.from_pretrained(source or ImageRewardScorer.DEFAULT, device=device)


def _blip(source: str, device: str | torch.device) -> BLIPScorer:
    return BLIPScorer.from_pretrained(source or BLIPScorer.DEFAULT, device=device)


register_scorer("clip", _clip)
register_scorer("pickscore", _pickscore)
register_scorer("imagereward", _imagereward)
register_scorer("blip", _blip)
