"""What the serving engine moves: a request's :class:`Job` and its :class:`Image` s, a whole pipeline
:class:`Call` (an edit), a finished job's :class:`JobResult` (:func:`job_result`), and the ways a request ends
without one.

A job of ``n`` prompts whose plan draws N drafts (:mod:`tandem.pipeline.drafts`) moves ``n * N`` images, its draft
slots, prompt-major as in the pipeline: slot ``i * N + d`` is draft ``d`` of prompt ``i``. Once all are scored
each prompt keeps its best draft (``Job.kept``); the others leave, and the result has one image per prompt."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ..generate import prompt_seed
from ..pipeline.drafts import draft_record, fold_ledger
from ..pipeline.records import CostLedger, image_record


class QueueFull(RuntimeError):
    """The queues hold as many images as they may; ``retry_after`` seconds is the estimated time to drain them."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(f"the server's queues are full ({queued} images queued, limit {limit}); retry after "
                         f"{retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(RuntimeError):
    """The job waited past its deadline and was dropped before the rest of its work ran."""


class ShuttingDown(RuntimeError):
    """The engine is draining: it finishes the jobs it has and takes no new ones."""


class BatchFailed(RuntimeError):
    """A model call failed on a batch holding this job's images; ``error_id`` is in the server's log."""

    def __init__(self, error_id: str):
        super().__init__(f"a model call failed (error id {error_id}; see the server log)")
        self.error_id = error_id


@dataclass
class Image:
    """One image of a job on its way through the stages: a draft slot (``index``; the prompt's image with one draft).
    ``plan``: the settings its stages run with, when not its job's (a pre-routed prompt's teacher draw)."""

    job: Job
    index: int
    plan: object = None
    enqueued: float = 0.0
    latent: torch.Tensor | None = None
    image: np.ndarray | None = None
    student_image: np.ndarray | None = None
    score: float = float("nan")
    path: str | None = None
    stages: dict = field(default_factory=dict)  # stage -> {"queue_s", "compute_s", "batch", "batch_size"}


@dataclass
class Job:
    """One request: ``n`` prompts under one resolved generation plan (:func:`tandem.pipeline.settings.plan_generation`)."""

    id: str
    prompts: list[str]
    plan: object
    seed: int
    arrival: float
    deadline: float
    generators: list
    noise: torch.Tensor
    ledger: CostLedger
    images: list[Image] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    failed: bool = False
    scored: int = 0
    finished: int = 0
    tau: float | None = None  # the cut-off it was routed by (its own, capped by the load policy)
    share_cap: float | None = None
    kept: list[int] | None = None  # each prompt's slot once routed (its best draft)
    prerouted: set = field(default_factory=set)  # the prompts sent straight to the teacher

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def drafts(self) -> int:
        return self.plan.drafts

    def prompt(self, slot: int) -> str:
        return self.prompts[slot // self.drafts]


@dataclass
class JobResult:
    """A finished job: its final and student images (uint8 [H, W, 3]; no student image for mode teacher) and one
    record per image (the pipeline's :data:`~tandem.pipeline.records.RECORD_FIELDS` plus ``serving``)."""

    images: list
    student_images: list
    records: list[dict]
    job: Job


def job_result(job: Job, done: float) -> JobResult:
    """The result of a job whose kept images are all finished (at ``done``, monotonic seconds): the pipeline's
    records of its prompts (each prompt paying for all its drafts, the kept draft and every draft's score said, as
    in the pipeline), with each kept image's ``serving`` details."""
    drafts, kept = job.drafts, job.kept or list(range(job.n))
    ledger = fold_ledger(job.ledger, drafts) if drafts > 1 else job.ledger
    scores = np.array([im.score for im in job.images])
    adaptive = job.plan.mode == "adaptive"
    records = []
    for i, slot in enumerate(kept):
        image = job.images[slot]
        rec = image_record(i, job.prompts[i], image.path, prompt_seed(job.seed, i), ledger, image.score,
                           job.tau if adaptive else None)
        if image.path == "refined":
            rec["rollback_sigma"], rec["teacher_steps_run"] = job.plan.refine.sigma, job.plan.refine.steps
        if job.plan.preroute is not None:
            rec["pre_routed"] = i in job.prerouted
        if drafts > 1:
            rec = draft_record(rec, slot, drafts, scores)
        rec["serving"] = {"request_id": job.id, "latency_s": done - job.arrival, "stages": image.stages,
                          "teacher_share_cap": job.share_cap}
        records.append(rec)
    images = [job.images[slot] for slot in kept]
    student = [im.student_image for im in images] if job.plan.mode != "teacher" else []
    return JobResult([im.image for im in images], student, records, job)


@dataclass
class Call:
    """A whole pipeline call run on the worker between batches (an edit: its stages are not shared)."""

    fn: object
    images: int
    deadline: float
    future: Future = field(default_factory=Future)
    cancelled: bool = False


def set_error(future: Future, error: Exception) -> None:
    if not future.done():  # a cancelled future (its client left) takes nothing more
        future.set_exception(error)
