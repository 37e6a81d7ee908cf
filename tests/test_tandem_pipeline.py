"""The adaptive teacher-student pipeline against independent references: diffusers' own
text-to-image and image-to-image pipelines on the same latents and generators, the closed form
of Algorithm 1's rollback, and hand-counted costs. Runs on the shipped world (its student and
teacher), with a stand-in oracle (mean brightness) where only the plumbing is under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)
from worldtools import PROMPTS, world_pipeline

from tandem.calibration import Calibration, CalibrationMismatch, percentile_k_for_budget
from tandem.generate import (
    StudentSettings,
    TeacherSettings,
    _to_uint8,
    generate_student,
    generate_teacher,
    initial_latents,
    prompt_generator,
)
from tandem.loaders import load_student
from tandem.pipeline import RECORD_FIELDS, generate_alone, refine_schedule


@pytest.fixture(scope="module")
def pipe():
    return world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=4, teacher_guidance_scale=4.5,
                          teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.6)


def test_shares_components_with_the_teacher(pipe):
    assert pipe.student.vae is pipe.teacher.vae and pipe.student.text_encoder is pipe.teacher.text_encoder
    assert pipe.teacher_img2img.unet is pipe.teacher.unet
    assert pipe.student.unet is not pipe.teacher.unet


def test_student_and_teacher_modes_match_the_plain_generators(pipe):
    out = pipe(PROMPTS, mode="student", seed=3, batch_size=4)
    ref = generate_student(pipe.student, PROMPTS, StudentSettings(2, 6.0), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(out.images, ref))
    assert {r["path"] for r in out.records} == {"student"}
    assert [r["unet_evals"]["total"] for r in out.records] == [2.0] * len(PROMPTS)

    out = pipe(PROMPTS[:3], mode="teacher", teacher_steps=3, seed=3)
    ref = generate_teacher(pipe.teacher, PROMPTS[:3], TeacherSettings(3, "dpm", 4.5), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(out.images, ref))
    assert [r["unet_evals"]["teacher"] for r in out.records] == [6.0] * 3  # 3 steps, CFG doubles the batch


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_a_model_alone_writes_the_pipelines_records(pipe, mode):
    """generate_alone (``tandem generate --mode teacher|student`` run directly) draws the plain generators'
    images and gives them the records the pipeline's own mode does, costs included, at another batch size."""
    if mode == "student":
        model, settings, kwargs = pipe.student, StudentSettings(2, 6.0), {}
    else:
        model, settings, kwargs = pipe.teacher, TeacherSettings(3, "dpm", 4.5), {"teacher_steps": 3}
    prompts, done = PROMPTS[:5], []
    alone = generate_alone(model, prompts, settings, seed=4, batch_size=2, on_batch=done.append)
    ours = pipe(prompts, mode=mode, seed=4, batch_size=5, **kwargs)
    plain = (generate_student if mode == "student" else generate_teacher)(model, prompts, settings, seed=4,
                                                                         batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(alone.images, plain, strict=True))
    assert done == [2, 4, 5]
    assert alone.records == ours.records
    assert [list(r) for r in alone.records] == [list(RECORD_FIELDS)] * 5
    per_image = 2.0 if mode == "student" else 6.0  # the student's w-embedding; the teacher's CFG doubles
    assert [r["unet_evals"][mode] for r in alone.records] == [per_image] * 5
    assert alone.summary["paths"] == {mode: 5} and alone.summary["unet_evals_mean"] == per_image


