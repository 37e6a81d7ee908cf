"""Multistep consistency sampling (Song et al. 2023; Luo et al. 2023, latent consistency models).

The student is a consistency function ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)``
with ``x0_hat`` from its ε-prediction. A sampler evaluates it at a few timesteps taken from the
distillation grid; between evaluations it noises the estimate back to the next timestep, with
fresh noise (``stochastic``, the LCM sampler of the papers and of diffusers' ``LCMScheduler``)
or with the noise implied by the last evaluation (``deterministic``, a DDIM-like variant).

Formulas and the timestep choice follow diffusers' ``LCMScheduler`` so that a student saved by
tandem works in ``LatentConsistencyModelPipeline`` unchanged (tested for parity). The stochastic
sampler *is* ``LCMScheduler.step``, float for float: its x₀ and re-noising take ᾱ in the schedule's
own dtype (``1 - ᾱ`` and the square roots in float32 for a float32 schedule), not the float64
coefficients of :mod:`tandem.denoiser`, which move x_t by an ulp (~1e-6) and, through the VAE, a
pixel by a grey level. So ``tandem generate --mode student`` and ``TandemPipeline(mode="student")``
(which runs diffusers' pipeline) draw the same bytes. The deterministic sampler is tandem's own
and keeps the float64 denoiser contract (the mixed sampler's consistency transitions are it, bit
for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .denoiser import NoiseSchedule

NOISE_MODES = ("stochastic", "deterministic")


def boundary_scalings(t: torch.Tensor | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """``(c_skip, c_out)`` of the consistency parameterisation; ``c_skip(0) = 1, c_out(0) = 0``."""
    scaled = torch.as_tensor(t) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the guidance strength ``w`` [B] -> [B, dim] (the w-embedding of LCM;
    the student receives ``guidance_scale - 1``)."""
    w = w.to(torch.float32) * 1000.0
    half = dim // 2
    # float32 throughout, as the w-embedding is computed at inference by diffusers' LCM pipeline
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def distillation_grid(num_train_timesteps: int = 1000, original_steps: int = 50) -> np.ndarray:
    """The skipping grid of consistency distillation: ``k, 2k, ..., N k`` minus one, ``k = T / N``."""
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    k = num_train_timesteps // original_steps
    return np.arange(1, original_steps + 1) * k - 1


