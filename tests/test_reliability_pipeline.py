"""The library side of bad input and broken models: NaN and infinity refused wherever numbers are
taken, before any model runs; step counts the sampler cannot take refused with the limit; a model
whose weights hold NaN stops the run instead of returning black images; malformed calibration files
and model directories named with what is wrong; user text in messages cut to a readable length.

Each refusal is checked through the Python API (TandemPipeline, generate_teacher/_student,
Calibration.load, resolve_model) on the tiny random world, and once per kind through
``tandem.cli.main`` (exit status 2, one stderr line naming the problem)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from clitools import assert_user_error, tandem_in_process
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from tandem.calibration import FORMAT, Calibration
from tandem.checks import NonFiniteError, check_finite, sampler_step_limit
from tandem.distill.consistency import make_student_unet
from tandem.generate import (
    StudentSettings,
    TeacherSettings,
    generate_student,
    generate_teacher,
    prompt_generator,
)
from tandem.loaders import load_student
from tandem.models import load_teacher_pipeline, resolve_model, world_dir
from tandem.pipeline import TandemPipeline, refine_schedule
from tandem.world.grammar import CaptionError, parse_caption

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a green triangle", "a small blue square"]
A = PROMPTS[0]
NAN, INF = float("nan"), float("inf")


class Brightness:
    """A stand-in oracle: mean pixel value; NaN for the prompt ``broken`` (a broken oracle)."""

    def __init__(self, broken: str | None = None):
        self.broken = broken

    def __call__(self, images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor([p == self.broken for p in prompts]), torch.tensor(NAN), scores)

    def fingerprint(self):
        return {"kind": "brightness"}


def tiny_pipeline(world, scorer=None) -> TandemPipeline:
    """The tiny world's teacher, and a consistency student made from its UNet (fresh modules each call)."""
    teacher = load_teacher_pipeline(resolve_model(str(world)))
    torch.manual_seed(1)
    unet = make_student_unet(teacher.unet, 16)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    student = LatentConsistencyModelPipeline(
        vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(teacher.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return TandemPipeline(student, teacher, scorer or Brightness(),
                          defaults={"num_inference_steps": 2, "guidance_scale": 3.0, "teacher_steps": 3,
                                        "teacher_guidance_scale": 3.0, "rollback_sigma": 0.6})


@pytest.fixture(scope="module")
def pipe(tiny_world):
    return tiny_pipeline(tiny_world)


def fill_nan(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(NAN)


class ModelCalls:
    """Counts forward calls of the pipeline's networks (UNets, VAE, text encoder)."""

    def __init__(self, pipe: TandemPipeline):
        modules = [pipe.student.unet, pipe.teacher.unet, pipe.student.vae, pipe.student.text_encoder]
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.hook) for m in modules]

    def hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for h in self.handles:
            h.remove()


def cli(capsys, monkeypatch, *args):
    return tandem_in_process(capsys, monkeypatch, *args)


# ---------------------------------------------------------------------------------------------
# 8. NaN and infinity: refused before any model runs, and caught where a model produces them


@pytest.mark.parametrize("kwargs, names", [
    ({"guidance_scale": INF, "mode": "student"}, ["guidance_scale", "finite", "inf"]),
    ({"guidance_scale": NAN, "mode": "student"}, ["guidance_scale", "finite", "nan"]),
    ({"guidance_scale": -1.0, "mode": "student"}, ["guidance_scale", ">= 0"]),
    ({"teacher_guidance_scale": INF, "mode": "teacher"}, ["teacher_guidance_scale", "finite"]),
    ({"rollback_sigma": NAN, "mode": "refine-all"}, ["rollback_sigma", "finite"]),
    ({"rollback_sigma": NAN, "strategy": "regenerate", "accept_threshold": 0.5}, ["rollback_sigma", "finite"]),
    ({"accept_threshold": NAN}, ["accept_threshold", "nan"]),
    ({"percentile": NAN}, ["percentile", "finite"]),
    ({"percentile": 150}, ["percentile", "[0, 100]", "150"]),
    ({"percentile": -INF}, ["percentile", "finite"]),
    ({"budget": NAN}, ["budget", "finite"]),
    ({"budget": INF}, ["budget", "finite"]),
    ({"budget": 0}, ["budget", "> 0"]),
    ({"num_inference_steps": INF, "mode": "student"}, ["num_inference_steps", "whole number", "inf"]),
    ({"num_inference_steps": 2.5, "mode": "student"}, ["num_inference_steps", "2.5"]),
    ({"teacher_steps": INF, "mode": "teacher"}, ["teacher_steps", "inf"]),
    ({"seed": -1, "mode": "student"}, ["seed", ">= 0", "-1"]),
    ({"batch_size": NAN, "mode": "student"}, ["batch_size", "nan"]),
    ({"mode": "student", "controlnet_conditioning_scale": NAN}, ["controlnet_conditioning_scale", "finite"]),
])
def test_call_refuses_non_finite_numbers_before_any_model_runs(pipe, kwargs, names):
    with ModelCalls(pipe) as calls, pytest.raises(ValueError) as info:
        pipe(PROMPTS, **kwargs)
    assert calls.calls == 0, "a model ran before the bad argument was refused"
    for name in names:
        assert name in str(info.value), str(info.value)


def test_percentile_and_budget_are_checked_even_with_a_calibration(pipe):
    """Without the checks, budget=nan gave k = min(100, nan) = 100 and every image went to the teacher."""
    pipe.calibration = pipe.calibrate(PROMPTS, seed=0)
    try:
        assert pipe(PROMPTS, budget=2 + 6 * 0.5).summary["settings"]["percentile"] == pytest.approx(50)
        for kwargs, name in (({"budget": NAN}, "budget"), ({"percentile": INF}, "percentile")):
            with ModelCalls(pipe) as calls, pytest.raises(ValueError, match=name):
                pipe(PROMPTS, **kwargs)
            assert calls.calls == 0
    finally:
        pipe.calibration = None


@pytest.mark.parametrize("method, kwargs, name", [
    ("edit", {"strength": NAN}, "strength"),
    ("edit", {"guidance_scale": INF, "mode": "student"}, "guidance_scale"),
    ("edit", {"teacher_guidance_scale": NAN, "mode": "teacher"}, "teacher_guidance_scale"),
    ("edit", {"accept_threshold": NAN}, "accept_threshold"),
    ("calibrate", {"guidance_scale": NAN}, "guidance_scale"),
    ("calibrate", {"num_inference_steps": INF}, "num_inference_steps"),
    ("calibrate_edits", {"strength": INF}, "strength"),
    ("calibrate_edits", {"guidance_scale": NAN}, "guidance_scale"),
])
def test_edit_and_calibration_refuse_non_finite_numbers(pipe, method, kwargs, name):
    image = np.zeros((32, 32, 3), np.uint8)
    args = (PROMPTS,) if method == "calibrate" else (image, PROMPTS)
    with ModelCalls(pipe) as calls, pytest.raises(ValueError, match=name):
        getattr(pipe, method)(*args, **kwargs)
    assert calls.calls == 0


@pytest.mark.parametrize("make", [
    lambda: TeacherSettings(steps=3, guidance_scale=NAN),
    lambda: TeacherSettings(steps=3, guidance_scale=INF),
    lambda: TeacherSettings(steps=INF),
    lambda: StudentSettings(steps=2, guidance_scale=INF),
    lambda: StudentSettings(steps=2, guidance_scale=NAN),
    lambda: StudentSettings(steps=NAN),
])
def test_generation_settings_refuse_non_finite_numbers(make):
    with pytest.raises(ValueError, match="guidance scale|steps"):
        make()


def test_nan_student_weights_stop_the_run(tiny_world):
    """Without the check, the NaN latents decode to black images (uint8 0) and the run succeeds."""
    broken = tiny_pipeline(tiny_world)
    fill_nan(broken.student.unet)
    with pytest.raises(NonFiniteError, match=r"the student's latents are not finite \(NaN/inf\) for prompts 0, 1, 2"):
        broken(PROMPTS, mode="student")
    with pytest.raises(NonFiniteError, match="the student's latents"):
        broken(PROMPTS, accept_threshold=0.5)
    with pytest.raises(NonFiniteError, match="the student's latents"):
        generate_student(broken.student, PROMPTS, StudentSettings(2, 3.0), seed=0)
    # the teacher alone does not use the student
    assert len(broken(PROMPTS, mode="teacher").images) == 3


def test_nan_teacher_weights_stop_the_run_in_every_teacher_path(tiny_world):
    broken = tiny_pipeline(tiny_world)
    fill_nan(broken.teacher.unet)
    for kwargs in ({"mode": "teacher"}, {"mode": "refine-all"}, {"accept_threshold": INF},
                   {"accept_threshold": INF, "strategy": "regenerate"}):
        with pytest.raises(NonFiniteError, match="the teacher's latents are not finite"):
            broken(PROMPTS, **kwargs)
    with pytest.raises(NonFiniteError, match="the teacher's latents"):
        generate_teacher(broken.teacher, PROMPTS, TeacherSettings(3, "dpm", 3.0), seed=0)
    with pytest.raises(NonFiniteError, match="the teacher's latents"):
        broken.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS, mode="teacher", teacher_steps=3)
    # images the oracle accepts never reach the teacher
    assert {r["path"] for r in broken(PROMPTS, accept_threshold=-INF).records} == {"accepted"}


