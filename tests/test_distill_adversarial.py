"""Adversarial diffusion distillation (tandem.distill.adversarial) checked against the formulas of Sauer et
al. (ADD, Eq. 1-4, appendix A) recomputed with diffusers' own scheduler arithmetic and the raw networks, on
the tiny random world; the run, its resume and its student end to end on the shipped world and a real-tier
directory with a tiny local DINOv2."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest
import torch
from clitools import tandem_in_process
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from distilltools import assert_ddp_matches_accumulation
from safetensors.torch import load_file

from tandem.checks import NonFiniteError
from tandem.distill.adversarial import (
    AdversarialConfig,
    AdversarialDistillation,
    Discriminator,
    distill_adversarial,
    export_student,
    hinge_d,
    hinge_g,
    load_feature_network,
    r1_penalty,
)
from tandem.distill.data import WorldSource
from tandem.generate import derive_seed
from tandem.loaders import load_student
from tandem.models import resolve_model
from tandem.students import read_student_info
from tandem.training.config import TrainerConfig
from tandem.training.trainer import Trainer, _name_key

LR = 0.05


@pytest.fixture(scope="module")
def spec(tiny_world):
    return resolve_model(str(tiny_world))


# the first release's ADD (a zero-SNR v-student, the mean over latent elements, logits averaged over tokens before
# the hinge, no spectral norm, no augmentation): the formula tests below check it, every option at a time; the
# fixes of the second release have tests of their own (tests/test_distill_adversarial_fixes.py)
FIRST_RELEASE = {"student_schedule": "zero-snr", "distill_reduction": "mean", "hinge": "per-image",
                 "spectral_norm": False, "augment": ""}


def _method(teacher, spec, **kwargs) -> AdversarialDistillation:
    cfg = AdversarialConfig(guidance_scale=3.0, features="world-clip", cmap_dim=8, **{**FIRST_RELEASE, **kwargs})
    return AdversarialDistillation(teacher, cfg, load_feature_network("world-clip", spec))


@pytest.fixture(scope="module")
def method(teacher, spec):
    return _method(teacher, spec)


@pytest.fixture(scope="module")
def batch():
    return WorldSource(0).batch(0, 2)


class Ctx:
    """What ``step`` reads of the Trainer's context, with chosen networks and seed."""

    def __init__(self, method, seed: int, step: int = 0, discriminator=None):
        self.generator, self.device, self.step = torch.Generator().manual_seed(seed), torch.device("cpu"), step
        self.nets = {"student": method.student, "discriminator": discriminator or method.discriminator}

    def model(self, name):
        return self.nets[name]

    unwrapped = model


