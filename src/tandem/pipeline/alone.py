"""The teacher or a student alone, without an oracle, through the pipeline's own stages: the draws, decodes,
records and costs of ``TandemPipeline(mode="teacher" | "student")`` for a model loaded without the other one
(``tandem generate --mode teacher|student`` on a world or ``tandem distill`` student)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..checks import count, sampler_steps
from ..generate import (
    StudentSettings,
    TeacherSettings,
    check_student_run,
    initial_latents,
    prompt_generator,
    prompt_seed,
    sample_student,
)
from ..models import make_scheduler
from .records import CostLedger, TandemOutput, image_record, summarize_records
from .stages import run_stages, student_draw, teacher_regenerate


@torch.no_grad()
def generate_alone(pipe, prompts: Sequence[str], settings: TeacherSettings | StudentSettings, seed: int,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> TandemOutput:
    """The teacher or a student alone, without an oracle, through the stages of ``TandemPipeline``
    (:func:`~.stages.run_stages`): a student draws with :func:`~.stages.student_draw`, as the pipeline's
    ``mode="student"`` does (a consistency student's "deterministic" noise, which diffusers' pipeline lacks, with
    the sampler of its kind: :func:`tandem.generate.sample_student`); the teacher draws from each image's initial
    noise with :func:`~.stages.teacher_regenerate`, as ``mode="teacher"`` does. The pixels are those of
    :func:`tandem.generate.generate_student` and :func:`tandem.generate.generate_teacher` (tested), each image gets
    the record the pipeline's mode gives it (:func:`image_record`), its costs counted by the same
    :class:`CostLedger`.

    Args:
        pipe: the teacher's pipeline (``settings`` a ``TeacherSettings``) or a student's (``tandem.load_student``
            without a teacher; ``settings`` a ``StudentSettings``).
        prompts: B prompts; prompt i is seeded from ``(seed, i)``.
        on_batch: called with the number of images finished after each batch.
    Returns:
        B uint8 images [H, W, 3], their records (path "teacher" or "student") and their summary.
    """
    if not isinstance(settings, TeacherSettings | StudentSettings):
        raise ValueError(f"settings must be TeacherSettings or StudentSettings, got {type(settings).__name__}")  # noqa: TRY004
    role = "teacher" if isinstance(settings, TeacherSettings) else "student"
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    config, original = dict(pipe.scheduler.config), None  # the teacher's sampler config; the student's grid size
    if role == "teacher":  # what the stages would refuse mid-run, refused before any model runs
        sampler_steps(settings.steps, make_scheduler(settings.scheduler, config), "teacher steps", "the teacher")
        count(seed, "seed", minimum=0)
        count(batch_size, "batch size")
    else:
        original = check_student_run(pipe, settings, seed, batch_size)
    n = len(prompts)
    gens = [prompt_generator(seed, i) for i in range(n)]  # each image's noise, then its steps' noise
    noise = initial_latents(pipe, seed, list(range(n)), gens)

    def draw(idx: list[int]) -> torch.Tensor:  # the student's latents
        ps, gs = [prompts[i] for i in idx], [gens[i] for i in idx]
        if original is not None and settings.noise == "deterministic":  # a noise diffusers' pipeline lacks
            return sample_student(pipe, ps, noise[idx], gs, settings, original)
        return student_draw(pipe, ps, noise[idx], gs, settings.guidance_scale, num_inference_steps=settings.steps)

    def regenerate(idx: list[int], _latents: list) -> torch.Tensor:  # the teacher's latents, a fresh sampler
        return teacher_regenerate(pipe, make_scheduler(settings.scheduler, config), [prompts[i] for i in idx],
                                  noise[idx], [gens[i] for i in idx], settings.guidance_scale,
                                  num_inference_steps=settings.steps)

    ledger = CostLedger(n, {role: pipe.unet})
    run = run_stages(pipe, pipe, None, prompts, batch_size, ledger, draw if role == "student" else None,
                     lambda scores: list(range(len(scores))) if role == "teacher" else [], regenerate, False,
                     None if on_batch is None else lambda _phase, done, _total: on_batch(done))
    records = [image_record(i, p, role, prompt_seed(seed, i), ledger) for i, p in enumerate(prompts)]
    summary = {**summarize_records(records), "settings": {"mode": role, **settings.__dict__},
               "seconds": {"total": run.seconds}}
    return TandemOutput(run.images, records, summary, None if role == "teacher" else list(run.images))
