"""Distribution metrics in an image-feature space: the Fréchet distance (the FID of whichever
feature network is used; in ShapesWorld the world CLIP's image tower, against exact renderings of
the same prompts), diversity as the mean pairwise feature distance between images of one prompt
(the LPIPS-diversity of the DDIL paper), and the world's CLIP score.

Real tier: ``ImageFeatures.from_pretrained(hub id or directory)`` takes any transformers CLIP or
DINOv2 (the paper's reference-preservation metric for editing: ``preservation``). The FID proper is
``InceptionFeatures.torchmetrics()``: the FID Inception network through torchmetrics and torch-fidelity
(``pip install "tandem[fid]"``), fed clean-fid style (every image, generated or reference, resized to
299 x 299 with PIL's bicubic filter before it enters the network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..hub import quiet_hub_libraries
from ..models import world_dir
from ..scorers import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPScorer,
    _image_processor_config,
    clip_preprocess,
    to_image_tensor,
)
from ..world.conditional import scenes_for_captions
from ..world.scene import render

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFeatures:
    """Unit-norm image embeddings [N, D] of images (uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1])
    by a CLIP image tower (projected) or a DINOv2 (its CLS token)."""

    def __init__(self, model, image_mean, image_std, batch_size: int = 256, image_size: int | None = None):
        self.model, self.batch_size = model.eval(), batch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.dino = model.config.model_type == "dinov2"
        config = model.config if self.dino else model.config.vision_config
        self.image_size = image_size or config.image_size

    @classmethod
    def world(cls) -> ImageFeatures:
        """The shipped world CLIP (it sees pixels in [-1, 1]: mean and std 0.5)."""
        return cls.from_pretrained(str(world_dir() / "clip"), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)

    @classmethod
    def from_pretrained(cls, name_or_path: str, image_mean=None, image_std=None) -> ImageFeatures:
        """A transformers ``CLIPModel`` or ``Dinov2Model`` by hub id or directory; mean, std and (DINOv2)
        crop size from its preprocessor config."""
        from transformers import AutoConfig, CLIPModel, Dinov2Model

        quiet_hub_libraries()
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
        if model_type not in ("clip", "dinov2"):
            raise ValueError(f"image features: {name_or_path} is a {model_type!r} model; expected a CLIP or a DINOv2 "
                             "(the Inception FID is fid='inception')")
        config = _image_processor_config(name_or_path) if image_mean is None else {}
        if model_type == "dinov2":
            crop = config.get("crop_size")
            size = crop.get("height") if isinstance(crop, dict) else crop
            return cls(Dinov2Model.from_pretrained(name_or_path), image_mean or config.get("image_mean", IMAGENET_MEAN),
                       image_std or config.get("image_std", IMAGENET_STD), image_size=size)
        return cls(CLIPModel.from_pretrained(name_or_path), image_mean or config.get("image_mean", OPENAI_CLIP_MEAN),
                   image_std or config.get("image_std", OPENAI_CLIP_STD))

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = to_image_tensor(list(images) if isinstance(images, np.ndarray) else images)
        out = []
        for s in range(0, len(x), self.batch_size):
            pixels = clip_preprocess(x[s:s + self.batch_size], self.image_size, self.image_mean, self.image_std)
            if self.dino:
                embedding = self.model(pixel_values=pixels).pooler_output
            else:
                embedding = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
            out.append(torch.nn.functional.normalize(embedding, dim=-1))
        return torch.cat(out).double().numpy()


class InceptionFeatures:
    """Raw (not normalised) feature vectors [N, D] of a network that takes uint8 images [N, 3, S, S]: the
    FID's Inception pool features with ``torchmetrics()``, or any such ``module``. Images (uint8
    [N, H, W, 3]) are resized to ``image_size`` with PIL's bicubic filter first, generated and reference
    alike, so that the network's own resizing never differs between the two (Parmar et al., clean-fid)."""

    def __init__(self, module: torch.nn.Module, image_size: int = 299, batch_size: int = 64):
        self.module, self.image_size, self.batch_size = module.eval(), image_size, batch_size

    @classmethod
    def torchmetrics(cls, weights: str | None = None) -> InceptionFeatures:
        """The FID Inception (``inception-v3-compat``, 2048 pool features) of torchmetrics/torch-fidelity;
        ``weights``: a local copy of its weights file (pt_inception-2015-12-05), else they are fetched."""
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:
            raise ImportError(f"the Inception FID needs torchmetrics ({e}); pip install 'tandem[fid]'") from e
        if weights is not None and not Path(weights).is_file():
            raise ValueError(f"Inception weights: {weights} is not a file")
        try:
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=weights)
        except ModuleNotFoundError as e:
            raise ImportError(f"the Inception FID needs torch-fidelity and torchvision ({e}); pip install "
                              "'tandem[fid]' (torchvision must match your torch build)") from e
        return cls(module)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        from PIL import Image

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception features take uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        out = []
        for s in range(0, len(images), self.batch_size):
            resized = np.stack([np.asarray(Image.fromarray(im).resize((self.image_size,) * 2, Image.Resampling.BICUBIC))
                                for im in images[s:s + self.batch_size]])
            batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()
            out.append(self.module(batch).reshape(len(resized), -1))
        return torch.cat(out).double().numpy()


def preservation(inputs, outputs, features: ImageFeatures) -> np.ndarray:
    """Per-image reference preservation of an edit: the cosine similarity of input and output features
    (the paper's DINOv2 similarity; in ShapesWorld, the world CLIP's)."""
    return np.einsum("nd,nd->n", features(inputs), features(outputs))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of two feature sets [N, D] (Heusel et al.)."""
    from scipy import linalg

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"Fréchet distance needs two feature sets [N >= 2, D] of one D, got {x.shape} and {y.shape}")
    mu, nu = x.mean(0), y.mean(0)
    s, t = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s @ t)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu - nu) ** 2).sum() + np.trace(s + t - 2 * root))


def diversity(features: np.ndarray) -> float:
    """Mean pairwise cosine distance between the images of one prompt, averaged over prompts.

    Args:
        features: unit-norm features [P, S, D]: S >= 2 images (seeds) of each of P prompts.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 3 or f.shape[1] < 2:
        raise ValueError(f"diversity needs features [prompts, seeds >= 2, D], got {f.shape}")
    gram = np.einsum("psd,ptd->pst", f, f)
    i, j = np.triu_indices(f.shape[1], 1)
    return float((1 - gram[:, i, j]).mean())


def renderings(prompts: list[str], seed: int) -> np.ndarray:
    """Exact ShapesWorld renderings uint8 [N, 32, 32, 3] of prompts (as ``tandem world render``)."""
    return np.stack([render(scene) for scene in scenes_for_captions(prompts, seed)])


def world_clip_scorer():
    """The CLIP score (``tandem.scorers.CLIPScorer``) under the world CLIP, which sees pixels in [-1, 1]."""
    from transformers import CLIPModel, CLIPTokenizer

    quiet_hub_libraries()
    return CLIPScorer(CLIPModel.from_pretrained(world_dir() / "clip"),
                      CLIPTokenizer.from_pretrained(world_dir() / "tokenizer"), str(world_dir() / "clip"),
                      image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


def world_clip_score(images, prompts: list[str], scorer=None) -> np.ndarray:
    """100 * max(cos(image, caption), 0) under the world CLIP, per image (``scorer``: a
    ``world_clip_scorer()`` to reuse across calls)."""
    scorer = scorer or world_clip_scorer()
    return scorer(images if not isinstance(images, np.ndarray) else list(images), prompts).numpy()
