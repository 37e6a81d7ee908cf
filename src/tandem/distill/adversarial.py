"""Adversarial diffusion distillation (Sauer et al., *Adversarial Diffusion Distillation*, ADD).

Three networks (section 3.1): the **student** θ, initialised from the teacher's UNet; a
**discriminator** φ, trainable heads ``D_φ,k`` on the features ``F_k`` of a frozen feature network
``F``; the frozen **teacher** ψ. For data ``x₀`` (VAE latents) with caption ``c``:

* student input ``x_s = α_s x₀ + σ_s ε`` with ``s`` uniform on ``N`` student timesteps ``τ_n`` (the
  trailing grid, ``τ_1 = T - 1``: 999, 749, 499, 249 for N = 4). ``student_schedule="teacher"`` (the
  default): the teacher's own schedule and parametrisation (its ε, say), so the student starts as exactly
  the denoiser its teacher is, and starts sampling from pure noise at ``τ_1 = 999`` (``ᾱ_999`` is
  negligible: 0.0047 on SD's schedule), as ``pd`` and ``dmd2`` do. ``"zero-snr"`` (the first release's):
  the teacher's schedule with **zero terminal SNR** enforced (diffusers' ``rescale_betas_zero_snr``) and
  the student read as predicting **v**, where the teacher's ε-weights start as a broken denoiser at high
  noise (kept for the ablation);
* Eq. (1): ``L = L_adv^G(x̂_θ, φ) + λ L_distill(x̂_θ, ψ)``, ``λ = 2.5``;
* Eq. (2), (3): hinge losses ``L_adv^G = -E[Σ_k D_k(F_k(x̂_θ))]`` and ``L_adv^D = E[Σ_k max(0, 1 - D_k(F_k(x₀)))
  + γ R1] + E[Σ_k max(0, 1 + D_k(F_k(x̂_θ)))]``, with ``R1 = Σ_k ||∇_{F_k} D_k||²`` on the heads' inputs
  (the real features), ``γ = 1e-5``;
* Eq. (4): ``L_distill = E_{t,ε'}[c(t) ||x̂_θ - x̂_ψ(sg(x̂_θ,t); t)||²]`` with ``x̂_θ,t = α_t x̂_θ + σ_t ε'`` on the
  teacher's schedule, ``t ~ U{0..T-1}``, and ``x̂_ψ = (x̂_θ,t - σ_t ε̂_ψ)/α_t`` from the teacher's
  classifier-free guided ε̂. ``c(t) = α_t`` ("exponential", the default); "sds": ``c(t) = α_t w(t)/(2σ_t)``
  with DreamFusion's ``w(t) = σ_t²`` (appendix A: the gradient is then SDS's ``w(t)(ε̂ - ε')``); "nfsd":
  the same ``c(t)`` with ε̂ - ε' replaced by noise-free score distillation's ``δ = w(ε_c - ε_u) + δ_D``,
  ``δ_D = ε_u`` for ``t < 0.2 T`` else ``ε_u - ε_neg`` (Katzir et al.; a negative prompt).

Choices where the paper leaves them open (documented, each an option where it matters):

* ``‖·‖²`` is the squared norm, summed over latent elements (``distill_reduction="sum"``; the paper sums
  over pixels); ``"mean"`` (the first release's) divides it by their number, which left the distillation
  gradient, the only way guidance reaches the student, far below the adversarial one.
* The discriminator (``tandem.distill.discriminator``) is StyleGAN-T's: heads on ``F``'s blocks, spectrally
  normalised, a logit per token, the hinge per token then averaged; images augmented (DiffAugment) before
  ``F``. ``F`` is a ViT — the world's own CLIP vision tower (the world's stand-in for DINOv2; ``--features
  world-clip``) or a transformers ``Dinov2Model`` (hub id or path; ADD's best, Table 1a:
  ``facebook/dinov2-small``, the default for other teachers). Heads sit on ``feature_layers`` blocks spaced
  evenly and ending at the last (StyleGAN-T's blocks 3, 6, 9, 12 of a ViT-S), projected (Miyato & Koyama)
  onto the conditioning ``[c_text, c_img]``: ``c_text`` is the teacher text encoder's pooled output (CLIP's
  EOS state); ``c_img`` is ``F``'s CLS embedding of the (unaugmented) *real* image ``x₀`` the sample was made
  from (Table 1b: both). Real images are the data's pixels (``real_images="pixels"``) or their VAE
  reconstruction ``decode(encode(x₀))`` (``"vae"``: real and fake then share the decoder's signature);
  generated ones are ``x̂_θ`` decoded by the frozen VAE, through which ``L_adv^G`` reaches the student
  (``F`` passes gradients to its inputs; its weights never train).
* The student samples without guidance (one UNet call per step) by DDIM on the trailing grid of its
  schedule: one step is ``x̂_θ(ε, 999)``; at 2 and 4 steps every timestep is a training timestep. It ships
  with diffusers' ``DPMSolverMultistepScheduler`` at order 1 (DDIM exactly, and unlike ``DDIMScheduler`` it
  takes explicit timesteps, which an edit's part-way schedule needs); on the zero-SNR schedule that
  scheduler keeps ᾱ at the last timestep at 2⁻²⁴ rather than 0 (its first σ/α stays finite), a change of
  about 2·10⁻⁴ in the first step's x₀.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..denoiser import NoiseSchedule, trailing_timesteps
from ..models import resolve_model
from ..students import StudentInfo, save_student
from ..training.checks import require_decay, require_number
from ..training.config import Trainable
from ..training.method import StepContext
from .common import TeacherParts, run_method, teacher_record
from .discriminator import (
    DEFAULT_DINOV2,
    HINGES,
    WORLD_CLIP,
    Discriminator,
    FeatureNetwork,
    diff_augment,
    hinge_d,
    hinge_g,
    load_feature_network,
    parse_augment,
    r1_penalty,
)
from .progressive import student_scheduler as dpm_student_scheduler

WEIGHTINGS = ("exponential", "sds", "nfsd")
STUDENT_SCHEDULES = ("teacher", "zero-snr")
STUDENT_PREDICTIONS = ("v_prediction", "sample")  # on the zero-SNR schedule (ε is undefined at SNR 0)
REDUCTIONS = ("sum", "mean")
REAL_IMAGES = ("pixels", "vae")
# Katzir et al.'s negative prompt for NFSD's domain term
NFSD_NEGATIVE = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
NFSD_SMALL_T = 0.2  # NFSD: below 0.2 T the domain term is ε_u alone (t < 200 of 1000)


@dataclass(frozen=True)
class AdversarialConfig:
    student_steps: int = 4  # N: student timesteps on the trailing grid (τ_1 = T - 1)
    student_schedule: str = "teacher"  # the teacher's schedule and parametrisation, or "zero-snr" (v or sample)
    prediction_type: str | None = None  # zero-snr: what the student predicts [v_prediction]; teacher: its own
    guidance_scale: float | None = None  # the teacher's CFG scale in L_distill [the teacher's default]
    distill_weighting: str = "exponential"  # c(t): exponential (α_t), sds or nfsd
    distill_lambda: float = 2.5  # λ of Eq. (1)
    distill_reduction: str = "sum"  # ||·||² over latent elements: "sum" (a squared norm) or "mean"
    r1_gamma: float = 1e-5  # γ of Eq. (3)
    features: str | None = None  # "world-clip" or a DINOv2 hub id / path [world-clip for a world teacher]
    feature_layers: int | None = None  # heads, on this many blocks of F [min(4, F's blocks)]
    feature_resolution: int | None = None  # F's input size [F's image_size, at most 224]
    cmap_dim: int = 64  # width of the heads' projection onto the conditioning
    hinge: str = "per-token"  # the hinge on each token's logit, then averaged; "per-image": on their average
    spectral_norm: bool = True  # in the heads' convolutions (StyleGAN-T)
    augment: str = "color,translation,cutout"  # DiffAugment before F, on real and generated images ("" none)
    real_images: str = "pixels"  # the discriminator's real images: the data's "pixels" or their "vae" reconstruction
    nfsd_negative_prompt: str = NFSD_NEGATIVE
    lr: float = 2e-5  # the student's
    disc_lr: float = 1e-4  # the heads' (Adam betas 0, 0.99, as StyleGAN-T's discriminator)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float | None = None  # also keep an EMA of the student with this decay and export it

    def __post_init__(self):
        require_number(self.student_steps, "student_steps", integer=True, at_least=1, at_most=1000)
        if self.student_schedule not in STUDENT_SCHEDULES:
            raise ValueError(f"student_schedule must be one of {STUDENT_SCHEDULES}, got {self.student_schedule!r}")
        if self.student_schedule == "teacher" and self.prediction_type is not None:
            raise ValueError("prediction_type goes with student_schedule 'zero-snr'; on the teacher's schedule the "
                             "student predicts what its teacher does")
        if self.student_schedule == "zero-snr" and self.prediction_type not in (None, *STUDENT_PREDICTIONS):
            raise ValueError(f"prediction_type must be one of {STUDENT_PREDICTIONS} (an ε-prediction is undefined "
                             f"at the zero terminal SNR the student starts from), got {self.prediction_type!r}")
        for value, name, options in ((self.distill_reduction, "distill_reduction", REDUCTIONS),
                                     (self.hinge, "hinge", HINGES), (self.real_images, "real_images", REAL_IMAGES)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        parse_augment(self.augment)
        if self.guidance_scale is not None:
            require_number(self.guidance_scale, "guidance_scale (the teacher's)", at_least=1.0)
        if self.distill_weighting not in WEIGHTINGS:
            raise ValueError(f"distill_weighting must be one of {WEIGHTINGS}, got {self.distill_weighting!r}")
        require_number(self.distill_lambda, "distill_lambda (λ)", at_least=0.0)
        require_number(self.r1_gamma, "r1_gamma (γ)", at_least=0.0)
        if self.features is not None and not self.features.strip():
            raise ValueError("features must be 'world-clip' or a DINOv2 hub id or path, got an empty name")
        if self.feature_layers is not None:
            require_number(self.feature_layers, "feature_layers", integer=True, at_least=1)
        if self.feature_resolution is not None:
            require_number(self.feature_resolution, "feature_resolution", integer=True, at_least=1)
        require_number(self.cmap_dim, "cmap_dim", integer=True, at_least=1)
        require_number(self.lr, "lr", above=0.0)
        require_number(self.disc_lr, "disc_lr", above=0.0)
        require_number(self.warmup_steps, "warmup_steps", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.grad_clip, "grad_clip", above=0.0)
        if self.ema is not None:
            require_decay(self.ema, "ema (EMA decay)")


# -- the method --------------------------------------------------------------------------------------------

def student_scheduler(teacher_scheduler_config: dict, prediction_type: str = "v_prediction", zero_snr: bool = True):
    """The student's sampler: DDIM on the trailing grid of the teacher's schedule (with zero terminal SNR, or the
    teacher's own)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(teacher_scheduler_config, rescale_betas_zero_snr=zero_snr,
                                     timestep_spacing="trailing", prediction_type=prediction_type,
                                     set_alpha_to_one=True, clip_sample=False, thresholding=False)


