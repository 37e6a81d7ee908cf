"""DMD2: improved distribution matching distillation (Yin et al. 2024, *Improved Distribution Matching
Distillation for Fast Image Synthesis*; DMD: Yin et al. 2023).

The student starts as the teacher's UNet; its output ``x`` (an x₀) follows the distribution-matching gradient

    ∇_θ KL ≈ E_{s,ε}[ w (x̂₀_fake(x_s, s) - x̂₀_real(x_s, s)) ∂x/∂θ ],   x_s = α_s x + σ_s ε,  s ~ U{0.02 T .. 0.98 T},

with the real x̂₀ the frozen teacher's under classifier-free guidance, the fake one a *critic*'s (a trainable
copy of the teacher's UNet, unguided) and ``w = 1 / mean|x - x̂₀_real|`` per sample (DMD's normalisation),
applied as the surrogate ``0.5 mean((x - sg(x - g))²)``, whose gradient in ``x`` is ``g / x.numel()``.

* The critic tracks the student's distribution by denoising score matching on detached student outputs
  (MSE in the teacher's parameterisation at ``t ~ U{0..T-1}``) and updates ``critic_updates`` times per
  student update (two time-scale update rule: the student is a Trainer network with ``every =
  critic_updates``; the critic updates on every step, after the student on shared ones).
* GAN (``gan_weight > 0``): a classifier on the critic's bottleneck (its UNet's mid block) sees latents
  noised to ``t ~ U{0..gan_max_timestep-1}`` (clean at t = 0 when that is 0); the critic learns the batch's
  real VAE latents against student outputs with ``gan_critic_weight (softplus(l_fake) + softplus(-l_real))``,
  the student minimises ``gan_weight softplus(-l_fake)``. Off by default (DMD2: 1e-3 for SD 1.5, 5e-3 for
  SDXL); it has not been measured on the world yet.
* Multi-step students train with *backward simulation*: the student's own rollout from pure noise through
  its timesteps (trailing grid: 999/749/499/249 for 4 steps), without gradients, gives the input at a step
  index drawn once per micro-batch. Without it the input is real latents noised to that timestep (pure
  noise at the first step).
* Regression (``regression_weight > 0``; DMD's, as an MSE in latent space rather than LPIPS): the student's
  one-step output from the rollout's pure noise against the teacher's guided DDIM sample from that noise.

Sampling: between steps the student re-noises its x₀ with the noise its own prediction implies (DDIM,
η = 0), in backward simulation and at export alike. DMD2's sampler re-noises with fresh noise (LCM-style),
but tandem samples ``LCMScheduler`` students only with a w-embedding (:func:`tandem.sampling.consistency_sample`);
so the student (guidance ``none``) ships, like the progressive ones, with ``DPMSolverMultistepScheduler`` at
order 1 on the trailing grid: DDIM on that grid exactly (tested through ``load_student``'s pipeline).

Options (DDIL, Garrepalli et al.): ``ddil`` replaces backward simulation as the choice of the student's
inputs at the drawn step (section 4.2: mixed rollouts of student and teacher down to that step, the teacher
guided on the ``regression_steps`` trailing grid; also forward diffusion and the teacher's rollouts; no DAgger
buffer); ``reflect`` thresholds the x₀ of the real score,
the fake critic and the student, in training and at sampling (:mod:`tandem.reflect`).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import trailing_timesteps
from ..reflect import Reflection, reflected
from ..students import StudentInfo, save_student
from ..training.checks import require_decay, require_number
from ..training.config import Trainable
from ..training.method import StepContext
from .common import TeacherParts, options_config, resolve_reflection, run_method, teacher_record, variants
from .critic import Critic, parameters_frozen
from .ddil import DDILSampler, DDILSpec, Denoiser
from .progressive import student_scheduler


@dataclass(frozen=True)
class DMD2Config:
    steps: int = 4  # student sampling steps, on the trailing grid (4: 999, 749, 499, 249)
    real_guidance: float | None = None  # the real score's classifier-free guidance [the teacher's default scale]
    critic_updates: int = 5  # critic updates per student update (two time-scale update rule)
    dm_t_range: tuple[float, float] = (0.02, 0.98)  # distribution-matching timesteps, as fractions of T
    backward_simulation: bool | None = None  # the student's own rollouts supply its inputs [on for steps > 1]
    gan_weight: float = 0.0  # the student's GAN loss weight (0: no GAN classifier)
    gan_critic_weight: float = 1e-2  # the critic's classification loss weight (with gan_weight > 0)
    gan_max_timestep: int = 1000  # the classifier's inputs are noised to t ~ U{0..max-1}; 0: clean
    regression_weight: float = 0.0  # weight of the MSE to the teacher's DDIM sample from the same noise
    regression_steps: int = 25  # the teacher's DDIM steps for the regression target
    lr: float = 1e-5  # the student's peak LR (DMD2, SD 1.5)
    critic_lr: float | None = None  # the critic's [lr]
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema: float | None = None  # export this EMA of the student's weights [the student itself]

    def __post_init__(self):
        require_number(self.steps, "steps (student sampling steps)", integer=True, at_least=1, at_most=1000)
        if self.real_guidance is not None:
            require_number(self.real_guidance, "real_guidance (the teacher's guidance scale)", at_least=1.0)
        require_number(self.critic_updates, "critic_updates", integer=True, at_least=1)
        if len(self.dm_t_range) != 2:
            raise ValueError(f"dm_t_range must be two fractions of T, got {self.dm_t_range!r}")
        for f in self.dm_t_range:
            require_number(f, "dm_t_range (fractions of T)", at_least=0.0, at_most=1.0)
        if not self.dm_t_range[0] <= self.dm_t_range[1]:
            raise ValueError(f"dm_t_range must be (low, high) with low <= high, got {self.dm_t_range!r}")
        if self.backward_simulation and self.steps == 1:
            raise ValueError("backward simulation needs steps > 1 (a 1-step student always starts from noise)")
        require_number(self.gan_weight, "gan_weight", at_least=0.0)
        require_number(self.gan_critic_weight, "gan_critic_weight", at_least=0.0)
        require_number(self.gan_max_timestep, "gan_max_timestep", integer=True, at_least=0, at_most=1000)
        require_number(self.regression_weight, "regression_weight", at_least=0.0)
        require_number(self.regression_steps, "regression_steps", integer=True, at_least=1, at_most=1000)
        require_number(self.lr, "lr", above=0.0)
        if self.critic_lr is not None:
            require_number(self.critic_lr, "critic_lr", above=0.0)
        require_number(self.warmup_steps, "warmup_steps", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.grad_clip, "grad_clip", above=0.0)
        if self.ema is not None:
            require_decay(self.ema, "ema (EMA decay)")

    @property
    def simulates(self) -> bool:
        """Whether the student's inputs come from its own rollouts (backward simulation)."""
        return self.steps > 1 if self.backward_simulation is None else self.backward_simulation

    @property
    def uses_gan(self) -> bool:
        return self.gan_weight > 0


