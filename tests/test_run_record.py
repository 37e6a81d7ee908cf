"""The record of the models behind a run (:func:`tandem.pipeline.records.run_record`): what every command's
config.json says about them, and what a Python run of the same pipeline gets. Runs on the tiny world."""

from __future__ import annotations

import json

import pytest
from worldtools import Brightness

from tandem.pipeline import TandemPipeline, load_preset
from tandem.pipeline.records import run_record
from tandem.presets import Preset, read_preset_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def composed(tiny_world):
    """A preset whose student is the tiny world's own pipeline (loaded again: it brings its own VAE and text
    encoder)."""
    return Preset(name="tiny", description="the tiny world as its own student", teacher=str(tiny_world),
                  student=str(tiny_world), student_kind="pipeline", scorer="unused",
                  defaults={"num_inference_steps": 2, "teacher_steps": 2})


def test_a_preset_pipeline_records_the_preset_that_rebuilds_it(composed, tmp_path):
    pipe = load_preset(composed, scorer=Brightness())
    record = run_record(pipe)
    assert list(record) == ["preset", "teacher", "student", "scorer", "scorer_fingerprint", "controlnet",
                            "student_own_components", "preset_fields"]  # the keys every config.json has had
    assert (record["preset"], record["teacher"], record["student"]) == ("tiny", composed.teacher, composed.student)
    assert record["scorer_fingerprint"] == {"kind": "brightness"}
    assert record["student_own_components"] == ["vae", "text_encoder"] == list(pipe.student_own_components)
    (tmp_path / "preset.json").write_text(json.dumps(record["preset_fields"]))
    assert read_preset_file(tmp_path / "preset.json") == composed
    assert run_record(pipe, edit=True) == record  # no edit student: its edits are the student's


def test_a_pipeline_built_in_python_records_its_weights(composed):
    from_preset = load_preset(composed, scorer=Brightness())
    by_hand = TandemPipeline(from_preset.student, from_preset.teacher, Brightness())
    record = run_record(by_hand)
    assert record == {"preset": None, "fingerprint": from_preset.fingerprint(),
                      "scorer_fingerprint": {"kind": "brightness"}, "student_own_components": ["vae", "text_encoder"]}
    unscored = run_record(TandemPipeline(from_preset.student, from_preset.teacher))
    assert unscored["scorer_fingerprint"] is None and unscored["fingerprint"]["scorer"] is None
