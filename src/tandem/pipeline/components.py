"""Whether a student and a teacher can work together on the components they share (latent space,
resolution, text embeddings), and input images as tensors at the pipeline's resolution."""

from __future__ import annotations

import inspect

import numpy as np
import torch


def accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _unet_config(pipe):
    unet = getattr(pipe, "unet", None)
    return None if unet is None else unet.config


def own_components(student, teacher) -> tuple[str, ...]:
    """What ``student`` brings of its own (``vae``, ``text_encoder``) rather than sharing ``teacher``'s."""
    return tuple(name for name in ("vae", "text_encoder")
                 if getattr(student, name, None) is not None and getattr(student, name) is not getattr(
                     teacher, name, None))


def check_pair(student, teacher) -> None:
    """Refuse a student that cannot work beside ``teacher`` with the components it shares: a UNet for other
    latents or another resolution on the teacher's VAE, or for other text embeddings on the teacher's text
    encoder (what would otherwise surface as a convolution or matmul shape error mid-run)."""
    s, t = _unet_config(student), _unet_config(teacher)
    if s is None or t is None:
        return
    vae = getattr(student, "vae", None)
    if vae is not None and vae is getattr(teacher, "vae", None):
        if s.in_channels != t.in_channels:
            raise ValueError(f"student UNet takes {s.in_channels}-channel latents, the teacher's takes "
                             f"{t.in_channels} (in_channels): they do not share a latent space (the student uses "
                             "the teacher's VAE)")
        if s.sample_size != t.sample_size:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            raise ValueError(f"student UNet is made for {_size(s.sample_size, factor)} images, the teacher's for "
                             f"{_size(t.sample_size, factor)} (sample_size {s.sample_size} vs {t.sample_size}): "
                             "they do not share a resolution (the student uses the teacher's VAE)")
    encoder = getattr(student, "text_encoder", None)
    if encoder is not None and encoder is getattr(teacher, "text_encoder", None) \
            and s.cross_attention_dim != t.cross_attention_dim:
        raise ValueError(f"student UNet attends to {s.cross_attention_dim}-wide text embeddings, the teacher's to "
                         f"{t.cross_attention_dim} (cross_attention_dim): they do not share a text encoder (the "
                         "student uses the teacher's)")


def _size(sample_size, factor: int) -> str:
    """A UNet's ``sample_size`` (an int or [height, width] in latents) as image pixels: "512x512 px"."""
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return f"{h * factor}x{w * factor} px"


def check_shared_latents(student, teacher, what: str, fix: str) -> None:
    """Refuse giving the teacher latents of the student's space (``what`` does: the student's latents, its
    initial noise, an edit's noised input) when the teacher's are another: other channels, or another
    VAE scaling; ``fix`` says what to do instead."""
    s, t = _unet_config(student), _unet_config(teacher)
    if s is not None and t is not None and s.in_channels != t.in_channels:
        raise ValueError(f"{what}, but the student UNet takes {s.in_channels}-channel latents and the teacher's "
                         f"{t.in_channels} (in_channels): they do not share a latent space; {fix}")
    s_vae, t_vae = getattr(student, "vae", None), getattr(teacher, "vae", None)
    if s_vae is None or t_vae is None or s_vae is t_vae:
        return
    s_scale, t_scale = s_vae.config.get("scaling_factor"), t_vae.config.get("scaling_factor")
    if s_scale != t_scale:
        raise ValueError(f"{what}, but the student's VAE scales latents by {s_scale:g} and the teacher's by "
                         f"{t_scale:g}: they do not share a latent space; {fix}")


def images_to_unit_tensor(images, size: tuple[int, int], what: str = "image") -> torch.Tensor:
    """PIL images, uint8 [H, W, 3] arrays (or one [B, H, W, 3] array) or a float [B, 3, H, W] tensor in
    [0, 1] -> float [B, 3, H, W] in [0, 1] at ``size`` (height, width); other sizes are resized (bicubic)."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{what} tensor must be [B, 3, H, W], got {list(images.shape)}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{what} tensor values must lie in [0, 1]")
        if tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return x
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, Image.Image | np.ndarray):
        images = [images]
    arrays = []
    for im in images:
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"{what} arrays must be uint8 [H, W, 3], got {im.dtype} {list(im.shape)}")
            im = Image.fromarray(im)
        elif not isinstance(im, Image.Image):
            raise ValueError(f"{what}: expected PIL images, uint8 arrays or a tensor, got {type(im).__name__}")  # noqa: TRY004
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
