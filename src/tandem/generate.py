"""Teacher generation with per-prompt seeding.

An image's noise depends only on (seed, index): the initial noise of prompt ``index`` comes from
its own generator, seeded from ``(seed, index)``, so neither the batch size nor the other prompts
of the batch change it. Its pixels also depend on the *shape* of the batch it is computed in (the
float rounding of batched kernels; never on the other prompts in it): the same seed and batch size
give the same bytes, another batch size may move a pixel by one grey level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_finite, count, finite_number, sampler_steps
from .models import SCHEDULERS, make_scheduler
from .reflect import student_reflection
from .sampling import NOISE_MODES, student_kind
from .students import check_student_guidance, student_info_of


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for prompt ``index`` of a run seeded with ``seed``."""
    return derive_seed(seed, index)


def prompt_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(prompt_seed(seed, index))


@dataclass(frozen=True)
class TeacherSettings:
    steps: int = 25
    scheduler: str = "dpm"
    guidance_scale: float = 7.5

    def __post_init__(self):
        count(self.steps, "teacher steps")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        finite_number(self.guidance_scale, "guidance scale", low=0)

    @property
    def unet_evals_per_image(self) -> int:
        """UNet evaluations per image, counting the CFG batch-doubling (guidance > 1)."""
        return self.steps * (2 if self.guidance_scale > 1 else 1)


