"""Adaptive editing (SDEdit) and ControlNet generation against diffusers' own pipelines on the
same latents and generators: the student's edit is LCM img2img, the teacher's edit is SD img2img
from the same noised input, and a ControlNet at conditioning scale 0 changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    LatentConsistencyModelImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
)
from worldtools import world_pipeline

from tandem.calibration import CalibrationMismatch
from tandem.generate import prompt_generator
from tandem.pipeline import edit_timesteps, images_to_unit_tensor, teacher_edit_timesteps
from tandem.world.control import (
    CONDITIONING_CHANNELS,
    control_fidelity,
    control_from_image,
    control_image,
)
from tandem.world.scene import make_example, object_mask

EXAMPLES = [make_example(s) for s in (3, 5, 11)]
CAPTIONS = [c for c, _, _ in EXAMPLES]
IMAGES = [im for _, im, _ in EXAMPLES]


@pytest.fixture(scope="module")
def pipe():
    # the consistency student cd (the world preset's editing student), so its edits are LCM img2img's
    return world_pipeline("cd", num_inference_steps=4, guidance_scale=6.0, teacher_steps=6,
                          teacher_guidance_scale=4.5, teacher_scheduler="dpm")


def _input_latents(pipe, images):
    x = images_to_unit_tensor(images, pipe.resolution()) * 2 - 1
    return pipe.student.vae.encode(x).latent_dist.mean * pipe.student.vae.config.scaling_factor


def test_student_edit_is_lcm_img2img(pipe):
    ours = pipe.edit(IMAGES, CAPTIONS, strength=0.6, mode="student", seed=4, output_type="latent")
    s = pipe.student
    ref_pipe = LatentConsistencyModelImg2ImgPipeline(
        vae=s.vae, text_encoder=s.text_encoder, tokenizer=s.tokenizer, unet=s.unet, scheduler=s.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(CAPTIONS, image=_input_latents(pipe, IMAGES), strength=0.6, num_inference_steps=4,
                   guidance_scale=6.0, generator=[prompt_generator(4, i) for i in range(3)],
                   output_type="latent").images
    torch.testing.assert_close(torch.cat(ours.images), ref, rtol=1e-4, atol=1e-4)
    assert [r["start_timestep"] for r in ours.records] == [int(ref_pipe.scheduler.timesteps[0])] * 3


def test_teacher_edits_the_same_noised_input_as_sd_img2img(pipe):
    ours = pipe.edit(IMAGES, CAPTIONS, strength=0.6, mode="teacher", seed=4, output_type="latent")
    ts = ours.summary["settings"]["teacher_timesteps"]
    assert ts[0] == ours.records[0]["start_timestep"] and len(ts) == 6
    t = pipe.teacher
    ref_pipe = StableDiffusionImg2ImgPipeline(**{k: v for k, v in t.components.items()
                                                 if k not in ("image_encoder",)})
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = pipe._teacher_scheduler("dpm")
    # strength 1 over custom timesteps: img2img noises its input to ts[0] with the generator's first draw
    ref = ref_pipe(CAPTIONS, image=_input_latents(pipe, IMAGES), strength=1.0, timesteps=ts, guidance_scale=4.5,
                   generator=[prompt_generator(4, i) for i in range(3)], output_type="latent").images
    torch.testing.assert_close(torch.cat(ours.images), ref, rtol=1e-4, atol=1e-4)
    assert ours.summary["unet_evals_mean"] == 6 * 2


def test_adaptive_edit_takes_the_teacher_exactly_below_tau(pipe):
    student = pipe.edit(IMAGES, CAPTIONS, mode="student", seed=1, score=True)
    teacher = pipe.edit(IMAGES, CAPTIONS, mode="teacher", seed=1)
    scores = np.array([r["student_score"] for r in student.records])
    tau = float(np.median(scores))
    out = pipe.edit(IMAGES, CAPTIONS, mode="adaptive", accept_threshold=tau, seed=1)
    for i, rec in enumerate(out.records):
        below = scores[i] < tau
        assert rec["path"] == ("regenerated" if below else "accepted")
        expected = teacher.images[i] if below else student.images[i]
        assert np.array_equal(out.images[i], expected)
        assert rec["unet_evals"]["total"] == 4 + (12 if below else 0)


def test_budget_exact_editing_takes_the_lowest_scoring_edits_to_the_teacher(pipe):
    student = pipe.edit(IMAGES, CAPTIONS, mode="student", seed=1, score=True)
    teacher = pipe.edit(IMAGES, CAPTIONS, mode="teacher", seed=1)
    scores = np.array([r["student_score"] for r in student.records])
    # student 4 calls, teacher 12: a budget of 9 pays for floor(3 * 5 / 12) = 1 teacher edit of 3
    out = pipe.edit(IMAGES, CAPTIONS, mode="adaptive", budget=9.0, routing="budget-exact", seed=1)
    worst = int(np.argmin(scores))
    for i, rec in enumerate(out.records):
        assert rec["path"] == ("regenerated" if i == worst else "accepted")
        assert np.array_equal(out.images[i], teacher.images[i] if i == worst else student.images[i])
    assert out.summary["unet_evals_mean"] == pytest.approx(4 + 12 / 3) and out.summary["settings"]["routing"] == (
        "budget-exact")
    # one record schema for generation and editing: the common fields in order, then the edit's own
    from tandem.pipeline import RECORD_FIELDS

    for i, rec in enumerate(out.records):
        assert list(rec) == [*RECORD_FIELDS, "edit_strength", "start_timestep"]
        assert rec["vae"] == {"encode": 1, "decode": 2 if i == worst else 1} and rec["oracle_calls"] == 1


def test_edit_calibration_is_tied_to_its_strength(pipe):
    cal = pipe.calibrate_edits(IMAGES, CAPTIONS, strength=0.6, seed=2)
    out = pipe.edit(IMAGES, CAPTIONS, strength=0.6, percentile=50, calibration=cal, seed=2)
    assert out.records[0]["tau"] == pytest.approx(np.median(cal.scores))
    with pytest.raises(CalibrationMismatch, match="edit_strength"):
        pipe.edit(IMAGES, CAPTIONS, strength=0.4, percentile=50, calibration=cal)
    with pytest.raises(ValueError, match="edit calibration"):
        pipe.edit(IMAGES, CAPTIONS, strength=0.6, percentile=50)  # the generation calibration does not apply


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0.0), "strength"),
    (dict(strength=0.6, teacher_steps=700), "do not fit"),
    (dict(teacher_scheduler="ddim", mode="teacher"), "custom timesteps"),
    (dict(mode="refine-all"), "edit mode"),
])
def test_edit_rejects_bad_settings(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.edit(IMAGES, CAPTIONS, **{"accept_threshold": 0.0, **kwargs})


def test_edit_needs_one_image_per_prompt(pipe):
    with pytest.raises(ValueError, match="2 input images for 3 prompts"):
        pipe.edit(IMAGES[:2], CAPTIONS, mode="student")


def test_student_edit_schedules_follow_diffusers():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(10)
    assert edit_timesteps(ddim, 10, 0.6) == [int(t) for t in ddim.timesteps[4:]]
    from diffusers import DPMSolverMultistepScheduler
    assert teacher_edit_timesteps(DPMSolverMultistepScheduler(), 600, 4) == [600, 450, 300, 150]


# -- control -------------------------------------------------------------------------------------


def test_control_images_follow_the_spec():
    _, image, scene = make_example(7)
    mask = control_image(scene, "mask")[..., 0] > 0
    union = np.zeros_like(mask)
    for o in scene.objects:
        union |= object_mask(o.shape, o.cx, o.cy, o.radius)
    assert np.array_equal(mask, union)
    edges = control_image(scene, "edges")[..., 0] > 0
    assert edges.sum() < mask.sum() and not (edges & ~mask).any()
    o = scene.objects[0]
    x0, y0, x1, y1 = o.bbox
    if o.shape == "square":  # a square's edges are its box outline: 4 * 2r pixels
        assert edges[y0:y1 + 1, x0:x1 + 1].sum() == 8 * o.radius
    for kind in ("mask", "edges"):
        assert np.array_equal(control_from_image(image, kind), control_image(scene, kind))
        assert control_fidelity(image, control_image(scene, kind), kind) == 1.0
    assert control_fidelity(np.zeros_like(image), control_image(scene, "mask"), "mask") == 0.0


@pytest.fixture(scope="module")
def controlnet(pipe):
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(pipe.teacher.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    with torch.no_grad():  # non-zero residuals, so that the scale matters
        for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    return cn


def test_controlnet_at_scale_zero_changes_nothing(pipe, controlnet):
    controlled = pipe.with_controlnet(controlnet)
    masks = [control_image(s, "mask") for _, _, s in EXAMPLES]
    for mode in ("student", "teacher", "refine-all"):
        plain = pipe(CAPTIONS, mode=mode, seed=3, output_type="latent")
        zero = controlled(CAPTIONS, mode=mode, seed=3, output_type="latent", control_image=masks,
                          controlnet_conditioning_scale=0.0)
        torch.testing.assert_close(torch.cat(zero.images), torch.cat(plain.images), rtol=1e-4, atol=1e-4)
        one = controlled(CAPTIONS, mode=mode, seed=3, output_type="latent", control_image=masks)
        assert not torch.allclose(torch.cat(one.images), torch.cat(plain.images), atol=1e-3)


def test_controlnet_runs_beside_every_unet_call(pipe, controlnet):
    controlled = pipe.with_controlnet(controlnet)
    out = controlled(CAPTIONS, mode="refine-all", seed=0, control_image=control_image(EXAMPLES[0][2], "edges"))
    for rec in out.records:  # one control image for all prompts; the ControlNet sees every UNet row
        assert rec["controlnet_evals"] == rec["unet_evals"]["total"]
    assert out.summary["settings"]["controlnet_conditioning_scale"] == 1.0


def test_controlnet_drafts_are_one_draft_calls_with_each_drafts_generator(pipe, controlnet):
    """Drafts under a ControlNet: each prompt's control conditions every one of its drafts, and the kept draft's
    image is what a one-draft call draws with that draft's generator."""
    from tandem.pipeline.drafts import draft_generator

    controlled = pipe.with_controlnet(controlnet)
    masks = [control_image(s, "mask") for _, _, s in EXAMPLES]
    out = controlled(CAPTIONS, mode="student", drafts=2, seed=3, control_image=masks)
    for i, rec in enumerate(out.records):
        one = controlled([CAPTIONS[i]], mode="student", generator=[draft_generator(3, i, rec["draft"])],
                         control_image=[masks[i]])
        assert np.abs(out.images[i].astype(int) - one.images[0].astype(int)).max() <= 1
        assert rec["controlnet_evals"] == rec["unet_evals"]["total"]  # both drafts ran beside the ControlNet