def consistency_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` timesteps, descending, evenly spaced in index over the distillation grid."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"student steps must be in [1, {original_steps}], got {steps}")
    grid = distillation_grid(num_train_timesteps, original_steps)[::-1]
    idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def consistency_sample(
    unet,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generators: list[torch.Generator],
    steps: int = 4,
    guidance_scale: float = 4.0,
    noise: str = "stochastic",
    original_steps: int = 50,
    timesteps: list[int] | None = None,
    reflect=None,
) -> torch.Tensor:
    """Sample with a consistency student.

    Args:
        unet: an ε-predicting ``UNet2DConditionModel`` with ``time_cond_proj_dim`` (the w-embedding).
        alphas_cumprod: ᾱ_t of the noise schedule [T].
        latents: initial noise [B, C, h, w], already at the first timestep's scale (unit variance).
        text_embeddings: [B, L, D].
        generators: one per image; image i's fresh noise comes from ``generators[i]`` only.
        timesteps: explicit descending timesteps (for refinement/editing that starts mid-way);
            default: ``consistency_timesteps(steps, original_steps)``.
        reflect: a thresholding of each x₀ estimate (a reflected student's
            :class:`~tandem.reflect.Reflection`, as ``LCMScheduler`` applies it with ``thresholding``); None: none.
    Returns:
        the final estimate of x0 [B, C, h, w].

    Gradients flow through it (a distillation step may backpropagate through the student's own
    sampling); callers that only sample turn them off, as a pipeline's ``__call__`` does.
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise mode {noise!r}; expected one of {', '.join(NOISE_MODES)}")
    if len(generators) != latents.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {latents.shape[0]} latents")
    ts = timesteps if timesteps is not None else consistency_timesteps(steps, original_steps, len(alphas_cumprod))
    dim = unet.config.time_cond_proj_dim
    if dim is None:
        raise ValueError("this UNet has no w-embedding (time_cond_proj_dim is None): not a consistency student")
    b = latents.shape[0]
    w_emb = guidance_embedding(torch.full((b,), guidance_scale - 1.0), dim).to(latents.device, latents.dtype)
    schedule = NoiseSchedule(alphas_cumprod)
    lcm = noise == "stochastic"  # LCMScheduler.step's own arithmetic (module docstring)
    x = latents
    denoised = x
    for i, t in enumerate(ts):
        eps = unet(x, t, encoder_hidden_states=text_embeddings, timestep_cond=w_emb).sample
        if lcm:
            a_t = _lcm_alpha_bar(alphas_cumprod, schedule, t)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        else:
            x0 = schedule.to_x0(eps, x, t)
        if reflect is not None:
            x0 = reflect(x0)
        c_skip, c_out = boundary_scalings(t)
        denoised = c_out.to(x.dtype) * x0 + c_skip.to(x.dtype) * x
        if i == len(ts) - 1:
            break
        if lcm:
            z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype).to(x.device)
                           for g in generators])
            a_next = _lcm_alpha_bar(alphas_cumprod, schedule, ts[i + 1])
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * z
        else:  # the noise that would put ``denoised`` at x_t
            z = schedule.to_eps(denoised, x, t, "sample")
            x = schedule.add_noise(denoised, z, ts[i + 1])
    return denoised


def _lcm_alpha_bar(alphas_cumprod: torch.Tensor, schedule: NoiseSchedule, t: int) -> torch.Tensor:
    """ᾱ_t as ``LCMScheduler.step`` takes it: a 0-d tensor in ``alphas_cumprod``'s own dtype (the
    arithmetic on it stays in that dtype); the timestep checked as :mod:`tandem.denoiser` checks it."""
    if bool(schedule.alpha_bar(t) == 0):  # alpha_bar refuses a timestep outside the schedule
        raise ValueError("an ε-prediction at zero SNR (ᾱ = 0) implies no x0; use a v- or x0-prediction")
    return alphas_cumprod[t]


def unet_evals_per_step(pipe, guidance_scale: float) -> int:
    """UNet rows per image and step of ``pipe`` (a pipeline, or its UNet): 2 with classifier-free guidance
    (a doubled batch), 1 for a guidance-embedded (LCM) UNet or guidance <= 1."""
    unet = getattr(pipe, "unet", pipe)
    embedded = getattr(unet.config, "time_cond_proj_dim", None) is not None
    return 1 if embedded or guidance_scale <= 1 else 2


# -- student kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudentKind:
    """How the students of one sampler are built and sampled. A student's kind follows from its scheduler
    (``student.json``'s ``scheduler``, or a pipeline's own): :data:`STUDENT_KINDS` by scheduler class name, and
    :data:`SCHEDULED` for any other scheduler, which samples through the pipeline itself.

    Attributes:
        scheduler: the diffusers scheduler class name (None: any other).
        pipeline: the diffusers text-to-image pipeline class a loaded student of this kind is.
        sample: tandem's own sampler for the student alone, with ``consistency_sample``'s signature (None:
            the pipeline samples).
        max_steps: the most steps its distillation grid takes, from its scheduler (None: the scheduler's limit).
        consistency_scaling: the timestep scaling of its consistency function ``c_skip x_t + c_out x0``, from
            its scheduler, for a sampler that takes x0 from the student (None: x0 is the prediction itself).
    """

    scheduler: str | None
    pipeline: str = "StableDiffusionPipeline"
    sample: Callable | None = None
    max_steps: Callable | None = None
    consistency_scaling: Callable | None = None


SCHEDULED = StudentKind(None)
CONSISTENCY = StudentKind(
    "LCMScheduler", "LatentConsistencyModelPipeline", sample=consistency_sample,
    max_steps=lambda scheduler: scheduler.config.original_inference_steps,
    consistency_scaling=lambda scheduler: scheduler.config.get("timestep_scaling", 10.0))
STUDENT_KINDS = {kind.scheduler: kind for kind in (CONSISTENCY,)}


def kind_of_scheduler(name: str) -> StudentKind:
    """The kind of a student sampled by the diffusers scheduler class ``name``."""
    return STUDENT_KINDS.get(name, SCHEDULED)


def student_kind(pipe) -> StudentKind:
    """The kind of the student ``pipe`` (a pipeline), from its scheduler."""
    return kind_of_scheduler(type(pipe.scheduler).__name__)
