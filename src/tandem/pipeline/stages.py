"""The stages of Algorithm 1, each a function over a batch of images: the student draws
(:func:`student_draw`), the VAE decodes (:func:`decode`), the oracle scores (:func:`score_images`), a
:class:`~tandem.pipeline.routing.Cutoff` routes, and the teacher improves the routed images
(:func:`teacher_regenerate` from their initial noise, :func:`teacher_refine` from the student's latents).
:func:`run_stages` runs them over a whole request in batches; :class:`~tandem.pipeline.TandemPipeline` and a
server that batches across requests both call them.

Every image owns a generator seeded from ``(seed, index)``: it draws the image's initial noise, the student's
per-step noise and the refinement noise, in that order, so an image's noise does not depend on its batch or on
which other images the oracle rejected. Its pixels depend on the batch only through the float rounding of batched
kernels, which follows the batch's *shape*, not the other images in it: at another batch size a pixel may differ by
one grey level (measured on CPU, teacher, student and refinement, 24 prompts at batch 1, 7 and 16, 1 and 2 threads:
at most 1/255, latents within 4e-4); a score that close to tau could take the other path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_finite
from ..denoiser import NoiseSchedule
from ..generate import _to_uint8
from .components import accepts
from .drafts import best_drafts
from .records import CostLedger
from .schedules import RefineSchedule

Draw = Callable[[list[int]], torch.Tensor]  # image indices -> their latents
Route = Callable[[np.ndarray], list[int]]  # scores of the images drawn last -> positions among them to improve
Improve = Callable[[list[int], list], torch.Tensor]  # image indices, every image's latents -> the teacher's latents


@dataclass
class Phases:
    """What :func:`run_stages` leaves: each image's final latents and image, the student's images (None where
    the student did not draw), the oracle's scores (NaN where it did not score), the images the teacher
    improved, and the seconds spent (by phase, and in all)."""

    latents: list
    images: list
    student_images: list
    scores: np.ndarray
    improved: list[int]
    timings: dict
    seconds: float
    levels: list[list[int]] = field(default_factory=list)  # the images each student level drew (a cascade's)
    kept: list[int] | None = None  # with drafts: the slot kept for each prompt (:mod:`.drafts`)


def control_kwargs(pipe, controls: torch.Tensor | None, idx: list[int], scale: float) -> dict:
    """The ControlNet arguments of a call of ``pipe`` for images ``idx`` (none without control images)."""
    if controls is None:
        return {}
    key = "control_image" if accepts(pipe, "control_image") else "image"  # img2img vs text2img ControlNet
    return {key: controls[idx], "controlnet_conditioning_scale": scale}


def student_draw(student, prompts: Sequence[str], latents: torch.Tensor, generators: Sequence[torch.Generator],
                 guidance_scale: float, num_inference_steps: int | None = None,
                 timesteps: Sequence[int] | None = None, **extra) -> torch.Tensor:
    """The student's latents of a batch: from ``latents`` (initial noise, or an edit's noised inputs on the
    student's ``timesteps``), each image drawing its per-step noise from its own generator."""
    steps = {"timesteps": timesteps} if timesteps is not None else {"num_inference_steps": num_inference_steps}
    return student(list(prompts), **steps, guidance_scale=guidance_scale, latents=latents,
                   generator=list(generators), output_type="latent", **extra).images


def teacher_regenerate(teacher, scheduler, prompts: Sequence[str], latents: torch.Tensor,
                       generators: Sequence[torch.Generator], guidance_scale: float,
                       num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                       **extra) -> torch.Tensor:
    """The teacher's latents of a batch drawn afresh from ``latents`` (the images' initial noise, or an edit's
    noised inputs on the teacher's ``timesteps``) with ``scheduler`` (a fresh one per call)."""
    teacher.scheduler = scheduler
    steps = {"timesteps": timesteps} if timesteps is not None else {"num_inference_steps": num_inference_steps}
    return teacher(list(prompts), **steps, guidance_scale=guidance_scale, latents=latents,
                   generator=list(generators), output_type="latent", **extra).images