def test_a_nan_vae_decoder_stops_the_run(tiny_world):
    broken = tiny_pipeline(tiny_world)
    fill_nan(broken.student.vae.decoder)
    with pytest.raises(NonFiniteError, match="the VAE's decoded images are not finite"):
        broken(PROMPTS, mode="student")
    with pytest.raises(NonFiniteError, match="the VAE's decoded images"):
        generate_teacher(broken.teacher, PROMPTS, TeacherSettings(2, "dpm", 3.0), seed=0)


def test_a_nan_score_names_its_prompt_across_batches(tiny_world):
    """A NaN score compares false with tau: without the check the image is silently accepted."""
    prompts = [*PROMPTS, "a white circle"]
    broken = tiny_pipeline(tiny_world, Brightness(broken="a white circle"))
    with pytest.raises(NonFiniteError, match=r"the oracle's scores are not finite \(NaN/inf\) for prompt 3:"):
        broken(prompts, accept_threshold=0.5, batch_size=2)


def test_check_finite_names_the_prompt_of_each_bad_row():
    x = torch.zeros(4, 2, 3)
    check_finite(x, "x")
    x[1, 0, 2], x[3, 1, 1] = NAN, -INF
    with pytest.raises(NonFiniteError, match=r"x are not finite \(NaN/inf\) for prompts 11, 13:"):
        check_finite(x, "x", indices=[10, 11, 12, 13])