class AdversarialDistillation:
    """ADD for :class:`~tandem.training.trainer.Trainer`: trainables ``student`` and ``discriminator`` (the heads).

    Args:
        teacher: a ``StableDiffusionPipeline``-like teacher (ε-, v- or x₀-predicting).
        cfg: with ``guidance_scale`` set (the distillation's CFG scale).
        features: the frozen feature network ``F``.
        seed: seeds the heads' initialisation.
    """

    name = "adversarial"
    divergence_hint = "a lower lr or disc_lr"  # what a resumed run may lower (training.checkpoints.RESUMABLE_CHANGES)
    uses_data = True

    def __init__(self, teacher, cfg: AdversarialConfig, features: FeatureNetwork, seed: int = 0):
        if cfg.guidance_scale is None:
            raise ValueError("AdversarialDistillation needs cfg.guidance_scale (the teacher's CFG scale)")
        self.cfg, self.features = cfg, features.eval().requires_grad_(False)
        self.parts = TeacherParts(teacher)
        self.schedule = self.parts.schedule  # the teacher's
        if self.schedule.zero_terminal_snr:
            raise ValueError("the teacher's own schedule ends at zero SNR, where its x0 target of Eq. (4) is undefined")
        self.zero_snr = cfg.student_schedule == "zero-snr"
        self.prediction_type = (cfg.prediction_type or "v_prediction") if self.zero_snr else self.parts.prediction_type
        self.sampler_config = dict(student_scheduler(self.parts.scheduler_config, self.prediction_type,
                                                     self.zero_snr).config)
        self.student_schedule = NoiseSchedule.from_scheduler(self.sampler_config)
        self.augment = parse_augment(cfg.augment)
        self.student_timesteps = torch.tensor(trailing_timesteps(cfg.student_steps,
                                                                 self.student_schedule.num_train_timesteps))
        self.student = copy.deepcopy(self.parts.teacher_unet).float().requires_grad_(True).train()
        text_dim = int(self.parts.text_encoder.config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminator = Discriminator(features.channels, len(features.layers), text_dim + features.channels,
                                               cfg.cmap_dim, spectral_norm=cfg.spectral_norm, hinge=cfg.hinge)
        self._negative: torch.Tensor | None = None

    def trainables(self) -> list[Trainable]:
        cfg = self.cfg
        return [Trainable("student", self.student, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
                          emas={"sampling": cfg.ema} if cfg.ema is not None else {}),
                Trainable("discriminator", self.discriminator, lr=cfg.disc_lr, betas=(0.0, 0.99),
                          grad_clip=cfg.grad_clip)]

    def frozen(self) -> dict[str, nn.Module]:
        return {**self.parts.frozen(), "features": self.features}

    # -- pieces, public so that tests can check them against independent computations -------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, D] (the UNets' condition) and the pooled embedding [B, D] (``c_text``)."""
        tok = self.parts.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = self.parts.text_encoder(ids)
        return out[0], out[1]

    def student_x0(self, unet, x_s: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x̂_θ(x_s, s)`` from the student's prediction on its schedule (the teacher's parametrisation, or v/x₀ on
        the rescaled one)."""
        pred = unet(x_s, s.to(x_s.device), encoder_hidden_states=cond).sample
        return self.student_schedule.to_x0(pred, x_s, s.cpu(), self.prediction_type)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of latents by the frozen VAE (differentiable in the latents)."""
        return self.parts.vae.decode(latents / self.parts.vae.config.scaling_factor).sample

    def distill_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``c(t)`` [B] (float32): ``α_t`` (exponential) or ``α_t w(t) / (2σ_t)`` with ``w(t) = σ_t²`` (sds, nfsd)."""
        alpha, sigma = self.schedule.coefficients(t, torch.empty(len(t), dtype=torch.float64))
        return (alpha if self.cfg.distill_weighting == "exponential" else alpha * sigma / 2).to(torch.float32)

    @torch.no_grad()
    def distill_target(self, x_hat: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor
                       ) -> torch.Tensor:
        """The stop-gradient target of Eq. (4) at ``x̂_θ,t = α_t x̂_θ + σ_t ε'`` (teacher's schedule, ``t`` [B] on the
        CPU): the teacher's guided x₀, or for NFSD ``x̂_θ - (σ_t/α_t) δ``."""
        x_hat = x_hat.detach()
        x_t = self.schedule.add_noise(x_hat, noise, t)
        b, tt, w = len(x_hat), t.to(x_hat.device), torch.full((len(x_hat),), self.cfg.guidance_scale)
        uncond = self.parts.uncond(b, x_hat.device)
        if self.cfg.distill_weighting != "nfsd":
            return self.parts.teacher_x0(x_t, tt, cond, uncond, w.to(x_hat.device))
        eps_c = self.parts.teacher_eps(x_t, tt, cond, None, None)
        eps_u = self.parts.teacher_eps(x_t, tt, uncond, None, None)
        eps_neg = self.parts.teacher_eps(x_t, tt, self._negative_embeddings(b, x_hat.device), None, None)
        small = (t < NFSD_SMALL_T * self.schedule.num_train_timesteps).reshape(-1, 1, 1, 1).to(x_hat.device)
        delta = w.reshape(-1, 1, 1, 1).to(x_hat) * (eps_c - eps_u) + torch.where(small, eps_u, eps_u - eps_neg)
        alpha, sigma = self.schedule.coefficients(t, x_hat)
        return x_hat - sigma / alpha * delta

    def _negative_embeddings(self, batch: int, device) -> torch.Tensor:
        if self._negative is None:
            self._negative = self.parts.encode_text([self.cfg.nfsd_negative_prompt], device)
        return self._negative.to(device).expand(batch, -1, -1)

    def distill_loss(self, x_hat: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``E[c(t) ||x̂_θ - target||²]``, the squared norm summed over latent elements (``"mean"``: averaged)."""
        squared = (x_hat.float() - target.float()).pow(2).flatten(1)
        per_sample = squared.sum(1) if self.cfg.distill_reduction == "sum" else squared.mean(1)
        return (self.distill_weight(t).to(per_sample.device) * per_sample).mean()

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def see(self, pixels: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """``F``'s token features of augmented ``pixels`` (differentiable in them)."""
        return self.features(diff_augment(pixels, self.augment, g) if self.augment else pixels)[0]

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        g, device = ctx.generator, ctx.device
        real = batch["pixels"].to(device)
        latents = self.parts.encode_images(batch["pixels"], g).to(device)
        b = len(latents)
        cond, text_emb = self.encode_text(list(batch["captions"]), device)
        s = self.student_timesteps[torch.randint(0, len(self.student_timesteps), (b,), generator=g)]
        x_s = self.student_schedule.add_noise(latents, torch.randn(latents.shape, generator=g).to(device), s)
        with torch.no_grad():
            _, real_cls = self.features(real)  # c_img: the real image as it is
            if self.cfg.real_images == "vae":
                real = self.decode(latents).clamp(-1, 1)
            real_features = self.see(real, g) if update == "discriminator" else None
        head_cond = torch.cat([text_emb, real_cls], dim=1)  # [c_text, c_img]
        if update == "student":
            x_hat = self.student_x0(ctx.model("student"), x_s, s, cond)
            fake_features = self.see(self.decode(x_hat), g)
            disc = ctx.unwrapped("discriminator")
            mode = disc.training
            disc.eval()  # spectral norm's power iteration is the discriminator's own state: the student's pass reads it
            try:
                fake_logits = disc(fake_features, head_cond)
            finally:
                disc.train(mode)
            g_adv = hinge_g(fake_logits)
            t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)
            target = self.distill_target(x_hat, t, torch.randn(latents.shape, generator=g).to(device), cond)
            distill = self.distill_loss(x_hat, target, t)
            losses = {"loss": g_adv + self.cfg.distill_lambda * distill, "g_adv": g_adv, "distill": distill,
                      "fake_logit": fake_logits.detach().mean()}
        elif update == "discriminator":
            with torch.no_grad():
                fake_features = self.see(self.decode(self.student_x0(ctx.unwrapped("student"), x_s, s, cond)), g)
            real_features = [f.detach().requires_grad_(True) for f in real_features]
            disc = ctx.model("discriminator")
            real_logits, fake_logits = disc(real_features, head_cond), disc(fake_features, head_cond)
            d_loss = hinge_d(real_logits, fake_logits)
            r1 = r1_penalty(real_logits, real_features)
            losses = {"loss": d_loss + self.cfg.r1_gamma * r1, "d_loss": d_loss, "r1": r1,
                      "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}
        else:
            raise KeyError(f"adversarial distillation trains 'student' and 'discriminator', not {update!r}")
        return losses


# -- export -----------------------------------------------------------------------------------------------

def export_student(unet, out_dir: Path, method: AdversarialDistillation, teacher_spec, optimisation_steps: int,
                   weights: str = "student") -> Path:
    cfg = method.cfg
    info = StudentInfo(
        method="adversarial", scheduler="DPMSolverMultistepScheduler", prediction_type=method.prediction_type,
        guidance="none",
        steps=cfg.student_steps, guidance_scale=1.0, teacher=teacher_record(teacher_spec),
        timesteps=trailing_timesteps(cfg.student_steps, method.student_schedule.num_train_timesteps),
        details={"zero_terminal_snr": method.zero_snr, "optimisation_steps": optimisation_steps, "weights": weights,
                 "teacher_guidance_scale": cfg.guidance_scale, "features": method.features.name,
                 "feature_blocks": method.features.layers, "feature_resolution": method.features.resolution,
                 "config": asdict(cfg)})
    return save_student(copy.deepcopy(unet).float(), out_dir, dpm_student_scheduler(method.sampler_config), info)


def distill_adversarial(teacher: str, out_dir: str | Path, cfg: AdversarialConfig, trainer_cfg,
                        data: str = "world", resume: bool = False) -> Path:
    """Adversarial diffusion distillation of ``teacher`` into ``out_dir/student`` (a student sampled by DDIM in
    ``cfg.student_steps`` steps, or fewer, without guidance)."""
    spec = resolve_model(teacher)
    features = cfg.features or (WORLD_CLIP if spec.is_world else DEFAULT_DINOV2)
    if features == WORLD_CLIP and not spec.is_world:
        raise ValueError(f"features='world-clip' needs a world teacher, not {teacher!r}; give features=... a DINOv2 "
                         f"hub id or path (e.g. {DEFAULT_DINOV2})")
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else float(spec.teacher.guidance_scale)
    cfg = replace(cfg, features=features, guidance_scale=guidance)

    def make(pipe, spec, out: Path):
        network = load_feature_network(features, spec, cfg.feature_layers, cfg.feature_resolution)
        return AdversarialDistillation(pipe, cfg, network, seed=trainer_cfg.seed)

    def config(spec, source):
        return {"adversarial": asdict(cfg)}

    def export(trainer, method, spec, student_dir: Path) -> None:
        ema = "sampling" if cfg.ema is not None else None
        export_student(trainer.export("student", ema), student_dir, method, spec, trainer.steps_done,
                       weights="ema" if ema else "student")

    return run_method(method_name="adversarial", teacher=teacher, out_dir=out_dir, trainer_cfg=trainer_cfg, data=data,
                      resume=resume, make_method=make, run_config=config, export=export)
