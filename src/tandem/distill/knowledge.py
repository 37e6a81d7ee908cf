"""Knowledge distillation into a smaller network (Dockhorn et al., *Distilling the Knowledge in
Diffusion Models*).

The student is a **smaller** UNet (the teacher's architecture at a fraction of its width, or an
explicit ``block_out_channels``), randomly initialised, trained on noisy data at every noise level.
With ``D`` the x₀-prediction (denoiser), ``x_t = α_t x₀ + σ_t ε`` and ``t ~ U{0..T-1}``:

* Eq. 5 (approximate score matching): ``λ_t ||D_θ(x_t; t, c) - D_φ(x_t; t, c)||²``; guided
  distillation for classifier-free guidance replaces ``c`` by the empty caption in a share
  ``cond_dropout`` of the batch, so the student serves ``ε_u + w (ε_c - ε_u)`` at sampling time
  (``guidance="classifier-free"``, two calls per step);
* Eq. 6 (guidance distilled): the student also takes ``w ~ U[w_min, w_max]`` through a w-embedding and
  matches the teacher's guided ``D_φ^w`` (``guidance="w-embedding"``, one call per step);
* Eq. 8 (mixed training): ``λ_t ((1 - α) ||D_θ - D_φ||² + α ||D_θ - x₀||²)``; ``α = 1`` is plain
  denoising score matching (Eq. 3), the from-scratch baseline, for which the teacher is never called.

``λ_t = min(SNR_t, γ)`` (x₀ space), which is the Min-SNR-γ weighting the world's teacher was trained
with: in ε space the loss is ``min(SNR_t, γ)/SNR_t ||ε_θ - ε_target||²``.

The student samples with the teacher's sampler (DPM-Solver++ 2M) and is saved by the one student
contract; it can itself be the teacher of another distillation (``--teacher <student dir>``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..checks import MAX_DEPTH, MAX_WIDTH
from ..models import make_scheduler
from ..sampling import guidance_embedding
from ..students import StudentInfo, save_student, unet_cost
from ..training.checks import require_number, require_probability
from ..training.config import Trainable
from ..training.method import StepContext
from ..training.schedules import parse_lr_stages
from .common import TeacherParts, run_method, teacher_record, uniform

ARCHS = {"half": 0.5, "quarter": 0.25, "three-quarter": 0.75}
GUIDANCE_MODES = ("classifier-free", "w-embedding")


@dataclass(frozen=True)
class KnowledgeConfig:
    arch: str = "half"  # a width preset of ARCHS, or "custom" with block_out_channels
    block_out_channels: tuple[int, ...] | None = None
    guidance: str = "classifier-free"
    cond_dropout: float = 0.1  # classifier-free: share of captions replaced by the empty one
    w_min: float = 1.0  # w-embedding: guidance scales drawn in training
    w_max: float = 8.0
    w_embedding_dim: int = 256
    alpha: float = 0.0  # Eq. 8's weight of the data term; 1.0 = plain denoising score matching (Eq. 3)
    min_snr_gamma: float = 5.0
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.995  # the exported weights are this EMA of the student's
    # a staged LR schedule, "STEPS[:SHAPE[:PEAK[:WARMUP]]],..." (trainer.parse_lr_stages; PEAK scales lr), with
    # warmup_steps 0: e.g. the world teacher's three stages. None: warm-up, then constant
    lr_stages: str | None = None

    def __post_init__(self):
        if self.arch == "custom":
            if not self.block_out_channels:
                raise ValueError("arch 'custom' needs block_out_channels")
            if len(self.block_out_channels) > MAX_DEPTH:
                raise ValueError(f"block_out_channels: at most {MAX_DEPTH} blocks, got {len(self.block_out_channels)}")
            for c in self.block_out_channels:  # bounded before the UNet is built: 10**8 channels would fill the memory
                require_number(c, "block_out_channels", integer=True, at_least=1, at_most=MAX_WIDTH)
        elif self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join([*ARCHS, 'custom'])}, got {self.arch!r}")
        elif self.block_out_channels is not None:
            raise ValueError(f"block_out_channels goes with arch 'custom', not {self.arch!r}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        require_probability(self.cond_dropout, "cond_dropout")
        require_number(self.w_min, "w_min (guidance scale range)", at_least=1.0)
        require_number(self.w_max, "w_max (guidance scale range)", at_least=1.0)
        if not self.w_min <= self.w_max:
            raise ValueError(f"need 1 <= w_min <= w_max, got [{self.w_min}, {self.w_max}]")
        require_number(self.w_embedding_dim, "w_embedding_dim", integer=True, at_least=4)
        require_number(self.alpha, "alpha (Eq. 8)", at_least=0.0, at_most=1.0)
        if self.alpha == 1.0 and self.guidance == "w-embedding":
            raise ValueError("alpha 1 (plain denoising score matching) learns no guidance: use classifier-free")
        require_number(self.min_snr_gamma, "min_snr_gamma", above=0.0)
        require_number(self.lr, "lr", above=0.0)
        require_number(self.warmup_steps, "warmup_steps", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.grad_clip, "grad_clip", above=0.0)
        require_number(self.ema, "ema (EMA decay)", above=0.0, below=1.0)
        if self.lr_stages is not None:
            parse_lr_stages(self.lr_stages)
            if self.warmup_steps:
                raise ValueError(f"lr_stages carry their own warm-ups: warmup_steps must be 0, got {self.warmup_steps}")

    @property
    def uses_teacher(self) -> bool:
        return self.alpha < 1.0


def student_config(teacher_config: dict, cfg: KnowledgeConfig) -> dict:
    """The student UNet's config: the teacher's, narrower. Attention heads and norm groups scale with
    the width (so each head and group keeps its size) and must divide every block's channels."""
    config = dict(teacher_config)
    config.pop("_name_or_path", None)
    teacher_channels = list(teacher_config["block_out_channels"])
    if cfg.arch == "custom":
        channels = list(cfg.block_out_channels)
        if len(channels) != len(teacher_channels):
            raise ValueError(f"block_out_channels needs {len(teacher_channels)} entries (the teacher's blocks), "
                             f"got {channels}")
        factor = channels[0] / teacher_channels[0]
    else:
        factor = ARCHS[cfg.arch]
        channels = [max(1, round(c * factor)) for c in teacher_channels]
    heads = teacher_config.get("num_attention_heads") or teacher_config["attention_head_dim"]
    groups = teacher_config["norm_num_groups"]
    key = "num_attention_heads" if teacher_config.get("num_attention_heads") else "attention_head_dim"
    config["block_out_channels"] = channels
    if isinstance(heads, int):
        config[key] = _divisor(round(heads * factor), channels)
    else:  # one head count per block
        config[key] = [_divisor(round(h * factor), [c]) for h, c in zip(heads, channels)]
    config["norm_num_groups"] = _divisor(round(groups * factor), channels)
    config["time_cond_proj_dim"] = cfg.w_embedding_dim if cfg.guidance == "w-embedding" else None
    return config


