"""DDIL's mixed sampler (tandem.pipeline.mixed; `tandem generate --mode mixed`) on the shipped world, against
independent references: the student alone through its own pipeline (progressive student) or tandem's
consistency sampler (consistency student), the teacher through diffusers' DDIMScheduler with
classifier-free guidance done by hand, and the draws' law; plus records, costs, the command line and the
budget-curve points."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from clitools import assert_user_error, ok, tandem_in_process
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from tandem.denoiser import NoiseSchedule
from tandem.generate import initial_latents, prompt_generator
from tandem.loaders import load_preset_student, load_preset_teacher
from tandem.pipeline import RECORD_FIELDS, TandemPipeline
from tandem.pipeline.mixed import (
    mixed_grid,
    mixed_sample,
    mixing_obstacle,
    student_denoiser,
    teacher_choices,
    teacher_denoiser,
)
from tandem.presets import PRESETS, compose
from tandem.sampling import consistency_sample

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle",
           "an orange triangle to the left of a large green circle", "a large purple circle at the bottom"]
WORLD = PRESETS["world"].defaults  # pd student, 4 steps at guidance 4.5; teacher guidance 5.0


@pytest.fixture(scope="module")
def teacher(one_thread):
    return load_preset_teacher(PRESETS["world"], "cpu", torch.float32)


@pytest.fixture(scope="module")
def pd(teacher):
    """The world preset's progressive student (w-embedding, DPM-Solver++(1) on trailing timesteps)."""
    student = load_preset_student(PRESETS["world"], teacher, "cpu", torch.float32)
    return TandemPipeline(student, teacher, None, defaults=WORLD)


@pytest.fixture(scope="module")
def cd(teacher):
    """The world's consistency student (LCMScheduler, w-embedding)."""
    student = load_preset_student(compose("world", student="cd"), teacher, "cpu", torch.float32)
    return TandemPipeline(student, teacher, None, defaults={**WORLD, "guidance_scale": 6.0})


def test_the_student_grid_lies_on_the_teacher_grid():
    grid = mixed_grid(4, 32)
    assert grid.student_timesteps == (999, 749, 499, 249)  # the paper's alignment (appendix E)
    assert grid.substeps == 8
    for k, t in enumerate(grid.student_timesteps):
        path = grid.teacher_path(k)
        assert len(path) == 9 and path[0] == t and path == sorted(path, reverse=True)
        assert path[-1] == (grid.student_timesteps[k + 1] if k < 3 else -1)  # the last transition ends clean
    assert mixed_grid(3, 9).student_timesteps == mixed_grid(9, 9).student_timesteps[::3]
    with pytest.raises(ValueError, match="not a multiple of the student's 4 steps"):
        mixed_grid(4, 30)


def test_p0_is_the_student_alone(pd, cd):
    mixed = pd.mixed(PROMPTS, teacher_prob=0.0, seed=3, output_type="latent")
    alone = pd(PROMPTS, mode="student", seed=3, output_type="latent")
    # the student's own sampler (DPM-Solver++ of order 1 on 999/749/499/249) is DDIM in another float order
    for a, b in zip(mixed.images, alone.images):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    images = pd.mixed(PROMPTS, teacher_prob=0.0, seed=3).images
    assert all(np.array_equal(a, b) for a, b in zip(images, pd(PROMPTS, mode="student", seed=3).images))
    assert all(r["transitions"] == ["student"] * 4 and r["unet_evals"] == {"student": 4.0, "teacher": 0.0, "total": 4.0}
               for r in mixed.records)

    # a student whose scheduler thresholds x0 (as a reflected student's does) thresholds it here too
    scheduler = DPMSolverMultistepScheduler.from_config(pd.student.scheduler.config, thresholding=True,
                                                        sample_max_value=1.5)
    student = type(pd.student)(**{**pd.student.components, "scheduler": scheduler})
    student.student_info = pd.student.student_info
    reflected = TandemPipeline(student, pd.teacher, None, defaults=WORLD)
    mixed_r = reflected.mixed(PROMPTS[:3], teacher_prob=0.0, seed=3, output_type="latent")
    alone_r = reflected(PROMPTS[:3], mode="student", seed=3, output_type="latent")
    for a, b, plain in zip(mixed_r.images, alone_r.images, alone.images):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert not torch.allclose(a, plain, atol=1e-3)

    # the consistency student: tandem's deterministic consistency sampler on the shared grid, bit for bit
    out = cd.mixed(PROMPTS[:3], teacher_prob=0.0, seed=3, output_type="latent")
    gens = [prompt_generator(3, i) for i in range(3)]
    latents = initial_latents(cd.student, 3, [0, 1, 2], gens)
    embeds = cd.student.encode_prompt(PROMPTS[:3], "cpu", 1, False)[0]
    with torch.no_grad():
        ref = consistency_sample(cd.student.unet, cd.student.scheduler.alphas_cumprod, latents, embeds, gens,
                                 guidance_scale=6.0, noise="deterministic", timesteps=[999, 749, 499, 249])
    assert torch.equal(torch.cat(out.images), ref)


