"""DMD2 (tandem.distill.dmd2; Yin et al. 2024) checked against the formulas recomputed here with
diffusers' own schedulers and the UNets called directly, on the tiny random world: the distribution-
matching gradient and its surrogate, the critic's denoising score matching and GAN losses, backward
simulation against the exported student's pipeline, gradient isolation between the student and the
critic, an exact resume, and runs from the command line on the world and on a plain diffusers directory."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from clitools import tandem_in_process
from diffusers import DDIMScheduler, DDPMScheduler
from distilltools import assert_ddp_matches_accumulation, encode_text
from safetensors.torch import load_file

from tandem.checks import NonFiniteError
from tandem.distill.critic import Critic, bottleneck_features, check_bottleneck_unet
from tandem.distill.data import WorldSource
from tandem.distill.dmd2 import DMD2Config, DMD2Distillation, distill_dmd2, export_student
from tandem.generate import derive_seed
from tandem.loaders import load_student
from tandem.students import read_student_info
from tandem.training.config import TrainerConfig
from tandem.training.trainer import Trainer, _name_key

CAPTIONS = ["a red circle", "two blue squares at the top", "a small green triangle", "a yellow square"]
GUIDANCE = 3.0


def _method(teacher, **kwargs) -> DMD2Distillation:
    return DMD2Distillation(teacher, DMD2Config(**{"real_guidance": GUIDANCE, **kwargs}))


def _alphas(teacher) -> torch.Tensor:
    return DDPMScheduler.from_config(teacher.scheduler.config).alphas_cumprod.double()


def _x0(teacher, eps, x_t, t) -> torch.Tensor:
    """x₀ of an ε-prediction, float64, from diffusers' ᾱ."""
    ab = _alphas(teacher)[t].reshape(-1, 1, 1, 1)
    return (x_t.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()


def _perturbed(unet, seed: int, std: float = 0.02):
    """A copy of ``unet`` with every weight moved a little (so that it disagrees with the teacher)."""
    unet = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return unet


def _ctx(generator_seed: int, **models) -> SimpleNamespace:
    """A stand-in for the Trainer's StepContext: the given networks, a seeded generator, the CPU."""
    return SimpleNamespace(generator=torch.Generator().manual_seed(generator_seed), device=torch.device("cpu"),
                           step=0, model=models.__getitem__, unwrapped=models.__getitem__)


# -- the distribution-matching gradient ------------------------------------------------------------------


def test_dmd_gradient_is_the_normalised_x0_difference(teacher):
    method = _method(teacher)
    fake = _perturbed(teacher.unet, seed=1)
    g = torch.Generator().manual_seed(0)
    b = 4
    x, noise = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([20, 300, 700, 980])
    cond = encode_text(teacher, CAPTIONS)
    got = method.dmd_gradient(x, t, noise, cond, fake)

    x_t = DDPMScheduler.from_config(teacher.scheduler.config).add_noise(x, noise, t)
    uncond = encode_text(teacher, [""] * b)
    with torch.no_grad():
        eps_c, eps_u = teacher.unet(x_t, t, cond).sample, teacher.unet(x_t, t, uncond).sample
        eps_fake = fake(x_t, t, cond).sample
    x0_real = _x0(teacher, eps_u + GUIDANCE * (eps_c - eps_u), x_t, t)
    x0_fake = _x0(teacher, eps_fake, x_t, t)
    weight = 1.0 / (x.double() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x0_fake - x0_real) * weight
    torch.testing.assert_close(got["x0_real"].double(), x0_real, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["grad"].double(), expected, rtol=1e-3, atol=1e-4)
    assert expected.abs().max() > 1e-2  # the perturbed critic disagrees: the check is not vacuous

    # the surrogate 0.5 ||x - sg(x - g)||² (mean) pushes x along the gradient: d/dx = g / numel
    x_leaf = x.clone().requires_grad_(True)
    method.dmd_loss(x_leaf, got["grad"]).backward()
    torch.testing.assert_close(x_leaf.grad, got["grad"] / x.numel(), rtol=1e-4, atol=1e-8)  # float32 x - (x - g)

    # a fresh critic is the teacher: at guidance 1 the real and the fake score agree and the gradient vanishes
    unguided = _method(teacher, real_guidance=1.0)
    zero = unguided.dmd_gradient(x, t, noise, cond, unguided.critic.unet)["grad"]
    assert zero.abs().max() < 1e-5


def test_teacher_ddim_regression_target_is_diffusers_guided_ddim(teacher):
    method = _method(teacher)
    steps, b = 4, 2  # T / steps whole: diffusers DDIM steps T // steps, off the trailing grid otherwise
    noise = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond, uncond = encode_text(teacher, CAPTIONS[:b]), encode_text(teacher, [""] * b)
    got = method.teacher_ddim(noise, cond, steps)

    ddim = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False)
    ddim.set_timesteps(steps)
    x = noise
    for t in ddim.timesteps:
        with torch.no_grad():
            eps_c, eps_u = teacher.unet(x, t, cond).sample, teacher.unet(x, t, uncond).sample
        x = ddim.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


