"""The library's messages name its Python arguments; the command line shows its options for them
(:func:`tandem.cli.common.cli_message`). Real messages of a tiny-world pipeline, in both words."""

from __future__ import annotations

import numpy as np
import pytest
from worldtools import Brightness

from tandem.calibration import Calibration
from tandem.cli.common import cli_message
from tandem.pipeline import load_preset
from tandem.presets import Preset, compose

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a green triangle"]


@pytest.fixture(scope="module")
def pipe(tiny_world):
    return load_preset(Preset(name="tiny", description="", teacher=str(tiny_world), student=str(tiny_world),
                              student_kind="pipeline", scorer="unused",
                              defaults={"num_inference_steps": 2, "teacher_steps": 2}), scorer=Brightness())


def message(call) -> str:
    with pytest.raises(ValueError) as e:
        call()
    assert "--" not in str(e.value), str(e.value)  # a Python caller reads the arguments' names
    return str(e.value)


@pytest.mark.parametrize("call, python, command_line", [
    (lambda p: p(PROMPTS, mode="student", percentile=50),
     "accept_threshold, percentile and budget apply to mode='adaptive', not 'student'",
     "--threshold, --percentile and --budget apply to --mode adaptive, not 'student'"),
    (lambda p: p(PROMPTS, mode="student", routing="budget-exact"),
     "routing='budget-exact' applies to mode='adaptive', not 'student'",
     "--budget-exact applies to --mode adaptive, not 'student'"),
    (lambda p: p(PROMPTS, routing="budget-exact", budget=8, percentile=50),
     "routing='budget-exact' takes budget and neither accept_threshold nor percentile",
     "--budget-exact takes --budget and neither --threshold nor --percentile"),
    (lambda p: p(PROMPTS, percentile=50, budget=3),
     "adaptive mode needs exactly one of accept_threshold (tau), percentile (k) or budget; got percentile, budget",
     "adaptive mode needs exactly one of --threshold (tau), --percentile (k) or --budget; got --percentile, --budget"),
    (lambda p: p(PROMPTS, percentile=50),
     ("percentile needs a calibration: make one with pipe.calibration = pipe.calibrate(prompts), or pass "
      "accept_threshold"),
     ("--percentile needs a calibration: make one with `tandem calibrate`, then --calibration FILE, or pass "
      "--threshold")),
    (lambda p: p.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS[:1], percentile=50, strength=0.5),
     ("percentile needs an edit calibration for strength 0.5: make one with pipe.edit_calibrations[0.5] = "
      "pipe.calibrate_edits(images, prompts, strength=0.5), or pass accept_threshold"),
     ("--percentile needs an edit calibration for strength 0.5: make one with `tandem calibrate --edits val "
      "--strength 0.5`, then --calibration FILE, or pass --threshold")),
    (lambda p: p.mixed(PROMPTS),
     "mixed sampling needs exactly one of teacher_prob or teacher_at; got neither",
     "mixed sampling needs exactly one of --teacher-prob or --teacher-at; got neither"),
])
def test_a_library_message_names_the_argument_and_the_command_line_its_option(pipe, call, python, command_line):
    said = message(lambda: call(pipe))
    assert said == python
    assert cli_message(said) == command_line


def test_messages_outside_the_pipeline_call():
    said = message(lambda: Calibration(np.zeros(5), {}))
    assert said.endswith("so no cut-off can route them; check the scorer (scorer=...)")
    assert cli_message(said).endswith("check the scorer (--scorer)")
    said = message(lambda: compose("world", student="nope"))
    assert said.startswith("student: no student 'nope': not a directory, nor a student world ships")
    assert cli_message(said).startswith("--student: no student 'nope'")
    assert cli_message(message(lambda: compose("world", teacher_kind="flat"))).startswith("--teacher-kind must be")


def test_commands_quoted_values_and_paths_stay_as_they_are():
    for text in ["expected the results.json of `tandem eval budget`, got 'budget'",
                 "runs/budget/cascade.json is not a cascade table", "percentile-ish x_budget budget_exact",
                 "no student 'percentile'"]:
        assert cli_message(text) == text
    # a message that still names the option itself shows it once
    assert cli_message("pass control_image (--control-image), one per prompt") == "pass --control-image, one per prompt"


def _said(call, kind: type[Exception] = ValueError) -> str:
    with pytest.raises(kind) as e:
        call()
    assert "--" not in str(e.value), str(e.value)
    return str(e.value)


def test_the_trainings_messages_name_the_arguments_and_the_command_line_its_options(tmp_path):
    from tandem.distill.adversarial import AdversarialDistillation
    from tandem.distill.ddil import DDILSpec
    from tandem.distill.dmd2 import DMD2Config, DMD2Distillation, check_ddil
    from tandem.outputs import write_json_file
    from tandem.training.checkpoints import check_run_dir
    from tandem.training.config import check_precision

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x\n")
    said = _said(lambda: check_run_dir(tmp_path / "mine", False, 1), FileExistsError)
    assert said.startswith(f"out_dir {tmp_path / 'mine'} is not empty") and said.endswith(
        "(resume=True continues a run stopped in it)")
    assert cli_message(said).startswith(f"--out {tmp_path / 'mine'} is not empty")
    assert cli_message(said).endswith("(--resume continues a run stopped in it)")
    said = _said(lambda: check_run_dir(tmp_path / "none", True, 1), FileNotFoundError)
    assert cli_message(said) == f"--resume: no checkpoint in {tmp_path / 'none'} (no train_config.json: no run there)"
    said = _said(lambda: check_precision("fp16", cpu=True))
    assert cli_message(said).startswith("--mixed-precision fp16 needs a GPU")
    said = _said(lambda: DDILSpec.parse("frwd=0.5,student=0.5,teacher_steps=2"))
    assert said == "ddil.teacher_steps: no rollout uses the teacher (give teacher > 0 or mixed < 1)"
    assert cli_message(said) == "--ddil teacher_steps: no rollout uses the teacher (give teacher > 0 or mixed < 1)"
    said = _said(lambda: check_ddil(DMD2Config(steps=1), DDILSpec.parse("student=1")))
    assert cli_message(said) == ("dmd2 takes --ddil as on-policy rollouts to a step of a multi-step student, so it "
                                 "needs --steps > 1, no buffer=, and no --backward-simulation setting (DDIL chooses "
                                 "the inputs)")
    for method, lower in ((AdversarialDistillation, "--lr or --disc-lr"), (DMD2Distillation, "--lr or --critic-lr")):
        assert cli_message(f"resume from its last checkpoint (step 2) with resume=True and {method.divergence_hint}") \
            == f"resume from its last checkpoint (step 2) with --resume and a lower {lower}"
    (tmp_path / "t.json").write_text("{}\n")
    said = _said(lambda: write_json_file(tmp_path / "t.json", {}), FileExistsError)
    assert cli_message(said) == f"{tmp_path / 't.json'} exists; pass --overwrite to replace it"
    # a student method's name keeps its '+ddil'
    assert cli_message("the consistency+ddil student") == "the consistency+ddil student"
