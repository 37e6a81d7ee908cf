"""Latent consistency distillation (Song et al. 2023; Luo et al. 2023; the adaptive paper's appendix A).

One training step, for a batch of latents ``x0`` with captions ``c``:

1. Pick ``n`` uniformly on the skipping grid ``t_1 < ... < t_N`` (N DDIM steps, e.g. 50), with
   ``t_{n-1}`` the grid point below (``-1 -> 0`` at the bottom), a guidance scale ``w ~ U[w_min, w_max]``
   and noise ``ε``; ``x_{t_n} = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε``.
2. Teacher target: one guided DDIM step ``x_{t_n} -> x̂_{t_{n-1}}`` with
   ``ε̂ = ε_u + w (ε_c - ε_u)`` and ``x̂0 = (x - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)``.
3. Student ``f_θ(x_{t_n}, t_n, w, c)`` and the EMA target network ``f_θ⁻(x̂_{t_{n-1}}, t_{n-1}, w, c)``, each the
   consistency function ``c_skip(t) x_t + c_out(t) x̂0(x_t, t)``; loss ``d(f_θ, f_θ⁻)`` with ``d`` the
   squared error or the pseudo-Huber ``sqrt(Δ² + c²) - c`` (mean over the latent).
4. After the optimizer step the target network moves towards the student with EMA decay 0.95.

The student is the teacher's UNet plus a w-embedding (diffusers' ``time_cond_proj_dim``): a
zero-initialised projection, so at step 0 the student *is* the teacher for every ``w``. Its
w-embedding receives ``w - 1`` (the convention of diffusers' LCM pipeline).

Not implemented (documented): the paper's own CD-SD1.5 variant that applies classifier-free
guidance to the student at sampling time instead of the w-embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import encode_captions
from ..outputs import atomic_write_text
from ..sampling import boundary_scalings, distillation_grid, guidance_embedding
from ..world.runs import require_decay, require_number
from .trainer import StepContext, Trainable

LOSSES = ("l2", "huber")


@dataclass(frozen=True)
class ConsistencyConfig:
    num_ddim_timesteps: int = 50
    w_min: float = 1.0  # guidance scale range (diffusers convention: ε_u + w (ε_c - ε_u)); paper: 1-8
    w_max: float = 8.0
    w_embedding_dim: int = 256
    loss: str = "huber"
    huber_c: float = 0.001
    target_ema: float = 0.95
    sampling_ema: float | None = None  # an extra EMA of the student to export (None: export the student)
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        require_number(self.num_ddim_timesteps, "num_ddim_timesteps", integer=True, at_least=1, at_most=1000)
        require_number(self.w_min, "w_min (guidance scale range)", at_least=0.0)
        require_number(self.w_max, "w_max (guidance scale range)", at_least=0.0)
        if not self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got [{self.w_min}, {self.w_max}]")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        require_number(self.w_embedding_dim, "w_embedding_dim", integer=True, at_least=4)
        require_number(self.huber_c, "huber_c", above=0.0)
        require_decay(self.target_ema, "target_ema (EMA decay)")
        if self.sampling_ema is not None:
            require_decay(self.sampling_ema, "sampling_ema (EMA decay)")
        require_number(self.lr, "lr", above=0.0)
        require_number(self.warmup_steps, "warmup_steps", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.grad_clip, "grad_clip", above=0.0)


def make_student_unet(teacher_unet, w_embedding_dim: int):
    """The teacher's UNet with a zero-initialised w-embedding projection (``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    if teacher_unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError("the teacher UNet already has a time_cond_proj_dim (is it a student?)")
    student = UNet2DConditionModel.from_config({**teacher_unet.config, "time_cond_proj_dim": w_embedding_dim})
    missing, unexpected = student.load_state_dict(
        {k: v.float() for k, v in teacher_unet.state_dict().items()}, strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.float()


class ConsistencyDistillation:
    """The consistency distillation method for :class:`~tandem.distill.trainer.Trainer`.

    Args:
        teacher: a ``StableDiffusionPipeline``-like object with ``unet``, ``vae``, ``text_encoder``,
            ``tokenizer`` and ``scheduler`` (its config gives the noise schedule).
    """

    name = "consistency"
    uses_data = True  # real (or rendered) images are noised to make x_{t_n}

    def __init__(self, teacher, cfg: ConsistencyConfig):
        self.cfg = cfg
        self.teacher_unet = teacher.unet.float()
        self.vae = teacher.vae.float()
        self.text_encoder = teacher.text_encoder.float()
        self.tokenizer = teacher.tokenizer
        self.scheduler_config = dict(teacher.scheduler.config)
        if self.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("consistency distillation here needs an epsilon-prediction teacher, got "
                             f"{self.scheduler_config.get('prediction_type')!r}")
        from diffusers import DDPMScheduler

        schedule = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)
        grid = distillation_grid(len(self.alphas_cumprod), cfg.num_ddim_timesteps)
        self.grid = torch.from_numpy(grid).long()
        self.grid_prev = torch.clamp(self.grid - (len(self.alphas_cumprod) // cfg.num_ddim_timesteps), min=0)
        self.student = make_student_unet(self.teacher_unet, cfg.w_embedding_dim)
        self._uncond: torch.Tensor | None = None

    def trainables(self) -> list[Trainable]:
        emas = {"target": self.cfg.target_ema}
        if self.cfg.sampling_ema is not None:
            emas["sampling"] = self.cfg.sampling_ema
        return [Trainable("student", self.student, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                          warmup_steps=self.cfg.warmup_steps, grad_clip=self.cfg.grad_clip, emas=emas)]

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher_unet, "vae": self.vae, "text_encoder": self.text_encoder}

    # -- pieces, public so that tests can check them against independent computations ----------------

    @torch.no_grad()
    def encode_text(self, captions: list[str], device) -> torch.Tensor:
        return encode_captions(self.tokenizer, self.text_encoder, captions, device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def consistency_fn(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w_emb: torch.Tensor):
        """``c_skip(t) x + c_out(t) x̂0`` with ``x̂0`` from ``unet``'s ε-prediction."""
        eps = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        a = _per_sample(self.alphas_cumprod.to(x.device)[t], x)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = boundary_scalings(t)
        return _per_sample(c_skip.to(x.device, x.dtype), x) * x + _per_sample(c_out.to(x.device, x.dtype), x) * x0

    @torch.no_grad()
    def teacher_ddim_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One guided DDIM step of the teacher from ``t`` to ``t_prev``."""
        eps_c = self.teacher_unet(x, t, encoder_hidden_states=cond).sample
        eps_u = self.teacher_unet(x, t, encoder_hidden_states=uncond).sample
        eps = eps_u + _per_sample(w, x) * (eps_c - eps_u)
        ac = self.alphas_cumprod.to(x.device)
        a, a_prev = _per_sample(ac[t], x), _per_sample(ac[t_prev], x)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "l2":
            return (pred.float() - target.float()).pow(2).mean()
        c = self.cfg.huber_c
        return (torch.sqrt((pred.float() - target.float()).pow(2) + c**2) - c).mean()

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        g, device = ctx.generator, ctx.device
        latents = self.encode_images(batch["pixels"], g).to(device)
        b = latents.shape[0]
        cond = self.encode_text(batch["captions"], device)
        if self._uncond is None:
            self._uncond = self.encode_text([""], device)
        uncond = self._uncond.expand(b, -1, -1)
        n = torch.randint(0, len(self.grid), (b,), generator=g).to(device)
        t, t_prev = self.grid.to(device)[n], self.grid_prev.to(device)[n]
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand((b,), generator=g)
        w_emb = guidance_embedding(w - 1.0, self.cfg.w_embedding_dim).to(device)
        w = w.to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        a = _per_sample(self.alphas_cumprod.to(device)[t], latents)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise

        pred = self.consistency_fn(ctx.model("student"), x_t, t, cond, w_emb)
        with torch.no_grad():
            x_prev = self.teacher_ddim_step(x_t, t, t_prev, cond, uncond, w)
            target = self.consistency_fn(ctx.ema("student", "target"), x_prev, t_prev, cond, w_emb)
        loss = self.loss_fn(pred, target)
        return {"loss": loss}


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# -- export -----------------------------------------------------------------------------------------------

STUDENT_META = "student.json"


def save_student(unet, out_dir: str | Path, scheduler_config: dict, meta: dict, fp16: bool = False) -> Path:
    """Write ``out_dir/unet`` and ``out_dir/scheduler`` (an ``LCMScheduler``) and ``out_dir/student.json``.

    Load it in diffusers with ``LatentConsistencyModelPipeline.from_pretrained(teacher,
    unet=UNet2DConditionModel.from_pretrained(out_dir / "unet"), scheduler=LCMScheduler.from_pretrained(
    out_dir / "scheduler"))``.
    """
    from diffusers import LCMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = unet.to(torch.float16) if fp16 else unet
    unet.save_pretrained(out / "unet")
    lcm = LCMScheduler.from_config(scheduler_config, original_inference_steps=meta.get("num_ddim_timesteps", 50))
    lcm.save_pretrained(out / "scheduler")
    atomic_write_text(out / STUDENT_META, json.dumps(meta, indent=2, default=str) + "\n")
    return out


def distill_consistency(teacher: str, out_dir: str | Path, cfg: ConsistencyConfig, trainer_cfg,
                        data: str = "world", resume: bool = False) -> Path:
    """Train a consistency student of ``teacher`` (``world``, a model directory or a hub id) into
    ``out_dir``; the student is exported to ``out_dir/student``. Returns that directory."""
    from ..models import load_teacher_pipeline, resolve_model
    from .data import WorldSource, open_source
    from .trainer import Trainer, check_run_dir

    spec = resolve_model(teacher)
    if data == "world" and not spec.is_world:
        raise ValueError(f"--data world (ShapesWorld renderings) only fits the world teacher, not {teacher!r}; "
                         "give --data a folder, webdataset shards or a saved HF dataset")
    check_run_dir(out_dir, resume, trainer_cfg.max_steps)  # a bad --out fails before the teacher loads
    pipe = load_teacher_pipeline(spec)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    source = WorldSource(trainer_cfg.seed) if data == "world" else open_source(data, resolution, trainer_cfg.seed)
    method = ConsistencyDistillation(pipe, cfg)
    run_config = {"teacher": {"name": spec.name, "path": spec.path}, "consistency": asdict(cfg),
                  "data": source.describe()}
    trainer = Trainer(method, source, trainer_cfg, out_dir, resume=resume, run_config=run_config)
    trainer.train()
    student_dir = Path(out_dir) / "student"
    exported = "sampling_ema" if cfg.sampling_ema is not None else "student"
    if trainer.is_main:
        unet = trainer.export("student", "sampling" if cfg.sampling_ema is not None else None)
        meta = {"method": "consistency", "teacher": {"name": spec.name, "path": spec.path},
                "num_ddim_timesteps": cfg.num_ddim_timesteps, "w_range": [cfg.w_min, cfg.w_max],
                "weights": exported, "steps": trainer_cfg.max_steps}
        save_student(unet, student_dir, method.scheduler_config, meta)
    trainer.finish({"steps": trainer_cfg.max_steps, "student": str(student_dir), "weights": exported})
    return student_dir
