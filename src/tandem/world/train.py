"""``tandem world train vae|vae-decoder|clip|teacher``: reproduce ShapesWorld's components from scratch.

Each component is a small method of the one :class:`~tandem.training.trainer.Trainer` (which owns
the run directory, checkpoints, exact resume, EMAs and logs). A world training is data-free from
the Trainer's side: its method draws batch ``ctx.batch_index`` (the step: a world training runs in
one CPU process) from the world's training stream itself. At the end each component exports its
weights with ``save_pretrained`` into ``<out>/<component>/`` in the layout of a Stable Diffusion
repository. The teacher needs the VAE and the text encoder, taken from ``--world`` (default: the
shipped world).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from ..calibration import module_digest
from ..checks import check_model_class, check_weights, load_pretrained
from ..hub import quiet_hub_libraries
from ..models import encode_captions
from ..outputs import atomic_write_text
from ..training.checkpoints import check_run_dir
from ..training.checks import (
    config_dict,
    require_decay,
    require_number,
    require_probability,
    require_training_fields,
)
from ..training.config import Trainable, TrainerConfig
from ..training.schedules import LR_SCHEDULES
from ..training.trainer import Trainer
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
from .stream import images_to_tensor, sample_batch
from .tokenizer import build_tokenizer


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


# -- the run around a world training -------------------------------------------------------------------


def open_world_run(out: str | Path, cfg: Any, resume: bool, keep: tuple[str, ...] = ()) -> None:
    """Before any model loads: refuse a multi-process launch, check (and create) the run directory, set
    torch's threads and seed (the weights' init draws from ``cfg.seed``, as the shipped components' did)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the world's trainings run in one CPU process; start them without torchrun or "
                         "accelerate launch")
    check_run_dir(out, resume, cfg.max_steps, keep=keep)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def world_trainer(method, cfg: Any, out: str | Path, resume: bool, *, batch_size: int | None = None,
                  log_every: int = 50, keep: tuple[str, ...] = ()) -> Trainer:
    """The Trainer of a world training: one CPU process with the config's seed, steps, checkpoint interval and
    threads; ``train_config.json`` records the component and its config (as the exported one does)."""
    trainer_cfg = TrainerConfig(max_steps=cfg.max_steps, seed=cfg.seed,
                                batch_size=batch_size if batch_size is not None else cfg.batch_size,
                                checkpoint_every=cfg.checkpoint_every, log_every=log_every, threads=cfg.threads)
    return Trainer(method, None, trainer_cfg, out, resume=resume, cpu=True, keep=keep,
                   run_config={"component": method.name, "config": config_dict(cfg)})


def run_world_training(out: str | Path, cfg: Any, resume: bool, make_method: Callable[[], Any]):
    """Open the run (:func:`open_world_run`), build the method (after the seed is set: its weights' init
    draws from it), train it on :func:`world_trainer` and return ``(method, trainer)``."""
    open_world_run(out, cfg, resume)
    method = make_method()
    trainer = world_trainer(method, cfg, out, resume)
    trainer.train()
    return method, trainer


def finish_world_run(trainer: Trainer, cfg: Any, component_dirs: list[Path], summary: dict) -> None:
    """``train_config.json`` (component, config and ``summary``) beside each export; then the run's ``done.json``."""
    record = {"component": trainer.method.name, "config": config_dict(cfg), **summary}
    for component_dir in component_dirs:
        atomic_write_text(component_dir / "train_config.json", json.dumps(record, indent=2) + "\n")
    trainer.finish(summary)


def step_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key`` (e.g. ``(seed, step)``): the per-step draws of a world training."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))


# -- VAE ------------------------------------------------------------------------------------------------


class _VAEMethod:
    """What the VAE and decoder trainings share: one network, ``vae``, on a cosine schedule."""

    uses_data = False

    def trainables(self) -> list[Trainable]:
        cfg = self.cfg
        return [Trainable("vae", self.vae, lr=cfg.lr, warmup_steps=cfg.warmup_steps, lr_schedule="cosine",
                          grad_clip=1.0)]

    def frozen(self) -> dict:
        return {}


