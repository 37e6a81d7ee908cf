"""Real-tier preset loading, run on tiny randomly initialised models saved to local directories:
a consistency UNet swapped into the teacher's components, a complete student pipeline, an
image-to-image-only teacher (the SDXL refiner's role), and a CLIP oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from worldtools import Brightness

from tandem.distill.consistency import make_student_unet
from tandem.pipeline import load_preset
from tandem.presets import PRESETS, Preset
from tandem.scorers import CLIPScorer

PROMPTS = ["a red circle", "a green triangle", "a small blue square"]


@pytest.fixture(scope="module")
def parts(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    torch.manual_seed(0)
    student = make_student_unet(UNet2DConditionModel.from_pretrained(tiny_world / "unet"), 256)
    student.save_pretrained(root / "lcm-unet")
    scorer = CLIPScorer.from_pretrained(str(tiny_world / "clip"), processor=str(tiny_world / "tokenizer"))
    return tiny_world, root / "lcm-unet", scorer


def preset(world, student, **changes) -> Preset:
    base = Preset(name="tiny", description="", teacher=str(world), student=str(student), student_kind="unet",
                  scorer="unused", defaults=dict(num_inference_steps=2, guidance_scale=4.0, teacher_steps=3,
                                                 teacher_guidance_scale=3.0, rollback_sigma=0.6))
    return dataclasses.replace(base, **changes)


def test_a_consistency_unet_shares_the_teachers_other_components(parts):
    world, unet_dir, scorer = parts
    pipe = load_preset(preset(world, unet_dir), scorer=scorer)
    assert pipe.student.vae is pipe.teacher.vae and pipe.student.text_encoder is pipe.teacher.text_encoder
    assert pipe.student.unet.config.time_cond_proj_dim == 256
    assert type(pipe.student.scheduler).__name__ == "LCMScheduler"
    out = pipe(PROMPTS, accept_threshold=float("inf"), seed=0)  # everything refined
    assert {r["path"] for r in out.records} == {"refined"} and len(out.images) == 3
    assert [r["unet_evals"]["student"] for r in out.records] == [2.0] * 3  # no CFG doubling for an LCM UNet
    assert [r["unet_evals"]["teacher"] for r in out.records] == [6.0] * 3
    scores = [r["student_score"] for r in out.records]
    torch.testing.assert_close(torch.tensor(scores), scorer(out.student_images, PROMPTS))


def test_a_complete_student_pipeline_and_an_img2img_teacher(parts):
    world, _, scorer = parts
    pipe = load_preset(preset(world, world, student_kind="pipeline", teacher_kind="img2img"), scorer=scorer)
    assert pipe.teacher is None and pipe.teacher_img2img is not None
    out = pipe(PROMPTS, mode="refine-all", seed=0)
    assert [r["unet_evals"]["student"] for r in out.records] == [4.0] * 3  # 2 steps x CFG
    with pytest.raises(ValueError, match="only refine"):
        pipe(PROMPTS, strategy="regenerate", accept_threshold=0.0)


def test_a_plain_unet_is_refused_as_a_consistency_student(parts):
    world, _, scorer = parts
    with pytest.raises(ValueError, match="not a consistency-distilled UNet"):
        load_preset(preset(world, world / "unet"), scorer=scorer)


# The settings of the adaptive teacher-student paper, each preset's reference: the student (``lcm``: consistency
# distilled, guidance embedded; ``add``: adversarially distilled, sampled without guidance) and its steps, the
# teacher (``base``: a text-to-image model; ``refiner``: image-to-image only) and its refinement steps, the
# rollback sigma, the percentile k sent to the teacher. Table 4: SD1.5 (CD 5 + 10 steps, sigma 0.7, k 50);
# Table 5: CD-SDXL 4 + SDXL-Base 12 UniPC steps, sigma 0.85, k 70, and ADD-XL 2 + SDXL-Refiner 4 steps, sigma 0.4,
# k 50; appendix D.6: ControlNet, CD 5 + UniPC 10 steps, sigma 0.5, k 50 for Canny edges and 70 for segmentation.
PAPER = {
    "sd15-lcm": ("lcm", 5, "base", 10, 0.7, 50),
    "sdxl-lcm": ("lcm", 4, "base", 12, 0.85, 70),
    "sdxl-turbo": ("add", 2, "refiner", 4, 0.4, 50),
    "sd15-lcm-canny": ("lcm", 5, "base", 10, 0.5, 50),
    "sd15-lcm-seg": ("lcm", 5, "base", 10, 0.5, 70),
}
HELD_OUT = ["a red circle", "a green triangle", "a small blue square", "a large purple circle at the bottom",
            "a yellow square above a small red triangle", "an orange triangle", "a white circle at the top left",
            "a small green square", "a blue triangle to the left of a red circle", "a large orange circle"]


@pytest.mark.parametrize("name", PAPER)
def test_real_tier_presets_run_the_papers_settings(parts, name):
    """A real-tier preset's settings, run with tiny stand-ins for its models (the LCM UNet for a consistency
    student, a plain pipeline for the ADD student; the tiny teacher) and a brightness oracle calibrated on
    held-out prompts: a call that names no setting samples the student with the paper's steps at one UNet
    evaluation each, sends the paper's k% to the teacher, and refines each of them from the paper's rollback
    sigma in the paper's number of guided teacher steps; a refiner teacher cannot regenerate."""
    world, unet_dir, _ = parts
    student, student_steps, teacher, teacher_steps, sigma, k = PAPER[name]
    stand_in = dataclasses.replace(PRESETS[name], teacher=str(world), controlnet=None, calibration=None,
                                   **({"student": str(world), "student_kind": "pipeline"} if student == "add" else
                                      {"student": str(unet_dir), "student_kind": "unet"}))
    pipe = load_preset(stand_in, scorer=Brightness())
    assert (pipe.teacher is None) == (teacher == "refiner")
    if teacher == "refiner":
        with pytest.raises(ValueError, match="only refine"):
            pipe(HELD_OUT[:1], strategy="regenerate", accept_threshold=0.0)
    pipe.calibration = pipe.calibrate(HELD_OUT, seed=1)
    out = pipe(HELD_OUT, seed=1)
    refined = [r for r in out.records if r["path"] == "refined"]
    assert len(refined) == round(k / 100 * len(HELD_OUT)), out.summary["paths"]
    assert {r["path"] for r in out.records} == {"refined", "accepted"}
    for r in out.records:  # no classifier-free guidance doubling: one UNet evaluation per student step
        assert r["unet_evals"]["student"] == student_steps
        assert (r["student_score"] < r["tau"]) == (r["path"] == "refined")
    for r in refined:  # the paper counts a refinement's steps from sigma; each is guided (two evaluations)
        assert r["teacher_steps_run"] == teacher_steps and r["unet_evals"]["teacher"] == 2 * teacher_steps
        assert r["rollback_sigma"] == pytest.approx(sigma, abs=0.02)  # the nearest of the sampler's timesteps


