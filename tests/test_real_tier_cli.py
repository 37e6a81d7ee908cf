"""Your own models at the command line: a teacher, a student and an oracle given as local
directories (tiny random stand-ins built with ``save_pretrained``, as a user's Stable Diffusion
directories would be), composed on every command and kept as a preset file.

Independent checks: the adaptive routing is re-derived from a calibration file read back by hand
(tau = its percentile, "accepted" exactly where the student's score reaches tau); the composed
command-line pipeline draws the same images as the Python API built from the same parts; the
oracle's scores equal a fresh CLIP scorer's on the written PNGs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_user_error, ok, tandem, tandem_in_process
from PIL import Image

PROMPTS = ["a red circle", "a green triangle at the top", "a small blue square", "a white circle and a cyan square",
           "an orange triangle below a purple circle", "a large green square at the left"]


@pytest.fixture
def run(capsys, monkeypatch):
    return lambda *args: tandem_in_process(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def parts(tiny_world, tmp_path_factory):
    """A user's own directories: a diffusers teacher (no tandem metadata), an LCM UNet, a CLIP with its
    tokenizer, held-out prompts, and an input image for editing."""
    from diffusers import UNet2DConditionModel

    from tandem.distill.consistency import make_student_unet

    root = tmp_path_factory.mktemp("own-models")
    teacher = root / "teacher"
    shutil.copytree(tiny_world, teacher, ignore=shutil.ignore_patterns("tandem.json", "clip"))
    torch.manual_seed(0)
    make_student_unet(UNet2DConditionModel.from_pretrained(teacher / "unet"), 256).save_pretrained(root / "lcm-unet")
    clip = root / "clip"
    shutil.copytree(tiny_world / "clip", clip)
    for file in (tiny_world / "tokenizer").iterdir():
        shutil.copy(file, clip / file.name)
    (root / "held-out.txt").write_text("".join(p + "\n" for p in PROMPTS))
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS[:4]))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "in.png")
    (root / "images").mkdir()  # a user's training data: images with caption files
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(prompt + "\n")
    return root


def own(parts: Path, student: str | Path | None = None) -> list:
    """The options that compose a tandem from the parts (fast settings for tiny models)."""
    return ["--model", parts / "teacher", "--student", student or parts / "lcm-unet", "--scorer",
            f"clip:{parts / 'clip'}"]


FAST = ["--teacher-steps", 3]  # the student at its default 4 steps, as calibrated


@pytest.fixture(scope="module")
def calibration(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "calibration.json"
    ok(tandem("calibrate", *own(parts), "--prompts", parts / "held-out.txt", "--out", out))
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_calibrate_scores_the_student_with_the_given_oracle(parts, calibration, run, tmp_path):
    from tandem.calibration import Calibration
    from tandem.scorers import load_scorer

    table = Calibration.load(calibration)
    assert len(table.scores) == len(PROMPTS) and len(set(table.scores)) > 1
    # the calibrated scores are the CLIP scorer's on the student's images: re-score a student-only run
    out = tmp_path / "student"
    ok(run("generate", "--prompts", parts / "held-out.txt", *own(parts), "--mode", "student", "--out", out))
    images = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(len(PROMPTS))]
    fresh = load_scorer(f"clip:{parts / 'clip'}")(images, PROMPTS)
    np.testing.assert_allclose(np.sort(table.scores), np.sort(fresh.numpy()), atol=2e-2)  # 8-bit PNGs vs float


@pytest.mark.parametrize("strategy", ["refine", "regenerate"])
def test_adaptive_generation_routes_by_the_calibrated_tau(strategy, parts, calibration, run, tmp_path):
    from tandem.calibration import Calibration

    out = tmp_path / strategy
    ok(run("generate", "--prompts", parts / "prompts.txt", *own(parts), "--mode", "adaptive", "--strategy", strategy,
           "--calibration", calibration, "--percentile", 50, *FAST, "--out", out))
    tau = Calibration.load(calibration).threshold(50)
    for r in records(out):
        assert r["tau"] == pytest.approx(tau)
        assert r["path"] == ("accepted" if r["student_score"] >= tau else
                             "refined" if strategy == "refine" else "regenerated")
    config = json.loads((out / "config.json").read_text())
    assert config["preset_fields"]["student_kind"] == "unet"
    assert config["preset_fields"]["teacher"] == str((parts / "teacher").resolve())


def test_adaptive_generation_at_a_budget(parts, calibration, run, tmp_path):
    from tandem.calibration import Calibration

    out = tmp_path / "budget"
    ok(run("generate", "--prompts", parts / "prompts.txt", *own(parts), "--mode", "adaptive", "--budget", 7,
           "--calibration", calibration, "--strategy", "regenerate", *FAST, "--out", out))
    config = json.loads((out / "config.json").read_text())
    # student 4 steps (w-embedding: 1 call each) + k% x teacher 3 steps x 2 (guidance) = 7: k = 50
    assert config["summary"]["student_cost"] == 4 and config["summary"]["improve_cost"] == 6
    assert config["percentile"] == pytest.approx(50)
    tau = Calibration.load(calibration).threshold(50)
    assert [r["path"] for r in records(out)] == ["accepted" if r["student_score"] >= tau else "regenerated"
                                                 for r in records(out)]


def test_the_command_line_draws_what_the_python_api_draws(parts, run, tmp_path):
    from tandem.pipeline import load_preset
    from tandem.presets import compose
    from tandem.scorers import load_scorer

    out = tmp_path / "cli"
    ok(run("generate", *PROMPTS[:2], *own(parts), "--mode", "refine-all", *FAST, "--seed", 3, "--out", out))
    pipe = load_preset(compose(str(parts / "teacher"), student=str(parts / "lcm-unet")),
                       scorer=load_scorer(f"clip:{parts / 'clip'}"))
    api = pipe(PROMPTS[:2], mode="refine-all", teacher_steps=3, seed=3)
    for i, image in enumerate(api.images):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), image)


def test_a_students_default_guidance_is_one_whichever_way_it_runs(parts, run, tmp_path):
    """`generate --mode student` with a `tandem distill`-layout student runs the diffusers LCM pipeline
    directly; the Python API runs it inside TandemPipeline. Both default to the teacher's guidance."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from tandem.pipeline import load_preset
    from tandem.presets import compose

    student = tmp_path / "student"
    shutil.copytree(parts / "lcm-unet", student / "unet")
    teacher = StableDiffusionPipeline.from_pretrained(parts / "teacher")
    LCMScheduler.from_config(teacher.scheduler.config).save_pretrained(student / "scheduler")
    out = tmp_path / "cli"
    ok(run("generate", PROMPTS[0], "--model", parts / "teacher", "--student", student, "--mode", "student",
           "--out", out))
    assert json.loads((out / "config.json").read_text())["student"]["guidance_scale"] == 7.5  # diffusers' SD default
    pipe = load_preset(compose(str(parts / "teacher"), student=str(student)))
    cli = np.asarray(Image.open(out / "00000.png"), dtype=np.int16)
    default = pipe([PROMPTS[0]], mode="student", seed=0).images[0].astype(np.int16)
    other = pipe([PROMPTS[0]], mode="student", seed=0, guidance_scale=1.0).images[0].astype(np.int16)
    assert np.abs(cli - default).max() <= np.abs(cli - other).max()
    assert np.abs(cli - default).max() <= 2, np.abs(cli - default).max()