class VAETraining(_VAEMethod):
    """The VAE's loss on batch ``i`` of the stream ``cfg.seed``: MSE + L1 reconstruction of a posterior sample,
    plus ``kl_weight`` x the KL to N(0, I) per latent element (a KL-weighted ELBO, Kingma & Welling 2014).

    The posterior noise comes from the method's own generator, which starts where torch's global stream stands
    after the weights' init (where the shipped VAE's came from) and is kept in every checkpoint.
    """

    name = "vae"
    uses_data = False

    def __init__(self, cfg: VAETrainConfig):
        self.cfg = cfg
        self.vae = build_vae(cfg.arch)
        self.noise = torch.Generator()
        self.noise.set_state(torch.get_rng_state())

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        _, images = sample_batch(self.cfg.seed, ctx.batch_index, self.cfg.batch_size)
        x = images_to_tensor(images)
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(self.noise)).sample
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return {"loss": rec + self.cfg.kl_weight * kl, "rec": rec.detach(), "kl": kl.detach()}

    def state_dict(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.noise.set_state(state["noise"])


def train_vae(out: str | Path, cfg: VAETrainConfig | None = None, resume: bool = False) -> Path:
    cfg = cfg if cfg is not None else VAETrainConfig()
    method, trainer = run_world_training(out, cfg, resume, lambda: VAETraining(cfg))
    vae = method.vae.eval()
    # SD's latent scaling factor: make the latents of renderings unit-variance
    with torch.no_grad():
        _, images = sample_batch(cfg.seed + 10_000, 0, 1024)
        latents = vae.encode(images_to_tensor(images)).latent_dist.mean
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    target = trainer.dir / "vae"
    vae.save_pretrained(target)
    finish_world_run(trainer, cfg, [target], {"scaling_factor": scaling, "steps": cfg.max_steps})
    return target


# -- VAE decoder ------------------------------------------------------------------------------------------


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel's 3x3 neighbourhood holds more than one colour, else 0: [B, 1, H, W]."""
    hi = F.max_pool2d(x, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return ((hi - lo).amax(dim=1, keepdim=True) > 0).float()


def _require_vae(vae_dir: str | Path) -> Path:
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").exists():
        raise FileNotFoundError(f"no VAE in {vae_dir} (expected a save_pretrained directory)")
    _require_weights(AutoencoderKL, vae_dir, "VAE")
    return vae_dir


def _require_weights(cls, path: Path, what: str) -> None:
    """Before the run directory is made: ``path`` holds whole safetensors weights of a ``cls`` (headers only
    are read; :func:`tandem.checks.check_weights`), or a ``ValueError`` naming the file."""
    check_weights(path, what)
    check_model_class(path, cls, what)


class DecoderTraining(_VAEMethod):
    """Fine-tune the decoder of a VAE (``vae_dir``) with an edge-weighted MSE + L1 reconstruction of the
    posterior mean; the encoder and ``quant_conv`` (so the latent space) stay fixed."""

    name = "vae-decoder"
    uses_data = False

    def __init__(self, cfg: DecoderTrainConfig, vae_dir: Path):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        self.vae = load_pretrained(AutoencoderKL.from_pretrained, vae_dir, "VAE")
        self.vae.encoder.requires_grad_(False)
        self.vae.quant_conv.requires_grad_(False)

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        _, images = sample_batch(self.cfg.seed, ctx.batch_index, self.cfg.batch_size)
        x = images_to_tensor(images)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean
        recon = self.vae.decode(z).sample
        weight = 1.0 + self.cfg.edge_weight * edge_map(x)
        err = (recon - x).abs() + (recon - x).pow(2)
        return {"loss": (weight * err).mean() / weight.mean(), "mse": (recon - x).pow(2).mean().detach()}


def train_vae_decoder(out: str | Path, vae_dir: str | Path, cfg: DecoderTrainConfig | None = None,
                      resume: bool = False) -> Path:
    """Fine-tune the decoder of the VAE in ``vae_dir`` with an edge-weighted reconstruction loss."""
    cfg = cfg if cfg is not None else DecoderTrainConfig()
    quiet_hub_libraries()
    vae_dir = _require_vae(vae_dir)
    method, trainer = run_world_training(out, cfg, resume, lambda: DecoderTraining(cfg, vae_dir))
    target = trainer.dir / "vae"
    method.vae.eval().save_pretrained(target)  # the scaling factor is carried over from vae_dir's config
    finish_world_run(trainer, cfg, [target], {"steps": cfg.max_steps, "encoder_from": str(vae_dir)})
    return target


# -- CLIP -------------------------------------------------------------------------------------------------


class CLIPTraining:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3) on the captions and renderings of batch
    ``i`` of the stream ``cfg.seed``; logs the image-to-text retrieval accuracy within the batch."""

    name = "clip"
    uses_data = False

    def __init__(self, cfg: CLIPTrainConfig):
        self.cfg = cfg
        self.tokenizer = build_tokenizer()
        self.clip = build_clip(len(self.tokenizer), self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                               cfg.arch)

    def trainables(self) -> list[Trainable]:
        cfg = self.cfg
        return [Trainable("clip", self.clip, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                          lr_schedule="cosine", grad_clip=1.0)]

    def frozen(self) -> dict:
        return {}

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        captions, images = sample_batch(self.cfg.seed, ctx.batch_index, self.cfg.batch_size)
        tok = self.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = self.clip(input_ids=ids, pixel_values=images_to_tensor(images), return_loss=True)
        with torch.no_grad():
            acc = (out.logits_per_image.argmax(1) == torch.arange(len(captions))).float().mean()
        return {"loss": out.loss, "i2t_acc": acc}


def train_clip(out: str | Path, cfg: CLIPTrainConfig | None = None, resume: bool = False) -> Path:
    cfg = cfg if cfg is not None else CLIPTrainConfig()
    method, trainer = run_world_training(out, cfg, resume, lambda: CLIPTraining(cfg))
    clip = method.clip.eval()
    clip.save_pretrained(trainer.dir / "clip")
    text_encoder_of(clip).save_pretrained(trainer.dir / "text_encoder")
    method.tokenizer.save_pretrained(trainer.dir / "tokenizer")
    finish_world_run(trainer, cfg, [trainer.dir / "clip", trainer.dir / "text_encoder"], {"steps": cfg.max_steps})
    return trainer.dir


# -- teacher ----------------------------------------------------------------------------------------------


def _arch(config) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)




class TeacherTraining:
    """The teacher UNet's epsilon-prediction loss with Min-SNR-gamma weighting (Hang et al. 2023) on the
    VAE latents of batch ``i`` of the stream ``cfg.seed``, captions dropped for classifier-free guidance (Ho &
    Salimans 2022); the VAE and the text encoder stay frozen, and the EMA of the weights is the teacher."""

    name = "teacher"
    uses_data = False

    def __init__(self, cfg: TeacherTrainConfig, vae_dir: Path, text_dir: Path):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        self.vae = load_pretrained(AutoencoderKL.from_pretrained, vae_dir, "VAE").eval().requires_grad_(False)
        self.tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, text_dir / "tokenizer", "tokenizer")
        self.text_encoder = load_pretrained(CLIPTextModel.from_pretrained, text_dir / "text_encoder",
                                            "text encoder").eval().requires_grad_(False)
        self.noise_scheduler = build_noise_scheduler()
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float64)
        self.unet = build_unet(cfg.arch)
        self.init_digest = None
        if cfg.init_from is not None:
            from diffusers import UNet2DConditionModel

            warm = load_pretrained(UNet2DConditionModel.from_pretrained, cfg.init_from, "init_from UNet")
            if _arch(warm.config) != _arch(self.unet.config):
                raise ValueError(f"init_from {cfg.init_from}: its UNet config differs from the teacher arch {cfg.arch}")
            self.unet.load_state_dict({k: v.float() for k, v in warm.state_dict().items()})
            # the path may later hold other weights (a shipped dir updated in place): record these
            self.init_digest = module_digest(warm)

    def trainables(self) -> list[Trainable]:
        cfg = self.cfg
        return [Trainable("unet", self.unet, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                          lr_schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip, emas={"ema": cfg.ema_decay})]

    def frozen(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        captions, images = sample_batch(cfg.seed, ctx.batch_index, cfg.batch_size)
        noisy, t, cond, noise = noised_batch(captions, images, step_generator(cfg.seed, ctx.batch_index),
                                             cfg.cond_dropout, self.vae, self.tokenizer, self.text_encoder,
                                             self.noise_scheduler)
        pred = self.unet(noisy, t, cond).sample
        loss, per_sample = min_snr_loss(pred, noise, t, self.alphas_cumprod, cfg.min_snr_gamma)
        return {"loss": loss, "mse": per_sample.mean().detach()}


def train_teacher(out: str | Path, vae_dir: str | Path, text_dir: str | Path,
                  cfg: TeacherTrainConfig | None = None, resume: bool = False) -> Path:
    """Train the teacher UNet with epsilon prediction and condition dropout for CFG.

    Args:
        vae_dir: the VAE (``save_pretrained`` directory) whose latent space the teacher learns.
        text_dir: a directory holding ``text_encoder/`` and ``tokenizer/`` (a CLIP run or a world).
    """
    cfg = cfg if cfg is not None else TeacherTrainConfig()
    quiet_hub_libraries()
    vae_dir, text_dir = _require_vae(vae_dir), Path(text_dir)
    missing = [d for d in ("text_encoder", "tokenizer") if not (text_dir / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{text_dir} lacks {', '.join(missing)}/ (the teacher's text encoder)")
    _require_weights(CLIPTextModel, text_dir / "text_encoder", "text encoder")
    if cfg.init_from is not None:
        from diffusers import UNet2DConditionModel

        _require_weights(UNet2DConditionModel, Path(cfg.init_from), "init_from UNet")
    method, trainer = run_world_training(out, cfg, resume, lambda: TeacherTraining(cfg, vae_dir, text_dir))
    target = trainer.dir / "unet"
    trainer.export("unet", "ema").save_pretrained(target)  # the exported teacher is the EMA of the weights
    summary = {"steps": cfg.max_steps, "weights": "ema"}
    if method.init_digest is not None:
        summary["init_from_weights"] = method.init_digest
    finish_world_run(trainer, cfg, [target], summary)
    return target
