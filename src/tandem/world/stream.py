"""ShapesWorld's unbounded training stream: batch ``step`` of a run is drawn from
``numpy.random.default_rng([seed, step])``, so a resumed run sees exactly the batches an
uninterrupted run would have seen."""

from __future__ import annotations

import numpy as np
import torch

from .scene import make_example, render, sample_scene

TRAIN_STREAM_SEED = 0  # training scenes; the prompt lists use the disjoint seed families (1, i) and (2, i)


def sample_scenes(seed: int, step: int, batch_size: int) -> list:
    """The scenes of batch ``step`` of the stream ``seed``."""
    rng = np.random.default_rng([TRAIN_STREAM_SEED, seed, step])
    return [sample_scene(rng) for _ in range(batch_size)]


def sample_batch(seed: int, step: int, batch_size: int) -> tuple[list[str], np.ndarray]:
    """Captions and renderings of batch ``step`` of the stream ``seed``.

    Returns:
        captions (list[str] of length B), images (uint8 array [B, 32, 32, 3]).
    """
    scenes = sample_scenes(seed, step, batch_size)
    return [s.caption for s in scenes], np.stack([render(s) for s in scenes])


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (the diffusers convention)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding to nearest."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


__all__ = ["images_to_tensor", "make_example", "sample_batch", "sample_scenes", "tensor_to_images"]