def test_cli_nan_weights_are_an_error_not_black_images(tiny_world, tmp_path, capsys, monkeypatch):
    world = tmp_path / "nan-world"
    shutil.copytree(tiny_world, world)
    unet = UNet2DConditionModel.from_pretrained(world / "unet")
    fill_nan(unet)
    unet.save_pretrained(world / "unet")
    out = tmp_path / "out"
    result = cli(capsys, monkeypatch, "generate", A, "--model", world, "--teacher-steps", 2, "--out", out)
    assert_user_error(result, "the teacher's latents are not finite", "prompt 0")
    assert not list(tmp_path.glob("out*/*.png")), "an image of the broken run was written"


# ---------------------------------------------------------------------------------------------
# 9. Steps: no more than the sampler can take, refused before any model runs


@pytest.mark.parametrize("scheduler_cls, kwargs, limit", [
    (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, 999),
    (UniPCMultistepScheduler, {}, 999),
    (DDIMScheduler, {}, 1000),
    (LCMScheduler, {}, 50),
])
def test_the_step_limit_is_where_diffusers_schedules_stop_being_distinct(tiny_world, scheduler_cls, kwargs, limit):
    """Against diffusers' own timesteps: at the limit every step has its own timestep inside the training
    range; one more repeats a timestep (DPM-Solver++ then divides by a zero step: a black image) or is
    refused by diffusers itself."""
    config = dict(load_teacher_pipeline(resolve_model(str(tiny_world))).scheduler.config)
    sched = scheduler_cls.from_config(config, **kwargs)
    assert sampler_step_limit(sched) == limit
    sched.set_timesteps(limit)
    ts = sched.timesteps.tolist()
    assert len(set(ts)) == len(ts) == limit and 0 <= min(ts) and max(ts) < 1000
    try:
        sched.set_timesteps(limit + 1)
    except ValueError:
        return
    ts = sched.timesteps.tolist()
    assert len(set(ts)) < limit + 1 or max(ts) >= 1000