# -- the critic ---------------------------------------------------------------------------------------------


def test_bottleneck_features_are_the_unets_mid_block_output(teacher):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, cond = torch.tensor([0, 600]), encode_text(teacher, CAPTIONS[:2])
    captured = {}
    handle = teacher.unet.mid_block.register_forward_hook(lambda m, args, out: captured.setdefault("mid", out))
    try:
        with torch.no_grad():
            teacher.unet(x, t, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        got = bottleneck_features(teacher.unet, x, t, cond)
    torch.testing.assert_close(got, captured["mid"], rtol=0, atol=1e-6)
    config = dict(teacher.unet.config)
    check_bottleneck_unet(config)
    with pytest.raises(ValueError, match="class_embed_type"):
        check_bottleneck_unet({**config, "class_embed_type": "timestep"})


def test_critic_losses_are_dsm_and_the_non_saturating_gan_loss(teacher):
    """A 1-step student's critic update recomputed from its draws: the student's sample from pure noise,
    ε-MSE at a uniform timestep (noised by diffusers), and the classifier's real-vs-fake loss on the
    mid-block output (captured from a full UNet forward)."""
    method = _method(teacher, steps=1, gan_weight=1e-3, gan_critic_weight=0.5)
    student = _perturbed(teacher.unet, seed=3)
    batch = WorldSource(seed=1).batch(0, 2)
    b = 2
    cond = encode_text(teacher, batch["captions"])
    got = method.critic_losses(batch, cond, _ctx(7, student=student, critic=method.critic))

    g = torch.Generator().manual_seed(7)
    assert int(torch.randint(0, 1, (1,), generator=g)) == 0
    z = torch.randn(b, 4, 8, 8, generator=g)
    t999 = torch.full((b,), 999)
    with torch.no_grad():
        x0 = _x0(teacher, student(z, t999, cond).sample, z, t999).float()
    s = torch.randint(0, 1000, (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    with torch.no_grad():
        pred = method.critic.unet(ddpm.add_noise(x0, eps, s), s, cond).sample
    dsm = (pred.double() - eps.double()).pow(2).mean()
    torch.testing.assert_close(got["dsm_loss"].double(), dsm, rtol=1e-4, atol=0)

    dist = teacher.vae.encode(batch["pixels"]).latent_dist
    real = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * teacher.vae.config.scaling_factor
    t_gan = torch.randint(0, 1000, (2 * b,), generator=g)
    x_gan = ddpm.add_noise(torch.cat([real, x0]), torch.randn(2 * b, 4, 8, 8, generator=g), t_gan)
    captured = {}
    unet = method.critic.unet
    handle = unet.mid_block.register_forward_hook(lambda m, args, out: captured.setdefault("mid", out))
    try:
        with torch.no_grad():
            unet(x_gan, t_gan, torch.cat([cond, cond]))
            logits = method.critic.head(captured["mid"]).squeeze(1)
    finally:
        handle.remove()
    gan = F.softplus(logits[b:]).mean() + F.softplus(-logits[:b]).mean()
    torch.testing.assert_close(got["gan_loss"], gan, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["loss"], got["dsm_loss"] + 0.5 * gan, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["logit_real"], logits[:b].mean(), rtol=1e-4, atol=1e-6)


# -- backward simulation and the exported student -----------------------------------------------------------


def test_backward_simulation_is_the_exported_students_own_sampler(teacher, tiny_world, tmp_path):
    """The state the student trains on at step k is where the exported student's pipeline stands after
    k steps from the same noise; its last step's x₀ is the pipeline's output."""
    method = _method(teacher)
    student = _perturbed(teacher.unet, seed=4).eval()
    spec = SimpleNamespace(name="tiny", path=str(tiny_world))
    path = export_student(student, tmp_path / "student", method, spec, optimisation_steps=10)
    info = read_student_info(path)
    assert (info.method, info.guidance, info.guidance_scale, info.steps) == ("dmd2", "none", 1.0, 4)
    assert info.timesteps == [999, 749, 499, 249] and info.details["student_updates"] == 2

    pipe = load_student(path, teacher)
    b = 2
    z = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    states = []

    def keep(pipeline, i, t, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    final = pipe(CAPTIONS[:b], num_inference_steps=4, guidance_scale=info.guidance_scale, latents=z.clone(),
                 output_type="latent", callback_on_step_end=keep).images
    assert pipe.scheduler.timesteps.tolist() == method.timesteps
    cond = encode_text(teacher, CAPTIONS[:b])
    for k in (1, 2, 3):
        torch.testing.assert_close(method.backward_simulation(student, z, cond, k), states[k - 1], rtol=1e-4,
                                   atol=1e-4)
    x3 = method.backward_simulation(student, z, cond, 3)
    with torch.no_grad():
        last = method.x0_of(student, x3, torch.full((b,), 249), cond)
    torch.testing.assert_close(last, final, rtol=1e-4, atol=1e-4)
    assert (states[0] - z).abs().max() > 1e-2


# -- the two networks never leak gradients into each other -------------------------------------------------

LR = 1e-3


class SGDDMD2(DMD2Distillation):
    """DMD2 with plain SGD and no clipping, so that an update is exactly ``-LR * gradient``."""

    def trainables(self):
        return [dataclasses.replace(t, make_optimizer=_sgd, grad_clip=None) for t in super().trainables()]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


def _trainer_seed(name: str, seed: int = 0, batch_index: int = 0) -> int:
    """The seed of the Trainer's generator for ``name``'s update on ``batch_index``."""
    return derive_seed(seed, batch_index, _name_key(name))


def _params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_each_update_is_the_gradient_of_its_own_loss_and_the_teacher_never_moves(teacher, tmp_path):
    """Step 0 updates the student (its loss runs through the critic's classifier), then the critic. Each
    network's change must be the SGD step of its own loss alone, recomputed with the Trainer's draws; the
    critic's from its weights before the step (the student's update left it alone)."""
    cfg = DMD2Config(real_guidance=GUIDANCE, steps=2, critic_updates=2, gan_weight=0.5, regression_weight=0.5,
                     regression_steps=2)
    method = SGDDMD2(teacher, cfg)
    source = WorldSource(seed=0)
    trainer = Trainer(method, source, TrainerConfig(max_steps=2, batch_size=2), tmp_path / "run", cpu=True)
    student_before, critic_before = copy.deepcopy(method.student), copy.deepcopy(method.critic)
    frozen_before = {k: copy.deepcopy(m.state_dict()) for k, m in method.frozen().items()}
    trainer.train_step(0)
    assert all(p.grad is None for p in [*method.student.parameters(), *method.critic.parameters()])

    batch = source.batch(0, 2)
    cond = encode_text(teacher, batch["captions"])
    losses = method.student_losses(batch, cond, _ctx(_trainer_seed("student"), student=student_before, critic=critic_before))
    grads = torch.autograd.grad(losses["loss"], list(student_before.parameters()), retain_graph=True)
    assert {"gan_loss", "regression_loss", "dm_grad_norm"} <= set(losses)
    # the student's GAN loss runs through the classifier, but records no gradient for the critic's weights
    assert all(g is None for g in torch.autograd.grad(losses["loss"], list(critic_before.parameters()),
                                                      allow_unused=True))
    assert all(p.requires_grad for p in critic_before.parameters())
    for after, before, grad in zip(method.student.parameters(), student_before.parameters(), grads):
        torch.testing.assert_close(after.detach(), before.detach() - LR * grad, rtol=0, atol=1e-7)

    losses = method.critic_losses(batch, cond, _ctx(_trainer_seed("critic"), student=method.student, critic=critic_before))
    grads = torch.autograd.grad(losses["loss"], list(critic_before.parameters()))
    assert all(g.abs().sum() > 0 for g in grads[-2:])  # the classifier head is trained
    for after, before, grad in zip(method.critic.parameters(), critic_before.parameters(), grads):
        torch.testing.assert_close(after.detach(), before.detach() - LR * grad, rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(method.critic.parameters(), critic_before.parameters()))

    student_now, critic_now = _params(method.student), _params(method.critic)
    trainer.train_step(1)  # a critic-only step: the student stays
    assert all(torch.equal(a, b) for a, b in zip(method.student.parameters(), student_now))
    assert any(not torch.equal(a, b) for a, b in zip(method.critic.parameters(), critic_now))
    for name, module in method.frozen().items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, frozen_before[name][k]), (name, k)
        assert all(not p.requires_grad for p in module.parameters())


def test_a_non_finite_loss_stops_the_run_naming_the_step(teacher, tmp_path):
    method = _method(teacher, steps=1)
    trainer = Trainer(method, WorldSource(0), TrainerConfig(max_steps=18, batch_size=2), tmp_path / "run")
    with torch.no_grad():
        method.critic.unet.conv_out.bias.fill_(float("nan"))
    student_before = [p.detach().clone() for p in method.student.parameters()]
    with pytest.raises(NonFiniteError, match=r"dmd2 diverged: the critic.s loss is nan at step 17; .*no checkpoint.*a lower lr or critic_lr$"):
        trainer.train_step(17)
    assert all(torch.equal(a, b) for a, b in zip(method.student.parameters(), student_before))


# -- a run: the update ratio, resume ----------------------------------------------------------------------

_RUN_CFG = DMD2Config(real_guidance=GUIDANCE, steps=2, critic_updates=2, gan_weight=1e-2, lr=1e-3)


def _run(tiny_world, out, max_steps, resume=False):
    return distill_dmd2(str(tiny_world), out, _RUN_CFG, TrainerConfig(max_steps=max_steps, batch_size=2,
                                                                      checkpoint_every=2, log_every=1, seed=3),
                        data="world", resume=resume)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tiny_world, tmp_path):
    """A 2-process DDP run (gloo, torchrun) makes the updates of 1 process accumulating 2 micro-batches, for the
    student (backward simulation through the unwrapped student) and the critic alike."""
    args = ["distill", "dmd2", "--teacher", str(tiny_world), "--max-steps", "2", "--batch-size", "2",
            "--critic-updates", "1", "--lr", "1e-3", "--threads", "1", "--seed", "3"]
    assert_ddp_matches_accumulation(args, tmp_path, ("student", "critic"))


def test_resume_is_bitwise_identical(tiny_world, one_thread, tmp_path):
    whole = _run(tiny_world, tmp_path / "whole", 4)
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    # two time-scale updates: the critic on every step, the student on every second (the first included)
    assert [any(k.startswith("student/") for k in r) for r in log] == [True, False, True, False]
    assert all("critic/dsm_loss" in r and "critic/logit_real" in r for r in log)
    assert all(r["student/dm_grad_norm"] > 0 for r in log[::2])

    part = _run(tiny_world, tmp_path / "part", 2)
    assert part.exists()
    _run(tiny_world, tmp_path / "part", 4, resume=True)
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "part" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(tmp_path / d / "checkpoint" / "state.pt", weights_only=True)["models"]["critic"]
              for d in ("whole", "part")]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    teacher_weights = load_file(tiny_world / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], teacher_weights[k]) for k in a)  # the student trained