# -- the method ---------------------------------------------------------------------------------------------

def check_ddil(cfg: DMD2Config, ddil: DDILSpec | None) -> None:
    """DMD2 takes DDIL as on-policy rollouts to a step of a multi-step student (section 4.2)."""
    if ddil is not None and (ddil.buffer or cfg.steps == 1 or cfg.backward_simulation is not None):
        raise ValueError("dmd2 takes ddil as on-policy rollouts to a step of a multi-step student, so it needs "
                         "steps > 1, no buffer=, and no backward_simulation setting (DDIL chooses the inputs)")


class DMD2Distillation:
    """DMD2 for :class:`~tandem.training.trainer.Trainer`: trainables ``student`` and ``critic``.

    Args:
        teacher: a ``StableDiffusionPipeline``-like teacher (ε-, v- or x₀-predicting, guided classifier-free).
        default_guidance: the real score's guidance scale when ``cfg.real_guidance`` is None.
        seed: initialises the GAN head.
        ddil, reflect: the DDIL options (module docstring).
    """

    name = "dmd2"
    divergence_hint = "a lower lr or critic_lr"  # what a resumed run may lower (training.checkpoints.RESUMABLE_CHANGES)
    uses_data = True

    def __init__(self, teacher, cfg: DMD2Config, default_guidance: float | None = None, seed: int = 0,
                 ddil: DDILSpec | None = None, reflect: Reflection | None = None):
        self.cfg = cfg
        self.parts = TeacherParts(teacher)
        self.schedule = self.parts.schedule
        check_ddil(cfg, ddil)
        self.ddil = DDILSampler(ddil, self.schedule) if ddil is not None else None
        self.reflect = self.parts.reflect = reflect
        guidance = cfg.real_guidance if cfg.real_guidance is not None else default_guidance
        if guidance is None:
            raise ValueError("DMD2 needs the real score's guidance scale: give real_guidance (the teacher has no default)")
        require_number(guidance, "the real score's guidance scale (real_guidance)", at_least=1.0)
        self.real_guidance = float(guidance)
        unet = self.parts.teacher_unet
        if unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("DMD2 needs a teacher guided classifier-free; this teacher UNet takes a w-embedding")
        self.student = copy.deepcopy(unet).float().requires_grad_(True).train()
        self.critic = Critic(unet, cfg.uses_gan, seed)
        T = self.schedule.num_train_timesteps
        self.timesteps = trailing_timesteps(cfg.steps, T)  # the student's sampling grid
        self.dm_t_low, self.dm_t_high = (min(int(f * T), T - 1) for f in cfg.dm_t_range)  # both included
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (unet.config.in_channels, *size)

    def trainables(self) -> list[Trainable]:
        cfg = self.cfg
        common = {"weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps, "grad_clip": cfg.grad_clip}
        return [Trainable("student", self.student, lr=cfg.lr, every=cfg.critic_updates,
                          emas={"sampling": cfg.ema} if cfg.ema is not None else {}, **common),
                Trainable("critic", self.critic, lr=cfg.critic_lr or cfg.lr, **common)]

    def frozen(self) -> dict[str, nn.Module]:
        return self.parts.frozen()

    # -- pieces, public so that tests can check them against independent computations -------------------

    def x0_of(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x̂₀ of a UNet in the teacher's parameterisation (student, critic), reflected when on."""
        x0 = self.schedule.to_x0(unet(x, t, encoder_hidden_states=cond).sample, x, t, self.parts.prediction_type)
        return reflected(self.reflect, x0)

    @torch.no_grad()
    def backward_simulation(self, student, noise: torch.Tensor, cond: torch.Tensor, index: int) -> torch.Tensor:
        """The student's own sampling state at ``timesteps[index]``: ``index`` DDIM steps of the student from
        pure ``noise`` [B, C, h, w] (DMD2 section 4.5), without gradients."""
        x = noise
        for i in range(index):
            t = torch.full((x.shape[0],), self.timesteps[i], device=x.device)
            x = self.schedule.ddim_step(x, self.x0_of(student, x, t, cond), self.timesteps[i], self.timesteps[i + 1])
        return x

    @torch.no_grad()
    def dmd_gradient(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                     fake_unet) -> dict[str, torch.Tensor]:
        """The distribution-matching gradient on student outputs ``x`` [B, C, h, w] at timesteps ``t`` [B]
        with ``noise``: ``(x̂₀_fake - x̂₀_real) / mean|x - x̂₀_real|``, the real x̂₀ the teacher's under
        guidance ``real_guidance``, the fake one the critic's (conditional; DMD2's fake guidance is 1)."""
        x = x.detach()
        x_t = self.schedule.add_noise(x, noise, t)
        b = x.shape[0]
        w = torch.full((b,), self.real_guidance, device=x.device)
        x0_real = self.parts.teacher_x0(x_t, t, cond, self.parts.uncond(b, x.device), w)
        x0_fake = self.x0_of(fake_unet, x_t, t, cond)
        weight = 1.0 / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        return {"grad": (x0_fake - x0_real) * weight, "x0_real": x0_real, "x0_fake": x0_fake}

    @staticmethod
    def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The surrogate ``0.5 mean((x - sg(x - grad))²)``: its gradient in ``x`` is ``grad / x.numel()``."""
        return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())

    def dsm_target(self, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """What the critic predicts at ``x_t = α x₀ + σ ε`` in the teacher's parameterisation (ε for ε-models)."""
        return self.schedule.convert(noise, x_t, t, "epsilon", self.parts.prediction_type)

    @torch.no_grad()
    def teacher_ddim(self, noise: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
        """The teacher's guided DDIM sample (η = 0, ``steps`` trailing steps) from pure ``noise``."""
        ts = trailing_timesteps(steps, self.schedule.num_train_timesteps) + [-1]
        b = noise.shape[0]
        uncond, w = self.parts.uncond(b, noise.device), torch.full((b,), self.real_guidance, device=noise.device)
        x = noise
        for t, t_next in itertools.pairwise(ts):
            tt = torch.full((b,), t, device=noise.device)
            x = self.schedule.ddim_step(x, self.parts.teacher_x0(x, tt, cond, uncond, w), t, t_next)
        return x

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def student_input(self, batch: dict, cond: torch.Tensor, ctx: StepContext):
        """``(x at the drawn step, its timesteps [B], the rollout's pure noise)``. Draws, in order: the step
        index, the noise, then (without backward simulation) the batch's VAE latents."""
        g, device, b = ctx.generator, ctx.device, cond.shape[0]
        index = int(torch.randint(0, self.cfg.steps, (1,), generator=g))
        noise = torch.randn((b, *self.latent_shape), generator=g).to(device)
        t = torch.full((b,), self.timesteps[index], device=device)
        if self.ddil is not None:
            x = self._ddil_input(batch, noise, cond, index, ctx)
        elif self.cfg.simulates:
            x = self.backward_simulation(ctx.unwrapped("student"), noise, cond, index)
        elif index == 0:  # the first step starts from pure noise, as sampling does
            x = noise
        else:
            x = self.schedule.add_noise(self.parts.encode_images(batch["pixels"], g).to(device), noise,
                                        self.timesteps[index])
        return x, t, noise

    def _ddil_input(self, batch: dict, noise: torch.Tensor, cond: torch.Tensor, index: int, ctx: StepContext):
        """DDIL's input at the student's step ``index`` (pure noise at the first, as sampling starts)."""
        if index == 0:
            self.ddil.idle()
            return noise
        b, T = cond.shape[0], self.schedule.num_train_timesteps
        drawn = self.ddil.inputs(
            latents=partial(self.parts.encode_images, batch["pixels"], ctx.generator), noise=noise, grid=self.timesteps,
            index=torch.full((b,), index), cond={"cond": cond},
            teacher=Denoiser(partial(self.parts.guided_x0, w=self.real_guidance),
                             trailing_timesteps(self.cfg.regression_steps, T), calls=2),
            student=Denoiser(partial(self.x0_of, ctx.unwrapped("student")), self.timesteps),
            generator=ctx.generator, step=ctx.step)
        return drawn.x

    def _gan_input(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` noised for the classifier (diffusion GAN), with its timesteps."""
        b = x.shape[0]
        if self.cfg.gan_max_timestep == 0:
            return x, torch.zeros((b,), dtype=torch.long, device=x.device)
        t = torch.randint(0, self.cfg.gan_max_timestep, (b,), generator=g)
        noise = torch.randn(x.shape, generator=g).to(x.device)
        return self.schedule.add_noise(x, noise, t), t.to(x.device)

    def student_losses(self, batch: dict, cond: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The student's update: DMD (+ GAN, + regression). Draws after :meth:`student_input`: the DMD
        timesteps and noise, then the classifier's timesteps and noise."""
        cfg, g, device = self.cfg, ctx.generator, ctx.device
        x_t, t, noise = self.student_input(batch, cond, ctx)
        b = x_t.shape[0]
        student = ctx.model("student")
        if cfg.regression_weight > 0:  # one forward: the drawn step and the one-step output from pure noise
            first = torch.full((b,), self.timesteps[0], device=device)
            both = self.x0_of(student, torch.cat([x_t, noise]), torch.cat([t, first]), torch.cat([cond, cond]))
            x, x_one_step = both[:b], both[b:]
        else:
            x = self.x0_of(student, x_t, t, cond)
        s = torch.randint(self.dm_t_low, self.dm_t_high + 1, (b,), generator=g)
        eps = torch.randn(x.shape, generator=g).to(device)
        critic = ctx.unwrapped("critic")
        dm = self.dmd_gradient(x, s.to(device), eps, cond, critic.unet)
        dm_loss = self.dmd_loss(x, dm["grad"])
        out = {"dm_loss": dm_loss.detach(), "dm_grad_norm": dm["grad"].flatten(1).norm(dim=1).mean()}
        loss = dm_loss
        if cfg.uses_gan:
            x_gan, t_gan = self._gan_input(x, g)
            with parameters_frozen(critic):
                logits = critic.logits(x_gan, t_gan, cond)
            gan_loss = F.softplus(-logits).mean()
            loss = loss + cfg.gan_weight * gan_loss
            out |= {"gan_loss": gan_loss.detach(), "logit_fake": logits.detach().mean()}
        if cfg.regression_weight > 0:
            target = self.teacher_ddim(noise, cond, cfg.regression_steps)
            regression = F.mse_loss(x_one_step.float(), target.float())
            loss = loss + cfg.regression_weight * regression
            out["regression_loss"] = regression.detach()
        return {"loss": loss, **out}

    def critic_losses(self, batch: dict, cond: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The critic's update: DSM on a fresh student output (+ GAN). Draws after :meth:`student_input`: the
        DSM timesteps and noise, then the real latents' posterior noise, the classifier's timesteps and noise."""
        cfg, g, device = self.cfg, ctx.generator, ctx.device
        with torch.no_grad():
            x_t, t, _ = self.student_input(batch, cond, ctx)
            x = self.x0_of(ctx.unwrapped("student"), x_t, t, cond)
        b = x.shape[0]
        s = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)
        eps = torch.randn(x.shape, generator=g).to(device)
        x_s = self.schedule.add_noise(x, eps, s)
        s = s.to(device)
        gan = None
        if cfg.uses_gan:
            real = self.parts.encode_images(batch["pixels"], g).to(device)
            x_gan, t_gan = self._gan_input(torch.cat([real, x]), g)
            gan = (x_gan, t_gan, torch.cat([cond, cond]))
        pred, logits = ctx.model("critic")(x_s, s, cond, gan)
        dsm = F.mse_loss(pred.float(), self.dsm_target(x, eps, x_s, s).float())
        out = {"loss": dsm, "dsm_loss": dsm.detach()}
        if cfg.uses_gan:
            logit_real, logit_fake = logits[:b], logits[b:]
            gan_loss = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            out |= {"loss": dsm + cfg.gan_critic_weight * gan_loss, "gan_loss": gan_loss.detach(),
                    "logit_real": logit_real.detach().mean(), "logit_fake": logit_fake.detach().mean()}
        return out

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        cond = self.parts.encode_text(list(batch["captions"]), ctx.device)
        if update == "student":
            losses = self.student_losses(batch, cond, ctx)
        elif update == "critic":
            losses = self.critic_losses(batch, cond, ctx)
        else:
            raise ValueError(f"dmd2 trains 'student' and 'critic', not {update!r}")
        if self.ddil is not None:
            losses |= self.ddil.last_log
        return losses


# -- export -----------------------------------------------------------------------------------------------

def export_student(unet, out_dir: str | Path, method: DMD2Distillation, teacher_spec, optimisation_steps: int,
                   weights: str = "student") -> Path:
    """Save a DMD2 student by the one student contract: DDIM on its trailing grid, no guidance."""
    cfg = method.cfg
    method_name, options = variants("dmd2", method.ddil.spec if method.ddil else None, method.reflect)
    info = StudentInfo(
        method=method_name, scheduler="DPMSolverMultistepScheduler", prediction_type=method.parts.prediction_type,
        guidance="none", steps=cfg.steps, guidance_scale=1.0, teacher=teacher_record(teacher_spec),
        timesteps=list(method.timesteps),
        details={"real_guidance": method.real_guidance, "critic_updates": cfg.critic_updates,
                 "backward_simulation": cfg.simulates and method.ddil is None, "optimisation_steps": optimisation_steps,
                 "student_updates": math.ceil(optimisation_steps / cfg.critic_updates), "weights": weights,
                 "config": asdict(cfg), **options})
    return save_student(copy.deepcopy(unet).float(), out_dir, student_scheduler(method.parts.scheduler_config), info)


def distill_dmd2(teacher: str, out_dir: str | Path, cfg: DMD2Config, trainer_cfg, data: str = "world",
                 resume: bool = False, ddil: DDILSpec | None = None, reflect: Reflection | None = None) -> Path:
    """Distil ``teacher`` into a ``cfg.steps``-step DMD2 student in ``out_dir/student``. ``trainer_cfg.max_steps``
    counts critic updates; the student updates on every ``cfg.critic_updates``-th of them (the first included).
    A log record holds the losses of the networks updated on its step: with ``trainer_cfg.log_every`` > 1 the
    student's appear only where a logged step is one of its updates (``tandem distill dmd2`` logs every step)."""
    check_ddil(cfg, ddil)
    reflection = resolve_reflection(teacher, reflect)
    state = {}

    def make(pipe, spec, out: Path):
        state["method"] = DMD2Distillation(pipe, cfg, default_guidance=spec.teacher.guidance_scale,
                                           seed=trainer_cfg.seed, ddil=ddil, reflect=reflection)
        return state["method"]

    def config(spec, source):
        return {"dmd2": asdict(cfg), "real_guidance": state["method"].real_guidance, **options_config(ddil, reflection)}

    def export(trainer, method, spec, student_dir: Path) -> None:
        weights = "ema" if cfg.ema is not None else "student"
        unet = trainer.export("student", "sampling" if cfg.ema is not None else None)
        export_student(unet, student_dir, method, spec, trainer.steps_done, weights)

    return run_method(method_name="dmd2", teacher=teacher, out_dir=out_dir, trainer_cfg=trainer_cfg, data=data,
                      resume=resume, make_method=make, run_config=config, export=export)
