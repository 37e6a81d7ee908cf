"""Teacher and student in one trajectory on a shared DDIM grid: the covariate-shift study of DDIL
(Garrepalli et al., appendix E, Tables 5-7), as an entry point of :class:`~tandem.pipeline.TandemPipeline`
(:meth:`~tandem.pipeline.TandemPipeline.mixed`).

The student's K-step grid ``t_0 > t_1 > ... > t_{K-1}`` (trailing spacing: 999, 749, 499, 249 for K = 4)
runs down to the clean end ``t_K = -1``, and lies on the teacher's finer trailing grid of N = m K steps
(m teacher steps per student step: the paper's 32-step teacher and 4-step student have m = 8). Transition
``t_k -> t_{k+1}`` is taken by one of the two:

* the **student**: one evaluation, its x0 at ``t_k``, one DDIM step (η = 0) to ``t_{k+1}``;
* the **teacher**: m DDIM steps of its classifier-free guided x0 along the fine grid between the same two
  timesteps.

Both are the paper's stateless DDIM solver, so a trajectory can change hands at any student timestep. Who
takes transition k: the teacher with probability ``teacher_prob`` (p_T), decided for each image by K
uniform draws from its own generator right after its initial noise (none when p_T is 0 or 1), so a
choice depends on the seed and the image, never on the batch; or the teacher exactly at the student
timesteps ``teacher_at``.

A consistency (LCM) student's x0 is its consistency function ``c_skip x_t + c_out x̂0``, as its own
sampler takes it, and its transition is DDIM from there (tandem's "deterministic" consistency sampler),
not the LCM step that re-noises x0 with fresh noise: the paper uses DDIM for both models on the shared
grid, and a deterministic step leaves every difference between two runs of one seed to who took which
transition. On the shared grid such a student samples at 749 and 249 where its own 50-point skipping grid
has 759 and 259.

A model whose scheduler thresholds its x0 (``thresholding``: a reflected student, DDIL section 3, or
diffusers' dynamic thresholding) thresholds it here too; DDIM from the thresholded x0 is then its
DPM-Solver++(1) step with thresholding, as a progressive student samples.

The sampler (:func:`mixed_sample`) is a free function of tensors and keeps gradients; the pipeline's
``mixed`` turns them off.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_finite, count, finite_number
from ..denoiser import CLEAN, NoiseSchedule, trailing_timesteps
from ..generate import initial_latents, prompt_generator, prompt_seed
from ..sampling import boundary_scalings, guidance_embedding, student_kind, unet_evals_per_step
from ..students import student_info_of
from .components import check_shared_latents
from .records import CostLedger, TandemOutput, final_images, image_record, run_summary
from .stages import decode

TEACHER_SUBSTEPS = 8  # teacher steps per student step by default (the paper's 32-step teacher, 4-step student)
ROLES = ("student", "teacher")


@dataclass(frozen=True)
class MixedGrid:
    """The shared grid: the student's timesteps and the teacher's finer grid that contains them."""

    student_timesteps: tuple[int, ...]  # t_0 > ... > t_{K-1}; the last transition ends at the clean end (-1)
    teacher_timesteps: tuple[int, ...]  # N = m K descending timesteps, t_k at position m k

    @property
    def substeps(self) -> int:
        """Teacher steps per student transition (m)."""
        return len(self.teacher_timesteps) // len(self.student_timesteps)

    def transition(self, k: int) -> tuple[int, int]:
        """``(t_k, t_{k+1})`` of transition k (``t_K = -1``: the clean end)."""
        ts = self.student_timesteps
        return ts[k], ts[k + 1] if k + 1 < len(ts) else CLEAN

    def teacher_path(self, k: int) -> list[int]:
        """The teacher's m + 1 timesteps of transition k, from ``t_k`` to ``t_{k+1}`` (both included)."""
        m = self.substeps
        return [*self.teacher_timesteps[m * k:m * (k + 1)], self.transition(k)[1]]