def _divisor(wanted: int, channels: list[int]) -> int:
    """The largest number <= ``wanted`` (at least 1) that divides every entry of ``channels``."""
    common = 0
    for c in channels:
        common = math.gcd(common, c)
    for d in range(max(1, wanted), 0, -1):
        if common % d == 0:
            return d
    return 1


def make_student(teacher_unet, cfg: KnowledgeConfig, seed: int):
    """A randomly initialised student UNet (initialisation seeded by ``seed``)."""
    from diffusers import UNet2DConditionModel

    config = student_config(dict(teacher_unet.config), cfg)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return UNet2DConditionModel.from_config(config).float()
    finally:
        torch.random.set_rng_state(state)


class KnowledgeDistillation:
    """Knowledge distillation (Eq. 5/6/8) for :class:`~tandem.training.trainer.Trainer`."""

    name = "knowledge"
    uses_data = True

    def __init__(self, teacher, cfg: KnowledgeConfig, seed: int = 0):
        self.cfg = cfg
        self.parts = TeacherParts(teacher)
        self.schedule = self.parts.schedule
        self.student = make_student(self.parts.teacher_unet, cfg, seed)

    def trainables(self) -> list[Trainable]:
        return [Trainable("student", self.student, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                          warmup_steps=self.cfg.warmup_steps, grad_clip=self.cfg.grad_clip,
                          emas={"sampling": self.cfg.ema},
                          lr_stages=parse_lr_stages(self.cfg.lr_stages) if self.cfg.lr_stages else ())]

    def frozen(self) -> dict[str, nn.Module]:
        frozen = self.parts.frozen()
        if not self.cfg.uses_teacher:
            frozen.pop("teacher")
        return frozen

    # -- pieces, public so that tests can check them against the closed forms ---------------------------

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """``λ_t / SNR_t = min(SNR_t, γ) / SNR_t``: the x₀-space weight ``λ_t`` carried to ε space."""
        snr = self.schedule.snr(t)
        return (snr.clamp(max=self.cfg.min_snr_gamma) / snr).to(torch.float32)

    def loss(self, eps_student: torch.Tensor, eps_teacher: torch.Tensor | None, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 8 in ε space: ``λ_t/SNR_t ((1-α)||ε_θ - ε_φ||² + α||ε_θ - ε||²)`` (Eq. 5/6 at α = 0,
        Eq. 3 at α = 1), averaged over the batch; also each term's plain mean squared error."""
        a = self.cfg.alpha
        w = self.weight(t.cpu()).to(eps_student.device)
        data = (eps_student.float() - noise.float()).pow(2).flatten(1).mean(1)
        out = {"data_mse": data.mean().detach()}
        per_sample = a * data
        if eps_teacher is not None:
            distill = (eps_student.float() - eps_teacher.float()).pow(2).flatten(1).mean(1)
            per_sample = per_sample + (1 - a) * distill
            out["teacher_mse"] = distill.mean().detach()
        out["loss"] = (w * per_sample).mean()
        return out

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg, g, device = self.cfg, ctx.generator, ctx.device
        latents = self.parts.encode_images(batch["pixels"], g).to(device)
        b = latents.shape[0]
        captions = list(batch["captions"])
        w = None
        kwargs = {}
        if cfg.guidance == "classifier-free":
            drop = torch.rand((b,), generator=g) < cfg.cond_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        else:
            w = uniform(g, b, cfg.w_min, cfg.w_max)
            kwargs["timestep_cond"] = guidance_embedding(w - 1.0, cfg.w_embedding_dim).to(device)
        cond = self.parts.encode_text(captions, device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(latents.shape, generator=g).to(device)
        x_t = self.schedule.add_noise(latents, noise, t)
        t = t.to(device)
        eps_teacher = None
        if cfg.uses_teacher:
            uncond = self.parts.uncond(b, device) if w is not None else None
            eps_teacher = self.parts.teacher_eps(x_t, t, cond, uncond, w.to(device) if w is not None else None)
        eps_student = ctx.model("student")(x_t, t, encoder_hidden_states=cond, **kwargs).sample
        return self.loss(eps_student, eps_teacher, noise, t)


# -- export -----------------------------------------------------------------------------------------------

def distill_knowledge(teacher: str, out_dir: str | Path, cfg: KnowledgeConfig, trainer_cfg,
                      data: str = "world", resume: bool = False) -> Path:
    """Distil ``teacher`` into a smaller student in ``out_dir/student`` (the EMA of its weights)."""
    def make(pipe, spec, out: Path):
        return KnowledgeDistillation(pipe, cfg, seed=trainer_cfg.seed)

    def config(spec, source):
        return {"knowledge": asdict(cfg)}

    def export(trainer, method, spec, student_dir: Path) -> None:
        unet = trainer.export("student", "sampling")
        teacher_cost = unet_cost(method.parts.teacher_unet, context_length=method.parts.tokenizer.model_max_length)
        cost = unet_cost(unet, context_length=method.parts.tokenizer.model_max_length)
        info = StudentInfo(
            method="knowledge", scheduler="DPMSolverMultistepScheduler", prediction_type="epsilon",
            guidance=cfg.guidance, steps=spec.teacher.steps, guidance_scale=float(spec.teacher.guidance_scale),
            teacher=teacher_record(spec),
            details={"arch": cfg.arch, "block_out_channels": list(unet.config.block_out_channels),
                     "baseline": cfg.alpha == 1.0, "alpha": cfg.alpha, "optimisation_steps": trainer.steps_done,
                     "weights": "ema", **cost, "teacher_params": teacher_cost["params"],
                     "teacher_flops_per_call": teacher_cost["flops_per_call"], "config": asdict(cfg)})
        scheduler = make_scheduler("dpm", {**method.parts.scheduler_config, "prediction_type": "epsilon"})
        save_student(unet, student_dir, scheduler, info)

    return run_method(method_name="knowledge", teacher=teacher, out_dir=out_dir, trainer_cfg=trainer_cfg, data=data,
                      resume=resume, make_method=make, run_config=config, export=export)