def teacher_refine(teacher_img2img, scheduler, prompts: Sequence[str], start: torch.Tensor,
                   generators: Sequence[torch.Generator], refine: RefineSchedule, guidance_scale: float,
                   **extra) -> torch.Tensor:
    """The teacher's refinement of a batch: ``start`` (the student's latents, or its pixels for a pixel
    hand-off) noised to the rollback of ``refine`` and denoised from there."""
    teacher_img2img.scheduler = scheduler
    return teacher_img2img(list(prompts), image=start, strength=refine.strength,
                           num_inference_steps=refine.num_inference_steps, guidance_scale=guidance_scale,
                           generator=list(generators), output_type="latent", **extra).images


def pixels(pipe, latents: torch.Tensor, idx: list[int] | None = None) -> torch.Tensor:
    """``pipe``'s VAE decode of ``latents`` as float [B, 3, H, W] in [0, 1], refusing NaN/inf."""
    x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    check_finite(x, "the VAE's decoded images", idx)
    return (x / 2 + 0.5).clamp(0, 1)


def decode(pipe, latents: torch.Tensor, idx: list[int] | None = None) -> list[np.ndarray]:
    """uint8 images [H, W, 3] of latents (prompt indices ``idx``), refusing NaN/inf."""
    return _to_uint8(pixels(pipe, latents, idx).permute(0, 2, 3, 1).float().cpu().numpy())