def mixed_grid(student_steps: int, teacher_steps: int, num_train_timesteps: int = 1000) -> MixedGrid:
    """The student's and the teacher's trailing DDIM grids, the first on the second.

    Raises:
        ValueError: where ``teacher_steps`` is not a multiple of ``student_steps`` (each student transition
            must be a whole number of teacher steps) or either exceeds the schedule.
    """
    student_steps = count(student_steps, "num_inference_steps (the student's steps)")
    teacher_steps = count(teacher_steps, "teacher_steps")
    if teacher_steps % student_steps:
        raise ValueError(f"teacher_steps {teacher_steps} is not a multiple of the student's {student_steps} steps: "
                         f"each student transition must be a whole number of teacher steps (e.g. "
                         f"{TEACHER_SUBSTEPS * student_steps})")
    if teacher_steps > num_train_timesteps:
        raise ValueError(f"teacher_steps must be at most {num_train_timesteps} (the schedule's timesteps), "
                         f"got {teacher_steps}")
    student, teacher = trailing_timesteps(student_steps, num_train_timesteps), trailing_timesteps(
        teacher_steps, num_train_timesteps)
    m = teacher_steps // student_steps
    if teacher[::m] != student:  # equal on paper (i m T / (m K) = i T / K); refuse a rounding that breaks it
        raise ValueError(f"the student's timesteps {student} are not on the teacher's {teacher_steps}-step grid")
    return MixedGrid(tuple(student), tuple(teacher))


def check_teacher_choice(grid: MixedGrid, teacher_prob: float | None = None,
                         teacher_at: Sequence[int] | None = None) -> tuple[float | None, tuple[int, ...] | None]:
    """``(teacher_prob, teacher_at)`` checked: exactly one given, p_T in [0, 1], timesteps on the student's grid."""
    if (teacher_prob is None) == (teacher_at is None):
        raise ValueError("mixed sampling needs exactly one of teacher_prob or teacher_at; "
                         f"got {'both' if teacher_prob is not None else 'neither'}")
    if teacher_prob is not None:
        return finite_number(teacher_prob, "teacher_prob", low=0, high=1), None
    at = tuple(count(t, "teacher_at timesteps", minimum=0) for t in teacher_at)
    if not at:
        raise ValueError("teacher_at names no timestep; give some of the student's timesteps "
                         f"{list(grid.student_timesteps)}")
    off = sorted(set(at) - set(grid.student_timesteps))
    if off:
        raise ValueError(f"teacher_at: {', '.join(map(str, off))} not on the student's grid "
                         f"{list(grid.student_timesteps)} (the teacher takes whole student transitions)")
    return None, at


def teacher_choices(generators: Sequence[torch.Generator], grid: MixedGrid, teacher_prob: float | None = None,
                    teacher_at: Sequence[int] | None = None) -> list[tuple[bool, ...]]:
    """For each image, whether the teacher takes each transition of ``grid`` (True) or the student.

    Args:
        generators: one per image; with ``0 < teacher_prob < 1`` each gives K uniform draws (the teacher
            takes transition k where draw k < p_T), so a choice depends only on its image's generator.
        teacher_prob: p_T in [0, 1]; or
        teacher_at: the student timesteps at which the teacher takes the transition (exactly one of the two).
    """
    p, at = check_teacher_choice(grid, teacher_prob, teacher_at)
    k = len(grid.student_timesteps)
    if at is not None:
        return [tuple(t in at for t in grid.student_timesteps)] * len(generators)
    if p in (0.0, 1.0):  # no draw: the generators are left as they are
        return [(p == 1.0,) * k] * len(generators)
    return [tuple(bool(u < p) for u in torch.rand(k, generator=g, dtype=torch.float64, device=g.device).tolist())
            for g in generators]


