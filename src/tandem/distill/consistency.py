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

Options (DDIL, Garrepalli et al.): ``ddil`` chooses the inputs ``x_{t_n}`` (section 4.2: consistency
distillation on forward and student-backward trajectories; the student rolls with its own sampler, the
LCM one with fresh noise, in ``min(4, N)`` steps; :mod:`tandem.distill.ddil`); ``reflect`` thresholds the
teacher's x₀ estimates and the target network's (the student-derived target), and the student's at
sampling (:mod:`tandem.reflect`).

Not implemented (documented): the paper's own CD-SD1.5 variant that applies classifier-free
guidance to the student at sampling time instead of the w-embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..reflect import Reflection, reflected
from ..sampling import boundary_scalings, consistency_timesteps, distillation_grid, guidance_embedding
from ..students import StudentInfo, save_student
from ..training.checks import require_decay, require_number
from ..training.config import Trainable
from ..training.method import StepContext
from .common import TeacherParts, options_config, resolve_reflection, run_method, teacher_record, variants
from .ddil import DDILSampler, DDILSpec, Denoiser

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
    """The consistency distillation method for :class:`~tandem.training.trainer.Trainer`.

    Args:
        teacher: a ``StableDiffusionPipeline``-like object with ``unet``, ``vae``, ``text_encoder``,
            ``tokenizer`` and ``scheduler`` (its config gives the noise schedule).
        ddil: where the inputs come from (None: forward diffusion of the data).
        reflect: the thresholding of x₀ estimates (None: none).
    """

    name = "consistency"
    uses_data = True  # real (or rendered) images are noised to make x_{t_n}

    def __init__(self, teacher, cfg: ConsistencyConfig, ddil: DDILSpec | None = None,
                 reflect: Reflection | None = None):
        self.cfg = cfg
        self.parts = TeacherParts(teacher)
        self.ddil = DDILSampler(ddil, self.parts.schedule) if ddil is not None else None
        self.reflect = self.parts.reflect = reflect
        if self.parts.prediction_type != "epsilon":
            raise ValueError("consistency distillation here needs an epsilon-prediction teacher, got "
                             f"{self.parts.prediction_type!r}")
        self.schedule = self.parts.schedule
        steps = self.schedule.num_train_timesteps
        self.grid = torch.from_numpy(distillation_grid(steps, cfg.num_ddim_timesteps)).long()
        self.grid_prev = torch.clamp(self.grid - (steps // cfg.num_ddim_timesteps), min=0)
        self.student = make_student_unet(self.parts.teacher_unet, cfg.w_embedding_dim)

    def trainables(self) -> list[Trainable]:
        emas = {"target": self.cfg.target_ema}
        if self.cfg.sampling_ema is not None:
            emas["sampling"] = self.cfg.sampling_ema
        return [Trainable("student", self.student, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                          warmup_steps=self.cfg.warmup_steps, grad_clip=self.cfg.grad_clip, emas=emas)]

    def frozen(self) -> dict[str, nn.Module]:
        return self.parts.frozen()

    # -- method state: DDIL's DAgger buffer, when it has one ---------------------------------------------

    def state_dict(self) -> dict | None:
        return {"ddil": self.ddil.state_dict()} if self.ddil is not None and self.ddil.stateful else None

    def load_state_dict(self, state: dict) -> None:
        self.ddil.load_state_dict(state["ddil"])

    # -- pieces, public so that tests can check them against independent computations ----------------

    def consistency_fn(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w_emb: torch.Tensor,
                       reflect: Reflection | None = None):
        """``c_skip(t) x + c_out(t) x̂0`` with ``x̂0`` from ``unet``'s ε-prediction (thresholded by ``reflect``)."""
        eps = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        x0 = reflected(reflect, self.schedule.to_x0(eps, x, t.cpu()))
        c_skip, c_out = boundary_scalings(t)
        return _per_sample(c_skip.to(x.device, x.dtype), x) * x + _per_sample(c_out.to(x.device, x.dtype), x) * x0

    @torch.no_grad()
    def teacher_ddim_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One guided DDIM step of the teacher from ``t`` to ``t_prev``."""
        x0 = self.parts.teacher_x0(x, t, cond, uncond, w)
        return self.schedule.ddim_step(x, x0, t.cpu(), t_prev.cpu())

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "l2":
            return (pred.float() - target.float()).pow(2).mean()
        c = self.cfg.huber_c
        return (torch.sqrt((pred.float() - target.float()).pow(2) + c**2) - c).mean()

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        g, device = ctx.generator, ctx.device
        latents = self.parts.encode_images(batch["pixels"], g).to(device)
        b = latents.shape[0]
        cond = self.parts.encode_text(batch["captions"], device)
        uncond = self.parts.uncond(b, device)
        n = torch.randint(0, len(self.grid), (b,), generator=g).to(device)
        t, t_prev = self.grid.to(device)[n], self.grid_prev.to(device)[n]
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand((b,), generator=g)
        w_emb = guidance_embedding(w - 1.0, self.cfg.w_embedding_dim).to(device)
        w = w.to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        logs = {}
        if self.ddil is None:
            x_t = self.schedule.add_noise(latents, noise, t.cpu())
        else:
            x_t, n, cond, w, logs = self._ddil_input(latents, noise, n, cond, w, ctx)
            t, t_prev = self.grid.to(device)[n], self.grid_prev.to(device)[n]
            w_emb = guidance_embedding(w.cpu() - 1.0, self.cfg.w_embedding_dim).to(device)

        pred = self.consistency_fn(ctx.model("student"), x_t, t, cond, w_emb)
        with torch.no_grad():
            x_prev = self.teacher_ddim_step(x_t, t, t_prev, cond, uncond, w)
            target = self.consistency_fn(ctx.ema("student", "target"), x_prev, t_prev, cond, w_emb, self.reflect)
        loss = self.loss_fn(pred, target)
        return {"loss": loss, **logs}

    # -- DDIL ---------------------------------------------------------------------------------------------

    @property
    def student_steps(self) -> int:
        """The student's own sampling steps in DDIL's rollouts (and its exported default)."""
        return min(4, self.cfg.num_ddim_timesteps)

    def sampled_x0(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor):
        """The consistency function the student samples with at guidance scales ``w`` [B] (reflected when on)."""
        w_emb = guidance_embedding(w.cpu() - 1.0, self.cfg.w_embedding_dim).to(x.device)
        return self.consistency_fn(unet, x, t, cond, w_emb, self.reflect)

    def _ddil_input(self, latents, noise, n, cond, w, ctx: StepContext):
        """DDIL's inputs at the skipping grid's ``n`` [B]: ``(x_t, n, cond, w, log)``; the index, captions and
        guidance scales change where the batch is drawn from the DAgger buffer."""
        steps = self.schedule.num_train_timesteps
        drawn = self.ddil.inputs(
            latents=latents, noise=noise, grid=self.grid.tolist(), index=n.cpu(), cond={"cond": cond, "w": w},
            teacher=Denoiser(self.parts.guided_x0, self.grid.flip(0).tolist(), calls=2),
            student=Denoiser(partial(self.sampled_x0, ctx.unwrapped("student")),
                             consistency_timesteps(self.student_steps, self.cfg.num_ddim_timesteps, steps),
                             stochastic=True),
            generator=ctx.generator, step=ctx.step)
        return drawn.x, drawn.index.to(ctx.device), drawn.cond["cond"], drawn.cond["w"], drawn.log


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# -- export -----------------------------------------------------------------------------------------------

def export_student(unet, out_dir: str | Path, method: ConsistencyDistillation, teacher_spec, weights: str,
                   optimisation_steps: int) -> Path:
    """Save a consistency student by the one student contract: ``LCMScheduler`` on the distillation grid,
    guidance through the w-embedding. It also loads in diffusers' ``LatentConsistencyModelPipeline``."""
    from diffusers import LCMScheduler

    cfg = method.cfg
    scheduler = LCMScheduler.from_config(method.parts.scheduler_config, original_inference_steps=cfg.num_ddim_timesteps)
    steps = method.student_steps
    method_name, options = variants("consistency", method.ddil.spec if method.ddil else None, method.reflect)
    info = StudentInfo(
        method=method_name, scheduler="LCMScheduler", prediction_type="epsilon", guidance="w-embedding",
        steps=steps, guidance_scale=float(teacher_spec.teacher.guidance_scale),
        teacher=teacher_record(teacher_spec),
        timesteps=consistency_timesteps(steps, cfg.num_ddim_timesteps, method.schedule.num_train_timesteps),
        details={"num_ddim_timesteps": cfg.num_ddim_timesteps, "w_range": [cfg.w_min, cfg.w_max],
                 "weights": weights, "optimisation_steps": optimisation_steps, "config": asdict(cfg), **options})
    return save_student(unet, out_dir, scheduler, info)


def distill_consistency(teacher: str, out_dir: str | Path, cfg: ConsistencyConfig, trainer_cfg,
                        data: str = "world", resume: bool = False, ddil: DDILSpec | None = None,
                        reflect: Reflection | None = None) -> Path:
    """Train a consistency student of ``teacher`` (``world``, a model directory or a hub id) into
    ``out_dir``; the student is exported to ``out_dir/student``. Returns that directory. ``ddil``,
    ``reflect``: the DDIL options (``reflect``'s defaults from the teacher's ``latent_range.json``)."""
    exported = "sampling_ema" if cfg.sampling_ema is not None else "student"
    reflection = resolve_reflection(teacher, reflect)

    def export(trainer, method, spec, student_dir: Path) -> None:
        unet = trainer.export("student", "sampling" if cfg.sampling_ema is not None else None)
        export_student(unet, student_dir, method, spec, exported, trainer.steps_done)

    return run_method(method_name="consistency", teacher=teacher, out_dir=out_dir, trainer_cfg=trainer_cfg,
                      data=data, resume=resume,
                      make_method=lambda pipe, spec, out: ConsistencyDistillation(pipe, cfg, ddil, reflection),
                      run_config=lambda spec, source: {"consistency": asdict(cfg), **options_config(ddil, reflection)},
                      export=export)
