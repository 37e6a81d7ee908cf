"""The shipped world as an adaptive pipeline for tests: its student and teacher with a stand-in oracle
(mean brightness), and the prompts the pipeline, evaluation, cascade and route tests share."""

from __future__ import annotations

import torch

from tandem.loaders import load_preset_student, load_preset_teacher
from tandem.pipeline import TandemPipeline
from tandem.presets import PRESETS

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle",
           "an orange triangle to the left of a large green circle", "a large purple circle at the bottom",
           "a yellow square above a small red triangle"]


class Brightness:
    """A stand-in oracle: mean pixel value (independent of the prompt)."""

    name = "brightness"

    def __call__(self, images, prompts):
        assert images.ndim == 4 and images.shape[1] == 3 and len(prompts) == len(images)
        return images.mean(dim=(1, 2, 3))

    def fingerprint(self):
        return {"kind": "brightness"}


def world_pipeline(student: str | None = None, **defaults) -> TandemPipeline:
    """The shipped world's student (the preset's, or ``student``: a shipped name) and teacher with the
    stand-in oracle."""
    from tandem.presets import compose

    torch.set_num_threads(2)
    preset = compose("world", student=student) if student else PRESETS["world"]
    teacher = load_preset_teacher(preset, "cpu", torch.float32)
    student = load_preset_student(preset, teacher, "cpu", torch.float32)
    return TandemPipeline(student, teacher, Brightness(), defaults=defaults)
