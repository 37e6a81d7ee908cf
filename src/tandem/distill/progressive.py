"""Progressive distillation with guidance distilled first (Salimans & Ho 2022; Meng et al. 2023).

Two stages, each a span of the one Trainer's steps (``stage_steps``), resumable mid-stage:

1. **Guidance** (Meng et al., stage one). The student is the teacher's UNet plus a zero-initialised
   w-embedding (so it starts as the teacher's conditional model); at ``t ~ U{0..T-1}`` and
   ``w ~ U[w_min, w_max]`` it learns the teacher's classifier-free-guided x₀,
   ``x̂₀(ε_u + w (ε_c - ε_u))``, in one call.
2. **Halving rounds** (Salimans & Ho, Algorithm 2). The round that makes an ``N``-step student starts
   from the last round's student, which also becomes its frozen teacher at ``2N`` steps. On the
   ``N``-step grid ``t_i`` (diffusers' "trailing" spacing, ``t_0 = T - 1``), with ``t'`` the point of the
   ``2N``-step grid between ``t_i`` and ``t_{i+1}`` (``-1`` past the last: the clean end):

   ``z_{t'} = DDIM(z_t; teacher)``, ``z_{t_{i+1}} = DDIM(z_{t'}; teacher)``,
   ``x̃ = (z_{t_{i+1}} - (σ_{t_{i+1}}/σ_t) z_t) / (α_{t_{i+1}} - (σ_{t_{i+1}}/σ_t) α_t)``,

   and the loss is ``max(SNR_t, 1) ||x̂₀(student) - x̃||²`` ("truncated SNR" weighting, x₀ space) or the
   same target in v space (``--target v``: weight ``1 + SNR_t``).

Students are sampled by DDIM on the trailing grid; diffusers' ``DDIMScheduler`` rounds its step to
``T // N`` (not the grid when ``N`` does not divide ``T``), so the student ships with
``DPMSolverMultistepScheduler`` at order 1 and trailing spacing, which is DDIM on that grid exactly
(tested against two DDIM steps). Every finished round is exported to ``rounds/<N>-steps/`` as a
student of its own.

Options (DDIL, Garrepalli et al.): ``ddil`` chooses each halving round's inputs ``z_t`` (forward diffusion,
the round teacher's or the student's rollouts, Algorithm 2's mixed rollouts through a DAgger buffer:
Algorithm 3; :mod:`tandem.distill.ddil`; the guidance stage keeps forward diffusion, its ramp restarts
with each round, its buffer empties); ``reflect`` thresholds the teacher's x₀ estimates (the guidance
stage's target, each of the round teacher's DDIM steps) and the student's at sampling (:mod:`tandem.reflect`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..denoiser import trailing_timesteps
from ..reflect import Reflection, reflected
from ..sampling import guidance_embedding
from ..students import StudentInfo, save_student
from ..training.checks import require_number
from ..training.config import Trainable
from ..training.method import StepContext
from .common import TeacherParts, options_config, resolve_reflection, run_method, teacher_record, uniform, variants
from .consistency import make_student_unet
from .ddil import DDILSampler, DDILSpec, Denoiser

TARGETS = ("x0", "v")


@dataclass(frozen=True)
class ProgressiveConfig:
    start_steps: int = 32  # the teacher's DDIM steps in the first halving round
    end_steps: int = 1  # the last round's student steps
    guidance_steps: int = 400  # optimisation steps of the guidance stage (0 plans none; the method then needs a
    # w-conditioned teacher, which it does not load yet, and refuses)
    round_steps: int = 300  # optimisation steps per halving round
    w_min: float = 1.0
    w_max: float = 8.0
    w_embedding_dim: int = 256
    target: str = "x0"
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("start_steps", "end_steps"):
            require_number(getattr(self, name), name, integer=True, at_least=1, at_most=1000)
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two (each round halves the steps), got {value}")
        if not self.end_steps < self.start_steps:
            raise ValueError(f"need end_steps < start_steps, got {self.end_steps} and {self.start_steps}")
        require_number(self.guidance_steps, "guidance_steps", integer=True, at_least=0)
        require_number(self.round_steps, "round_steps", integer=True, at_least=1)
        require_number(self.w_min, "w_min (guidance scale range)", at_least=1.0)
        require_number(self.w_max, "w_max (guidance scale range)", at_least=1.0)
        if not self.w_min <= self.w_max:
            raise ValueError(f"need 1 <= w_min <= w_max, got [{self.w_min}, {self.w_max}]")
        require_number(self.w_embedding_dim, "w_embedding_dim", integer=True, at_least=4)
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        require_number(self.lr, "lr", above=0.0)
        require_number(self.warmup_steps, "warmup_steps", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.grad_clip, "grad_clip", above=0.0)

    @property
    def round_student_steps(self) -> list[int]:
        """Student steps of each halving round, e.g. [16, 8, 4, 2, 1] for 32 -> 1."""
        out, n = [], self.start_steps
        while n > self.end_steps:
            n //= 2
            out.append(n)
        return out

    @property
    def stages(self) -> list[tuple[str, int, int]]:
        """``(name, first step, student steps)`` of each stage in order; the guidance stage's student
        samples at ``start_steps``."""
        out, step = [], 0
        if self.guidance_steps:
            out.append(("guidance", 0, self.start_steps))
            step = self.guidance_steps
        for n in self.round_student_steps:
            out.append((f"round-{n}", step, n))
            step += self.round_steps
        return out

    @property
    def total_steps(self) -> int:
        return self.guidance_steps + self.round_steps * len(self.round_student_steps)

    def stage_at(self, step: int) -> int:
        """Index into :attr:`stages` of the stage that optimisation step ``step`` belongs to."""
        index = 0
        for i, (_, first, _) in enumerate(self.stages):
            if step >= first:
                index = i
        return index


class ProgressiveDistillation:
    """Progressive distillation for :class:`~tandem.training.trainer.Trainer`.

    Args:
        teacher: a ``StableDiffusionPipeline``-like teacher (ε-, v- or x₀-predicting).
        on_stage_end: called ``(stage index, student unet)`` on the main process when a stage has ended
            (at the first step of the next one); the run exports the finished round there.
        ddil: where the halving rounds' inputs come from (None: forward diffusion).
        reflect: the thresholding of x₀ estimates (None: none).
    """

    name = "progressive"
    uses_data = True

    def __init__(self, teacher, cfg: ProgressiveConfig, on_stage_end=None, ddil: DDILSpec | None = None,
                 reflect: Reflection | None = None):
        self.cfg = cfg
        self.parts = TeacherParts(teacher)
        self.schedule = self.parts.schedule
        self.ddil = DDILSampler(ddil, self.schedule) if ddil is not None else None
        self.reflect = self.parts.reflect = reflect
        self.student = make_student_unet(self.parts.teacher_unet, cfg.w_embedding_dim)
        self.stage = 0  # the stage whose teacher is loaded
        self.round_teacher: nn.Module | None = None  # the frozen previous student (halving rounds)
        self.on_stage_end = on_stage_end
        if not cfg.guidance_steps:  # rounds start from the teacher itself: it must take w already
            raise ValueError("guidance_steps 0 needs a w-conditioned teacher, which this version does not load; "
                             "keep the guidance stage")

    def trainables(self) -> list[Trainable]:
        return [Trainable("student", self.student, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                          warmup_steps=self.cfg.warmup_steps, grad_clip=self.cfg.grad_clip)]

    def frozen(self) -> dict[str, nn.Module]:
        return self.parts.frozen()

    # -- method state: the stage and its teacher --------------------------------------------------------

    def state_dict(self) -> dict:
        teacher = self.round_teacher.state_dict() if self.round_teacher is not None else {}
        ddil = {"ddil": self.ddil.state_dict()} if self.ddil is not None and self.ddil.stateful else {}
        return {"stage": self.stage, "teacher": teacher, **ddil}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        if self.ddil is not None and self.ddil.stateful:
            self.ddil.load_state_dict(state["ddil"])
        if state["teacher"]:
            self.round_teacher = self._frozen_copy(self.student)
            self.round_teacher.load_state_dict(state["teacher"])
            self.round_teacher.to(next(self.student.parameters()).device)
        else:
            self.round_teacher = None

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).requires_grad_(False).eval()

    def _enter(self, stage: int, ctx: StepContext) -> None:
        """Start ``stage``: the student as it is now becomes the round's teacher."""
        student = ctx.unwrapped("student")
        if self.on_stage_end is not None and ctx.accelerator.is_main_process:
            self.on_stage_end(self.stage, student)
        self.round_teacher = self._frozen_copy(student).to(ctx.device)
        self.stage = stage
        if self.ddil is not None:
            self.ddil.reset()

    # -- pieces, public so that tests can check them against independent computations -------------------

    def grids(self, student_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, t_mid, t_next)`` for every index of the ``student_steps`` grid (``-1``: the clean end)."""
        T = self.schedule.num_train_timesteps
        coarse = trailing_timesteps(student_steps, T) + [-1]
        fine = trailing_timesteps(2 * student_steps, T) + [-1]
        t = torch.tensor(coarse[:-1])
        return t, torch.tensor(fine[1::2]), torch.tensor(coarse[1:])

    def student_x0(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w_emb: torch.Tensor):
        pred = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        return self.schedule.to_x0(pred, x, t, self.parts.prediction_type)

    def sampled_x0(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor):
        """The x₀ a w-conditioned ``unet`` samples with at guidance scales ``w`` [B]: reflected when on."""
        w_emb = guidance_embedding(w.cpu() - 1.0, self.cfg.w_embedding_dim).to(x.device)
        return reflected(self.reflect, self.student_x0(unet, x, t, cond, w_emb))

    @torch.no_grad()
    def two_teacher_steps(self, teacher, x: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                          t_next: torch.Tensor, cond: torch.Tensor, w_emb: torch.Tensor) -> torch.Tensor:
        """Two DDIM steps of the w-conditioned ``teacher``: ``x_t -> x_{t_mid} -> x_{t_next}`` (its x₀ reflected
        when on)."""
        x0 = reflected(self.reflect, self.student_x0(teacher, x, t, cond, w_emb))
        x_mid = self.schedule.ddim_step(x, x0, t, t_mid)
        x0 = reflected(self.reflect, self.student_x0(teacher, x_mid, t_mid, cond, w_emb))
        return self.schedule.ddim_step(x_mid, x0, t_mid, t_next)

    def round_target(self, teacher, x: torch.Tensor, t, t_mid, t_next, cond, w_emb) -> torch.Tensor:
        """x̃ of Algorithm 2: the x₀ that takes the student from ``x_t`` to the teacher's ``x_{t_next}`` in one step."""
        x_next = self.two_teacher_steps(teacher, x, t, t_mid, t_next, cond, w_emb)
        return self.schedule.x0_from_two_points(x, t, x_next, t_next)

    def loss(self, x0_pred: torch.Tensor, x0_target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Truncated-SNR weighted x₀ error, or the v-space error of the same target (``target="v"``)."""
        snr = self.schedule.snr(t).to(torch.float32).to(x_t.device)
        weight = snr.clamp(min=1.0) if self.cfg.target == "x0" else 1.0 + snr
        per_sample = (x0_pred.float() - x0_target.float()).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    def _ddil_input(self, latents, noise, i, cond, w, student_steps: int, ctx: StepContext):
        """DDIL's inputs of a halving round (Algorithm 3): ``(x_t, i, cond, w, log)``; the index, captions and
        guidance scales change where the batch is drawn from the DAgger buffer."""
        T = self.schedule.num_train_timesteps
        grid = trailing_timesteps(student_steps, T)
        drawn = self.ddil.inputs(
            latents=latents, noise=noise, grid=grid, index=i, cond={"cond": cond, "w": w.to(ctx.device)},
            teacher=Denoiser(partial(self.sampled_x0, self.round_teacher), trailing_timesteps(2 * student_steps, T)),
            student=Denoiser(partial(self.sampled_x0, ctx.unwrapped("student")), grid),
            generator=ctx.generator, step=ctx.step - self.cfg.stages[self.stage][1])
        return drawn.x, drawn.index, drawn.cond["cond"], drawn.cond["w"].cpu(), drawn.log

    # -- the Trainer's entry point ----------------------------------------------------------------------

    def step(self, batch: dict, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        stage = self.cfg.stage_at(ctx.step)
        if stage != self.stage:
            self._enter(stage, ctx)
        name, _, student_steps = self.cfg.stages[stage]
        g, device = ctx.generator, ctx.device
        latents = self.parts.encode_images(batch["pixels"], g).to(device)
        b = latents.shape[0]
        cond = self.parts.encode_text(batch["captions"], device)
        w = uniform(g, b, self.cfg.w_min, self.cfg.w_max)
        w_emb = guidance_embedding(w - 1.0, self.cfg.w_embedding_dim).to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        logs = {}
        if name == "guidance":
            t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)
            x_t = self.schedule.add_noise(latents, noise, t)
            t = t.to(device)
            target = self.parts.teacher_x0(x_t, t, cond, self.parts.uncond(b, device), w.to(device))
        else:
            grid, mid, nxt = self.grids(student_steps)
            i = torch.randint(0, student_steps, (b,), generator=g)
            if self.ddil is None:
                x_t = self.schedule.add_noise(latents, noise, grid[i])
            else:
                x_t, i, cond, w, logs = self._ddil_input(latents, noise, i, cond, w, student_steps, ctx)
                w_emb = guidance_embedding(w - 1.0, self.cfg.w_embedding_dim).to(device)
            t, t_mid, t_next = grid[i].to(device), mid[i].to(device), nxt[i].to(device)
            target = self.round_target(self.round_teacher, x_t, t, t_mid, t_next, cond, w_emb)
        pred = self.student_x0(ctx.model("student"), x_t, t, cond, w_emb)
        return {"loss": self.loss(pred, target, x_t, t.cpu()), **logs}


# -- export -----------------------------------------------------------------------------------------------

def student_scheduler(scheduler_config: dict):
    """DDIM on the trailing grid: diffusers' DPM-Solver++ at order 1 (see the module docstring)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=1, timestep_spacing="trailing",
        final_sigmas_type="zero", lower_order_final=True, use_karras_sigmas=False)