class X0Denoiser:
    """A diffusers UNet as an x0-denoiser of the one denoiser contract: ``(x_t [B, C, h, w], t, rows) -> x0``,
    ``rows`` the positions of the B latents among the prompts of ``cond`` (their conditioning).

    Args:
        unet: an ``UNet2DConditionModel`` predicting ``prediction_type``.
        cond: the prompts' text embeddings [R, L, D]; ``uncond`` the empty prompt's, for classifier-free guidance.
        guidance: "classifier-free" (ε_u + w (ε_c - ε_u) in one doubled batch, [uncond, cond] as diffusers
            orders it, where w > 1; the conditional prediction alone otherwise), "w-embedding" (one call with
            the w-embedding of w - 1, as LCM and progressive students take it) or "none" (one conditional call).
        consistency_scaling: ``timestep_scaling`` of a consistency function ``c_skip x_t + c_out x̂0``
            (:func:`tandem.sampling.boundary_scalings`), or None for the plain x0 of the prediction.
        reflect: a thresholding of the x0 estimate (x̂0, before a consistency function), as a reflected
            model's own scheduler applies it (:func:`scheduler_reflection`); None: none.
    """

    def __init__(self, unet, schedule: NoiseSchedule, prediction_type: str, cond: torch.Tensor, *, guidance: str,
                 guidance_scale: float, uncond: torch.Tensor | None = None, consistency_scaling: float | None = None,
                 reflect: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if guidance not in ("classifier-free", "w-embedding", "none"):
            raise ValueError(f"unknown guidance {guidance!r}; expected classifier-free, w-embedding or none")
        self.guided = guidance == "classifier-free" and guidance_scale > 1
        if self.guided and uncond is None:
            raise ValueError("classifier-free guidance needs the empty prompt's embeddings (uncond)")
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type
        self.cond, self.uncond, self.guidance, self.scale = cond, uncond, guidance, guidance_scale
        self.consistency_scaling, self.reflect = consistency_scaling, reflect

    def __call__(self, x: torch.Tensor, t: int, rows: list[int]) -> torch.Tensor:
        cond = self.cond[rows]
        if self.guided:
            both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self.uncond[rows], cond])).sample
            pred_u, pred_c = both.chunk(2)
            pred = pred_u + self.scale * (pred_c - pred_u)
        elif self.guidance == "w-embedding":
            w_emb = guidance_embedding(torch.full((len(rows),), self.scale - 1.0), self.unet.config.time_cond_proj_dim)
            pred = self.unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb.to(x.device, x.dtype)).sample
        else:
            pred = self.unet(x, t, encoder_hidden_states=cond).sample
        x0 = self.schedule.to_x0(pred, x, t, self.prediction_type)
        if self.reflect is not None:
            x0 = self.reflect(x0)
        if self.consistency_scaling is None:
            return x0
        c_skip, c_out = boundary_scalings(t, timestep_scaling=self.consistency_scaling)
        return c_out.to(x.dtype) * x0 + c_skip.to(x.dtype) * x


Denoiser = Callable[[torch.Tensor, int, list[int]], torch.Tensor]


def mixed_sample(latents: torch.Tensor, grid: MixedGrid, choices: Sequence[Sequence[bool]], student: Denoiser,
                 teacher: Denoiser, schedule: NoiseSchedule) -> torch.Tensor:
    """A mixed rollout (DDIL, appendix E; the roll-out of its Algorithm 2): transition k of image i is taken by the
    teacher where ``choices[i][k]``, else by the student, both by DDIM on the shared ``grid``.

    Args:
        latents: initial noise at ``t_0`` [B, C, h, w] (unit variance).
        choices: B rows of K booleans (:func:`teacher_choices`).
        student, teacher: x0-denoisers ``(x_t, t, rows) -> x0`` (:class:`X0Denoiser`); each is called on the
            rows it takes at a transition, in one batch.
    Returns:
        the clean latents [B, C, h, w] (the last transition's x0).
    """
    if len(choices) != len(latents) or any(len(c) != len(grid.student_timesteps) for c in choices):
        raise ValueError(f"choices must be {len(latents)} rows of {len(grid.student_timesteps)} (one per image and "
                         "transition)")
    x = latents
    for k in range(len(grid.student_timesteps)):
        t, t_next = grid.transition(k)
        by_teacher = [i for i, c in enumerate(choices) if c[k]]
        by_student = [i for i, c in enumerate(choices) if not c[k]]
        x_next = x.clone()
        if by_student:
            x_s = x[by_student]
            x_next[by_student] = schedule.ddim_step(x_s, student(x_s, t, by_student), t, t_next)
        if by_teacher:
            x_t = x[by_teacher]
            path = grid.teacher_path(k)
            for a, b in itertools.pairwise(path):
                x_t = schedule.ddim_step(x_t, teacher(x_t, a, by_teacher), a, b)
            x_next[by_teacher] = x_t
        x = x_next
    return x


class _Charged:
    """A denoiser whose UNet rows the ledger charges to the images it denoised, timing its calls."""

    def __init__(self, denoiser: X0Denoiser, ledger, role: str, idx: list[int], timings: dict):
        self.denoiser, self.ledger, self.role, self.idx, self.timings = denoiser, ledger, role, idx, timings

    def __call__(self, x: torch.Tensor, t: int, rows: list[int]) -> torch.Tensor:
        before, t0 = self.ledger.rows(self.role), time.perf_counter()
        x0 = self.denoiser(x, t, rows)
        self.ledger.charge(self.role, [self.idx[r] for r in rows], before)
        self.timings[self.role] += time.perf_counter() - t0
        return x0


