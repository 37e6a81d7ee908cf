"""What the serving engine moves: a request's :class:`Job` and its :class:`Image` s, a whole pipeline
:class:`Call` (an edit), a finished job's :class:`JobResult`, and the ways a request ends without one."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ..pipeline.records import CostLedger


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
    """One image of a job on its way through the stages."""

    job: Job
    index: int
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

    @property
    def n(self) -> int:
        return len(self.prompts)


@dataclass
class JobResult:
    """A finished job: its final and student images (uint8 [H, W, 3]; no student image for mode teacher) and one
    record per image (the pipeline's :data:`~tandem.pipeline.records.RECORD_FIELDS` plus ``serving``)."""

    images: list
    student_images: list
    records: list[dict]
    job: Job


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