def test_p1_is_the_teachers_ddim_on_the_fine_grid(pd, teacher):
    # 8 teacher steps: diffusers' trailing DDIM steps t -> t - 1000 // N, on the grid only where N divides 1000
    out = pd.mixed(PROMPTS[:3], teacher_prob=1.0, teacher_steps=8, seed=3, output_type="latent")
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing",
                                          set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.tolist() == list(out.summary["settings"]["teacher_timesteps"])
    x = initial_latents(pd.student, 3, [0, 1, 2], [prompt_generator(3, i) for i in range(3)])
    cond, uncond = teacher.encode_prompt(PROMPTS[:3], "cpu", 1, True)[:2]
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = teacher.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])
                                        ).sample.chunk(2)
            x = scheduler.step(eps_u + 5.0 * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(torch.cat(out.images), x, atol=2e-5, rtol=0)
    # 8 guided steps: 16 rows per image, no student call
    assert all(r["unet_evals"] == {"student": 0.0, "teacher": 16.0, "total": 16.0} for r in out.records)
    assert all(r["transitions"] == ["teacher"] * 4 for r in out.records)


class Recording:
    """A denoiser that keeps each call's timestep and input."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, t, rows):
        self.calls.append((t, x.clone()))
        return self.denoiser(x, t, rows)


def test_teacher_at_takes_exactly_that_transition(pd):
    grid, schedule = mixed_grid(4, 32), NoiseSchedule(pd.teacher.scheduler.alphas_cumprod)
    noise = initial_latents(pd.student, 3, [0, 1], [prompt_generator(3, i) for i in range(2)])

    def run(choices):
        student = Recording(student_denoiser(pd, PROMPTS[:2], schedule, 4.5))
        teacher = Recording(teacher_denoiser(pd, PROMPTS[:2], schedule, 5.0))
        with torch.no_grad():
            mixed_sample(noise, grid, choices, student, teacher, schedule)
        return dict(student.calls), teacher.calls

    alone, no_teacher = run([(False,) * 4] * 2)
    student, teacher = run([(False, False, True, False)] * 2)
    assert not no_teacher and sorted(alone) == [249, 499, 749, 999]
    assert sorted(student) == [249, 749, 999]  # the student does not step at 499
    for t in (999, 749):  # the trajectory up to 499 is the student's own
        assert torch.equal(student[t], alone[t])
    assert [t for t, _ in teacher] == list(grid.teacher_timesteps[16:24])  # 8 DDIM steps 499 -> 249 on the fine grid
    assert torch.equal(teacher[0][1], alone[499])  # the teacher takes over the student's state at 499
    assert not torch.allclose(student[249], alone[249], atol=1e-3)  # and hands the student another one at 249

    out = pd.mixed(PROMPTS[:2], teacher_at=[499], seed=3)
    assert all(r["transitions"] == ["student", "student", "teacher", "student"] for r in out.records)
    assert all(r["unet_evals"] == {"student": 3.0, "teacher": 16.0, "total": 19.0} for r in out.records)
    assert out.summary["teacher_share_by_timestep"] == {"999": 0.0, "749": 0.0, "499": 1.0, "249": 0.0}


def test_choices_follow_p_and_each_images_generator():
    grid = mixed_grid(4, 32)
    choices = np.array(teacher_choices([prompt_generator(0, i) for i in range(3000)], grid, teacher_prob=0.3))
    assert choices.shape == (3000, 4)
    assert np.abs(choices.mean(axis=0) - 0.3).max() < 0.03  # 4 sigma of 3000 draws
    again = teacher_choices([prompt_generator(0, i) for i in range(3000)], grid, teacher_prob=0.3)
    assert np.array_equal(choices, again)
    other_seed = np.array(teacher_choices([prompt_generator(1, i) for i in range(3000)], grid, teacher_prob=0.3))
    assert not np.array_equal(choices, other_seed)
    # an image's choices come from its generator alone: the images before it change nothing
    assert teacher_choices([prompt_generator(0, 7)], grid, teacher_prob=0.3)[0] == tuple(choices[7])


def test_records_costs_and_batch_independence(pd):
    out = pd.mixed(PROMPTS, teacher_prob=0.5, teacher_steps=16, seed=3, batch_size=5)
    m = 16 // 4
    for i, r in enumerate(out.records):
        assert list(r)[:len(RECORD_FIELDS)] == list(RECORD_FIELDS) and r["path"] == "mixed" and r["index"] == i
        by_teacher = r["transitions"].count("teacher")
        # w-embedded student: one row per transition; guided teacher: two rows per step, m steps per transition
        assert r["unet_evals"] == {"student": 4.0 - by_teacher, "teacher": 2.0 * m * by_teacher,
                                   "total": 4.0 - by_teacher + 2.0 * m * by_teacher}
        assert r["vae"] == {"decode": 1, "encode": 0} and r["student_score"] is None
    taken = [r["transitions"] for r in out.records]
    assert {w for t in taken for w in t} == {"student", "teacher"}  # these seeds mix
    assert out.summary["unet_evals_mean"] == pytest.approx(np.mean([r["unet_evals"]["total"] for r in out.records]))
    assert out.summary["teacher_share"] == pytest.approx(np.mean([w == "teacher" for t in taken for w in t]))
    assert out.summary["settings"]["student_timesteps"] == [999, 749, 499, 249]

    # other batches, or the last prompts alone with their own generators: the same choices and costs, pixels
    # within float rounding of the batch's shape
    for other in (pd.mixed(PROMPTS, teacher_prob=0.5, teacher_steps=16, seed=3, batch_size=2),
                  pd.mixed(PROMPTS[2:], teacher_prob=0.5, teacher_steps=16,
                     generator=[prompt_generator(3, i) for i in range(2, 5)])):
        skip = len(PROMPTS) - len(other.records)
        assert [r["transitions"] for r in other.records] == taken[skip:]
        assert [r["unet_evals"] for r in other.records] == [r["unet_evals"] for r in out.records[skip:]]
        for a, b in zip(other.images, out.images[skip:]):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    reseeded = pd.mixed(PROMPTS, teacher_prob=0.5, teacher_steps=16, seed=4)
    assert [r["transitions"] for r in reseeded.records] != taken


def test_errors_name_the_bad_value(pd):
    cases = [
        ({"teacher_prob": 1.5}, "teacher_prob must be"), ({"teacher_prob": math.nan}, "teacher_prob must be"),
        ({"teacher_at": [500]}, r"500 not on the student's grid \[999, 749, 499, 249\]"),
        ({"teacher_at": []}, "names no timestep"),
        ({"teacher_prob": 0.5, "teacher_steps": 30}, "not a multiple of the student's 4 steps"),
        ({"teacher_prob": 0.5, "teacher_at": [999]}, "exactly one of teacher_prob .* got both"),
        ({}, "exactly one of teacher_prob .* got neither"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pd.mixed(PROMPTS[:1], **kwargs)
    with pytest.raises(ValueError, match=r"own entry point: pipe\.mixed"):
        pd(PROMPTS[:1], mode="mixed")
    with pytest.raises(TypeError, match="teacher_prob"):  # the other modes take no mixed arguments
        pd(PROMPTS[:1], mode="student", teacher_prob=0.5)
    assert "image-to-image" in mixing_obstacle(SimpleNamespace(teacher=None))


def run(capsys, monkeypatch, *args):
    return tandem_in_process(capsys, monkeypatch, *args)


def test_generate_mixed_end_to_end(pd, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mixed"
    ok(run(capsys, monkeypatch, "generate", *PROMPTS[:3], "--mode", "mixed", "--teacher-prob", 0.5,
           "--teacher-steps", 8, "--seed", 3, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "mixed" and config["teacher_prob"] == 0.5 and config["teacher_steps"] == 8
    ref = pd.mixed(PROMPTS[:3], teacher_prob=0.5, teacher_steps=8, seed=3)  # the preset's pipeline
    for record, expected, image in zip(records, ref.records, ref.images):
        assert record["transitions"] == expected["transitions"] and record["unet_evals"] == expected["unet_evals"]
        assert record["path"] == "mixed" and record["seed"] == 3 and record["model"] == "world"
        assert np.array_equal(np.asarray(Image.open(out / record["file"])), image)
    assert config["summary"]["unet_evals_mean"] == pytest.approx(ref.summary["unet_evals_mean"])

    at = tmp_path / "at"
    ok(run(capsys, monkeypatch, "generate", PROMPTS[0], "--mode", "mixed", "--teacher-at", "999,499",
           "--teacher-steps", 8, "--teacher-guidance-scale", 1, "--out", at))
    record = json.loads((at / "records.jsonl").read_text())
    assert record["transitions"] == ["teacher", "student", "teacher", "student"]
    assert record["unet_evals"] == {"student": 2.0, "teacher": 4.0, "total": 6.0}  # guidance 1: one row per step


def test_generate_mixed_refuses_bad_options(tmp_path, capsys, monkeypatch):
    base = ("generate", PROMPTS[0], "--out", tmp_path / "x")
    cases = [
        (("--mode", "mixed", "--teacher-prob", 2), "--teacher-prob must lie in [0, 1]"),
        (("--mode", "mixed", "--teacher-prob", 0.5, "--teacher-at", 999), "exactly one of", "both"),
        (("--mode", "mixed"), "exactly one of", "neither"),
        (("--mode", "mixed", "--teacher-at", "abc"), "--teacher-at takes timesteps"),
        (("--mode", "mixed", "--teacher-prob", 0.5, "--scheduler", "ddim"), "--scheduler does not apply"),
        (("--mode", "student", "--teacher-prob", 0.5), "apply to --mode mixed"),
        (("--mode", "mixed", "--teacher-at", 500), "500 not on the student's grid"),
        (("--mode", "mixed", "--teacher-prob", 0.5, "--teacher-steps", 30), "not a multiple"),
        (("--mode", "mixed", "--teacher-prob", 0.5, "--handoff", "pixel"), "--handoff do not apply"),
    ]
    for args, *needles in cases:
        assert_user_error(run(capsys, monkeypatch, *base, *args), *needles)
    assert not (tmp_path / "x").exists()
    assert_user_error(run(capsys, monkeypatch, "world", "evaluate", "--mode", "mixed", "--out", tmp_path / "y"),
                      "judges the teacher or the student")


def test_budget_points_of_the_mixed_sampler(pd, tmp_path):
    from tandem.eval.experiments import BudgetConfig, _mixed_configs
    from tandem.eval.sweep import SamplerConfig, Sweep

    configs = _mixed_configs(BudgetConfig(), 4, pd, print)
    assert [(c.teacher_prob, c.teacher_at, c.teacher_steps) for c in configs] == [
        (0.25, None, 32), (0.5, None, 32), (0.75, None, 32), (None, (999,), 32)]
    with pytest.raises(ValueError, match="exactly one of teacher_prob or teacher_at"):
        SamplerConfig("mixed", 4, teacher_steps=32)
    logged = []
    assert _mixed_configs(BudgetConfig(), 4, SimpleNamespace(teacher=None), logged.append) == []
    assert "no mixed-sampler points" in logged[0]

    config = SamplerConfig("mixed", 4, teacher_steps=8, teacher_prob=0.5)
    data = Sweep(pd, PROMPTS[:3], 3, tmp_path, batch_size=2).run(config)
    ref = pd.mixed(PROMPTS[:3], teacher_prob=0.5, teacher_steps=8, seed=3)  # Sweep seeds image i from (3, i)
    assert data["evals"].tolist() == [r["unet_evals"]["total"] for r in ref.records]
    assert data["teacher_share"].tolist() == [r["transitions"].count("teacher") / 4 for r in ref.records]
    assert (tmp_path / f"{config.name}.npz").exists() and config.name == "mixed4_ddim8_p0.5"
