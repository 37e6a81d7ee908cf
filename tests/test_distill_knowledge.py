"""Knowledge distillation into a smaller UNet (tandem.distill.knowledge; Dockhorn et al., Eq. 5/6/8)
checked against closed forms computed here and against the teacher UNet called directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, StableDiffusionPipeline
from distilltools import encode_text
from safetensors.torch import load_file

from tandem.distill.data import WorldSource
from tandem.distill.knowledge import (
    KnowledgeConfig,
    KnowledgeDistillation,
    distill_knowledge,
    make_student,
    student_config,
)
from tandem.loaders import load_student
from tandem.students import unet_cost
from tandem.training.config import TrainerConfig

GAMMA = 5.0


def _alpha_sigma(t) -> tuple[np.ndarray, np.ndarray]:
    """(α_t, σ_t) of the world's scaled-linear schedule, float64 NumPy, [B, 1, 1, 1]."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - betas)[np.asarray(t)]
    return np.sqrt(ab).reshape(-1, 1, 1, 1), np.sqrt(1.0 - ab).reshape(-1, 1, 1, 1)


def _mse(a, b) -> np.ndarray:
    return ((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).reshape(len(a), -1).mean(1)


# -- the student's architecture ---------------------------------------------------------------------------

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "norm_num_groups": 32,
             "cross_attention_dim": 768, "_name_or_path": "sd15/unet"}


def _check_divides(config: dict) -> None:
    heads, groups = config["attention_head_dim"], config["norm_num_groups"]
    for c in config["block_out_channels"]:
        assert c % heads == 0 and c % groups == 0, (c, heads, groups)


@pytest.mark.parametrize("arch, factor", [("half", 0.5), ("quarter", 0.25), ("three-quarter", 0.75)])
def test_student_config_scales_the_teachers_widths(teacher, arch, factor):
    teacher_config = dict(teacher.unet.config)
    config = student_config(teacher_config, KnowledgeConfig(arch=arch))
    assert config["block_out_channels"] == [round(c * factor) for c in teacher_config["block_out_channels"]]
    _check_divides(config)
    # heads and groups scale with the width: each keeps its size (4 channels in the tiny teacher)
    assert config["block_out_channels"][0] // config["attention_head_dim"] == 32 // 8
    assert config["block_out_channels"][0] // config["norm_num_groups"] == 32 // 8
    assert config["time_cond_proj_dim"] is None and "_name_or_path" not in config
    changed = {k for k in config if config[k] != teacher_config.get(k)}
    assert changed <= {"block_out_channels", "attention_head_dim", "norm_num_groups"}
    # a real SD 1.5 UNet's widths as well
    sd = student_config(SD15_UNET, KnowledgeConfig(arch=arch, guidance="w-embedding", w_embedding_dim=64))
    assert sd["block_out_channels"] == [round(c * factor) for c in SD15_UNET["block_out_channels"]]
    assert sd["block_out_channels"][0] // sd["norm_num_groups"] == 10 and sd["time_cond_proj_dim"] == 64
    _check_divides(sd)


@pytest.mark.parametrize("channels", [(16, 24), (12, 20), (7, 14)])
def test_custom_widths_get_heads_and_groups_that_divide_them(teacher, channels):
    cfg = KnowledgeConfig(arch="custom", block_out_channels=channels)
    config = student_config(dict(teacher.unet.config), cfg)
    assert config["block_out_channels"] == list(channels)
    _check_divides(config)
    student = make_student(teacher.unet, cfg, seed=0)  # diffusers builds it: every GroupNorm divides
    assert list(student.config.block_out_channels) == list(channels)


@pytest.mark.parametrize("arch, at_most", [("half", 0.5), ("quarter", 0.25), ("three-quarter", 0.75)])
def test_student_is_smaller_and_cheaper(teacher, arch, at_most):
    student = make_student(teacher.unet, KnowledgeConfig(arch=arch), seed=0)
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert params(student) < params(teacher.unet)
    ours, theirs = unet_cost(student, context_length=32), unet_cost(teacher.unet, context_length=32)
    assert ours["params"] == params(student) and theirs["params"] == params(teacher.unet)
    assert 0 < ours["flops_per_call"] <= at_most * theirs["flops_per_call"], (ours, theirs)


def test_make_student_is_seeded_and_leaves_the_global_rng_alone(teacher):
    cfg = KnowledgeConfig()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = make_student(teacher.unet, cfg, seed=0)
    assert torch.equal(torch.rand(3), before)
    b, c = make_student(teacher.unet, cfg, seed=0), make_student(teacher.unet, cfg, seed=1)
    key = "conv_in.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