def mixing_obstacle(pipe) -> str | None:
    """Why the student and teacher of ``pipe`` (a TandemPipeline) cannot share a trajectory, or None: an
    image-to-image teacher, a ControlNet, an SDXL pipeline, other latents or another noise schedule."""
    if pipe.teacher is None:
        return "mixed sampling needs a text-to-image teacher; this one is an image-to-image pipeline"
    if getattr(pipe.student, "controlnet", None) is not None:
        return "mixed sampling with a ControlNet is not supported; use the pipeline without it"
    for who, part in (("student", pipe.student), ("teacher", pipe.teacher)):
        if getattr(part, "text_encoder_2", None) is not None:
            return (f"mixed sampling runs Stable Diffusion-style UNets with one text encoder; the {who} is an "
                    "SDXL pipeline")
    try:
        check_shared_latents(pipe.student, pipe.teacher, "mixed sampling hands each trajectory between student "
                              "and teacher", "use mode='student' or mode='teacher'")
    except ValueError as e:
        return str(e)
    if not torch.equal(pipe.student.scheduler.alphas_cumprod.double(), pipe.teacher.scheduler.alphas_cumprod.double()):
        return ("the student's and the teacher's noise schedules (alphas_cumprod) differ: a trajectory cannot change "
                "hands between them")
    return None


