"""One stage's model calls on one batch, as plain data in and out, so that the same function runs in the server's
worker or in a stage's own process (:mod:`tandem.serve.ray_app`): the pipeline's stages
(:mod:`tandem.pipeline.stages`) over a :class:`StageBatch`, giving a :class:`StageResult`.

A batch's images may come from different requests with the same settings (the engine's batching key). Each
image's generator comes in and goes out advanced, so the noise an image draws does not depend on where its
stages ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_finite
from ..pipeline.records import CostLedger
from ..pipeline.stages import decode, score_images, student_draw, teacher_improve

STAGES = ("student", "oracle", "teacher")


@dataclass
class StageBatch:
    """What one stage needs of a batch: the plan the images share (their request's resolved settings), their
    prompts, initial noise [B, C, h, w], generators, and the student's latents (the teacher) or images (the oracle)."""

    stage: str
    plan: object
    prompts: list[str]
    noise: torch.Tensor
    generators: list
    latents: list | None = None
    images: list | None = None


@dataclass
class StageResult:
    """A stage's outputs: latents [B, ...] and uint8 images (student, teacher), scores (oracle), and what each image
    cost (the ledger's per-image counts by key: UNet rows by model, VAE decodes and encodes, oracle calls)."""

    latents: torch.Tensor | None = None
    images: list | None = None
    scores: np.ndarray | None = None
    costs: dict = field(default_factory=dict)


@torch.no_grad()
def run_stage(pipe, batch: StageBatch) -> StageResult:
    """Run ``batch.stage`` of ``pipe`` (a TandemPipeline) on the batch, counting each image's costs."""
    if batch.stage not in STAGES:
        raise ValueError(f"unknown stage {batch.stage!r}; expected one of {', '.join(STAGES)}")
    ledger = CostLedger(len(batch.prompts), pipe._counted_modules())
    idx = list(range(len(batch.prompts)))
    plan, out = batch.plan, StageResult()
    with ledger.counting():
        if batch.stage == "oracle":
            out.scores = score_images(pipe.scorer, list(batch.images), batch.prompts, idx)
            ledger.add("oracle", idx)
        else:
            role = batch.stage
            before = ledger.rows(role)
            if role == "student":
                latents = student_draw(pipe.student, batch.prompts, batch.noise, batch.generators, plan.guidance,
                                       num_inference_steps=plan.steps)
            else:
                latents = teacher_improve(pipe, plan, batch.prompts, batch.noise, batch.latents, batch.generators,
                                          ledger, idx)
            ledger.charge(role, idx, before)
            check_finite(latents, f"the {role}'s latents", idx)
            out.latents = latents
            out.images = decode(pipe.student if role == "student" else pipe._teacher_any, latents, idx)
            ledger.add("vae_decode", idx)
    out.costs = {key: values.copy() for key, values in ledger.per_image.items()}
    return out


def generator_states(generators) -> list[torch.Tensor]:
    """The generators' states, to send them to another process."""
    return [g.get_state() for g in generators]


def generators_from(states) -> list[torch.Generator]:
    gens = []
    for state in states:
        g = torch.Generator()
        g.set_state(state)
        gens.append(g)
    return gens