# -- configuration and command line ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": 0}, "steps"),
    ({"steps": 1, "backward_simulation": True}, "backward simulation needs steps > 1"),
    ({"critic_updates": 0}, "critic_updates"),
    ({"real_guidance": 0.5}, "real_guidance"),
    ({"dm_t_range": (0.9, 0.1)}, "low <= high"),
    ({"dm_t_range": (0.0, 1.5)}, "dm_t_range"),
    ({"gan_weight": -1.0}, "gan_weight"),
    ({"gan_max_timestep": 1001}, "gan_max_timestep"),
    ({"regression_steps": 0}, "regression_steps"),
    ({"ema": 1.0}, "ema"),
])
def test_bad_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DMD2Config(**kwargs)


def test_a_teacher_without_a_guidance_scale_is_refused(teacher):
    with pytest.raises(ValueError, match="real_guidance"):
        DMD2Distillation(teacher, DMD2Config())
    assert not DMD2Config(steps=4).uses_gan and DMD2Config(steps=4).simulates and not DMD2Config(steps=1).simulates


def _cli(capsys, monkeypatch, *args):
    result = tandem_in_process(capsys, monkeypatch, *[str(a) for a in args])
    return result.returncode, result.stderr


def test_cli_distills_the_world_into_a_student_that_generates(tmp_path, capsys, monkeypatch, one_thread):
    out = tmp_path / "dmd2"
    code, err = _cli(capsys, monkeypatch, "distill", "dmd2", "--out", out, "--max-steps", 2, "--batch-size", 4,
                     "--threads", 1)
    assert code == 0, err
    student = out / "student"
    info = read_student_info(student)
    assert (info.method, info.steps, info.guidance, info.teacher["name"]) == ("dmd2", 4, "none", "world")
    assert info.details["real_guidance"] == 5.0  # the world teacher's own scale
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "student/dm_grad_norm" in log[0] and "critic/dsm_loss" in log[1]

    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "a blue square", "--mode", "student",
                     "--student", student, "--student-steps", 4, "--out", tmp_path / "direct")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "direct" / "records.jsonl").read_text().splitlines()]
    assert [r["unet_evals"]["student"] for r in records] == [4.0, 4.0]  # no guidance: one call per step
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "a blue square", "--mode", "adaptive",
                     "--student", student, "--student-steps", 4, "--teacher-steps", 2, "--threshold", 0.5,
                     "--out", tmp_path / "adaptive")
    assert code == 0, err
    assert len((tmp_path / "adaptive" / "records.jsonl").read_text().splitlines()) == 2