def test_controlnet_presets_are_the_sd15_pair_with_a_controlnet_and_unknown_presets_are_named():
    for name in ("sd15-lcm-canny", "sd15-lcm-seg"):
        preset, pair = PRESETS[name], PRESETS["sd15-lcm"]
        assert (preset.teacher, preset.student, preset.student_kind, preset.scorer) == (
            pair.teacher, pair.student, pair.student_kind, pair.scorer)
        assert preset.controlnet is not None and pair.controlnet is None
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("sd3-turbo")


def test_a_controlnet_preset_plugs_one_controlnet_into_student_and_teacher(parts, tmp_path):
    from diffusers import ControlNetModel

    world, unet_dir, scorer = parts
    torch.manual_seed(0)
    teacher_unet = UNet2DConditionModel.from_pretrained(world / "unet")
    ControlNetModel.from_unet(teacher_unet, conditioning_embedding_out_channels=(8, 8, 8)).save_pretrained(
        tmp_path / "controlnet")
    pipe = load_preset(preset(world, unet_dir, controlnet=str(tmp_path / "controlnet"),
                              defaults={**PRESETS["sd15-lcm-canny"].defaults, "num_inference_steps": 2,
                                        "teacher_steps": 2}), scorer=scorer)
    assert pipe.student.controlnet is pipe.teacher.controlnet is pipe.teacher_img2img.controlnet
    assert pipe.student.unet.config.time_cond_proj_dim == 256 and pipe.student.unet is not pipe.teacher.unet
    edges = torch.zeros(1, 3, 32, 32)
    edges[..., 8:24, 8] = 1.0
    out = pipe(PROMPTS, accept_threshold=float("inf"), seed=0, control_image=edges)  # everything refined
    assert {r["path"] for r in out.records} == {"refined"}
    assert all(r["controlnet_evals"] == r["unet_evals"]["total"] for r in out.records)
    with pytest.raises(ValueError, match="ControlNet .*missing.*: no such directory"):
        load_preset(preset(world, unet_dir, controlnet=str(tmp_path / "missing")), scorer=scorer)
