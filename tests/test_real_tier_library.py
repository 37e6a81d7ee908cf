"""The library side of the real tier from the command line: model names that are paths and not hub
ids, an unreachable hub said in one line (and in seconds), degenerate and tied calibrations, the
student's default guidance, API messages that name both spellings, students that do not fit the
teacher, and the budget experiment's student-alone points. Runs on the tiny random world."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

import tandem.hub
from tandem.calibration import Calibration, CalibrationMismatch, CalibrationTieWarning
from tandem.distill.consistency import make_student_unet
from tandem.eval.experiments import accelerations, budget_report
from tandem.generate import StudentSettings, generate_student
from tandem.hub import from_hub, hub_error
from tandem.models import load_teacher_pipeline, resolve_model
from tandem.pipeline import TandemPipeline

PROMPTS = ["a red circle", "a green triangle", "a small blue square"]
HUB_ID = "nobody-here/no-such-model"


class Brightness:
    """A stand-in oracle: mean pixel value."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))

    def fingerprint(self):
        return {"kind": "brightness"}


class Clamped(Brightness):
    """A scorer that clamps every score to 0 (a broken oracle)."""

    def __call__(self, images, prompts):
        return torch.zeros(len(images))


@pytest.fixture(scope="module")
def teacher(tiny_world, one_thread):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_student(teacher, unet=None, vae=None):
    """An LCM pipeline on the teacher's text encoder and noise schedule, and its VAE unless given one."""
    if unet is None:
        torch.manual_seed(0)
        unet = make_student_unet(teacher.unet, 32)
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)  # so that guidance changes the images
    return LatentConsistencyModelPipeline(
        vae=vae if vae is not None else teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
        unet=unet, scheduler=LCMScheduler.from_config(teacher.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def student_unet(teacher, **changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({**teacher.unet.config, "time_cond_proj_dim": 32, **changes})


@pytest.fixture(scope="module")
def student(teacher):
    return lcm_student(teacher)


# -- 1. model names: paths vs hub ids, and an unreachable hub -------------------------------------------


@pytest.mark.parametrize("name", ["models/nope", "./nope", "../nope", "/no/such/dir", "a/b/c", "~/no-such-dir-here"])
def test_a_name_written_as_a_path_is_no_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ValueError, match="no such directory") as e:
        resolve_model(name)
    assert repr(name) in str(e.value) and "not read as a hub id" in str(e.value)
    if name == "models/nope":
        assert "models/ exists here" in str(e.value)


def test_org_name_without_a_local_org_stays_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = resolve_model("some-org/some-model")
    assert spec.path == "some-org/some-model" and not spec.is_world
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="'file' is a file, not a directory"):
        resolve_model("file")


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_refuses(monkeypatch):
    """The hub's address refuses connections (no offline mode): huggingface_hub alone retries each file
    for about 25 s (1 + 2 + 4 + 8 + 8 s of back-off, measured) before saying "no file named config.json"."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(tandem.hub, "_hub_probes", {})


@pytest.mark.parametrize("hub", ["offline", "hub_refuses"])
def test_an_unreachable_hub_is_said_in_one_line_within_seconds(hub, request):
    request.getfixturevalue(hub)
    cause = "offline mode" if hub == "offline" else "127.0.0.1:9"
    for load in (lambda: load_teacher_pipeline(resolve_model(HUB_ID)),
                 lambda: from_hub(UNet2DConditionModel.from_pretrained, HUB_ID, "student")):
        start = time.perf_counter()
        with pytest.raises(ValueError) as e:
            load()
        assert time.perf_counter() - start < 5
        message = str(e.value)
        assert f"{HUB_ID!r} is not a local directory, and the hub is unreachable: " in message
        assert cause in message and "\n" not in message


@pytest.mark.parametrize("hub", ["offline", "hub_refuses"])
def test_a_cached_hub_model_still_loads_when_the_hub_is_unreachable(hub, request, teacher, tmp_path):
    request.getfixturevalue(hub)
    repo = tmp_path / "models--tiny-org--tiny-unet"
    snapshot = repo / "snapshots" / ("a" * 40)
    teacher.unet.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    start = time.perf_counter()
    unet = from_hub(UNet2DConditionModel.from_pretrained, "tiny-org/tiny-unet", "student", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    for a, b in zip(unet.parameters(), teacher.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_hub_error_tells_a_network_failure_from_another():
    import requests

    try:
        try:
            raise requests.exceptions.ConnectionError("HTTPSConnectionPool: Max retries exceeded\nmore detail")
        except requests.exceptions.ConnectionError as e:
            raise OSError(f"{HUB_ID} does not appear to have a file named model_index.json.") from e
    except OSError as e:
        network = e
    assert str(hub_error(HUB_ID, "teacher", network)) == (
        f"teacher {HUB_ID!r} is not a local directory, and the hub is unreachable: "
        "HTTPSConnectionPool: Max retries exceeded")
    other = OSError("Error no file named diffusion_pytorch_model.bin found in directory\nsecond line")
    assert str(hub_error(HUB_ID, "student", other)) == (
        f"cannot load student {HUB_ID!r}: Error no file named diffusion_pytorch_model.bin found in directory")


# -- 2. degenerate and tied calibrations ------------------------------------------------------------


def test_a_calibration_whose_scores_are_all_equal_is_refused(student, teacher, tmp_path):
    with pytest.raises(ValueError, match=r"all 500 oracle scores are equal \(0\).*check the scorer "
                                         r"\(scorer=\.\.\.\)$"):
        Calibration(np.zeros(500), {})
    pipe = TandemPipeline(student, teacher, Clamped(), defaults={"num_inference_steps": 2})
    with pytest.raises(ValueError, match="all 3 oracle scores are equal"):
        pipe.calibrate(PROMPTS)
    path = tmp_path / "flat.json"
    good = Calibration(np.linspace(0, 1, 5), {}).to_json()
    path.write_text(json.dumps({**good, "scores": [0.25] * 5}))
    with pytest.raises(ValueError, match=rf"calibration {path}: all 5 oracle scores are equal \(0.25\)"):
        Calibration.load(path)


def test_tied_scores_that_route_another_share_than_k_are_noted(student, teacher):
    pipe = TandemPipeline(student, teacher, Brightness(), defaults={"num_inference_steps": 2, "teacher_steps": 2})
    fingerprint = pipe.calibration_fingerprint(2, pipe.student_guidance())
    # 60 of 100 scores clamped to 0: the 50th percentile is 0, and no score is below it
    tied = np.concatenate([np.zeros(60), np.linspace(0.1, 1, 40)])
    pipe.calibration = Calibration(tied, fingerprint)
    # cost: the student 2 evaluations (guidance embedded), a refinement 2 teacher steps x 2 (CFG) = 4;
    # budget 2 + 0.5 * 4 asks for k = 50
    with pytest.warns(CalibrationTieWarning):
        out = pipe(PROMPTS, budget=4.0)
    assert out.summary["settings"]["percentile"] == pytest.approx(50)
    assert out.summary["paths"] == {"accepted": 3}  # every brightness is above tau = 0
    note = out.summary["calibration_note"]
    assert note.startswith("budget 4 asks for percentile 50.0: only 0.0% of the calibration's images")
    assert "60 of its 100 scores equal tau" in note and "spends less than the budget" in note
    # distinct scores route k% to within one image: no note
    pipe.calibration = Calibration(np.linspace(0, 1, 100), fingerprint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationTieWarning)
        assert pipe(PROMPTS, percentile=50).summary["calibration_note"] is None
    for k in range(0, 101, 5):  # the share each k routes on a tie-free calibration
        tau = pipe.calibration.threshold(k)
        assert abs(np.mean(pipe.calibration.scores < tau) - k / 100) <= 1 / 100 + 1e-12
        assert pipe.calibration.tie_note(k) is None


# -- 3. the student's default guidance -------------------------------------------------------------------


def test_the_students_default_guidance_is_the_teachers(student, teacher):
    plain = TandemPipeline(student, teacher, Brightness(), defaults={"num_inference_steps": 2})
    out = plain(PROMPTS, mode="student", seed=3)
    assert out.summary["settings"]["guidance_scale"] == 7.5
    as_cli = generate_student(student, PROMPTS, StudentSettings(2, 7.5), seed=3)  # `tandem generate --mode student`
    assert all(np.array_equal(a, b) for a, b in zip(out.images, as_cli, strict=True))
    unguided = generate_student(student, PROMPTS, StudentSettings(2, 1.0), seed=3)
    assert not all(np.array_equal(a, b) for a, b in zip(out.images, unguided, strict=True))  # guidance matters
    preset = TandemPipeline(student, teacher, Brightness(), defaults={"num_inference_steps": 2,
                                                                      "teacher_guidance_scale": 3.0})
    out = preset(PROMPTS, mode="student", seed=3)
    assert out.summary["settings"]["guidance_scale"] == 3.0
    assert all(np.array_equal(a, b) for a, b in
               zip(out.images, generate_student(student, PROMPTS, StudentSettings(2, 3.0), seed=3), strict=True))
    assert preset.calibrate(PROMPTS[:2]).fingerprint["student_guidance_scale"] == 3.0


# -- 4. API messages name the Python call and the option ----------------------------------------------


def test_calibration_messages_point_to_the_api_and_the_command_line(student, teacher):
    pipe = TandemPipeline(student, teacher, Brightness(), defaults={"num_inference_steps": 2, "teacher_steps": 2})
    with pytest.raises(ValueError) as e:
        pipe(PROMPTS, percentile=50)
    assert str(e.value) == ("percentile needs a calibration: make one with pipe.calibration = "
                            "pipe.calibrate(prompts), or pass accept_threshold")
    with pytest.raises(ValueError, match=r"got percentile, budget$"):
        pipe(PROMPTS, percentile=50, budget=3)
    with pytest.raises(ValueError, match=r"pipe\.calibrate_edits\(images, prompts, strength=0\.6\)"):
        pipe.edit(np.zeros((32, 32, 3), np.uint8), PROMPTS[:1], percentile=50)
    pipe.calibration = Calibration(np.linspace(0, 1, 10), {"student_steps": 99})
    with pytest.raises(CalibrationMismatch, match=r"recalibrate with pipe\.calibrate\(prompts\) "
                                                  r"\(.*student_steps: calibration has 99"):
        pipe(PROMPTS, percentile=50)


# -- 5. a student that does not fit the teacher ---------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"in_channels": 8, "out_channels": 8},
     (r"^student UNet takes 8-channel latents, the teacher's takes 4 \(in_channels\): they do not share a latent "
     r"space")),
    ({"cross_attention_dim": 16},
     (r"^student UNet attends to 16-wide text embeddings, the teacher's to 32 \(cross_attention_dim\): they do "
     r"not share a text encoder")),
    ({"sample_size": 16},
     (r"^student UNet is made for 64x64 px images, the teacher's for 32x32 px \(sample_size 16 vs 8\): they do "
     r"not share a resolution")),
])
def test_a_student_that_does_not_fit_the_teacher_is_refused(change, message, teacher):
    misfit = lcm_student(teacher, student_unet(teacher, **change))
    with pytest.raises(ValueError, match=message):
        TandemPipeline(misfit, teacher, Brightness())
    refiner = StableDiffusionImg2ImgPipeline(**teacher.components)  # a teacher that can only refine
    with pytest.raises(ValueError, match=message):
        TandemPipeline(misfit, refiner, Brightness())
    fitting = lcm_student(teacher, student_unet(teacher))
    assert TandemPipeline(fitting, refiner, Brightness()).student_own_components == ()


def test_a_student_with_its_own_latent_space_hands_off_in_pixels(teacher):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**teacher.vae.config, "latent_channels": 8})
    own = lcm_student(teacher, student_unet(teacher, in_channels=8, out_channels=8), vae=vae)
    pipe = TandemPipeline(own, teacher, Brightness(), defaults={"num_inference_steps": 2, "teacher_steps": 2})
    assert pipe.student_own_components == ("vae",)
    with pytest.raises(ValueError, match=r"student UNet takes 8-channel latents and the teacher's 4 .*"
                                         r"handoff='pixel'$"):
        pipe(PROMPTS[:1], mode="refine-all")
    with pytest.raises(ValueError, match="regeneration starts the teacher from the student's initial noise"):
        pipe(PROMPTS[:1], strategy="regenerate", accept_threshold=float("inf"))
    out = pipe(PROMPTS[:1], mode="refine-all", handoff="pixel")
    assert out.records[0]["path"] == "refined" and out.records[0]["vae"]["encode"] == 1
    assert out.summary["student_own_components"] == ["vae"]


# -- 6. eval budget: a point that sent nothing to the teacher is the student alone ----------------------


def point(label, family, evals, accuracy, **extra):
    return {"family": family, "label": label, "accuracy": accuracy, "mean_score": accuracy,
            "unet_evals_mean": evals, **extra}


def test_budget_acceleration_skips_points_that_sent_no_image_to_the_teacher():
    family = "adaptive refine sigma 0.5"
    teacher = point("dpm25", "teacher dpm", 50.0, 0.80)
    points = [teacher, point("dpm10", "teacher dpm", 20.0, 0.70), point("student4", "student", 4.0, 0.82),
              # ties at tau: k = 30 sent nothing, so it is the student (its cost and quality)
              point(f"{family} k=30", family, 4.0, 0.82, k=30, share_improved=0.0),
              point(f"{family} k=50", family, 14.0, 0.81, k=50, share_improved=0.5),
              point(f"{family} k=70", family, 18.0, 0.90, k=70, share_improved=0.7)]
    a = accelerations(points, {"dpm25": teacher})["dpm25"]
    assert a["adaptive"]["label"] == f"{family} k=50" and a["factor"] == pytest.approx(50 / 14)
    assert a["student_alone"]["label"] == f"{family} k=30"
    assert a["best_adaptive_quality"] == 0.90
    assert a["cheapest_teacher"]["label"] == "dpm25" and a["teacher_factor"] == 1.0
    report = budget_report({"preset": "tiny", "n_prompts": 3, "seed": 0, "points": points, "acceleration": {"dpm25": a}})
    assert f"| dpm25 | 80.0% | 50.0 | {family} k=50 (81.0%) | 14.0 | 3.57x |" in report
    assert f"{family} k=30 reaches it at 4.0 UNet evaluations per image, but sent no image to the teacher" in report
    assert f"| {family} k=30 (student alone: no image sent to the teacher) | 4.0 |" in report
    # with only student-alone points below k = 100 there is no acceleration to report
    alone_only = [p for p in points if p.get("share_improved", 0) == 0]
    a = accelerations(alone_only, {"dpm25": teacher})["dpm25"]
    assert a["adaptive"] is None and a["factor"] is None and a["best_adaptive_quality"] is None
    assert a["student_alone"]["label"] == f"{family} k=30"