def test_adaptive_editing(parts, run, tmp_path):
    out = tmp_path / "edit"
    ok(run("edit", "--image", parts / "in.png", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *own(parts),
           "--mode", "adaptive", "--threshold", 0.0, "--strength", 0.6, *FAST, "--out", out))
    assert [r["path"] for r in records(out)] == [("accepted" if r["student_score"] >= 0.0 else "regenerated")
                                                 for r in records(out)]
    assert (out / "00001_input.png").exists()


def test_an_evaluation_with_a_learned_judge(parts, calibration, run, tmp_path):
    out = tmp_path / "eval"
    ok(run("eval", "oracle", *own(parts), "--prompts", parts / "held-out.txt", "--calibration", calibration,
           "--judge", f"clip:{parts / 'clip'}", "--batch-size", 3, "--out", out))
    results = json.loads((out / "results.json").read_text())
    assert results["made_by"]["preset_fields"]["student"] == str((parts / "lcm-unet").resolve())
    assert results["n_prompts"] == len(PROMPTS)


def test_a_saved_preset_file_serves_every_command(parts, calibration, run, tmp_path):
    preset = tmp_path / "my-tandem.json"
    ok(run("preset", "save", *own(parts), "--calibration", calibration, "--set", "teacher_steps=3",
           "--out", preset))
    fields = json.loads(preset.read_text())
    assert fields["name"] == "my-tandem" and fields["defaults"]["teacher_steps"] == 3
    by_parts, by_file = tmp_path / "parts", tmp_path / "file"
    ok(run("generate", *PROMPTS[:3], *own(parts), "--mode", "adaptive", "--calibration", calibration, *FAST,
           "--out", by_parts))
    ok(run("generate", *PROMPTS[:3], "--preset", preset, "--mode", "adaptive", "--out", by_file))
    for i in range(3):
        assert (by_parts / f"{i:05d}.png").read_bytes() == (by_file / f"{i:05d}.png").read_bytes()
    ok(run("calibrate", "--preset", preset, "--prompts", parts / "held-out.txt", "--out", tmp_path / "c.json"))
    ok(run("edit", "--preset", preset, "--image", parts / "in.png", "--prompt", PROMPTS[0], "--mode", "adaptive",
           "--threshold", 0.0, "--out", tmp_path / "edit"))
    ok(run("eval", "oracle", "--preset", preset, "--prompts", parts / "held-out.txt", "--n", 3,
           "--judge", f"clip:{parts / 'clip'}", "--out", tmp_path / "eval"))
    shown = run("preset", "show", preset)
    assert json.loads(shown.stdout)["student"] == str((parts / "lcm-unet").resolve())