def _text(teacher, captions):
    ids = teacher.tokenizer(captions, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = teacher.text_encoder(ids)
    return out[0], out.pooler_output


def _sqrt_ab(scheduler, t):
    ab = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def _replay_student_input(method, teacher, batch, seed):
    """The step's first draws, recomputed: posterior sample, student timestep, ε, then x_s by diffusers."""
    g = torch.Generator().manual_seed(seed)
    latents = method.parts.encode_images(batch["pixels"], g)
    s = torch.tensor([999, 749, 499, 249])[torch.randint(0, 4, (len(latents),), generator=g)]
    eps = torch.randn(latents.shape, generator=g)
    rescaled = DDPMScheduler.from_config(teacher.scheduler.config, rescale_betas_zero_snr=True)
    return g, latents, s, rescaled.add_noise(latents, eps, s), rescaled


def _raw_logits(method, pixels, head_cond):
    """Head logits [B, K] from the CLIP vision tower called directly (the world CLIP sees [-1, 1] pixels)."""
    hidden = method.features.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    blocks = method.features.model.config.num_hidden_layers
    layers = [round((k + 1) * blocks / len(method.discriminator.heads)) for k in range(len(method.discriminator.heads))]
    return torch.stack([h(hidden[k], head_cond).mean(-1) for h, k in zip(method.discriminator.heads, layers)],
                       1), hidden


# -- the student's schedule and sampler ----------------------------------------------------------------


def test_student_schedule_is_diffusers_zero_terminal_snr(method, teacher):
    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    expected = torch.cumprod(1.0 - rescale_zero_terminal_snr(ddpm.betas.clone()), 0)
    torch.testing.assert_close(method.student_schedule.alphas_cumprod, expected.double(), rtol=0, atol=1e-7)
    assert float(method.student_schedule.alpha_bar(999)) == 0.0 and float(method.student_schedule.snr(999)) == 0.0
    # the rescaling keeps the first SNR and zeroes the last
    torch.testing.assert_close(method.student_schedule.alphas_cumprod[0], ddpm.alphas_cumprod[0].double())
    assert not method.schedule.zero_terminal_snr  # the teacher keeps its own schedule
    ddim = DDIMScheduler.from_config(method.sampler_config)
    assert ddim.config.rescale_betas_zero_snr and ddim.config.timestep_spacing == "trailing"
    torch.testing.assert_close(ddim.alphas_cumprod.double(), method.student_schedule.alphas_cumprod, rtol=0, atol=0)


def test_student_input_and_prediction_match_diffusers(method, teacher, batch):
    ddim = DDIMScheduler.from_config(method.sampler_config)
    ddim.set_timesteps(4)
    assert method.student_timesteps.tolist() == ddim.timesteps.tolist() == [999, 749, 499, 249]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = method.student_timesteps
    rescaled = DDPMScheduler.from_config(teacher.scheduler.config, rescale_betas_zero_snr=True)
    x_t = method.student_schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, rescaled.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(x_t[0], eps[0])  # pure noise at τ_1 = 999
    cond, _ = _text(teacher, ["a red circle"] * 4)
    with torch.no_grad():
        ours = method.student_x0(method.student, x_t, t, cond)
        v = method.student(x_t, t, cond).sample
    for i, ti in enumerate(t.tolist()):
        ref = ddim.step(v[i:i + 1], ti, x_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exported_student_samples_ddim_through_the_student_contract(method, teacher, spec, steps, tmp_path):
    path = export_student(method.student, tmp_path / "student", method, spec, optimisation_steps=7)
    info = read_student_info(path)
    assert (info.method, info.scheduler, info.prediction_type, info.guidance, info.steps, info.guidance_scale) == (
        "adversarial", "DPMSolverMultistepScheduler", "v_prediction", "none", 4, 1.0)
    assert info.timesteps == [999, 749, 499, 249] and info.details["optimisation_steps"] == 7
    pipe = load_student(path, teacher)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    prompts = ["a red circle", "two blue squares"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    got = pipe(prompts, num_inference_steps=steps, guidance_scale=info.guidance_scale, latents=latents.clone(),
               output_type="latent").images
    # DDIM (η = 0) in float64 on diffusers' rescaled ᾱ: x₀ = α x - σ v, ε = σ x + α v, x ← α' x₀ + σ' ε;
    # the shipped scheduler (DPM-Solver++ order 1) keeps ᾱ_999 at 2⁻²⁴ rather than 0
    ab = torch.cat([torch.cumprod(1.0 - rescale_zero_terminal_snr(DDPMScheduler.from_config(
        teacher.scheduler.config).betas.clone()), 0).double(), torch.ones(1, dtype=torch.float64)])
    ab[999] = 2.0**-24
    grid = [999 - k * (1000 // steps) for k in range(steps)] + [-1]
    cond, _ = _text(teacher, prompts)
    x = latents.double()
    for t, t_prev in itertools.pairwise(grid):
        with torch.no_grad():
            v = method.student(x.float(), t, cond).sample.double()
        x0, eps = ab[t].sqrt() * x - (1 - ab[t]).sqrt() * v, (1 - ab[t]).sqrt() * x + ab[t].sqrt() * v
        x = ab[t_prev].sqrt() * x0 + (1 - ab[t_prev]).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_a_zero_snr_student_edits_and_the_teacher_gets_the_input_noised_on_its_own_schedule(method, teacher, spec,
                                                                                             tmp_path):
    """The ADD student's schedule is not the teacher's: an edit noises the same input with the same eps on
    each model's own schedule, so the teacher's edit equals the one it makes beside a student that shares
    its schedule (same start timestep), and the student edits from its own x_t."""
    from tandem.pipeline import TandemPipeline

    student = load_student(export_student(method.student, tmp_path / "student", method, spec, optimisation_steps=1),
                           teacher)
    from tandem.distill.progressive import student_scheduler

    # the teacher's schedule on the student's sampler and grid
    twin = StableDiffusionPipeline(**{**teacher.components, "scheduler": student_scheduler(teacher.scheduler.config)})
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares"]
    kwargs = {"strength": 0.6, "num_inference_steps": 4, "teacher_steps": 3, "guidance_scale": 1.0,
              "output_type": "latent"}
    zero_snr = TandemPipeline(student, teacher).edit(image, prompts, mode="teacher", **kwargs)
    shared = TandemPipeline(twin, teacher).edit(image, prompts, mode="teacher", **kwargs)
    assert zero_snr.summary["settings"]["student_timesteps"] == shared.summary["settings"]["student_timesteps"]
    torch.testing.assert_close(torch.cat(zero_snr.images), torch.cat(shared.images), rtol=0, atol=0)
    edited = TandemPipeline(student, teacher).edit(image, prompts, mode="student", **kwargs)
    twin_edit = TandemPipeline(twin, teacher).edit(image, prompts, mode="student", **kwargs)
    got, other = torch.cat(edited.images), torch.cat(twin_edit.images)
    assert torch.isfinite(got).all() and not torch.equal(got, other)


# -- the losses ----------------------------------------------------------------------------------------


def test_hinge_losses_and_r1_against_their_formulas():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 3, generator=g) * 2, torch.randn(5, 3, generator=g) * 2
    expected_d = sum(max(0.0, 1 - float(r)) for r in real.flatten()) / 5 + \
        sum(max(0.0, 1 + float(f)) for f in fake.flatten()) / 5
    torch.testing.assert_close(hinge_d(real, fake), torch.tensor(expected_d), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hinge_g(fake), -fake.sum() / 5)

    torch.manual_seed(0)
    disc = Discriminator(channels=8, layers=2, cond_dim=5, cmap_dim=4, spectral_norm=False, hinge="per-image")
    features = [torch.randn(3, 6, 8, generator=g, requires_grad=True) for _ in range(2)]
    cond = torch.randn(3, 5, generator=g)
    r1 = r1_penalty(disc(features, cond), features)
    expected = 0.0
    for b in range(3):  # one image and one head at a time: ||∇_{F_k} D_k(F_k)||², summed over heads
        for head, f in zip(disc.heads, features):
            x = f[b:b + 1].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(head(x, cond[b:b + 1]).mean(), x)  # the image's logit: the tokens' mean
            expected += float(grad.double().pow(2).sum()) / 3
    torch.testing.assert_close(r1.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    r1.backward()  # R1 trains the heads (a graph through the gradient)
    assert all(p.grad is not None for p in disc.heads[0].main.parameters())


def test_student_loss_is_hinge_plus_lambda_exponential_distillation(method, teacher, batch):
    """Eq. (1): -Σ_k D_k(F_k(x̂_θ)) + 2.5 α_t ||x̂_θ - x̂_ψ||², recomputed with diffusers' add_noise and the raw
    UNets, VAE, text encoder and CLIP."""
    losses = method.step(batch, "student", Ctx(method, seed=11))
    g, latents, s, x_s, rescaled = _replay_student_input(method, teacher, batch, 11)
    cond, pooled = _text(teacher, batch["captions"])
    a_s, sig_s = _sqrt_ab(rescaled, s)
    with torch.no_grad():
        x_hat = a_s * x_s - sig_s * method.student(x_s, s, cond).sample  # v-prediction
        pixels = teacher.vae.decode(x_hat / teacher.vae.config.scaling_factor).sample
        real_cls = method.features.model(pixel_values=batch["pixels"]).pooler_output
        logits, _ = _raw_logits(method, pixels, torch.cat([pooled, real_cls], 1))
        t = torch.randint(0, 1000, (2,), generator=g)
        ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
        x_t = ddpm.add_noise(x_hat, torch.randn(latents.shape, generator=g), t)
        uncond, _ = _text(teacher, [""] * 2)
        eps_c, eps_u = teacher.unet(x_t, t, cond).sample, teacher.unet(x_t, t, uncond).sample
        a_t, sig_t = _sqrt_ab(ddpm, t)
        target = (x_t - sig_t * (eps_u + 3.0 * (eps_c - eps_u))) / a_t
    g_adv = -logits.sum(1).mean()
    distill = (a_t.flatten() * (x_hat - target).pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(losses["g_adv"], g_adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["distill"], distill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], g_adv + 2.5 * distill, rtol=1e-4, atol=1e-5)


def test_discriminator_loss_is_hinge_plus_gamma_r1_on_real_features(teacher, spec, batch):
    method = _method(teacher, spec, r1_gamma=0.5)  # a γ large enough to see
    losses = method.step(batch, "discriminator", Ctx(method, seed=5))
    _, _, s, x_s, rescaled = _replay_student_input(method, teacher, batch, 5)
    cond, pooled = _text(teacher, batch["captions"])
    a_s, sig_s = _sqrt_ab(rescaled, s)
    with torch.no_grad():
        x_hat = a_s * x_s - sig_s * method.student(x_s, s, cond).sample
        pixels = teacher.vae.decode(x_hat / teacher.vae.config.scaling_factor).sample
        real_cls = method.features.model(pixel_values=batch["pixels"]).pooler_output
    head_cond = torch.cat([pooled, real_cls], 1)
    fake, _ = _raw_logits(method, pixels, head_cond)
    real, hidden = _raw_logits(method, batch["pixels"], head_cond)
    d_loss = torch.relu(1 - real).sum(1).mean() + torch.relu(1 + fake).sum(1).mean()
    r1 = 0.0
    for b in range(2):
        x = hidden[1][b:b + 1].detach().requires_grad_(True)  # the one block of the tiny CLIP
        (grad,) = torch.autograd.grad(method.discriminator.heads[0](x, head_cond[b:b + 1]).mean(), x)  # tokens' mean
        r1 += grad.pow(2).sum() / 2
    torch.testing.assert_close(losses["d_loss"], d_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["r1"], r1, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(losses["loss"], d_loss + 0.5 * r1, rtol=1e-4, atol=1e-5)
    assert float(losses["real_logit"]) == pytest.approx(float(real.mean()), abs=1e-5)


@pytest.mark.parametrize("weighting", ["exponential", "sds", "nfsd"])
def test_distillation_weightings_give_the_score_distillation_gradients(weighting, teacher, spec):
    """c(t) = α_t (exponential) with the teacher's guided x₀ as target; SDS (appendix A): the gradient in x̂_θ is
    w(t)(ε̂ - ε') with w = σ²; NFSD: w(t) δ, δ = w(ε_c - ε_u) + (ε_u if t < 200 else ε_u - ε_neg)."""
    method = _method(teacher, spec, distill_weighting=weighting)
    g = torch.Generator().manual_seed(1)
    x_hat = torch.randn(4, 4, 8, 8, generator=g, requires_grad=True)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([50, 150, 600, 900])
    captions = ["a red circle", "a blue square", "a green triangle", "two red circles"]
    cond, _ = _text(teacher, captions)
    target = method.distill_target(x_hat, t, noise, cond)
    loss = method.distill_loss(x_hat, target, t)
    (grad,) = torch.autograd.grad(loss, x_hat)

    ddpm = DDPMScheduler.from_config(teacher.scheduler.config)
    x_t = ddpm.add_noise(x_hat.detach(), noise, t)
    a_t, sig_t = _sqrt_ab(ddpm, t)
    with torch.no_grad():
        eps_c = teacher.unet(x_t, t, cond).sample
        eps_u = teacher.unet(x_t, t, _text(teacher, [""] * 4)[0]).sample
        eps_neg = teacher.unet(x_t, t, _text(teacher, [method.cfg.nfsd_negative_prompt] * 4)[0]).sample
    eps_hat = eps_u + 3.0 * (eps_c - eps_u)
    n = x_hat.numel()  # the loss means over batch and elements
    if weighting == "exponential":
        expected_target = (x_t - sig_t * eps_hat) / a_t
        torch.testing.assert_close(target, expected_target, rtol=1e-4, atol=1e-4)
        expected_grad = 2 * a_t * (x_hat.detach() - expected_target) / n
    elif weighting == "sds":
        expected_grad = sig_t**2 * (eps_hat - noise) / n
    else:
        small = (t < 200).reshape(-1, 1, 1, 1)
        delta = 3.0 * (eps_c - eps_u) + torch.where(small, eps_u, eps_u - eps_neg)
        expected_grad = sig_t**2 * delta / n
    torch.testing.assert_close(grad * n, expected_grad * n, rtol=1e-3, atol=1e-4)


# -- gradient isolation, frozen networks, divergence ---------------------------------------------------------


class SGDAdversarial(AdversarialDistillation):
    """Plain SGD steps (no clipping), so an update is ``-LR x`` the gradient; ``disc_every`` sets the
    discriminator's update ratio."""

    disc_every = 1

    def trainables(self):
        out = super().trainables()
        for t in out:
            t.make_optimizer, t.grad_clip = (lambda params: torch.optim.SGD(params, lr=LR)), None
        out[1].every = self.disc_every
        return out


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sgd_method(teacher, spec, disc_every=1):
    method = SGDAdversarial(teacher, AdversarialConfig(guidance_scale=3.0, features="world-clip", cmap_dim=8,
                                                       **FIRST_RELEASE),
                            load_feature_network("world-clip", spec))
    method.disc_every = disc_every
    return method


def test_the_discriminator_update_is_the_gradient_of_its_own_loss_alone(teacher, spec, tmp_path):
    method = _sgd_method(teacher, spec)
    trainer = Trainer(method, WorldSource(0), TrainerConfig(max_steps=1, batch_size=2), tmp_path / "run")
    heads = copy.deepcopy(method.discriminator)
    before = {n: _snapshot(m) for n, m in method.frozen().items()}
    student_before = _snapshot(method.student)
    trainer.train_step(0)  # the student first (its loss runs through the heads), then the discriminator
    # the discriminator's expected step: its own loss (with the *updated* student's samples, same draws)
    ctx = Ctx(method, derive_seed(0, 0, _name_key("discriminator")), discriminator=heads)
    loss = method.step(WorldSource(0).batch(0, 2), "discriminator", ctx)["loss"]
    grads = torch.autograd.grad(loss, list(heads.parameters()))
    for (name, after), before_p, grad in zip(method.discriminator.named_parameters(), heads.parameters(), grads):
        torch.testing.assert_close(after.detach(), before_p.detach() - LR * grad, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(student_before[k], v) for k, v in method.student.state_dict().items())
    for name, module in method.frozen().items():  # the teacher, VAE, text encoder and feature network never move
        assert all(torch.equal(before[name][k], v) for k, v in module.state_dict().items()), name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert all(p.grad is None for p in [*method.student.parameters(), *method.discriminator.parameters()])


def test_the_students_update_leaves_the_discriminator_and_reaches_the_student_through_the_features(
        teacher, spec, batch, tmp_path):
    method = _sgd_method(teacher, spec, disc_every=2)
    trainer = Trainer(method, WorldSource(0), TrainerConfig(max_steps=2, batch_size=2), tmp_path / "run")
    disc_before, student_before = _snapshot(method.discriminator), _snapshot(method.student)
    logged = trainer.train_step(1)  # the discriminator is not due at step 1
    assert "student/g_adv" in logged and not any(k.startswith("discriminator/") for k in logged)
    assert all(torch.equal(disc_before[k], v) for k, v in method.discriminator.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in method.student.state_dict().items())
    # the adversarial loss alone reaches the student: through the frozen VAE decoder and feature network
    g_adv = method.step(batch, "student", Ctx(method, seed=2))["g_adv"]
    grads = torch.autograd.grad(g_adv, [method.student.conv_out.weight, method.student.conv_in.weight])
    assert all(float(gr.abs().sum()) > 0 for gr in grads)


def test_a_nonfinite_loss_stops_the_run_naming_step_and_term(teacher, spec, tmp_path):
    method = _sgd_method(teacher, spec)
    trainer = Trainer(method, WorldSource(0), TrainerConfig(max_steps=1, batch_size=2), tmp_path / "run")
    with torch.no_grad():
        method.discriminator.heads[0].out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the student's loss is nan at step 0"):
        trainer.train_step(0)


# -- runs ----------------------------------------------------------------------------------------------------

_RUN_CFG = AdversarialConfig(cmap_dim=8, lr=1e-3, disc_lr=1e-3)


def _run(tiny_world, out, max_steps, resume=False):
    return distill_adversarial(str(tiny_world), out, _RUN_CFG, TrainerConfig(max_steps=max_steps, batch_size=2,
                                                                           checkpoint_every=1, seed=3),
                               resume=resume)


def test_resume_is_bitwise_identical(tiny_world, one_thread, tmp_path):
    whole = _run(tiny_world, tmp_path / "whole", 2)
    _run(tiny_world, tmp_path / "part", 1)
    part = _run(tiny_world, tmp_path / "part", 2, resume=True)
    a, b = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(p.parent / "checkpoint" / "state.pt", weights_only=True) for p in (whole, part)]
    disc = [s["models"]["discriminator"] for s in states]
    assert all(torch.equal(disc[0][k], disc[1][k]) for k in disc[0])
    config = json.loads((tmp_path / "whole" / "train_config.json").read_text())["adversarial"]
    assert config["features"] == "world-clip" and config["guidance_scale"] == 3.0  # resolved from the teacher


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tiny_world, tmp_path):
    """A 2-process DDP run (gloo, torchrun) computes the updates of 1 process accumulating 2 micro-batches, the
    discriminator's R1 double backward through its DDP wrapper included."""
    args = ["distill", "adversarial", "--teacher", str(tiny_world), "--max-steps", "2", "--batch-size", "2",
            "--lr", "1e-3", "--disc-lr", "1e-3", "--threads", "1", "--seed", "3"]
    assert_ddp_matches_accumulation(args, tmp_path, ("student", "discriminator"))


def _cli(capsys, monkeypatch, *args):
    result = tandem_in_process(capsys, monkeypatch, *[str(a) for a in args])
    return result.returncode, result.stderr


def test_the_command_line_distils_the_world_into_a_student_every_mode_takes(tmp_path, one_thread, capsys,
                                                                           monkeypatch):
    code, err = _cli(capsys, monkeypatch, "distill", "adversarial", "--out", tmp_path / "run", "--max-steps", 2,
                     "--batch-size", 4)
    assert code == 0, err
    student = tmp_path / "run" / "student"
    info = read_student_info(student)
    assert (info.method, info.guidance, info.steps) == ("adversarial", "none", 4)
    assert info.details["features"] == "world-clip" and info.details["feature_blocks"] == [1, 2, 3, 4]
    assert info.details["teacher_guidance_scale"] == 5.0 and info.teacher["name"] == "world"
    # the command's default exports the student's 0.99 EMA (the shipped add's setting); --ema 0 the student itself
    assert info.details["weights"] == "ema" and info.details["config"]["ema"] == 0.99
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"student/g_adv", "student/distill", "discriminator/d_loss", "discriminator/r1",
            "discriminator/real_logit", "discriminator/fake_logit"} <= set(log[-1])
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "--mode", "student", "--student", student,
                     "--student-steps", 1, "--out", tmp_path / "one")
    assert code == 0, err
    record = json.loads((tmp_path / "one" / "records.jsonl").read_text().splitlines()[0])
    assert record["unet_evals"]["student"] == 1.0  # one step, no guidance
    for mode, extra in (("student", []), ("adaptive", ["--threshold", 0.5])):  # guidance: twice the calls, untrained
        code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "--mode", mode, "--student", student,
                         "--guidance-scale", 5, *extra, "--out", tmp_path / f"guided-{mode}")
        assert code != 0 and "samples without classifier-free guidance" in err, err
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "a blue square", "--mode", "adaptive",
                     "--student", student, "--threshold", 1e9, "--student-steps", 2, "--teacher-steps", 2,
                     "--out", tmp_path / "adaptive")
    assert code == 0, err
    assert (tmp_path / "adaptive" / "00001.png").exists()