def export_student(unet, out_dir: Path, method: ProgressiveDistillation, stage: int, teacher_spec,
                   guidance_scale: float, optimisation_steps: int) -> Path:
    cfg = method.cfg
    name, _, steps = cfg.stages[stage]
    ddil = method.ddil.spec if method.ddil is not None and name != "guidance" else None  # rounds only
    method_name, options = variants("progressive", ddil, method.reflect)
    info = StudentInfo(
        method=method_name, scheduler="DPMSolverMultistepScheduler", prediction_type=method.parts.prediction_type,
        guidance="w-embedding", steps=steps, guidance_scale=guidance_scale,
        teacher=teacher_record(teacher_spec),
        timesteps=trailing_timesteps(steps, method.schedule.num_train_timesteps),
        details={"stage": name, "w_range": [cfg.w_min, cfg.w_max], "optimisation_steps": optimisation_steps,
                 "config": asdict(cfg), **options})
    return save_student(copy.deepcopy(unet).float(), out_dir, student_scheduler(method.parts.scheduler_config), info)


def distill_progressive(teacher: str, out_dir: str | Path, cfg: ProgressiveConfig, trainer_cfg,
                        data: str = "world", resume: bool = False, ddil: DDILSpec | None = None,
                        reflect: Reflection | None = None) -> Path:
    """Progressive distillation of ``teacher`` into ``out_dir``: every finished stage in
    ``out_dir/rounds/<N>-steps``, the last trained one also in ``out_dir/student``. ``trainer_cfg.max_steps``
    may stop the run before the plan's end (resume it with more). ``ddil``, ``reflect``: the DDIL options
    (``reflect``'s defaults are resolved from the teacher's ``latent_range.json``)."""
    if trainer_cfg.max_steps > cfg.total_steps:
        raise ValueError(f"max_steps {trainer_cfg.max_steps} is past the plan's {cfg.total_steps} steps "
                         f"({cfg.guidance_steps} guidance + {len(cfg.round_student_steps)} rounds of {cfg.round_steps})")
    reflection = resolve_reflection(teacher, reflect)
    state = {}

    def make(pipe, spec, out: Path):
        state["spec"], state["guidance"] = spec, float(spec.teacher.guidance_scale)

        def on_stage_end(stage: int, unet) -> None:
            first_of_next = cfg.stages[stage + 1][1]
            export_student(unet, out / "rounds" / f"{cfg.stages[stage][2]}-steps", method, stage, state["spec"],
                           state["guidance"], first_of_next)

        method = ProgressiveDistillation(pipe, cfg, on_stage_end, ddil=ddil, reflect=reflection)
        return method

    def config(spec, source):
        return {"progressive": asdict(cfg), "stages": [list(s) for s in cfg.stages],
                **options_config(ddil, reflection)}

    def export(trainer, method, spec, student_dir: Path) -> None:
        unet = trainer.export("student")
        stage = cfg.stage_at(trainer_cfg.max_steps - 1)
        for where in (Path(out_dir) / "rounds" / f"{cfg.stages[stage][2]}-steps", student_dir):
            export_student(unet, where, method, stage, spec, state["guidance"], trainer_cfg.max_steps)

    # no snapshots: rounds/ already holds each round's student
    return run_method(method_name="progressive", teacher=teacher, out_dir=out_dir, trainer_cfg=trainer_cfg,
                      data=data, resume=resume, make_method=make, run_config=config, export=export, snapshots=False)