def score_images(scorer, images: list[np.ndarray], prompts: list[str], idx: list[int] | None = None) -> np.ndarray:
    """The oracle's scores of uint8 images (prompt indices ``idx``, default 0 .. B-1), refusing NaN/inf
    (a NaN score is never below tau: the image would pass unseen)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    s = torch.as_tensor(scorer(x, prompts), dtype=torch.float32).cpu()
    if s.shape != (len(images),):
        raise ValueError(f"the scorer returned shape {list(s.shape)} for {len(images)} images; expected "
                         f"[{len(images)}] (one score per image)")
    check_finite(s, "the oracle's scores", idx)
    return s.numpy()


def run_stages(student, teacher, scorer, prompts: list[str], batch_size: int, ledger: CostLedger,
               draw: Draw | None, route: Route, improve: Improve, do_score: bool,
               callback: Callable[[str, int, int], None] | None, cascade: Sequence[tuple[Draw, Route]] = (),
               drafts: int = 1, skip: Sequence[int] = (), regenerate: Draw | None = None) -> Phases:
    """Algorithm 1, shared by generation and editing, in batches of ``batch_size``:

    1. the student phase: ``draw(idx)`` gives the student's latents of images ``idx`` (``draw`` None: the
       teacher alone), decoded by ``student``'s VAE, and scored by ``scorer`` where ``do_score``; with a
       ``cascade`` of (draw, gate) levels, the first level's draw runs for every image and its gate passes the
       images the *next* level draws again (their scores replaced by the new ones), ``draw`` being the last level;
    2. routing: ``route(scores)``, given the scores of the images the last level drew (all of them without a
       cascade), picks the positions among them of the images the teacher improves: an image an earlier level
       kept is final. With ``drafts`` N > 1 the images are draft slots (N per prompt, prompt-major) and only
       each prompt's best-scoring draft is routed (:func:`~.drafts.best_drafts`; ``Phases.kept``);
    3. the teacher phase: ``improve(idx, latents)`` gives the teacher's latents of those images (from each
       image's noise or student latent), decoded by ``teacher``'s VAE in place of the student's; the prompts
       in ``skip`` (pre-routed: the student draws none of their drafts) are drawn by ``regenerate(idx)`` from
       their first draft's noise instead (in ``Phases.improved`` with the others).

    Every model call's UNet rows go to ``ledger`` (by role, per image), with the VAE decodes and the oracle
    calls; ``callback(phase, done, total)`` follows each batch."""
    n = len(prompts)
    latents: list[torch.Tensor | None] = [None] * n
    images: list[np.ndarray | None] = [None] * n
    student_images: list[np.ndarray | None] = [None] * n
    scores = np.full(n, np.nan)
    timings = dict.fromkeys(("student", "decode", "oracle", "teacher"), 0.0)
    levels: list[list[int]] = []
    t_start = time.perf_counter()

    def student_level(level_draw: Draw, members: list[int]) -> None:
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            t0 = time.perf_counter()
            before = {role: ledger.rows(role) for role in ("student", "controlnet")}
            out = level_draw(idx)
            for role, rows in before.items():
                ledger.charge(role, idx, rows)
            check_finite(out, "the student's latents", idx)
            t1 = time.perf_counter()
            decoded = decode(student, out, idx)
            ledger.add("vae_decode", idx)
            t2 = time.perf_counter()
            for j, i in enumerate(idx):
                latents[i], images[i], student_images[i] = out[j:j + 1], decoded[j], decoded[j]
            if do_score:
                scores[idx] = score_images(scorer, [images[i] for i in idx], [prompts[i] for i in idx], idx)
                ledger.add("oracle", idx)
            timings["student"] += t1 - t0
            timings["decode"] += t2 - t1
            timings["oracle"] += time.perf_counter() - t2
            if callback:
                callback("student", min(start + batch_size, len(members)), len(members))

    skipped = {int(i) for i in skip}
    with ledger.counting():
        # the images the current level draws; after the loop, those the last one drew
        members = [j for j in range(n) if j // drafts not in skipped]
        if draw is not None:
            for level_draw, gate in [*cascade, (draw, None)]:
                student_level(level_draw, members)
                levels.append(members)
                if gate is not None:  # gate(the level's scores) -> positions, in members, of those drawn again
                    members = sorted(members[j] for j in gate(scores[members]))
        kept = None
        if drafts > 1 and draw is not None:  # each prompt's best draft goes on; the others are done
            kept = best_drafts(scores, drafts)  # a skipped prompt's is its first draft (all its scores NaN)
            members = [j for j in kept if j // drafts not in skipped]
        # an image a cascade level kept is final: only the last level's images are routed (positions in members)
        routed = [members[j] for j in route(scores[members])]
        prerouted = [i * drafts for i in sorted(skipped)]
        batches = [(routed[s:s + batch_size], improve) for s in range(0, len(routed), batch_size)]
        batches += [(prerouted[s:s + batch_size], lambda idx, _latents: regenerate(idx))
                    for s in range(0, len(prerouted), batch_size)]
        improved, done = sorted(routed + prerouted), 0
        for idx, teacher_call in batches:
            t0 = time.perf_counter()
            before = {role: ledger.rows(role) for role in ("teacher", "student", "controlnet")}
            out = teacher_call(idx, latents)
            ledger.charge("teacher", idx, before["teacher"])
            ledger.charge("controlnet", idx, before["controlnet"])
            if ledger.rows("student") != before["student"] and student.unet is not teacher.unet:
                raise RuntimeError("the teacher call ran the student UNet")
            check_finite(out, "the teacher's latents", idx)
            t1 = time.perf_counter()
            decoded = decode(teacher, out, idx)
            ledger.add("vae_decode", idx)
            for j, i in enumerate(idx):
                latents[i], images[i] = out[j:j + 1], decoded[j]
            timings["teacher"] += t1 - t0
            timings["decode"] += time.perf_counter() - t1
            done += len(idx)
            if callback:
                callback("teacher", done, len(improved))
    return Phases(latents, images, student_images, scores, improved, timings, time.perf_counter() - t_start, levels,
                  kept)


def noised_inputs(student, teacher_scheduler, inputs: torch.Tensor, generators: list, t: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An edit's x_t of each input for the student and for the teacher: the input's VAE mean (``student``'s VAE)
    noised to timestep ``t`` with each image's own eps, on each model's schedule (they differ for a student
    trained to zero terminal SNR, such as ADD's; else both get the same tensor)."""
    vae = student.vae
    schedule = NoiseSchedule(student.scheduler.alphas_cumprod)
    same = torch.equal(student.scheduler.alphas_cumprod, teacher_scheduler.alphas_cumprod)
    teacher_schedule = schedule if same else NoiseSchedule(teacher_scheduler.alphas_cumprod)
    noised, teacher_noised = [], []
    for start in range(0, len(inputs), batch_size):
        idx = list(range(start, min(start + batch_size, len(inputs))))
        z = vae.encode((inputs[idx] * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        check_finite(z, "the VAE's encoded inputs", idx)
        z = z * vae.config.scaling_factor
        eps = torch.cat([torch.randn(z[:1].shape, generator=generators[i], device=generators[i].device,
                                     dtype=z.dtype) for i in idx]).to(z.device)
        noised.append(schedule.add_noise(z, eps, t))
        teacher_noised.append(noised[-1] if same else teacher_schedule.add_noise(z, eps, t))
    return torch.cat(noised), torch.cat(teacher_noised)


def generation_stages(pipe, plan, prompts: list[str], noise: torch.Tensor, gens: list, controls, c_scale: float,
                      ledger: CostLedger) -> tuple[list[tuple[Draw, Route | None]], Route, Improve]:
    """The stages of a generation call to ``pipe`` (a TandemPipeline) with ``plan`` (its resolved settings) over
    image indices: the student levels as (draw, gate) pairs, the last of them ``pipe``'s student (its gate
    unused), the route, and the teacher's improvement."""
    def draw_at(level_steps: int):
        return lambda idx: student_draw(
            pipe.student, [prompts[i] for i in idx], noise[idx], [gens[i] for i in idx], plan.guidance,
            num_inference_steps=level_steps, **control_kwargs(pipe.student, controls, idx, c_scale))

    def gate_at(threshold: float):  # below the level's threshold: on to the next level
        return lambda level_scores: [int(j) for j in np.flatnonzero(~(level_scores >= threshold))]

    # a cascade's levels before this student; one whose threshold keeps no image is not drawn
    drawn = [] if plan.cascade is None else [(s, t) for s, t in zip(plan.cascade.steps, plan.cascade.thresholds)
                                             if np.isfinite(t)]
    levels = [*((draw_at(s), gate_at(t)) for s, t in drawn), (draw_at(plan.steps), None)]

    def route(scores: np.ndarray) -> list[int]:  # of the last level's images (positions), those improved
        if plan.mode in ("teacher", "refine-all"):
            return list(range(len(scores)))
        return plan.cut.improved(scores) if plan.mode == "adaptive" else []

    def improve(idx: list[int], latents: list) -> torch.Tensor:  # regenerate from the noise, or refine
        teacher = pipe.teacher if plan.regenerates else pipe.teacher_img2img
        return teacher_improve(pipe, plan, [prompts[i] for i in idx], noise[idx], [latents[i] for i in idx],
                               [gens[i] for i in idx], ledger, idx, **control_kwargs(teacher, controls, idx, c_scale))

    return levels, route, improve


def teacher_improve(pipe, plan, prompts: Sequence[str], noise: torch.Tensor, student_latents: Sequence[torch.Tensor],
                    generators: Sequence[torch.Generator], ledger: CostLedger | None = None,
                    idx: list[int] | None = None, **extra) -> torch.Tensor:
    """The teacher's latents of a batch of images routed to it, as ``plan`` (a generation call's resolved
    settings) says: drawn afresh from their initial ``noise`` (strategy "regenerate"), or their student latents
    refined from the rollback (the pixels, re-encoded by the teacher's VAE, for a pixel hand-off: one VAE
    encode per image on ``ledger``). The images may come from different calls with the same teacher settings."""
    scheduler = pipe._teacher_scheduler(plan.teacher_scheduler)
    if plan.regenerates:
        return teacher_regenerate(pipe.teacher, scheduler, prompts, noise, generators, plan.teacher_guidance,
                                  num_inference_steps=plan.teacher_steps, **extra)
    start = torch.cat(list(student_latents))
    if plan.handoff == "pixel":
        start = pixels(pipe.student, start, idx)
        if ledger is not None:
            ledger.add("vae_encode", idx if idx is not None else list(range(len(start))))
    return teacher_refine(pipe.teacher_img2img, scheduler, prompts, start, generators, plan.refine,
                          plan.teacher_guidance, **extra)


def prerouted_draw(pipe, plan, prompts: list[str], noise: torch.Tensor, gens: list, controls,
                   c_scale: float) -> Draw:
    """The teacher's draw of pre-routed images (no student image to refine): regenerated from their initial
    noise with the plan's teacher sampler at ``plan.preroute_steps`` steps, whatever the call's strategy."""
    def regenerate(idx: list[int]) -> torch.Tensor:
        return teacher_regenerate(pipe.teacher, pipe._teacher_scheduler(plan.teacher_scheduler),
                                  [prompts[i] for i in idx], noise[idx], [gens[i] for i in idx],
                                  plan.teacher_guidance, num_inference_steps=plan.preroute_steps,
                                  **control_kwargs(pipe.teacher, controls, idx, c_scale))
    return regenerate
