"""The registry of student kinds: a student's scheduler picks how it is built and sampled (an LCM student is one
kind among them), and the samplers follow the registry rather than naming a scheduler class."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

from tandem import sampling
from tandem.generate import StudentSettings, generate_student
from tandem.loaders import load_student
from tandem.sampling import CONSISTENCY, SCHEDULED, student_kind

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_world_students_are_of_their_schedulers_kinds():
    cd, pd = load_student("cd"), load_student("pd")
    assert student_kind(cd) is CONSISTENCY and isinstance(cd, LatentConsistencyModelPipeline)
    assert student_kind(pd) is SCHEDULED and type(pd) is StableDiffusionPipeline
    assert CONSISTENCY.max_steps(cd.scheduler) == cd.scheduler.config.original_inference_steps


def test_a_registered_kind_brings_its_own_sampler(monkeypatch):
    pd = load_student("pd")
    calls = []

    def sample(unet, alphas_cumprod, latents, embeds, generators, steps, guidance_scale, noise, original_steps,
               reflect):
        calls.append((steps, original_steps, len(generators)))
        return torch.zeros_like(latents)

    own = dataclasses.replace(SCHEDULED, scheduler=type(pd.scheduler).__name__, sample=sample,
                              max_steps=lambda scheduler: 7)
    monkeypatch.setitem(sampling.STUDENT_KINDS, own.scheduler, own)
    images = generate_student(pd, ["a red circle", "a blue square"], StudentSettings(3, 4.5), seed=0)
    assert calls == [(3, 7, 2)]  # the kind's sampler drew, on the kind's grid, not the pipeline
    assert len(images) == 2 and all(image.dtype == np.uint8 for image in images)
    with pytest.raises(ValueError, match="at most 7"):
        generate_student(pd, ["a red circle"], StudentSettings(8, 4.5), seed=0)