def test_control_image_errors(pipe, controlnet):
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe(CAPTIONS, mode="student", control_image=IMAGES)
    controlled = pipe.with_controlnet(controlnet)
    with pytest.raises(ValueError, match="pass control_image"):
        controlled(CAPTIONS, mode="student")
    with pytest.raises(ValueError, match="2 control images for 3 prompts"):
        controlled(CAPTIONS, mode="student", control_image=IMAGES[:2])


# -- the experiments -------------------------------------------------------------------------------


def test_edit_experiment_composes_adaptive_points_and_writes_its_report(pipe, tmp_path):
    from tandem.eval.tasks import EditConfig, edit
    from tandem.world.edits import load_edits

    cfg = EditConfig(strengths=(0.5, 0.6), teacher_steps=(2,), main_teacher_steps=(2, 3), main_student_steps=(2,),
                     ks=(0, 50, 100))
    results = edit(pipe, load_edits("test")[:4], tmp_path, cfg=cfg, batch_size=4, log=str,
                   calibration_cases=load_edits("val")[:4])
    main = {p["label"]: p for p in results["points"] if p["strength"] == 0.6}
    assert {"student4", "student2", "dpm2", "dpm3"} <= set(main)
    # k = 0 is the student alone; every adaptive point costs the student plus its share of the teacher
    assert main["adaptive regenerate dpm2 k=0"]["accuracy"] == main["student4"]["accuracy"]
    for label, p in main.items():
        if label.startswith("adaptive regenerate dpm2 k="):
            assert p["unet_evals_mean"] == pytest.approx(4 + p["share_improved"] * 4)
        if label.startswith("adaptive"):
            assert 0 < p["preservation"] <= 1
    assert set(results["acceptance"]) == {"dpm2", "dpm3"}
    assert [r["strength"] for r in results["curves"]["student"]] == [0.5, 0.6]
    for name in ("report.md", "results.json", "edit_quality_vs_cost.png", "edit_preservation_vs_quality.png"):
        assert (tmp_path / name).exists()


def test_control_experiment_scores_fidelity_against_its_masks(pipe, controlnet, tmp_path):
    from tandem.eval.tasks import ControlConfig, control

    controlled = pipe.with_controlnet(controlnet)
    prompts = ["a red circle", "a large blue square at the top left", "a green triangle"]
    results = control(controlled, prompts, "mask", tmp_path, cfg=ControlConfig(teacher_steps=(2,), refine_steps=2,
                                                                                refine_sigmas=(0.5,), ks=(0, 50, 100)),
                      batch_size=3, log=str, calibration_prompts=prompts)
    labels = {p["label"]: p for p in results["points"]}
    assert {"student4", "dpm2", "refine_dpm2_sigma0.5"} <= set(labels)
    assert all(0 <= p["fidelity"] <= 1 for p in results["points"])
    refine = [p for p in results["points"] if p["family"] == "adaptive refine sigma 0.5"]
    assert [p["k"] for p in refine] == [0, 50, 100]
    # tau comes from these same prompts: at k = 50 the lower half of their student scores is refined
    assert refine[1]["share_improved"] == pytest.approx(1 / 3)
    assert (tmp_path / "control_quality_vs_cost.png").exists() and "Acceptance" in (tmp_path / "report.md").read_text()