@pytest.mark.parametrize("call, names", [
    (lambda p: p(PROMPTS, mode="teacher", teacher_steps=1001), ["teacher_steps", "at most 999", "1001"]),
    (lambda p: p(PROMPTS, mode="teacher", teacher_steps=1000), ["teacher_steps", "at most 999", "1000"]),
    (lambda p: p(PROMPTS, mode="teacher", teacher_steps=5000, teacher_scheduler="ddim"),
     ["teacher_steps", "at most 1000", "5000"]),
    (lambda p: p(PROMPTS, accept_threshold=0.5, strategy="regenerate", teacher_steps=1500), ["teacher_steps", "999"]),
    (lambda p: p(PROMPTS, mode="refine-all", teacher_steps=1001), ["teacher_steps", "999"]),
    (lambda p: p(PROMPTS, mode="refine-all", teacher_steps=1001, rollback_convention="strength"),
     ["teacher_steps", "999"]),
    (lambda p: p(PROMPTS, mode="student", num_inference_steps=51), ["num_inference_steps", "at most 50", "distillation"]),
    (lambda p: p.calibrate(PROMPTS, num_inference_steps=1001), ["num_inference_steps", "at most 50"]),
    (lambda p: p.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS, mode="student", num_inference_steps=51),
     ["num_inference_steps", "at most 50"]),
    (lambda p: p.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS, mode="student", num_inference_steps=40,
                      strength=0.5), ["40 student steps", "at most 25"]),
    (lambda p: p.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS, mode="teacher", teacher_steps=1001, strength=1.0),
     ["1001 teacher steps"]),
    (lambda p: generate_teacher(p.teacher, PROMPTS, TeacherSettings(1001, "unipc", 3.0), seed=0),
     ["teacher steps", "at most 999", "1001"]),
    (lambda p: generate_student(p.student, PROMPTS, StudentSettings(51, 3.0), seed=0), ["student steps", "at most 50"]),
])
def test_too_many_steps_are_refused_before_any_model_runs(pipe, call, names):
    with ModelCalls(pipe) as calls, pytest.raises(ValueError) as info:
        call(pipe)
    assert calls.calls == 0
    for name in names:
        assert name in str(info.value), str(info.value)


def test_refinement_never_stretches_past_the_step_limit(pipe):
    """A tiny rollback asks for the longest schedule; it stays one diffusers runs with distinct timesteps."""
    sched = DPMSolverMultistepScheduler.from_config(pipe.teacher.scheduler.config, algorithm_type="dpmsolver++")
    plan = refine_schedule(sched, 10, 0.001)
    assert plan.num_inference_steps <= 999
    sched.set_timesteps(plan.num_inference_steps)
    last = sched.timesteps[-plan.steps:].tolist()
    assert len(set(last)) == plan.steps and last[0] == plan.start_timestep