@pytest.mark.parametrize("noise", ["stochastic", "deterministic"])
def test_a_consistency_student_alone_draws_its_noise(noise):
    """A consistency student alone draws the images of generate_student (tandem's own sampler) with either noise:
    the stochastic through diffusers' pipeline, as the pipeline's mode="student" does, the deterministic (which
    diffusers' pipeline lacks) through the sampler; the two noises draw different images."""
    cd, prompts = load_student("cd"), PROMPTS[:3]
    other_noise = "deterministic" if noise == "stochastic" else "stochastic"
    settings, other = StudentSettings(4, 6.0, noise), StudentSettings(4, 6.0, other_noise)
    alone = generate_alone(cd, prompts, settings, seed=4, batch_size=2)
    plain = generate_student(cd, prompts, settings, seed=4, batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(alone.images, plain, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(alone.images, generate_student(cd, prompts, other, seed=4)))
    assert alone.summary["settings"]["noise"] == noise


def test_regeneration_is_the_teacher_from_the_students_noise(pipe):
    out = pipe(PROMPTS[:3], strategy="regenerate", accept_threshold=float("inf"), teacher_steps=3, seed=5)
    ref = generate_teacher(pipe.teacher, PROMPTS[:3], TeacherSettings(3, "dpm", 4.5), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(out.images, ref))
    assert {r["path"] for r in out.records} == {"regenerated"}
    assert [r["unet_evals"]["total"] for r in out.records] == [2.0 + 6.0] * 3


def test_strength_refinement_equals_diffusers_img2img(pipe):
    """The official code's convention: the same latents, generators and strength through diffusers'
    own img2img pipeline give the same images."""
    prompts, seed = PROMPTS[:4], 11
    out = pipe(prompts, mode="refine-all", rollback_convention="strength", rollback_sigma=0.5,
               teacher_steps=8, seed=seed)
    gens = [prompt_generator(seed, i) for i in range(len(prompts))]
    noise = initial_latents(pipe.student, seed, list(range(len(prompts))), gens)
    student = pipe.student(prompts, num_inference_steps=2, guidance_scale=6.0, latents=noise, generator=gens,
                           output_type="latent").images
    img2img = StableDiffusionImg2ImgPipeline(**pipe.teacher.components)
    img2img.scheduler = DPMSolverMultistepScheduler.from_config(pipe.teacher.scheduler.config,
                                                                algorithm_type="dpmsolver++", solver_order=2)
    ref = img2img(prompts, image=student, strength=0.5, num_inference_steps=8, guidance_scale=4.5,
                  generator=gens, output_type="np").images
    assert all(np.array_equal(a, b) for a, b in zip(out.images, _to_uint8(ref)))
    assert [r["teacher_steps_run"] for r in out.records] == [4] * 4
    assert [r["unet_evals"]["teacher"] for r in out.records] == [8.0] * 4


def test_paper_rollback_starts_from_the_closed_form(pipe):
    """Algorithm 1: the teacher's first input is sqrt(1 - s) x + sqrt(s) z with s the realised sigma,
    z the next draw of the image's own generator after the student's; the teacher runs exactly
    teacher_steps steps."""
    prompts, seed, sigma = PROMPTS[:2], 2, 0.6
    first_inputs = []
    hook = pipe.teacher.unet.register_forward_pre_hook(
        lambda m, args, kwargs: first_inputs.append(args[0].clone()), with_kwargs=True)
    try:
        out = pipe(prompts, mode="refine-all", rollback_sigma=sigma, teacher_steps=4, seed=seed,
                   output_type="latent")
    finally:
        hook.remove()
    assert len(first_inputs) == 4  # one call per step for the batch
    gens = [prompt_generator(seed, i) for i in range(2)]
    noise = initial_latents(pipe.student, seed, [0, 1], gens)
    x = pipe.student(prompts, num_inference_steps=2, guidance_scale=6.0, latents=noise, generator=gens,
                     output_type="latent").images
    z = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
    s = out.records[0]["rollback_sigma"]
    assert abs(s - sigma) < 0.05  # 4 steps: the nearest start the sampler's schedules offer
    expected = (1 - s) ** 0.5 * x + s ** 0.5 * z
    x_in = first_inputs[0][:2]  # the CFG batch is [unconditional, conditional]
    torch.testing.assert_close(x_in, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first_inputs[0][2:], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, DDIMScheduler, UniPCMultistepScheduler])
@pytest.mark.parametrize("sigma", [0.3, 0.55, 0.8])
def test_paper_schedule_hits_the_rollback(pipe, scheduler_cls, sigma):
    sched = scheduler_cls.from_config(pipe.teacher.scheduler.config)
    plan = refine_schedule(sched, 10, sigma)
    assert plan.steps == 10 and abs(plan.sigma - sigma) < 0.03
    sched.set_timesteps(plan.num_inference_steps)
    run = min(int(plan.num_inference_steps * plan.strength), plan.num_inference_steps)
    assert run == 10 and int(sched.timesteps[plan.num_inference_steps - run]) == plan.start_timestep
    alpha_bar = float(sched.alphas_cumprod[plan.start_timestep])
    assert plan.sigma == pytest.approx(1 - alpha_bar)