# -- the loss (Eq. 8, and Eq. 5 in x₀ space) ---------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_eq8_in_eps_space_and_eq5_in_x0_space(teacher, alpha):
    method = KnowledgeDistillation(teacher, KnowledgeConfig(alpha=alpha, min_snr_gamma=GAMMA))
    t = torch.tensor([0, 60, 120, 200, 500, 999])
    g = torch.Generator().manual_seed(1)
    eps_s, eps_t, noise, x0 = (torch.randn(len(t), 4, 8, 8, generator=g) for _ in range(4))
    out = method.loss(eps_s, eps_t, noise, t)

    alpha_t, sigma_t = _alpha_sigma(t)
    snr = (alpha_t / sigma_t).flatten() ** 2
    assert snr.min() < GAMMA < snr.max()  # the Min-SNR clamp acts on some timesteps and not on others
    weight = np.minimum(snr, GAMMA) / snr
    per_sample = (1 - alpha) * _mse(eps_s, eps_t) + alpha * _mse(eps_s, noise)
    np.testing.assert_allclose(float(out["loss"]), (weight * per_sample).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["data_mse"]), _mse(eps_s, noise).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out["teacher_mse"]), _mse(eps_s, eps_t).mean(), rtol=1e-5)

    # Eq. 5/8 as written, in x₀ space: λ_t ((1-α)||D_θ - D_φ||² + α||D_θ - x₀||²), λ_t = min(SNR_t, γ)
    x_t = alpha_t * x0.double().numpy() + sigma_t * noise.double().numpy()
    denoise = lambda eps: (x_t - sigma_t * eps.double().numpy()) / alpha_t
    d_student, d_teacher = denoise(eps_s), denoise(eps_t)
    x0_space = np.minimum(snr, GAMMA) * ((1 - alpha) * _mse(d_student, d_teacher) + alpha * _mse(d_student, x0))
    np.testing.assert_allclose(float(out["loss"]), x0_space.mean(), rtol=1e-5)

    if alpha == 1.0:  # what step() passes for the baseline: no teacher at all
        without = method.loss(eps_s, None, noise, t)
        assert "teacher_mse" not in without
        np.testing.assert_allclose(float(without["loss"]), (weight * _mse(eps_s, noise)).mean(), rtol=1e-5)


# -- one training step: the targets it uses ----------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """Calls ``inner`` and keeps what it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        self.calls.append({"x": x, "t": t, "cond": encoder_hidden_states, **kwargs})
        return self.inner(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)


class _Ctx:
    device = torch.device("cpu")

    def __init__(self, student, seed):
        self.student, self.generator = student, torch.Generator().manual_seed(seed)

    def model(self, name):
        return self.student


def _run_step(method, batch, seed):
    """``method.step`` with the loss's inputs and the student's calls recorded."""
    seen = {}
    loss = method.loss

    def recording_loss(eps_student, eps_teacher, noise, t):
        seen.update(eps_student=eps_student, eps_teacher=eps_teacher, noise=noise, t=t)
        return loss(eps_student, eps_teacher, noise, t)

    method.loss = recording_loss
    student = _Recorder(method.student)
    out = method.step(batch, "student", _Ctx(student, seed))
    return out, seen, student.calls


