"""Progressive distillation (tandem.distill.progressive) checked against diffusers' DDIM scheduler and
the closed forms of Salimans & Ho (2022), Algorithm 2, on the tiny random world."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
)
from distilltools import encode_text
from safetensors.torch import load_file

from tandem.distill.consistency import make_student_unet
from tandem.distill.progressive import (
    ProgressiveConfig,
    ProgressiveDistillation,
    distill_progressive,
    export_student,
)
from tandem.loaders import load_student
from tandem.sampling import guidance_embedding
from tandem.students import read_student_info
from tandem.training.config import TrainerConfig

W_DIM = 16
CAPTIONS = ["a red circle", "two blue squares at the top", "a small green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def method(teacher):
    return ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=8, guidance_steps=2, round_steps=2,
                                                              w_embedding_dim=W_DIM))


@pytest.fixture(scope="module")
def w_student(teacher):
    """A w-conditioned UNet with a *random* w-projection, so that the guidance scale visibly matters."""
    torch.manual_seed(1)
    unet = make_student_unet(teacher.unet, W_DIM)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    return unet.eval()


def _ddim(teacher, steps: int) -> DDIMScheduler:
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False)
    ddim.set_timesteps(steps)
    return ddim


def _w_embedding(w: torch.Tensor) -> torch.Tensor:
    """The w-embedding as diffusers' pipelines compute it (from ``w - 1``)."""
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1.0, embedding_dim=W_DIM)


def _alpha_sigma(teacher, t: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) in float64 from diffusers' own ᾱ, [B, 1, 1, 1]; t = -1 is ᾱ = 1."""
    ac = torch.cat([DDPMScheduler.from_config(teacher.scheduler.config).alphas_cumprod.double(),
                    torch.ones(1, dtype=torch.float64)])
    ab = ac[torch.tensor(t)].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


# -- the round target -----------------------------------------------------------------------------------


@pytest.mark.parametrize("student_steps", [1, 2, 4])
def test_round_target_is_two_diffusers_ddim_steps_of_the_teacher(teacher, method, w_student, student_steps):
    """At the start of a round the student is its teacher: x̃ must take it, in one DDIM step, where two
    DDIM steps (diffusers, 2N trailing steps) of that teacher go."""
    ddim = _ddim(teacher, 2 * student_steps)
    fine = ddim.timesteps.tolist()
    t, t_mid, t_next = method.grids(student_steps)
    assert t.tolist() == fine[0::2] and t_mid.tolist() == fine[1::2] and t_next.tolist() == fine[2::2] + [-1]

    b = student_steps  # one sample at every point of the N-step grid
    g = torch.Generator().manual_seed(student_steps)
    x = torch.randn(b, 4, 8, 8, generator=g)
    w = torch.linspace(1.0, 8.0, b)
    cond = encode_text(teacher, CAPTIONS[:b])
    ours = method.two_teacher_steps(w_student, x, t, t_mid, t_next, cond, guidance_embedding(w - 1.0, W_DIM))

    expected = []
    w_emb = _w_embedding(w)
    for i in range(b):
        x_i = x[i:i + 1]
        for k in (2 * i, 2 * i + 1):
            with torch.no_grad():
                eps = w_student(x_i, fine[k], cond[i:i + 1], timestep_cond=w_emb[i:i + 1]).sample
            x_i = ddim.step(eps, fine[k], x_i).prev_sample
        expected.append(x_i)
    expected = torch.cat(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    # w reaches the teacher: another w, another result
    other = method.two_teacher_steps(w_student, x, t, t_mid, t_next, cond, guidance_embedding(w + 1.0, W_DIM))  # w + 2
    assert (other - ours).abs().max() > 1e-3

    target = method.round_target(w_student, x, t, t_mid, t_next, cond, guidance_embedding(w - 1.0, W_DIM))
    # closed form, float64: one DDIM step x_t -> x_{t_next} with x̃ lands on the teacher's two-step result
    alpha_t, sigma_t = _alpha_sigma(teacher, t.tolist())
    alpha_n, sigma_n = _alpha_sigma(teacher, t_next.tolist())
    x0 = target.double()
    landed = alpha_n * x0 + sigma_n * (x.double() - alpha_t * x0) / sigma_t
    torch.testing.assert_close(landed, expected.double(), rtol=1e-4, atol=2e-5)
    # the last grid point steps to the clean end: x̃ is the teacher's result itself
    torch.testing.assert_close(target[-1], ours[-1], rtol=0, atol=0)


# -- the exported student ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 4])
def test_exported_student_samples_ddim_through_the_diffusers_pipeline(tiny_world, teacher, method, w_student, steps,
                                                                      tmp_path):
    stage = next(i for i, (name, _, n) in enumerate(method.cfg.stages) if n == steps and name != "guidance")
    spec = SimpleNamespace(name="tiny", path=str(tiny_world))
    path = export_student(w_student, tmp_path / "student", method, stage, spec, guidance_scale=3.0,
                          optimisation_steps=7)
    info = read_student_info(path)
    ddim = _ddim(teacher, steps)
    assert (info.method, info.guidance, info.steps, info.prediction_type) == ("progressive", "w-embedding", steps,
                                                                             "epsilon")
    assert info.timesteps == ddim.timesteps.tolist()
    assert info.details["stage"] == f"round-{steps}" and info.details["optimisation_steps"] == 7

    pipe = load_student(path, teacher)
    assert isinstance(pipe, StableDiffusionPipeline)
    prompts, scale = CAPTIONS[:2], 4.0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    got = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(),
               output_type="latent").images

    cond, w_emb = encode_text(teacher, prompts), _w_embedding(torch.full((2,), scale))
    x = latents
    for t in ddim.timesteps:
        with torch.no_grad():
            eps = w_student(x, t, cond, timestep_cond=w_emb).sample
        x = ddim.step(eps, t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    unguided = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(),
                    output_type="latent").images
    assert (unguided - got).abs().max() > 1e-3