@pytest.fixture(scope="module")
def real_tier(tiny_world, tmp_path_factory):
    """A plain diffusers SD directory, a captioned image folder and a tiny local DINOv2."""
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("real")
    sd = root / "sd"
    shutil.copytree(tiny_world, sd)
    (sd / "tandem.json").unlink()
    data = root / "photos"
    data.mkdir()
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 40), rgb).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"photo {i}")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             patch_size=8, image_size=32)).save_pretrained(root / "dinov2")
    return sd, data, root / "dinov2"


def test_a_real_tier_teacher_distils_with_a_dinov2_discriminator(real_tier, one_thread, tmp_path, capsys,
                                                                 monkeypatch):
    sd, data, dinov2 = real_tier
    code, err = _cli(capsys, monkeypatch, "distill", "adversarial", "--teacher", sd, "--data", data, "--features",
                     dinov2, "--steps", 2, "--max-steps", 1, "--batch-size", 2, "--out", tmp_path / "run")
    assert code == 0, err
    info = read_student_info(tmp_path / "run" / "student")
    assert info.details["features"] == str(dinov2) and info.details["feature_blocks"] == [1, 2]
    assert info.steps == 2 and info.timesteps == [999, 499] and info.teacher["path"] == str(sd)
    code, err = _cli(capsys, monkeypatch, "generate", "photo 1", "--model", sd, "--mode", "student", "--student",
                     tmp_path / "run" / "student", "--out", tmp_path / "gen")
    assert code == 0, err
    code, err = _cli(capsys, monkeypatch, "distill", "adversarial", "--teacher", sd, "--data", data, "--features",
                     "world-clip", "--max-steps", 1, "--out", tmp_path / "bad")
    assert code == 2 and "world-clip needs a world teacher" in err, err
    code, err = _cli(capsys, monkeypatch, "distill", "adversarial", "--teacher", sd, "--data", data, "--features",
                     sd / "text_encoder", "--max-steps", 1, "--out", tmp_path / "bad2")
    assert code == 2 and "is a 'clip_text_model' model; expected 'world-clip' or a DINOv2" in err, err