def _replay(teacher, batch, seed, b, w_range=None, cond_dropout=None):
    """The step's random draws in their documented order: latent sample, (caption dropout | w), t, noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dist = teacher.vae.encode(batch["pixels"]).latent_dist
    latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * teacher.vae.config.scaling_factor
    draws = {}
    if cond_dropout is not None:
        draws["drop"] = torch.rand((b,), generator=g) < cond_dropout
    else:
        draws["w"] = w_range[0] + (w_range[1] - w_range[0]) * torch.rand((b,), generator=g)
    draws["t"] = torch.randint(0, 1000, (b,), generator=g)
    draws["noise"] = torch.randn(latents.shape, generator=g)
    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    draws["x_t"] = ddpm.add_noise(latents, draws["noise"], draws["t"])
    return draws


def test_guided_target_is_the_teachers_cfg_combination(teacher):
    """Eq. 6: with a w-embedding the student matches ε_u + w (ε_c - ε_u) of the teacher, and gets w - 1."""
    cfg = KnowledgeConfig(guidance="w-embedding", w_min=2.0, w_max=6.0, w_embedding_dim=16)
    method = KnowledgeDistillation(teacher, cfg)
    batch = WorldSource(1).batch(0, 3)
    out, seen, calls = _run_step(method, batch, seed=11)
    d = _replay(teacher, batch, 11, 3, w_range=(2.0, 6.0))
    assert torch.equal(seen["noise"], d["noise"]) and torch.equal(seen["t"], d["t"])  # the replay is faithful

    cond, uncond = encode_text(teacher, batch["captions"]), encode_text(teacher, [""] * 3)
    with torch.no_grad():
        eps_c = teacher.unet(d["x_t"], d["t"], cond).sample
        eps_u = teacher.unet(d["x_t"], d["t"], uncond).sample
    w = d["w"].reshape(-1, 1, 1, 1)
    expected = eps_u + w * (eps_c - eps_u)
    torch.testing.assert_close(seen["eps_teacher"], expected, rtol=1e-4, atol=1e-5)
    assert (expected - eps_c).abs().max() > 1e-3  # guidance changes the target

    (call,) = calls
    torch.testing.assert_close(call["x"], d["x_t"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call["cond"], cond, rtol=1e-5, atol=1e-6)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, d["w"] - 1.0, embedding_dim=16)
    torch.testing.assert_close(call["timestep_cond"], w_emb, rtol=0, atol=0)
    assert out["loss"].requires_grad


def test_classifier_free_mode_drops_captions_for_student_and_teacher(teacher):
    method = KnowledgeDistillation(teacher, KnowledgeConfig(guidance="classifier-free", cond_dropout=1.0))
    batch = WorldSource(1).batch(1, 2)
    _, seen, calls = _run_step(method, batch, seed=5)
    d = _replay(teacher, batch, 5, 2, cond_dropout=1.0)
    uncond = encode_text(teacher, ["", ""])
    with torch.no_grad():
        eps_u = teacher.unet(d["x_t"], d["t"], uncond).sample
    torch.testing.assert_close(seen["eps_teacher"], eps_u, rtol=1e-4, atol=1e-5)
    (call,) = calls
    torch.testing.assert_close(call["cond"], uncond, rtol=1e-5, atol=1e-6)
    assert "timestep_cond" not in call


class _Refuses(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher was called")


def test_dsm_baseline_never_calls_the_teacher(teacher):
    baseline = KnowledgeDistillation(teacher, KnowledgeConfig(alpha=1.0))
    assert not baseline.cfg.uses_teacher
    assert "teacher" not in baseline.frozen() and {"vae", "text_encoder"} <= set(baseline.frozen())
    baseline.parts.teacher_unet = _Refuses()
    batch = WorldSource(2).batch(0, 2)
    out, seen, _ = _run_step(baseline, batch, seed=3)
    assert seen["eps_teacher"] is None and "teacher_mse" not in out
    t = seen["t"].numpy()
    alpha_t, sigma_t = _alpha_sigma(t)
    snr = (alpha_t / sigma_t).flatten() ** 2
    expected = (np.minimum(snr, GAMMA) / snr * _mse(seen["eps_student"].detach(), seen["noise"])).mean()
    np.testing.assert_allclose(float(out["loss"].detach()), expected, rtol=1e-5)
    # the refusing stand-in does refuse: a method that uses its teacher fails with it
    mixed = KnowledgeDistillation(teacher, KnowledgeConfig(alpha=0.3))
    assert "teacher" in mixed.frozen()
    mixed.parts.teacher_unet = _Refuses()
    with pytest.raises(AssertionError, match="the teacher was called"):
        _run_step(mixed, batch, seed=3)


# -- a run ---------------------------------------------------------------------------------------------------


def test_run_writes_a_smaller_cfg_student_that_generates(tiny_world, teacher, tmp_path):
    cfg = KnowledgeConfig(arch="half")
    path = distill_knowledge(str(tiny_world), tmp_path / "run", cfg, TrainerConfig(max_steps=3, batch_size=2))
    assert path == tmp_path / "run" / "student"
    info = json.loads((path / "student.json").read_text())
    assert (info["method"], info["guidance"], info["scheduler"], info["prediction_type"]) == (
        "knowledge", "classifier-free", "DPMSolverMultistepScheduler", "epsilon")
    details = info["details"]
    assert details["block_out_channels"] == [16, 16] and details["optimisation_steps"] == 3
    assert details["params"] < details["teacher_params"]
    assert details["flops_per_call"] <= 0.5 * details["teacher_flops_per_call"]

    pipe = load_student(path, teacher)
    assert pipe.unet.config.time_cond_proj_dim is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.solver_order == 2
    init = make_student(teacher.unet, cfg, seed=0).state_dict()
    trained = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # the exported EMA moved

    rows = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        guided = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).images
        assert rows == [2, 2]  # CFG: the unconditional and the conditional call batched, at each of 2 steps
        rows.clear()
        plain = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images
        assert rows == [1, 1]
    finally:
        hook.remove()
    assert guided.shape == plain.shape == (1, 4, 8, 8) and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-4


def test_run_on_a_v_prediction_teacher_writes_a_loadable_student(tiny_world, tmp_path):
    world = tmp_path / "v-world"
    shutil.copytree(tiny_world, world)
    config_path = world / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    path = distill_knowledge(str(world), tmp_path / "run", KnowledgeConfig(), TrainerConfig(max_steps=1, batch_size=2))
    pipe = load_student(path, StableDiffusionPipeline.from_pretrained(world))
    assert pipe.student_info.prediction_type == pipe.scheduler.config.prediction_type


# -- bad configurations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"arch": "tiny"}, "arch must be one of half, quarter, three-quarter, custom, got 'tiny'"),
    ({"arch": "custom"}, "arch 'custom' needs block_out_channels"),
    ({"arch": "half", "block_out_channels": (16, 16)}, "block_out_channels goes with arch 'custom'"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": 1.0, "guidance": "w-embedding"}, "alpha 1"),
    ({"guidance": "none"}, "guidance must be one of"),
    ({"cond_dropout": 1.5}, "cond_dropout"),
    ({"w_min": 3.0, "w_max": 2.0}, "w_min <= w_max"),
    ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
])
def test_bad_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        KnowledgeConfig(**kwargs)


def test_custom_widths_must_match_the_teachers_blocks(teacher):
    with pytest.raises(ValueError, match="block_out_channels needs 2 entries"):
        student_config(dict(teacher.unet.config), KnowledgeConfig(arch="custom", block_out_channels=(16,)))
    with pytest.raises(ValueError, match="block_out_channels"):
        KnowledgeConfig(arch="custom", block_out_channels=(16, 0))


def test_resume_is_bitwise_identical(tiny_world, one_thread, tmp_path):
    """Stopped after its checkpoint at step 2 and resumed to 4: the student, its EMA and the optimizer
    come back, so the exported (EMA) weights equal an uninterrupted 4-step run's."""
    cfg = KnowledgeConfig(arch="half", warmup_steps=1)

    def run(out, steps, resume=False):
        return distill_knowledge(str(tiny_world), out, cfg, TrainerConfig(max_steps=steps, batch_size=2,
                                                                          checkpoint_every=2), resume=resume)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 2)
    part = run(tmp_path / "part", 4, resume=True)
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_snapshots_are_the_students_a_shorter_run_exports(tiny_world, one_thread, tmp_path):
    """A 4-step run with --snapshot-every 2 leaves snapshots/step-2, bit for bit the student that a 2-step run of
    the same configuration exports (a constant schedule: step 2 of either run is the same state), recorded as
    trained for 2 steps; the last step is the run's own student, not a snapshot."""
    cfg = KnowledgeConfig(arch="half", warmup_steps=1)
    long = distill_knowledge(str(tiny_world), tmp_path / "long", cfg,
                             TrainerConfig(max_steps=4, batch_size=2, snapshot_every=2))
    short = distill_knowledge(str(tiny_world), tmp_path / "short", cfg, TrainerConfig(max_steps=2, batch_size=2))
    assert sorted(p.name for p in (tmp_path / "long" / "snapshots").iterdir()) == ["step-2"]
    snap = tmp_path / "long" / "snapshots" / "step-2"
    a = load_file(snap / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(short / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((snap / "student.json").read_text())["details"]["optimisation_steps"] == 2
    assert json.loads((long / "student.json").read_text())["details"]["optimisation_steps"] == 4


def test_a_staged_schedule_is_recorded_and_checked(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="warmup_steps must be 0"):
        KnowledgeConfig(lr_stages="2:constant:1:1,2:cosine:0.5")
    cfg = KnowledgeConfig(arch="half", warmup_steps=0, lr_stages="2:constant:1:1,2:cosine:0.5")
    with pytest.raises(ValueError, match="add up to 4 steps"):
        distill_knowledge(str(tiny_world), tmp_path / "bad", cfg, TrainerConfig(max_steps=3, batch_size=2))
    distill_knowledge(str(tiny_world), tmp_path / "run", cfg, TrainerConfig(max_steps=4, batch_size=2))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["knowledge"]["lr_stages"] == "2:constant:1:1,2:cosine:0.5"
    lrs = [json.loads(line)["lr"]["student"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lrs[-1] == 0.0  # the cosine stage ends at 0