def test_a_student_made_by_tandem_distill(parts, run, tmp_path):
    distilled = tmp_path / "distill"
    ok(run("distill", "consistency", "--teacher", parts / "teacher", "--data", parts / "images", "--max-steps", 2,
           "--batch-size", 2, "--checkpoint-every", 2, "--out", distilled))
    student = distilled / "student"
    calib = tmp_path / "calibration.json"
    ok(run("calibrate", *own(parts, student), "--prompts", parts / "held-out.txt", "--out", calib))
    out = tmp_path / "adaptive"
    ok(run("generate", *PROMPTS[:3], *own(parts, student), "--mode", "adaptive", "--calibration", calib, *FAST,
           "--out", out))
    assert json.loads((out / "config.json").read_text())["preset_fields"]["student_kind"] == "tandem"
    ok(run("edit", *own(parts, student), "--image", parts / "in.png", "--prompt", PROMPTS[0], "--mode", "adaptive",
           "--threshold", 0.0, *FAST, "--out", tmp_path / "edit"))


@pytest.fixture(scope="module")
def misfits(parts):
    """Students that do not fit the teacher: other latent channels, other text width, other resolution."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.load_config(parts / "teacher" / "unet")
    made = {}
    for name, change in (("channels", {"in_channels": 8, "out_channels": 8}), ("text", {"cross_attention_dim": 16}),
                         ("resolution", {"sample_size": 16})):
        config = {k: v for k, v in base.items() if not k.startswith("_")}
        config.update(change, time_cond_proj_dim=256)
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(config).save_pretrained(parts / f"misfit-{name}")
        made[name] = parts / f"misfit-{name}"
    return made


@pytest.mark.parametrize("misfit, needle", [("channels", "channel"), ("text", "cross"), ("resolution", "sample")])
def test_a_student_that_does_not_fit_is_one_line(misfit, needle, misfits, parts, calibration, run, tmp_path):
    result = run("generate", PROMPTS[0], *own(parts, misfits[misfit]), "--mode", "adaptive", "--threshold", 0.5,
                 "--out", tmp_path / "out")
    assert_user_error(result)
    assert needle in result.stderr.lower(), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no scorer", "no calibration", "two thresholds", "preset and model",
                                  "preset field", "missing student", "set key", "edit no calibration"])
def test_composition_errors_name_the_option(case, parts, calibration, run, tmp_path):
    bad_preset = tmp_path / "bad.json"
    bad_preset.write_text(json.dumps({"teacher": str(parts / "teacher"), "student": "x", "student_kind": "unet",
                                      "speed": "fast"}))
    teacher_student = ["--model", parts / "teacher", "--student", parts / "lcm-unet"]
    args, needles = {
        "no scorer": (["generate", A0, *teacher_student, "--mode", "adaptive", "--threshold", 0.5], ["--scorer"]),
        "no calibration": (["generate", A0, *own(parts), "--mode", "adaptive"],
                           ["calibration", "tandem calibrate", "--threshold"]),
        "two thresholds": (["generate", A0, *own(parts), "--mode", "adaptive", "--threshold", 0.5, "--budget", 5],
                           ["--threshold and --budget"]),
        "preset and model": (["generate", A0, "--preset", bad_preset, "--model", parts / "teacher"],
                             ["--preset and --model"]),
        "preset field": (["generate", A0, "--preset", bad_preset, "--mode", "adaptive"], ["bad.json", "speed"]),
        "missing student": (["generate", A0, "--model", parts / "teacher", "--mode", "adaptive", "--threshold", 0.5],
                            ["--student"]),
        "set key": (["preset", "save", *own(parts), "--set", "speed=9", "--out", tmp_path / "p.json"],
                    ["--set", "speed"]),
        "edit no calibration": (["edit", "--image", parts / "in.png", "--prompt", A0, *own(parts)],
                                ["calibration", "--threshold"]),
    }[case]
    result = run(*args, "--out", tmp_path / "out") if args[0] != "preset" else run(*args)
    assert_user_error(result, *map(str, needles))
    assert not (tmp_path / "out").exists()


A0 = PROMPTS[0]


def test_a_mistyped_path_and_an_unreachable_hub_say_so(parts, run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(parts)  # ./teacher exists here: "teacher/nope" is a mistyped path, not a hub id
    result = run("generate", A0, "--model", "teacher/nope", "--student", "lcm-unet", "--mode", "student",
                 "--out", tmp_path / "out")
    assert_user_error(result, "teacher/nope", "no such directory")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run("generate", A0, "--model", "teacher", "--student", "unet:nobody-here/no-such-student",
                 "--scorer", "clip:clip", "--mode", "adaptive", "--threshold", 0.5, "--out", tmp_path / "out")
    assert_user_error(result, "nobody-here/no-such-student", "not a local directory, and the hub is unreachable")
    assert not (tmp_path / "out").exists()