def initial_latents(pipe, seed: int, indices: list[int],
                    generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Unit-variance initial noise [B, C, h, w], one generator per prompt index.

    ``generators`` (one per index, default: fresh ones from ``(seed, index)``) are advanced, so a
    sampler that needs more noise for image i continues to draw it from image i's generator.
    """
    gens = generators if generators is not None else [prompt_generator(seed, i) for i in indices]
    return unit_noise(*noise_shape(pipe), gens)


def noise_shape(pipe) -> tuple[int, int, torch.device, torch.dtype]:
    """The channels, size, device and dtype of ``pipe``'s initial noise (its UNet's)."""
    return pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.device, pipe.unet.dtype


def unit_noise(channels: int, size: int, device, dtype, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Unit-variance noise [B, channels, size, size], image i's drawn (in float32, on the CPU) from
    ``generators[i]``: :func:`initial_latents` for a UNet's shape known beforehand."""
    noise = [torch.randn((1, channels, size, size), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device=device, dtype=dtype)


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
        batch_size: prompts per pipeline call. Every image keeps its noise at any batch size; its pixels
            may change by float rounding (at most 1/255 measured on CPU; ``tandem.pipeline``).
        on_batch: called with the number of images finished after each batch.
    Returns:
        B uint8 images [H, W, 3].
    Raises:
        ValueError: before any model runs, for steps the sampler cannot take (more than its training
            timesteps allow), a negative seed or a batch size below 1.
        NonFiniteError: where the teacher or the VAE produced NaN/inf (no image is returned).
    """
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    sampler_steps(settings.steps, pipe.scheduler, "teacher steps", "the teacher")
    _check_run(seed, batch_size)

    def draw(chunk: list[int]) -> list[np.ndarray]:
        latents = pipe(
            [prompts[i] for i in chunk],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            latents=initial_latents(pipe, seed, chunk),
            output_type="latent",
        ).images
        check_finite(latents, "the teacher's latents", chunk)
        return decode_latents(pipe, latents, chunk)

    return _in_batches(len(prompts), batch_size, draw, on_batch)


def _check_run(seed: int, batch_size: int) -> None:
    count(seed, "seed", minimum=0)
    count(batch_size, "batch size")


@dataclass(frozen=True)
class StudentSettings:
    steps: int = 4
    guidance_scale: float = 4.0
    noise: str = "stochastic"  # or "deterministic" (see tandem.sampling)

    def __post_init__(self):
        count(self.steps, "student steps")
        if finite_number(self.guidance_scale, "student guidance scale") < 1:
            raise ValueError(f"student guidance scale must be >= 1 (its w-embedding takes w - 1), "
                             f"got {self.guidance_scale}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"unknown student noise {self.noise!r}; expected one of {', '.join(NOISE_MODES)}")

    @property
    def unet_evals_per_image(self) -> int:
        """One student call per step for a w-embedded student (any student: :func:`unet_evals_per_step`)."""
        return self.steps


def decode_latents(pipe, latents: torch.Tensor, indices: Sequence[int] | None = None) -> list[np.ndarray]:
    """VAE-decode [B, C, h, w] latents to uint8 images [H, W, 3] (as the pipelines' ``output_type="np"``);
    a ``NonFiniteError`` names the prompt ``indices`` (default 0 .. B-1) of any NaN/inf image."""
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    check_finite(x, "the VAE's decoded images", indices)
    return _to_uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Float images in [0, 1] [B, H, W, 3] -> B uint8 images, rounding to nearest."""
    return list((images * 255).round().clip(0, 255).astype(np.uint8))


def _in_batches(n: int, batch_size: int, draw: Callable[[list[int]], list[np.ndarray]],
                on_batch: Callable[[int], None] | None) -> list[np.ndarray]:
    """``draw`` the prompt indices ``0 .. n-1`` in chunks of ``batch_size``, reporting progress."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    images: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        images.extend(draw(list(range(start, min(start + batch_size, n)))))
        if on_batch is not None:
            on_batch(len(images))
    return images


def check_student_run(pipe, settings: StudentSettings, seed: int, batch_size: int,
                      original_steps: int | None = None) -> int | None:
    """What a student-only run checks before any model runs (the seed, the batch size, the student's guidance
    and steps): the size of the student's distillation grid where its kind brings its own sampler (for
    :func:`sample_student`; ``original_steps`` [its kind's ``max_steps``]), else None (the pipeline samples)."""
    _check_run(seed, batch_size)
    check_student_guidance(pipe, settings.guidance_scale)
    kind = student_kind(pipe)
    if kind.sample is None:
        sampler_steps(settings.steps, pipe.scheduler, "student steps", "the student")
        return None
    original = count(original_steps or kind.max_steps(pipe.scheduler), "original_steps")
    if settings.steps > original:
        raise ValueError(f"student steps must be at most {original} for this student (its distillation grid "
                         f"has {original} timesteps), got {settings.steps}")
    return original


def sample_student(pipe, prompts: Sequence[str], latents: torch.Tensor, generators: Sequence[torch.Generator],
                   settings: StudentSettings, original_steps: int) -> torch.Tensor:
    """The x0 latents [B, C, h, w] of a batch drawn by the sampler of the student's kind (a consistency student's:
    :func:`tandem.sampling.consistency_sample`, with ``settings.noise``) from its initial noise ``latents``
    [B, C, h, w], image i's fresh noise from ``generators[i]``; ``original_steps`` from :func:`check_student_run`."""
    kind = student_kind(pipe)
    embeds = pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]
    return kind.sample(pipe.unet, pipe.scheduler.alphas_cumprod.to(pipe.device), latents, embeds, list(generators),
                       steps=settings.steps, guidance_scale=settings.guidance_scale, noise=settings.noise,
                       original_steps=original_steps, reflect=student_reflection(student_info_of(pipe)))


@torch.no_grad()
def generate_student(
    pipe,
    prompts: list[str],
    settings: StudentSettings,
    seed: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    original_steps: int | None = None,
) -> list[np.ndarray]:
    """Generate one image per prompt with a student.

    Args:
        pipe: a student pipeline (``tandem.load_student``): a student whose kind brings its own sampler
            (:class:`tandem.sampling.StudentKind`: a consistency student's is
            :func:`tandem.sampling.consistency_sample`) samples with it and ``settings.noise``; any other with
            its own scheduler through the pipeline (``noise`` does not apply).
        original_steps: the student's distillation grid size [its kind's ``max_steps``].
    Returns:
        B uint8 images [H, W, 3]. Image i uses only the generator of ``(seed, i)``: first its initial
        noise, then the fresh noise of each stochastic step, as diffusers' LCM pipeline does.
    Raises:
        ValueError: before any model runs, for more steps than the distillation grid holds, a negative
            seed or a batch size below 1.
        NonFiniteError: where the student or the VAE produced NaN/inf (no image is returned).
    """
    original = check_student_run(pipe, settings, seed, batch_size, original_steps)
    if original is None:  # the student samples with its own scheduler, through its pipeline

        def draw_pipeline(chunk: list[int]) -> list[np.ndarray]:
            gens = [prompt_generator(seed, i) for i in chunk]
            latents = pipe([prompts[i] for i in chunk], num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance_scale, latents=initial_latents(pipe, seed, chunk, gens),
                           generator=gens, output_type="latent").images
            check_finite(latents, "the student's latents", chunk)
            return decode_latents(pipe, latents, chunk)

        return _in_batches(len(prompts), batch_size, draw_pipeline, on_batch)

    def draw(chunk: list[int]) -> list[np.ndarray]:
        gens = [prompt_generator(seed, i) for i in chunk]
        x0 = sample_student(pipe, [prompts[i] for i in chunk], initial_latents(pipe, seed, chunk, gens), gens,
                            settings, original)
        check_finite(x0, "the student's latents", chunk)
        return decode_latents(pipe, x0, chunk)

    return _in_batches(len(prompts), batch_size, draw, on_batch)
