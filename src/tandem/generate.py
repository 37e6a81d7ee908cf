"""Teacher generation with per-prompt seeding.

An image's result depends only on (model, settings, prompt, seed, index): the initial noise
of prompt ``index`` comes from its own generator, seeded from ``(seed, index)``, so neither
the batch size nor the other prompts of the batch change it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .models import SCHEDULERS, make_scheduler


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for prompt ``index`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def prompt_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(prompt_seed(seed, index))


@dataclass(frozen=True)
class TeacherSettings:
    steps: int = 25
    scheduler: str = "dpm"
    guidance_scale: float = 7.5

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")

    @property
    def unet_evals_per_image(self) -> int:
        """UNet evaluations per image, counting the CFG batch-doubling (guidance > 1)."""
        return self.steps * (2 if self.guidance_scale > 1 else 1)


def initial_latents(pipe, seed: int, indices: list[int]) -> torch.Tensor:
    """Unit-variance initial noise [B, C, h, w], one generator per prompt index."""
    c = pipe.unet.config.in_channels
    size = pipe.unet.config.sample_size
    device = pipe.device
    noise = [
        torch.randn((1, c, size, size), generator=prompt_generator(seed, i), dtype=torch.float32)
        for i in indices
    ]
    return torch.cat(noise).to(device=device, dtype=pipe.unet.dtype)


@torch.no_grad()
def generate_teacher(
    pipe,
    prompts: list[str],
    settings: TeacherSettings,
    seed: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Generate one image per prompt with the teacher pipeline.

    Args:
        pipe: a ``diffusers.StableDiffusionPipeline``.
        prompts: B prompts; prompt i is seeded from ``(seed, i)``.
        settings: steps, scheduler and guidance scale.
        batch_size: prompts per pipeline call (does not change any image).
        on_batch: called with the number of images finished after each batch.
    Returns:
        B uint8 images [H, W, 3].
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        out = pipe(
            [prompts[i] for i in chunk],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            latents=initial_latents(pipe, seed, chunk),
            output_type="np",
        ).images
        images.extend((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))
        if on_batch is not None:
            on_batch(len(images))
    return images


def settings_dict(settings: TeacherSettings) -> dict:
    return asdict(settings)