# -- the loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["x0", "v"])
def test_loss_is_truncated_snr_x0_error_or_v_error(teacher, target):
    method = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=4, guidance_steps=2, round_steps=2,
                                                                w_embedding_dim=W_DIM, target=target))
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 40, 300, 700, 999])
    x_t, x0_pred, x0_target = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    got = method.loss(x0_pred, x0_target, x_t, t)

    alpha, sigma = _alpha_sigma(teacher, t.tolist())
    snr = (alpha / sigma).pow(2).flatten()
    if target == "x0":
        per_sample = (x0_pred.double() - x0_target.double()).pow(2).flatten(1).mean(1)
        expected = (snr.clamp(min=1.0) * per_sample).mean()
        assert snr.min() < 1 < snr.max()  # the truncation matters for these timesteps
    else:  # the v of each x₀ at x_t: v = α ε - σ x₀ with ε = (x_t - α x₀) / σ
        def v(x0):
            eps = (x_t.double() - alpha * x0.double()) / sigma
            return alpha * eps - sigma * x0.double()

        expected = (v(x0_pred) - v(x0_target)).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


# -- the configuration ------------------------------------------------------------------------------------


def test_config_plans_the_guidance_stage_and_the_halving_rounds():
    cfg = ProgressiveConfig(start_steps=32, end_steps=1, guidance_steps=10, round_steps=5)
    assert cfg.round_student_steps == [16, 8, 4, 2, 1]
    assert cfg.stages == [("guidance", 0, 32), ("round-16", 10, 16), ("round-8", 15, 8), ("round-4", 20, 4),
                          ("round-2", 25, 2), ("round-1", 30, 1)]
    assert cfg.total_steps == 35
    # every optimisation step belongs to the stage whose span holds it
    for step in range(cfg.total_steps):
        name, first, _ = cfg.stages[cfg.stage_at(step)]
        span = 10 if name == "guidance" else 5
        assert first <= step < first + span, step
    short = ProgressiveConfig(start_steps=8, end_steps=2, guidance_steps=0, round_steps=3)
    assert short.stages == [("round-4", 0, 4), ("round-2", 3, 2)] and short.total_steps == 6


@pytest.mark.parametrize("kwargs, needle", [
    ({"start_steps": 6}, "start_steps must be a power of two"),
    ({"start_steps": 8, "end_steps": 3}, "end_steps must be a power of two"),
    ({"start_steps": 4, "end_steps": 4}, "need end_steps < start_steps"),
    ({"start_steps": 4, "end_steps": 8}, "need end_steps < start_steps"),
    ({"w_min": 0.5}, "w_min"),
    ({"w_min": 5.0, "w_max": 2.0}, "w_min <= w_max"),
    ({"target": "eps"}, "target must be one of"),
    ({"w_embedding_dim": 2}, "w_embedding_dim"),
    ({"round_steps": 0}, "round_steps"),
])
def test_bad_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ProgressiveConfig(**kwargs)