def test_cli_teacher_steps_past_the_limit(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    result = cli(capsys, monkeypatch, "generate", A, "--model", tiny_world, "--teacher-steps", 1500, "--out", out)
    assert_user_error(result, "teacher steps", "at most 999", "1500")
    assert not list(tmp_path.glob("out*/*.png"))


# ---------------------------------------------------------------------------------------------
# 11. What the batch changes: the float rounding of a batch's shape, never the other images in it


@pytest.mark.parametrize("mode", ["student", "teacher", "refine-all"])
def test_an_image_depends_on_its_batch_shape_not_on_its_company(pipe, mode):
    """The guarantee the batch size can keep (measured on the shipped world: another batch size moves a
    pixel by at most 1/255): in a batch of the same size, another position and other prompts beside it
    leave an image's latents bitwise equal."""
    kwargs = {"mode": mode, "output_type": "latent", "batch_size": 3}
    first = [A, "a white circle", "a large cyan square"]  # "a red circle" first ...
    gens = [prompt_generator(0, 0), prompt_generator(0, 1), prompt_generator(0, 2)]
    a = pipe(first, generator=gens, **kwargs).images[0]
    second = ["an orange triangle at the top", "a purple circle", A]  # ... then last, among other prompts
    gens = [prompt_generator(0, 7), prompt_generator(0, 8), prompt_generator(0, 0)]
    b = pipe(second, generator=gens, **kwargs).images[2]
    assert torch.equal(a, b)
    alone = pipe([A], generator=[prompt_generator(0, 0)], **kwargs).images[0]  # another shape: rounding only
    torch.testing.assert_close(alone, a, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# 12 and 17. Malformed calibration files and model directories; long user text in messages


def calibration_json(**changes) -> dict:
    good = Calibration(np.linspace(0, 1, 11), {"student_steps": 4}, {"seed": 0}).to_json()
    return {k: v for k, v in {**good, **changes}.items() if v is not ...}


@pytest.mark.parametrize("content, names", [
    (calibration_json(scores=...), ["has no 'scores'"]),
    (calibration_json(fingerprint=None), ["'fingerprint' must be an object, got null"]),
    (calibration_json(fingerprint=...), ["has no 'fingerprint'"]),
    (calibration_json(scores={"0": 1}), ["'scores' must be a list of numbers, got an object"]),
    (calibration_json(scores=[]), ["'scores' is empty"]),
    (calibration_json(scores=[0.1, "0.2", 0.3]), ["'scores'[1] must be a number, got a string"]),
    (calibration_json(scores=[0.1, None]), ["'scores'[1] must be a number, got null"]),
    (calibration_json(config=[1]), ["'config' must be an object, got a list"]),
    (calibration_json(n=12), ["'n' is 12 but 'scores' holds 11"]),
    (calibration_json(percentiles={"50": 0.9}), ["'percentiles'['50'] is 0.9 but its scores give 0.5"]),
    (f'{{"format": "{FORMAT}", "fingerprint": {{}}, "scores": [0.1, NaN]}}', ["'scores'[1] is nan"]),
    ("[1, 2]", ["not a tandem calibration"]),
    ('{"scores": [1', ["not a calibration JSON file", "invalid JSON at line 1"]),
    (bytes(range(256)), ["not a calibration JSON file", "not UTF-8"]),
])
def test_calibration_load_names_the_file_and_the_problem(tmp_path, content, names):
    path = tmp_path / "calib.json"
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as info:
        Calibration.load(path)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1, message
    for name in names:
        assert name in message, message


def test_calibration_load_reads_every_shipped_calibration_and_its_own_files(tmp_path):
    shipped = sorted(world_dir().glob("**/calibration*.json"))
    assert len(shipped) >= 2
    for path in shipped:
        calib = Calibration.load(path)
        assert calib.threshold(50) == pytest.approx(json.loads(path.read_text())["percentiles"]["50"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(calibration_json()))
    assert Calibration.load(path).threshold(30) == pytest.approx(0.3)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="cannot read calibration .*dir.json"):
        Calibration.load(tmp_path / "dir.json")


def test_cli_calibration_without_scores(tmp_path, capsys, monkeypatch):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(calibration_json(scores=...)))
    result = cli(capsys, monkeypatch, "generate", A, "--mode", "adaptive", "--calibration", path, "--percentile", 50,
                 "--out", tmp_path / "out")
    assert_user_error(result, str(path), "has no 'scores'")


@pytest.mark.parametrize("remove, names", [
    ("unet", ["has no unet/", "expected a diffusers Stable Diffusion directory", "vae/"]),
    ("scheduler/scheduler_config.json", ["scheduler", "has no scheduler_config.json"]),
    ("text_encoder/config.json", ["text_encoder", "has no config.json"]),
])
def test_a_model_directory_missing_a_component_is_named(tiny_world, tmp_path, remove, names):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    target = world / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError) as info:
        load_teacher_pipeline(resolve_model(str(world)))
    for name in names:
        assert name in str(info.value), str(info.value)


def test_a_student_over_a_model_without_a_vae_is_named(tiny_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    student = tmp_path / "student"
    (student / "unet").mkdir(parents=True)
    (student / "scheduler").mkdir()
    with pytest.raises(ValueError, match=r"student has no unet/config.json|unet has no config.json"):
        load_student(student, teacher_source=str(world))
    shutil.rmtree(world / "vae")
    with pytest.raises(ValueError, match="world has no vae/ .expected a diffusers Stable Diffusion directory"):
        load_student(student, teacher_source=str(world))


def test_cli_model_directory_without_unet(tiny_world, tmp_path, capsys, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    shutil.rmtree(world / "unet")
    result = cli(capsys, monkeypatch, "generate", A, "--model", world, "--out", tmp_path / "out")
    assert_user_error(result, str(world), "has no unet/", "text_encoder/")


def test_long_user_text_is_cut_in_error_messages():
    prompt = "a purple hexagon " * 6000  # 102 000 characters
    with pytest.raises(CaptionError) as info:
        parse_caption(prompt)
    message = str(info.value)
    assert len(message) < 200 and "… (102000 characters)" in message and "'a purple hexagon" in message, message
    with pytest.raises(CaptionError, match="unknown word 'x{80}'… \\(5000 characters\\) at word 1"):
        parse_caption("x" * 5000)
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model " * 1000)
    assert len(str(info.value)) < 250, str(info.value)
    # short text is quoted whole, as before
    with pytest.raises(CaptionError, match="unknown word 'hexagon' at word 3 in 'a purple hexagon'$"):
        parse_caption("a purple hexagon")


def test_cli_long_prompt_is_one_short_line(tiny_world, tmp_path, capsys, monkeypatch):
    result = cli(capsys, monkeypatch, "generate", "a red circle " * 8000, "--model", tiny_world,
                 "--out", tmp_path / "out")
    assert_user_error(result, "grammar", "(104000 characters)")
    assert len(result.stderr) < 400
