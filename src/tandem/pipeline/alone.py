"""The teacher or a student alone, without an oracle: the records and costs of ``TandemPipeline`` for
a pipeline that is not in a tandem."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..generate import StudentSettings, TeacherSettings, generate_student, generate_teacher, prompt_seed
from .records import CostLedger, TandemOutput, image_record, summarize_records


def generate_alone(pipe, prompts: Sequence[str], settings: TeacherSettings | StudentSettings, seed: int,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> TandemOutput:
    """The teacher or a student alone, without an oracle: :func:`tandem.generate.generate_teacher` or
    :func:`tandem.generate.generate_student` draws the images (the same pixels), and each image gets the
    record ``TandemPipeline(mode="teacher" | "student")`` gives it (:func:`image_record`), its costs counted
    by the same :class:`CostLedger`.

    Args:
        pipe: the teacher's pipeline (``settings`` a ``TeacherSettings``) or a student's
            (``tandem.models.load_student_pipeline``; ``settings`` a ``StudentSettings``).
        prompts: B prompts; prompt i is seeded from ``(seed, i)``.
        on_batch: called with the number of images finished after each batch.
    Returns:
        B uint8 images [H, W, 3], their records (path "teacher" or "student") and their summary.
    """
    if isinstance(settings, TeacherSettings):
        role, draw = "teacher", generate_teacher
    elif isinstance(settings, StudentSettings):
        role, draw = "student", generate_student
    else:
        raise ValueError(f"settings must be TeacherSettings or StudentSettings, got {type(settings).__name__}")  # noqa: TRY004
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    ledger = CostLedger(len(prompts), {role: pipe.unet})
    finished, rows = 0, 0

    def batch_done(done: int) -> None:  # each batch: its UNet rows and one VAE decode per image
        nonlocal finished, rows
        idx = list(range(finished, done))
        ledger.charge(role, idx, rows)
        ledger.add("vae_decode", idx)
        finished, rows = done, ledger.rows(role)
        if on_batch is not None:
            on_batch(done)

    t_start = time.perf_counter()
    with ledger.counting():
        images = draw(pipe, prompts, settings, seed, batch_size, on_batch=batch_done)
    total = time.perf_counter() - t_start
    records = [image_record(i, p, role, prompt_seed(seed, i), ledger) for i, p in enumerate(prompts)]
    summary = {**summarize_records(records), "settings": {"mode": role, **settings.__dict__},
               "seconds": {"total": total}}
    return TandemOutput(images, records, summary, None if role == "teacher" else list(images))
