"""Presets and the students a teacher ships. A preset may edit with another student than it generates
with (the world: ``pd`` generates, ``cd`` edits, each chosen on the validation prompts or edits): the
pipeline edits and calibrates edits with its ``edit_student`` at ``edit_guidance_scale``, exactly as a
pipeline built around that student alone; an explicit student does both; a preset file keeps the field.
A shipped student brings its own calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tandem.models import resolve_model
from tandem.pipeline import TandemPipeline, load_preset
from tandem.presets import PRESETS, compose, read_preset_file, write_preset_file
from tandem.world.scene import make_example

PROMPTS = ["a red circle", "a small blue square at the top left"]


@pytest.fixture(scope="module")
def world_pipe():
    torch.set_num_threads(1)
    return load_preset("world")


@pytest.fixture(scope="module")
def inputs():
    return torch.stack([torch.from_numpy(make_example(i)[1]).permute(2, 0, 1).float() / 255 for i in range(2)])


def test_the_world_preset_generates_with_pd_and_edits_with_cd():
    spec = resolve_model("world")
    preset = PRESETS["world"]
    assert spec.student.path == spec.students["pd"].path and preset.edit_student == "cd"
    assert preset.defaults["guidance_scale"] == spec.students["pd"].guidance_scale
    assert preset.defaults["edit_guidance_scale"] == spec.students["cd"].guidance_scale


def test_edits_are_the_edit_students_own(world_pipe, inputs):
    """The preset's edits equal those of a pipeline whose only student is cd, at cd's guidance (bit for bit);
    its generations stay pd's."""
    cd = load_preset(compose("world", student="cd"))
    assert cd.student.student_info.method == "consistency"
    assert world_pipe.student.student_info.method == "progressive"
    assert world_pipe.edit_student.student_info.method == "consistency"
    kwargs = dict(strength=0.6, mode="student", num_inference_steps=8, output_type="np")
    got = world_pipe.edit(inputs, PROMPTS, **kwargs)
    expected = cd.edit(inputs, PROMPTS, guidance_scale=6.0, **kwargs)
    np.testing.assert_array_equal(np.stack(got.images), np.stack(expected.images))
    assert got.summary["settings"]["guidance_scale"] == 6.0
    generated = world_pipe(PROMPTS[:1], mode="student", output_type="np")
    alone = load_preset(compose("world", student="pd"))(PROMPTS[:1], mode="student", output_type="np")
    np.testing.assert_array_equal(generated.images[0], alone.images[0])


def test_the_shipped_edit_calibration_is_the_edit_students(world_pipe, inputs):
    """The shipped 0.6 calibration was made with cd: the preset's adaptive edit takes tau from it, and its
    own calibrate_edits fingerprints the same student."""
    out = world_pipe.edit(inputs, PROMPTS, strength=0.6, percentile=50, output_type="np")
    assert out.records[0]["tau"] == world_pipe.edit_calibrations[0.6].threshold(50)
    made = world_pipe.calibrate_edits(inputs, PROMPTS, strength=0.6)
    world_pipe.edit_calibrations[0.6].check(made.fingerprint)  # weights digests and settings, not install paths
    assert made.fingerprint["student"]["pipeline"] == "LatentConsistencyModelPipeline"


def test_an_explicit_student_also_edits(tmp_path):
    preset = compose("world", student="pd")
    assert preset.edit_student is None
    pipe = load_preset(preset)
    assert pipe.edit_student is None and pipe.editor() is pipe


def test_a_preset_file_keeps_its_edit_student(tmp_path):
    path = write_preset_file(dataclasses.replace(PRESETS["world"], name="mine"), tmp_path / "mine.json")
    back = read_preset_file(path)
    assert back.edit_student == "cd" and back.defaults["edit_guidance_scale"] == 6.0


def test_a_pipeline_without_an_edit_student_edits_with_its_student(world_pipe):
    plain = TandemPipeline(world_pipe.student, world_pipe.teacher, world_pipe.scorer)
    assert plain.editor() is plain


def test_a_shipped_student_brings_its_own_calibration():
    """`--student cd` keeps cd's shipped calibration (its fingerprint is cd's); another oracle or a ControlNet
    drops it, and the preset's own calibration is pd's."""
    preset = compose("world", student="cd")
    assert preset.calibration == resolve_model("world").students["cd"].calibration
    pipe = load_preset(preset)
    pipe.calibration.check(pipe.calibration_fingerprint(4, 6.0))
    world = load_preset("world")
    world.calibration.check(world.calibration_fingerprint(4, 4.5))
    assert pipe.calibration.fingerprint["student"]["weights"] != world.calibration.fingerprint["student"]["weights"]
    assert compose("world", student="cd", scorer="world-oracle").calibration is None
    assert compose("world-mask", student="cd").calibration is None
