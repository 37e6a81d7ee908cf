"""``tandem world train vae|clip|teacher``: reproduce ShapesWorld's components from scratch.

Each component trains in its own run directory (``runs.Run``: config, checkpoints,
resume, logs) and, at the end, exports its weights with ``save_pretrained`` into
``<out>/<component>/`` in the layout of a Stable Diffusion repository. The teacher
needs the VAE and the text encoder, taken from ``--world`` (default: the shipped world).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from ..calibration import module_digest
from ..models import encode_captions, quiet_hub_libraries
from .assemble import text_encoder_of
from .models import (
    CLIPArchConfig,
    UNetConfig,
    VAEConfig,
    build_clip,
    build_noise_scheduler,
    build_unet,
    build_vae,
)
from .runs import (
    EMA,
    Run,
    atomic_write_text,
    config_dict,
    require_decay,
    require_number,
    require_probability,
    require_training_fields,
)
from .stream import images_to_tensor, sample_batch
from .tokenizer import build_tokenizer

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class VAETrainConfig:
    arch: VAEConfig = field(default_factory=VAEConfig)
    seed: int = 1
    max_steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-4  # per latent element, relative to the per-pixel reconstruction loss
    checkpoint_every: int = 250
    threads: int = 1

    def __post_init__(self):
        require_training_fields(self)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        require_number(self.kl_weight, "kl_weight", at_least=0.0)


@dataclass
class DecoderTrainConfig:
    """Fine-tune only the VAE decoder (as SD's ft-MSE VAE did): the latent space, and so every
    model trained on it, is unchanged; the images get sharper details."""

    seed: int = 4
    max_steps: int = 600
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    edge_weight: float = 10.0  # extra loss weight on pixels next to a colour boundary
    checkpoint_every: int = 250
    threads: int = 2

    def __post_init__(self):
        require_training_fields(self)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        require_number(self.edge_weight, "edge_weight", at_least=0.0)


@dataclass
class CLIPTrainConfig:
    arch: CLIPArchConfig = field(default_factory=CLIPArchConfig)
    seed: int = 2
    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    checkpoint_every: int = 250
    threads: int = 1

    def __post_init__(self):
        require_training_fields(self)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)


@dataclass
class TeacherTrainConfig:
    arch: UNetConfig = field(default_factory=UNetConfig)
    seed: int = 3
    max_steps: int = 7250
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 500
    lr_schedule: str = "constant"  # after warmup; "cosine" decays to 0 at max_steps
    weight_decay: float = 0.01
    cond_dropout: float = 0.1  # p(caption -> ""), for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    threads: int = 2
    init_from: str | None = None  # warm start: a UNet save_pretrained directory (e.g. a world's unet/)

    def __post_init__(self):
        require_training_fields(self)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_probability(self.cond_dropout, "cond_dropout")
        require_number(self.min_snr_gamma, "min_snr_gamma", above=0.0)
        require_decay(self.ema_decay, "ema_decay")
        require_number(self.grad_clip, "grad_clip", above=0.0)


def noised_batch(captions: list[str], images: np.ndarray, g: torch.Generator, cond_dropout: float, vae,
                 tokenizer, text_encoder, noise_scheduler):
    """A denoising training batch drawn from ``g``: captions dropped to "" with probability ``cond_dropout``
    (for classifier-free guidance), latents sampled from the VAE, a timestep and noise per image.
    Returns (noisy latents, timesteps, caption embeddings, noise)."""
    drop = torch.rand(len(captions), generator=g) < cond_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.no_grad():
        latents = vae.encode(images_to_tensor(images)).latent_dist.sample(g) * vae.config.scaling_factor
        cond = encode_captions(tokenizer, text_encoder, captions)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return noise_scheduler.add_noise(latents, noise, t), t, cond, noise


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon-prediction MSE weighted by Min-SNR-gamma (Hang et al. 2023): (loss, per-sample MSE)."""
    snr = (alphas_cumprod[t] / (1 - alphas_cumprod[t])).float()
    weight = torch.clamp(snr, max=gamma) / snr
    per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    return (weight * per_sample).mean(), per_sample


def _lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'cosine' or 'constant'")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _finish(run: Run, component_dir: Path, summary: dict) -> None:
    atomic_write_text(component_dir / "train_config.json",
                      json.dumps({"component": run.name, "config": config_dict(run.cfg), **summary}, indent=2) + "\n")
    atomic_write_text(run.dir / "done.json", json.dumps(summary, indent=2) + "\n")


def train_vae(out: str | Path, cfg: VAETrainConfig | None = None, resume: bool = False) -> Path:
    cfg = cfg if cfg is not None else VAETrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Run(out, "vae", cfg, resume)
    vae = build_vae(cfg.arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.max_steps))
    state = {"vae": vae, "opt": opt, "sched": sched}
    start = run.load(state) if resume else 0

    def step(i: int) -> dict[str, float]:
        _, images = sample_batch(cfg.seed, i, cfg.batch_size)
        x = images_to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    run.loop(start, cfg.max_steps, step, state, cfg.checkpoint_every)
    vae.eval()
    # SD's latent scaling factor: make the latents of renderings unit-variance
    with torch.no_grad():
        _, images = sample_batch(cfg.seed + 10_000, 0, 1024)
        latents = vae.encode(images_to_tensor(images)).latent_dist.mean
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    target = run.dir / "vae"
    vae.save_pretrained(target)
    _finish(run, target, {"scaling_factor": scaling, "steps": cfg.max_steps})
    return target


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel's 3x3 neighbourhood holds more than one colour, else 0: [B, 1, H, W]."""
    hi = F.max_pool2d(x, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return ((hi - lo).amax(dim=1, keepdim=True) > 0).float()


def _require_vae(vae_dir: str | Path) -> Path:
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").exists():
        raise FileNotFoundError(f"no VAE in {vae_dir} (expected a save_pretrained directory)")
    return vae_dir


def train_vae_decoder(out: str | Path, vae_dir: str | Path, cfg: DecoderTrainConfig | None = None,
                      resume: bool = False) -> Path:
    """Fine-tune the decoder of the VAE in ``vae_dir`` with an edge-weighted reconstruction loss."""
    from diffusers import AutoencoderKL

    cfg = cfg if cfg is not None else DecoderTrainConfig()
    quiet_hub_libraries()
    vae_dir = _require_vae(vae_dir)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Run(out, "vae-decoder", cfg, resume)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.max_steps))
    state = {"vae": vae, "opt": opt, "sched": sched}
    start = run.load(state) if resume else 0

    def step(i: int) -> dict[str, float]:
        _, images = sample_batch(cfg.seed, i, cfg.batch_size)
        x = images_to_tensor(images)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        weight = 1.0 + cfg.edge_weight * edge_map(x)
        err = (recon - x).abs() + (recon - x).pow(2)
        loss = (weight * err).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "mse": (recon - x).pow(2).mean().item()}

    run.loop(start, cfg.max_steps, step, state, cfg.checkpoint_every)
    vae.eval()
    target = run.dir / "vae"
    vae.save_pretrained(target)  # the scaling factor is carried over from vae_dir's config
    _finish(run, target, {"steps": cfg.max_steps, "encoder_from": str(vae_dir)})
    return target