# -- bad options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"distill_weighting": "l1"}, "distill_weighting must be one of"),
    ({"distill_lambda": -1.0}, "distill_lambda"),
    ({"r1_gamma": -1e-5}, "r1_gamma"),
    ({"prediction_type": "epsilon", "student_schedule": "zero-snr"}, "ε-prediction is undefined"),
    ({"prediction_type": "sample"}, "goes with student_schedule .zero-snr."),
    ({"hinge": "per-batch"}, "hinge must be one of"), ({"augment": "color,blur"}, "unknown blur"),
    ({"real_images": "renders"}, "real_images must be one of"), ({"distill_reduction": "max"}, "distill_reduction"),
    ({"student_steps": 0}, "student_steps"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"feature_layers": 0}, "feature_layers"),
    ({"disc_lr": 0.0}, "disc_lr"),
    ({"features": " "}, "features must be"),
])
def test_bad_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AdversarialConfig(**kwargs)


def test_bad_options_are_one_line(spec, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"feature_layers must be in \[1, 1\]"):
        load_feature_network("world-clip", spec, layers=2)
    for option, value, needle in (("--distill-weighting", "l1", "distill_weighting must be one of"),
                                  ("--distill-lambda", -1, "distill_lambda")):
        code, err = _cli(capsys, monkeypatch, "distill", "adversarial", option, value, "--max-steps", 1, "--out",
                         tmp_path / "run")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