def test_a_plan_without_guidance_stage_or_past_its_end_is_refused(teacher, tiny_world, tmp_path):
    with pytest.raises(ValueError, match="guidance_steps 0"):
        ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=4, guidance_steps=0, round_steps=2,
                                                           w_embedding_dim=W_DIM))
    with pytest.raises(ValueError, match="past the plan's 6 steps"):
        distill_progressive(str(tiny_world), tmp_path / "run", _RUN_CFG, TrainerConfig(max_steps=7, batch_size=2))
    assert not (tmp_path / "run").exists()


def test_student_starts_as_a_v_prediction_teacher(tiny_world):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    method = ProgressiveDistillation(pipe, ProgressiveConfig(start_steps=4, guidance_steps=2, round_steps=2,
                                                             w_embedding_dim=W_DIM))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([200, 800]), encode_text(pipe, CAPTIONS[:2])
    got = method.student_x0(method.student, x, t, cond, guidance_embedding(torch.tensor([0.0, 2.0]), W_DIM))
    with torch.no_grad():
        v = pipe.unet(x, t, cond).sample
    alpha, sigma = _alpha_sigma(pipe, t.tolist())
    expected = (alpha * x.double() - sigma * v.double()).float()  # x₀ = α x_t - σ v
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- a run: rounds exported, resume across a round boundary ------------------------------------------------

# guidance stage [0, 2), round to 2 steps [2, 4), round to 1 step [4, 6)
_RUN_CFG = ProgressiveConfig(start_steps=4, guidance_steps=2, round_steps=2, w_embedding_dim=W_DIM, lr=1e-3)


def _run(tiny_world, out, max_steps, resume=False):
    return distill_progressive(str(tiny_world), out, _RUN_CFG,
                               TrainerConfig(max_steps=max_steps, batch_size=2, checkpoint_every=2, seed=4),
                               data="world", resume=resume)


def _weights(student_dir):
    return load_file(student_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def full_run(tiny_world, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("progressive") / "full"
    student = _run(tiny_world, out, 6)
    return out, student


def test_run_exports_every_round(full_run, teacher):
    out, student = full_run
    assert student == out / "student"
    expected = {4: ("guidance", 2), 2: ("round-2", 4), 1: ("round-1", 6)}
    weights = {}
    for steps, (stage, optimisation_steps) in expected.items():
        path = out / "rounds" / f"{steps}-steps"
        pipe = load_student(path, teacher)
        info = pipe.student_info
        assert (info.method, info.steps, info.details["stage"], info.details["optimisation_steps"]) == (
            "progressive", steps, stage, optimisation_steps)
        assert info.scheduler == "DPMSolverMultistepScheduler" and info.guidance == "w-embedding"
        latent = pipe("a red circle", num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).images
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
        weights[steps] = _weights(path)
    key = "time_embedding.cond_proj.weight"
    assert weights[4][key].abs().sum() > 0  # the guidance stage trained the (zero-initialised) w-projection
    assert not torch.equal(weights[4][key], weights[2][key]) and not torch.equal(weights[2][key], weights[1][key])
    final = _weights(student)
    assert all(torch.equal(final[k], weights[1][k]) for k in final)
    config = json.loads((out / "train_config.json").read_text())
    assert config["stages"] == [["guidance", 0, 4], ["round-2", 2, 2], ["round-1", 4, 1]]


def test_resume_across_a_round_boundary_is_bitwise_identical(full_run, tiny_world, tmp_path):
    """Stopped at step 3 (inside the round to 2 steps, whose teacher is the guidance stage's student at
    step 2) and resumed to 6: the round's teacher must come back from the checkpoint."""
    out, _ = full_run
    part = tmp_path / "part"
    _run(tiny_world, part, 3)
    assert json.loads((part / "checkpoint" / "meta.json").read_text())["step"] == 3
    _run(tiny_world, part, 6, resume=True)
    for where in ("student", "rounds/2-steps", "rounds/4-steps"):
        a, b = _weights(out / where), _weights(part / where)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (where, k)