def train_clip(out: str | Path, cfg: CLIPTrainConfig | None = None, resume: bool = False) -> Path:
    cfg = cfg if cfg is not None else CLIPTrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Run(out, "clip", cfg, resume)
    tokenizer = build_tokenizer()
    clip = build_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.arch)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.max_steps))
    state = {"clip": clip, "opt": opt, "sched": sched}
    start = run.load(state) if resume else 0

    def step(i: int) -> dict[str, float]:
        captions, images = sample_batch(cfg.seed, i, cfg.batch_size)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = clip(input_ids=ids, pixel_values=images_to_tensor(images), return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = (out.logits_per_image.argmax(1) == torch.arange(len(captions))).float().mean()
        return {"loss": out.loss.item(), "i2t_acc": acc.item()}

    run.loop(start, cfg.max_steps, step, state, cfg.checkpoint_every)
    clip.eval()
    clip.save_pretrained(run.dir / "clip")
    text_encoder_of(clip).save_pretrained(run.dir / "text_encoder")
    tokenizer.save_pretrained(run.dir / "tokenizer")
    for sub in ("clip", "text_encoder"):
        _finish(run, run.dir / sub, {"steps": cfg.max_steps})
    return run.dir


def _arch(config) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)


def train_teacher(out: str | Path, vae_dir: str | Path, text_dir: str | Path,
                  cfg: TeacherTrainConfig | None = None, resume: bool = False) -> Path:
    """Train the teacher UNet with epsilon prediction and condition dropout for CFG.

    Args:
        vae_dir: the VAE (``save_pretrained`` directory) whose latent space the teacher learns.
        text_dir: a directory holding ``text_encoder/`` and ``tokenizer/`` (a CLIP run or a world).
    """
    from diffusers import AutoencoderKL

    cfg = cfg if cfg is not None else TeacherTrainConfig()
    quiet_hub_libraries()
    vae_dir, text_dir = _require_vae(vae_dir), Path(text_dir)
    missing = [d for d in ("text_encoder", "tokenizer") if not (text_dir / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{text_dir} lacks {', '.join(missing)}/ (the teacher's text encoder)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Run(out, "teacher", cfg, resume)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(text_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(text_dir / "text_encoder").eval().requires_grad_(False)
    noise_scheduler = build_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)
    unet = build_unet(cfg.arch)
    if cfg.init_from is not None:
        from diffusers import UNet2DConditionModel

        warm = UNet2DConditionModel.from_pretrained(cfg.init_from)
        if _arch(warm.config) != _arch(unet.config):
            raise ValueError(f"init_from {cfg.init_from}: its UNet config differs from the teacher arch {cfg.arch}")
        unet.load_state_dict({k: v.float() for k, v in warm.state_dict().items()})
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule))
    state = {"unet": unet, "ema": ema, "opt": opt, "sched": sched}
    start = run.load(state) if resume else 0

    def step(i: int) -> dict[str, float]:
        captions, images = sample_batch(cfg.seed, i, cfg.batch_size)
        g = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, i]).integers(2**62)))
        noisy, t, cond, noise = noised_batch(captions, images, g, cfg.cond_dropout, vae, tokenizer, text_encoder,
                                             noise_scheduler)
        pred = unet(noisy, t, cond).sample
        loss, per_sample = min_snr_loss(pred, noise, t, alphas_cumprod, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(unet)
        return {"loss": loss.item(), "mse": per_sample.mean().item(), "grad_norm": float(gnorm)}

    run.loop(start, cfg.max_steps, step, state, cfg.checkpoint_every)
    unet.load_state_dict(ema.state_dict())  # the exported teacher is the EMA of the weights
    unet.save_pretrained(run.dir / "unet")
    summary = {"steps": cfg.max_steps, "weights": "ema"}
    if cfg.init_from is not None:  # the path may later hold other weights (a shipped dir updated in place)
        summary["init_from_weights"] = module_digest(warm)
    _finish(run, run.dir / "unet", summary)
    return run.dir / "unet"