def test_cli_on_a_plain_diffusers_directory_and_image_folder(tiny_world, tmp_path, capsys, monkeypatch,
                                                             one_thread):
    from PIL import Image

    sd = tmp_path / "sd"
    shutil.copytree(tiny_world, sd)
    (sd / "tandem.json").unlink()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]):
        Image.new("RGB", (40, 40), rgb).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(f"a {name} photo")
    out = tmp_path / "dmd2"
    code, err = _cli(capsys, monkeypatch, "distill", "dmd2", "--teacher", sd, "--data", photos, "--out", out,
                     "--max-steps", 2, "--batch-size", 2, "--steps", 2, "--gan-weight", 1e-3, "--real-guidance", 2)
    assert code == 0, err
    info = read_student_info(out / "student")
    assert info.teacher["path"] == str(sd) and info.steps == 2 and info.details["real_guidance"] == 2.0
    code, err = _cli(capsys, monkeypatch, "generate", "a red photo", "--model", sd, "--mode", "student",
                     "--student", out / "student", "--out", tmp_path / "gen")
    assert code == 0, err
    assert (tmp_path / "gen" / "00000.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--critic-updates", "0"], "critic_updates must be >= 1"),
    (["--steps", "1", "--backward-simulation"], "backward simulation needs steps > 1"),
    (["--gan-weight", "-1"], "gan_weight"),
    (["--real-guidance", "0.5"], "real_guidance"),
])
def test_cli_bad_options_are_one_line(args, needle, tmp_path, capsys, monkeypatch):
    code, err = _cli(capsys, monkeypatch, "distill", "dmd2", "--out", tmp_path / "run", "--max-steps", 1, *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_critic_without_gan_has_no_head(teacher):
    assert Critic(teacher.unet, gan=False).head is None
    assert _method(teacher, gan_weight=1e-3).critic.head is not None


def test_without_backward_simulation_the_input_is_noised_data(teacher):
    """DMD2's multi-step training without backward simulation: real latents noised to the drawn step's
    timestep (pure noise at the first step)."""
    method = _method(teacher, steps=4, backward_simulation=False)
    batch = WorldSource(seed=2).batch(0, 2)
    cond = encode_text(teacher, batch["captions"])
    seen = set()
    for seed in range(12):
        x, t, noise = method.student_input(batch, cond, _ctx(seed, student=method.student))
        g = torch.Generator().manual_seed(seed)
        index = int(torch.randint(0, 4, (1,), generator=g))
        seen.add(index)
        z = torch.randn(2, 4, 8, 8, generator=g)
        assert torch.equal(noise, z) and t.tolist() == [[999, 749, 499, 249][index]] * 2
        if index == 0:
            assert torch.equal(x, z)
            continue
        dist = teacher.vae.encode(batch["pixels"]).latent_dist
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * teacher.vae.config.scaling_factor
        expected = DDPMScheduler.from_config(teacher.scheduler.config).add_noise(latents, z, t)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert seen == {0, 1, 2, 3}