def test_an_image_does_not_depend_on_its_batch(pipe):
    """Same seed, other batch sizes and other company: the same decisions and the same latents up to the
    float rounding of batched CPU kernels (a batch of 4 and of 1 sum in other orders, ~1e-5)."""
    scores = [r["student_score"] for r in pipe(PROMPTS, mode="student", seed=7, score=True).records]
    tau = float(np.median(scores))
    full = pipe(PROMPTS, accept_threshold=tau, seed=7, batch_size=4, output_type="latent")
    ones = pipe(PROMPTS, accept_threshold=tau, seed=7, batch_size=1, output_type="latent")
    paths = [r["path"] for r in full.records]
    assert paths == [r["path"] for r in ones.records]
    assert "accepted" in paths and "refined" in paths, paths  # both branches ran
    for a, b in zip(full.images, ones.images):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # Generators passed explicitly: a prompt keeps its image in another company.
    alone = pipe([PROMPTS[3]], accept_threshold=tau, generator=[prompt_generator(7, 3)], output_type="latent")
    assert alone.records[0]["path"] == paths[3]
    torch.testing.assert_close(alone.images[0], full.images[3], atol=1e-4, rtol=0)
    other_seed = pipe([PROMPTS[3]], accept_threshold=tau, seed=8, output_type="latent")
    assert (other_seed.images[0] - full.images[3]).abs().max() > 0.1


def test_adaptive_accepts_above_tau_and_costs_add_up(pipe):
    scores = [r["student_score"] for r in pipe(PROMPTS, mode="student", seed=7, score=True).records]
    tau = float(np.median(scores))
    out = pipe(PROMPTS, accept_threshold=tau, seed=7)
    for r in out.records:
        assert (r["path"] == "accepted") == (r["student_score"] >= tau)
        assert r["tau"] == tau and r["oracle_calls"] == 1
        assert r["unet_evals"]["total"] == (2.0 if r["path"] == "accepted" else 2.0 + 8.0)
        assert r["vae"]["decode"] == (1 if r["path"] == "accepted" else 2)
    share = np.mean([r["path"] == "refined" for r in out.records])
    assert 0 < share < 1
    assert out.summary["unet_evals_mean"] == pytest.approx(2 + share * 8)
    accepted = [i for i, r in enumerate(out.records) if r["path"] == "accepted"]
    assert all(np.array_equal(out.images[i], out.student_images[i]) for i in accepted)


def test_percentile_and_budget_come_from_a_matching_calibration(pipe):
    calib = pipe.calibrate(PROMPTS, seed=1)
    assert len(calib.scores) == len(PROMPTS)
    scores = np.array([pipe(PROMPTS, mode="student", seed=1, score=True).records[i]["student_score"]
                       for i in range(len(PROMPTS))])
    assert calib.threshold(50) == pytest.approx(np.percentile(scores, 50))
    pipe.calibration = calib
    try:
        out = pipe(PROMPTS, percentile=50, seed=1)
        assert out.records[0]["tau"] == pytest.approx(np.percentile(scores, 50))
        # budget 2 + 0.25 * 8 = 4 UNet evaluations -> k = 25
        out = pipe(PROMPTS, budget=4.0, seed=1)
        assert out.summary["settings"]["percentile"] == pytest.approx(25.0)
        with pytest.raises(CalibrationMismatch, match="student_steps"):
            pipe(PROMPTS, percentile=50, num_inference_steps=3)
        with pytest.raises(ValueError, match="below the student's own cost"):
            pipe(PROMPTS, budget=1.0)
        with pytest.raises(ValueError, match="exactly one"):
            pipe(PROMPTS, percentile=50, accept_threshold=0.1)
    finally:
        pipe.calibration = None
    with pytest.raises(ValueError, match="needs a calibration"):
        pipe(PROMPTS, percentile=50)


