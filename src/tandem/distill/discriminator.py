"""ADD's discriminator (Sauer et al., section 3.1), built as StyleGAN-T's (Sauer et al. 2023) that ADD uses:
a frozen feature network ``F`` (a ViT), trainable heads ``D_φ,k`` on the token features of ``F``'s blocks,
spectrally normalised (Miyato et al. 2018), projected onto the conditioning and read **per token**, so that
the hinge losses apply to each token's logit and are then averaged over tokens (StyleGAN-T's ``DiscHead``
and ``ProjectedDiscriminator``); images pass through differentiable augmentation (Zhao et al. 2020,
DiffAugment: colour, translation, cutout) before ``F``. Each departure is an option, so the first release's
discriminator (logits averaged over tokens before the hinge, no spectral norm, no augmentation) stays
available for the ablation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..hub import from_hub, quiet_hub_libraries

WORLD_CLIP = "world-clip"
DEFAULT_DINOV2 = "facebook/dinov2-small"  # ViT-S DINOv2: Table 1a's best feature network
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's input normalisation
AUGMENTS = ("color", "translation", "cutout")
HINGES = ("per-token", "per-image")


# -- the feature network --------------------------------------------------------------------------------------

class FeatureNetwork(nn.Module):
    """The frozen feature network ``F``: pixels in [-1, 1] [B, 3, H, W] -> the token features ``F_k``
    [B, tokens, C] of ``layers`` blocks and the CLS embedding [B, C] (``pooler_output``).

    Args:
        model: a transformers ``CLIPVisionModel`` or ``Dinov2Model``.
        mean, std: its input normalisation of pixels in [0, 1] (0.5, 0.5: the world CLIP's [-1, 1]).
    """

    def __init__(self, model: nn.Module, name: str, mean: tuple[float, ...], std: tuple[float, ...],
                 layers: int | None = None, resolution: int | None = None):
        super().__init__()
        blocks = model.config.num_hidden_layers
        layers = min(4, blocks) if layers is None else layers
        if not 1 <= layers <= blocks:
            raise ValueError(f"feature_layers must be in [1, {blocks}] (the blocks of {name}), got {layers}")
        self.model, self.name = model, name
        self.layers = [round((k + 1) * blocks / layers) for k in range(layers)]  # hidden_states index (0: embeddings)
        self.resolution = resolution or min(224, int(model.config.image_size))
        self.channels = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = pixels
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return [out.hidden_states[k] for k in self.layers], out.pooler_output


def load_feature_network(features: str, teacher_spec, layers: int | None = None,
                         resolution: int | None = None) -> FeatureNetwork:
    """``F`` by name: ``world-clip`` (the vision tower of ``<world>/clip``, seeing pixels in [-1, 1]) for a world
    teacher, or a ``Dinov2Model`` by hub id or path (ImageNet normalisation)."""
    from transformers import AutoConfig, CLIPVisionModel, Dinov2Model

    quiet_hub_libraries()
    if features == WORLD_CLIP:
        if not teacher_spec.is_world:
            raise ValueError(f"features='world-clip' needs a world teacher, not {teacher_spec.name!r}; give "
                             f"features=... a DINOv2 hub id or path (e.g. {DEFAULT_DINOV2})")
        clip_dir = Path(teacher_spec.path) / "clip"
        if not (clip_dir / "config.json").is_file():
            raise ValueError(f"features='world-clip': the world {teacher_spec.path} has no clip/ (its CLIP)")
        model = CLIPVisionModel.from_pretrained(clip_dir)
        return FeatureNetwork(model, WORLD_CLIP, (0.5,) * 3, (0.5,) * 3, layers, resolution)
    config = from_hub(AutoConfig.from_pretrained, features, "feature network")
    if config.model_type != "dinov2":
        raise ValueError(f"feature network {features!r} is a {config.model_type!r} model; expected 'world-clip' or a "
                         "DINOv2 model (transformers Dinov2Model)")
    model = from_hub(Dinov2Model.from_pretrained, features, "feature network")
    return FeatureNetwork(model, features, IMAGENET_MEAN, IMAGENET_STD, layers, resolution)


def _conv(channels_in: int, channels_out: int, kernel: int, spectral: bool) -> nn.Module:
    conv = nn.Conv1d(channels_in, channels_out, kernel, padding=kernel // 2)
    return nn.utils.parametrizations.spectral_norm(conv) if spectral else conv


def _block(channels: int, kernel: int, spectral: bool) -> nn.Sequential:
    return nn.Sequential(_conv(channels, channels, kernel, spectral), nn.GroupNorm(1, channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (x + self.fn(x)) / math.sqrt(2)


class DiscriminatorHead(nn.Module):
    """``D_φ,k``: tokens [B, N, C] and conditioning [B, c_dim] -> a logit per token [B, N] (StyleGAN-T's head: a
    token-wise conv block and a residual 9-tap conv over the tokens, spectrally normalised, projected onto the
    conditioning)."""

    def __init__(self, channels: int, cond_dim: int, cmap_dim: int = 64, spectral_norm: bool = True):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1, spectral_norm), _Residual(_block(channels, 9, spectral_norm)))
        self.out = _conv(channels, cmap_dim, 1, spectral_norm)
        self.cmap = nn.Linear(cond_dim, cmap_dim)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.out(self.main(tokens.transpose(1, 2)))  # [B, cmap, N]
        return (h * self.cmap(cond)[..., None]).sum(1) / math.sqrt(h.shape[1])  # projection onto c, per token


class Discriminator(nn.Module):
    """The trainable heads, one per feature layer: features ``[F_k]`` and conditioning -> logits [B, K, N] (one per
    head and token; ``hinge="per-image"``: averaged over tokens, [B, K], the first release's)."""

    def __init__(self, channels: int, layers: int, cond_dim: int, cmap_dim: int = 64, spectral_norm: bool = True,
                 hinge: str = "per-token"):
        super().__init__()
        if hinge not in HINGES:
            raise ValueError(f"hinge must be one of {HINGES}, got {hinge!r}")
        self.per_token = hinge == "per-token"
        self.heads = nn.ModuleList(DiscriminatorHead(channels, cond_dim, cmap_dim, spectral_norm)
                                   for _ in range(layers))

    def forward(self, features: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(f, cond) for head, f in zip(self.heads, features)], dim=1)  # [B, K, N]
        return logits if self.per_token else logits.mean(2)


def _per_image(logits: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` of each logit, averaged over tokens (per-token logits [B, K, N]) and summed over heads: [B]."""
    out = fn(logits)
    return (out.mean(2) if out.ndim == 3 else out).sum(1)


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (3) without R1: ``E[Σ_k max(0, 1 - D_k(real))] + E[Σ_k max(0, 1 + D_k(fake))]``; logits [B, K] or, per
    token, [B, K, N]: then the hinge applies to each token's logit and is averaged over tokens (StyleGAN-T)."""
    return (_per_image(real_logits, lambda x: F.relu(1 - x)).mean()
            + _per_image(fake_logits, lambda x: F.relu(1 + x)).mean())


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ``-E[Σ_k D_k(F_k(x̂_θ))]``; logits [B, K] or [B, K, N] (averaged over tokens)."""
    return -_per_image(fake_logits, lambda x: x).mean()


def r1_penalty(real_logits: torch.Tensor, real_features: list[torch.Tensor]) -> torch.Tensor:
    """``E[Σ_k ||∇_{F_k} D_k(F_k)||²]`` on the heads' inputs (Mescheder et al. 2018), differentiable in φ; ``D_k``
    is the image's logit (per-token logits averaged over tokens)."""
    image_logits = real_logits.mean(2) if real_logits.ndim == 3 else real_logits
    grads = torch.autograd.grad(image_logits.sum(), real_features, create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads).mean()


# -- differentiable augmentation (DiffAugment) ----------------------------------------------------------------

def parse_augment(text: str) -> tuple[str, ...]:
    """``"color,translation,cutout"`` (any of :data:`AUGMENTS`, comma-separated; ``""`` or ``"none"``: none)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"augment: unknown {', '.join(unknown)}; expected any of {', '.join(AUGMENTS)} (or none)")
    return names


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) of images [B, 3, H, W] in [-1, 1], differentiable in ``x``, every draw from
    ``g``: ``color`` (brightness + U(-0.5, 0.5); saturation x U(0, 2) about the pixel's channel mean; contrast x
    U(0.5, 1.5) about the image mean), ``translation`` (a shift by up to 1/8 of the size, zeros shifted in),
    ``cutout`` (a square of half the size set to 0)."""
    b, _, h, w = x.shape

    def draw(*shape):
        return torch.rand(shape, generator=g).to(x.device, x.dtype)

    if "color" in policy:
        x = x + (draw(b, 1, 1, 1) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (draw(b, 1, 1, 1) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (draw(b, 1, 1, 1) + 0.5) + mean
    if "translation" in policy:
        sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        dy = torch.randint(-sh, sh + 1, (b,), generator=g).tolist()
        dx = torch.randint(-sw, sw + 1, (b,), generator=g).tolist()
        padded = F.pad(x, (sw, sw, sh, sh))
        x = torch.stack([padded[i, :, sh - dy[i]:sh - dy[i] + h, sw - dx[i]:sw - dx[i] + w] for i in range(b)])
    if "cutout" in policy:
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (b,), generator=g)
        cx = torch.randint(0, w + (1 - cw % 2), (b,), generator=g)
        rows = torch.arange(h).reshape(1, h, 1)
        cols = torch.arange(w).reshape(1, 1, w)
        top, left = (cy - ch // 2).reshape(b, 1, 1), (cx - cw // 2).reshape(b, 1, 1)
        hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        x = x * (~hole).unsqueeze(1).to(x.device, x.dtype)
    return x