def scheduler_reflection(scheduler) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The thresholding a diffusers scheduler applies to its x0 predictions (``config.thresholding``: diffusers'
    dynamic thresholding, or a reflected student's :class:`tandem.reflect.Reflection` installed in that hook),
    or None. With x0 thresholded, DDIM from x0 is DPM-Solver++(1) with thresholding (a progressive student's
    sampler) and the consistency sampler's deterministic step."""
    return scheduler._threshold_sample if scheduler.config.get("thresholding") else None


def student_denoiser(pipe, prompts: list[str], schedule: NoiseSchedule, guidance_scale: float) -> X0Denoiser:
    """The student of ``pipe`` (a TandemPipeline) as an x0-denoiser for ``prompts``: guidance and prediction type
    from its ``student.json`` (else from its UNet: a w-embedding where it has ``time_cond_proj_dim``), its
    consistency function where its kind has one (:class:`tandem.sampling.StudentKind`), and its scheduler's thresholding."""
    student = pipe.student
    info = student_info_of(student)
    embedded = student.unet.config.get("time_cond_proj_dim") is not None
    guidance = info.guidance if info is not None else ("w-embedding" if embedded else "classifier-free")
    prediction = student.scheduler.config.get("prediction_type", "epsilon")
    guided = guidance == "classifier-free" and guidance_scale > 1
    cond, uncond = student.encode_prompt(prompts, student.device, 1, guided)[:2]
    kind = student_kind(student)
    scaling = kind.consistency_scaling(student.scheduler) if kind.consistency_scaling is not None else None
    return X0Denoiser(student.unet, schedule, prediction, cond, guidance=guidance, guidance_scale=guidance_scale,
                      uncond=uncond, consistency_scaling=scaling, reflect=scheduler_reflection(student.scheduler))


def teacher_denoiser(pipe, prompts: list[str], schedule: NoiseSchedule, guidance_scale: float) -> X0Denoiser:
    """The teacher of ``pipe`` (a TandemPipeline) as a classifier-free guided x0-denoiser for ``prompts`` (with
    the thresholding of its scheduler config, if any)."""
    teacher = pipe.teacher
    guided = guidance_scale > 1
    cond, uncond = teacher.encode_prompt(prompts, teacher.device, 1, guided)[:2]
    prediction = pipe._teacher_scheduler_config.get("prediction_type", "epsilon")
    return X0Denoiser(teacher.unet, schedule, prediction, cond, guidance="classifier-free",
                      guidance_scale=guidance_scale, uncond=uncond, reflect=scheduler_reflection(teacher.scheduler))


def generate_mixed(pipe, prompts: list[str], *, teacher_prob: float | None,
                   teacher_at: Sequence[int] | None, num_inference_steps: int | None, guidance_scale: float | None,
                   teacher_steps: int | None, teacher_guidance_scale: float | None, seed: int,
                   generator: Sequence[torch.Generator] | None, batch_size: int, output_type: str,
                   callback: Callable[[str, int, int], None] | None) -> TandemOutput:
    """:meth:`TandemPipeline.mixed <tandem.pipeline.TandemPipeline.mixed>` of ``pipe`` (call it there: it turns gradients
    off): each image drawn by :func:`mixed_sample` from the student's initial noise (that of
    ``mode="student"``), with the choices of :func:`teacher_choices`; the student's steps and guidance
    are the pipeline's, the teacher's ``teacher_steps`` [8 per student step] at its guidance. The image
    is decoded by the student's VAE. Each record says who took each transition (``transitions``) and
    its UNet evaluations, a classifier-free guided step counting two."""
    obstacle = mixing_obstacle(pipe)
    if obstacle is not None:
        raise ValueError(obstacle)
    schedule = NoiseSchedule(pipe.teacher.scheduler.alphas_cumprod)
    seed, batch_size, n = count(seed, "seed", minimum=0), count(batch_size, "batch_size"), len(prompts)
    if generator is not None and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} prompts (one per prompt)")
    steps = count(pipe._setting("num_inference_steps", num_inference_steps, 4), "num_inference_steps")
    guidance = pipe.student_guidance(guidance_scale)
    t_steps = count(teacher_steps if teacher_steps is not None else TEACHER_SUBSTEPS * steps, "teacher_steps")
    t_guidance = pipe.teacher_guidance(teacher_guidance_scale)
    grid = mixed_grid(steps, t_steps, schedule.num_train_timesteps)
    check_teacher_choice(grid, teacher_prob, teacher_at)  # before any draw
    gens = list(generator) if generator is not None else [prompt_generator(seed, i) for i in range(n)]
    noise = initial_latents(pipe.student, seed, list(range(n)), gens)
    choices = teacher_choices(gens, grid, teacher_prob, teacher_at)  # after the noise, from the same generators

    ledger = CostLedger(n, pipe._counted_modules())
    timings = dict.fromkeys(("student", "decode", "oracle", "teacher"), 0.0)
    latents: list[torch.Tensor | None] = [None] * n
    images: list[np.ndarray | None] = [None] * n
    t_start = time.perf_counter()
    with ledger.counting():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            ps = [prompts[i] for i in idx]
            student = _Charged(student_denoiser(pipe, ps, schedule, guidance), ledger, "student", idx, timings)
            teacher = _Charged(teacher_denoiser(pipe, ps, schedule, t_guidance), ledger, "teacher", idx, timings)
            out = mixed_sample(noise[idx], grid, [choices[i] for i in idx], student, teacher, schedule)
            check_finite(out, "the mixed trajectory's latents", idx)
            t0 = time.perf_counter()
            decoded = decode(pipe.student, out, idx)
            ledger.add("vae_decode", idx)
            timings["decode"] += time.perf_counter() - t0
            for j, i in enumerate(idx):
                latents[i], images[i] = out[j:j + 1], decoded[j]
            if callback:
                callback("mixed", idx[-1] + 1, n)
    total = time.perf_counter() - t_start

    records = []
    for i in range(n):
        record = image_record(i, prompts[i], "mixed", prompt_seed(seed, i) if generator is None else None, ledger)
        record["transitions"] = [ROLES[c] for c in choices[i]]
        records.append(record)
    taken = np.array(choices, dtype=bool)
    settings = {
        "mode": "mixed", "num_inference_steps": steps, "guidance_scale": guidance, "teacher_steps": t_steps,
        "teacher_guidance_scale": t_guidance, "teacher_prob": None if teacher_prob is None else float(teacher_prob),
        "teacher_at": None if teacher_at is None else [int(t) for t in teacher_at], "sampler": "ddim",
        "student_timesteps": list(grid.student_timesteps), "teacher_timesteps": list(grid.teacher_timesteps),
    }
    student_cost = steps * unet_evals_per_step(pipe.student, guidance)  # every transition by the student
    teacher_cost = t_steps * unet_evals_per_step(pipe.teacher, t_guidance)  # every transition by the teacher
    summary = run_summary(records, settings, timings, total, student_cost, teacher_cost, None,
                          own_components=pipe.student_own_components)
    summary["teacher_share"] = float(taken.mean())  # of all transitions
    summary["teacher_share_by_timestep"] = {str(t): float(share) for t, share in
                                            zip(grid.student_timesteps, taken.mean(axis=0))}
    return TandemOutput(final_images(images, latents, output_type), records, summary, None)
