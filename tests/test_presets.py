"""Real-tier preset loading, run on tiny randomly initialised models saved to local directories:
a consistency UNet swapped into the teacher's components, a complete student pipeline, an
image-to-image-only teacher (the SDXL refiner's role), and a CLIP oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from tandem.distill.consistency import make_student_unet
from tandem.presets import PRESETS, Preset, load_preset
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


def test_real_tier_presets_carry_the_papers_settings():
    assert PRESETS["sdxl-lcm"].defaults["rollback_sigma"] == 0.85 and PRESETS["sdxl-lcm"].defaults["percentile"] == 70
    assert PRESETS["sdxl-turbo"].teacher_kind == "img2img" and PRESETS["sdxl-turbo"].defaults["teacher_steps"] == 4
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


def test_controlnet_presets_carry_the_papers_d6_settings():
    for name, k in (("sd15-lcm-canny", 50), ("sd15-lcm-seg", 70)):
        d = PRESETS[name].defaults
        assert (d["num_inference_steps"], d["teacher_steps"], d["teacher_scheduler"], d["rollback_sigma"],
                d["percentile"]) == (5, 10, "unipc", 0.5, k)
        assert PRESETS[name].controlnet.startswith("lllyasviel/")