@pytest.mark.parametrize("strategy, budget", [("regenerate", 5.0), ("refine", 4.0)])
def test_budget_exact_routing_sends_the_lowest_scores_the_budget_pays_for(pipe, strategy, budget):
    # one image per call, so that no batch's float rounding differs between the runs compared
    student = pipe(PROMPTS, mode="student", seed=1, score=True, batch_size=1)
    scores = np.array([r["student_score"] for r in student.records])
    improved = pipe(PROMPTS, mode="teacher" if strategy == "regenerate" else "refine-all", seed=1, batch_size=1)
    out = pipe(PROMPTS, budget=budget, routing="budget-exact", strategy=strategy, seed=1, batch_size=1)
    # student 2 calls, improvement 8 (4 guided teacher steps; refinement runs 4 steps from the rollback):
    # 6 images * budget pays for floor(6 * (budget - 2) / 8) improvements
    m = int(6 * (budget - 2) // 8)
    lowest = set(np.argsort(scores, kind="stable")[:m].tolist())
    assert 0 < m < len(PROMPTS) and len(lowest) == m
    for i, rec in enumerate(out.records):
        assert rec["path"] == (("regenerated" if strategy == "regenerate" else "refined") if i in lowest else "accepted")
        expected = improved.images[i] if i in lowest else student.images[i]
        assert np.array_equal(out.images[i], expected)
        assert rec["tau"] is None and rec["student_score"] == pytest.approx(scores[i])
    assert out.summary["unet_evals_mean"] <= budget
    assert out.summary["unet_evals_mean"] == pytest.approx(2 + 8 * m / 6)
    assert out.summary["settings"]["routing"] == "budget-exact" and out.summary["settings"]["percentile"] is None
    everything = pipe(PROMPTS, budget=100.0, routing="budget-exact", seed=1)
    assert everything.summary["share_improved"] == 1.0
    assert pipe(PROMPTS, budget=2.0, routing="budget-exact", seed=1).summary["share_improved"] == 0.0


def test_budget_exact_routing_refuses_what_it_cannot_do(pipe):
    with pytest.raises(ValueError, match="takes budget"):
        pipe(PROMPTS, routing="budget-exact")
    with pytest.raises(ValueError, match="neither accept_threshold nor percentile"):
        pipe(PROMPTS, routing="budget-exact", budget=4.0, percentile=50)
    with pytest.raises(ValueError, match="below the student's own cost"):
        pipe(PROMPTS, routing="budget-exact", budget=1.0)
    with pytest.raises(ValueError, match="applies to mode='adaptive'"):
        pipe(PROMPTS, mode="student", routing="budget-exact")
    with pytest.raises(ValueError, match="unknown routing"):
        pipe(PROMPTS, routing="cheapest")
    with pytest.raises(TypeError, match="routing"):  # mixed rollouts route nothing: pipe.mixed takes no routing
        pipe.mixed(PROMPTS, teacher_prob=0.5, routing="threshold")


def test_budget_formula_matches_the_paper():
    assert percentile_k_for_budget(15, 5, 20) == pytest.approx(50)  # 5 + 0.5 * 20 = 15
    assert percentile_k_for_budget(100, 5, 20) == 100
    with pytest.raises(ValueError, match="below"):
        percentile_k_for_budget(4, 5, 20)


def test_calibration_file_round_trip_and_no_silent_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    calib = Calibration(rng.normal(size=600), {"student_steps": 4, "scorer": {"kind": "x"}}, {"seed": 0})
    path = tmp_path / "calib.json"
    calib.save(path)
    with pytest.raises(FileExistsError):
        calib.save(path)
    back = Calibration.load(path)
    assert back.threshold(37) == pytest.approx(np.percentile(calib.scores, 37))
    back.check({"student_steps": 4, "scorer": {"kind": "x"}})
    with pytest.raises(CalibrationMismatch, match="scorer.kind"):
        back.check({"student_steps": 4, "scorer": {"kind": "y"}})
    # a local load path is not compared (digests identify the weights); a hub id is
    hub = Calibration(calib.scores, {"scorer": {"source": "org/a", "revision": None, "path": "/one"}})
    hub.check({"scorer": {"source": "org/a", "revision": None, "path": "/elsewhere"}})
    with pytest.raises(CalibrationMismatch, match="scorer.source"):
        hub.check({"scorer": {"source": "org/b", "revision": None, "path": "/one"}})
    rows = back.convergence(sizes=(50, 500), ks=(50,), resamples=2000)
    assert rows[0]["tau_std"] > rows[1]["tau_std"] > 0  # more prompts, a steadier threshold
    # the median of n standard-normal draws has standard deviation sqrt(pi / 2) / sqrt(n), asymptotically
    assert rows[1]["tau_std"] == pytest.approx(np.sqrt(np.pi / 2 / 500), rel=0.2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tandem calibration"):
        Calibration.load(tmp_path / "bad.json")


def test_bad_arguments_are_named(pipe):
    for kwargs, needle in ((dict(mode="fast"), "unknown mode"), (dict(strategy="x", accept_threshold=0), "strategy"),
                           (dict(rollback_sigma=1.5, mode="refine-all"), "rollback sigma"),
                           (dict(mode="student", percentile=50), "apply to mode='adaptive'"),
                           (dict(generator=[prompt_generator(0, 0)] * 2, mode="student"), "one per prompt"),
                           (dict(output_type="jpeg"), "output_type")):
        with pytest.raises(ValueError, match=needle):
            pipe(PROMPTS[:1], **kwargs)
