"""`tandem distill ...`: distil a teacher into a student.

Every method's command takes the same run options (teacher, data, out, resume, steps, batch,
learning rate, warm-up, seed, precision, checkpoints, threads), declared once in :data:`RUN_OPTIONS`
and added to each command by :func:`distill_command`; a command lists only its method's own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .common import UserError, cli_error, console, distill_app


@dataclass(frozen=True)
class RunOptions:
    out: Path
    teacher: str
    data: str
    resume: bool
    max_steps: int | None
    batch_size: int
    grad_accum: int
    lr: float | None
    warmup_steps: int | None
    seed: int
    mixed_precision: str
    checkpoint_every: int
    threads: int | None
    snapshot_every: int | None

    def trainer_config(self, max_steps: int):
        from ..training.config import TrainerConfig

        return TrainerConfig(max_steps=max_steps, seed=self.seed, batch_size=self.batch_size,
                             grad_accum=self.grad_accum, mixed_precision=self.mixed_precision,
                             checkpoint_every=self.checkpoint_every, threads=self.threads,
                             snapshot_every=self.snapshot_every)

    def method_overrides(self) -> dict:
        """``lr`` and ``warmup_steps`` when given (each method has its own defaults)."""
        return {k: v for k, v in (("lr", self.lr), ("warmup_steps", self.warmup_steps)) if v is not None}


RUN_OPTIONS: dict[str, tuple[object, object]] = {
    "out": (Annotated[Path, typer.Option(help="Run directory (config, log.jsonl, checkpoint/, student/).")], ...),
    "teacher": (Annotated[str, typer.Option(help="'world', a diffusers model directory, a hub id, or a `tandem "
                                                 "distill` student directory.")], "world"),
    "data": (Annotated[str, typer.Option(help="'world' (ShapesWorld's stream), an image folder (metadata.jsonl or "
                                              "caption .txt files), webdataset shards, or a saved HF dataset.")],
             "world"),
    "resume": (Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")], False),
    "max_steps": (Annotated[int | None, typer.Option(help="Optimisation steps [the method's].")], None),
    "batch_size": (Annotated[int, typer.Option(help="Images per process and micro-batch.")], 32),
    "grad_accum": (Annotated[int, typer.Option(help="Micro-batches per optimisation step.")], 1),
    "lr": (Annotated[float | None, typer.Option(help="Peak learning rate [the method's].")], None),
    "warmup_steps": (Annotated[int | None, typer.Option(help="Linear warm-up steps [the method's].")], None),
    "seed": (Annotated[int, typer.Option(help="Seed of the data stream, the initialisation and every random "
                                              "draw.")], 0),
    "mixed_precision": (Annotated[str, typer.Option(help="'no', 'bf16' or 'fp16' (where the device supports "
                                                         "it).")], "no"),
    "checkpoint_every": (Annotated[int, typer.Option(help="Steps between checkpoints.")], 250),
    "threads": (Annotated[int | None, typer.Option(help="torch CPU threads per process [torch default].")], None),
    "snapshot_every": (Annotated[int | None, typer.Option(help="Also export the student every N steps into "
                                                               "--out/snapshots/step-N (accuracy against steps).")],
                       None),
}


# DDIL's options (Garrepalli et al.) of the methods that train on noisy latents: progressive, consistency, dmd2
DDILOption = Annotated[str | None, typer.Option(
    "--ddil", help="DDIL: the sources of the training inputs, 'frwd=A,teacher=B,student=C' (priors summing to 1: "
                   "forward diffusion, the teacher's and the student's rollouts), with optional mixed=BETA (each "
                   "transition of a student rollout is the student's with probability BETA, else the teacher's), "
                   "buffer=N (a DAgger buffer of N visited states; progressive, consistency), ramp=K (the student "
                   "share grows over K steps), teacher_steps=K. Off by default.")]
ReflectOption = Annotated[str, typer.Option(
    "--reflect", help="Reflected diffusion: threshold x0 estimates in training and at sampling: 'static' (clip each "
                      "latent channel to the teacher's measured range of it, latent_range.json), 'static:global' (every "
                      "channel to the one measured range) or 'static:LO,HI', 'dynamic' or "
                      "'dynamic:P[,BOUND]' (Imagen's percentile thresholding for latents in [-BOUND, BOUND]), or "
                      "'off'.")]


def ddil_options(ddil: str | None, reflect: str) -> dict:
    """``--ddil`` and ``--reflect`` parsed (a ValueError, one line, names what is wrong)."""
    from ..distill.ddil import DDILSpec
    from ..reflect import Reflection

    try:
        spec = DDILSpec.parse(ddil) if ddil is not None else None
    except ValueError as e:
        raise cli_error(e) from None
    return {"ddil": spec, "reflect": Reflection.parse(reflect)}


def _train(distill, *args, **kwargs) -> Path:
    """``distill(*args, **kwargs)`` (a method's ``distill_*``: the run directory's checks, the training, the
    export), its library errors in the command line's words (:func:`~tandem.cli.common.cli_error`)."""
    try:
        return distill(*args, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        raise cli_error(e) from None


def distill_command(name: str):
    """Register ``fn(run: RunOptions, **own options)`` as ``tandem distill NAME`` with :data:`RUN_OPTIONS`
    added to its own options (``--out`` first)."""

    def register(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()
               if p.name != "run"]
        shared = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
                  for k, (a, d) in RUN_OPTIONS.items()]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared[:1] + own + shared[1:]]

        @functools.wraps(fn)
        def command(**kwargs):
            run = RunOptions(**{k: kwargs.pop(k) for k in RUN_OPTIONS})
            if run.max_steps is not None and run.max_steps < 1:
                raise UserError(f"--max-steps must be >= 1, got {run.max_steps}")
            return fn(run=run, **kwargs)

        del command.__wrapped__  # typer reads the signature below, not fn's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        distill_app.command(name)(command)
        return fn

    return register


def _report(method: str, run: RunOptions, steps: int, student: Path, t0: float, try_steps: int) -> None:
    log_path = run.out / "log.jsonl"  # absent when a resumed run had nothing left to train and its log was removed
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    # the last logged value of each loss (several networks log theirs as NETWORK/loss, each on its own steps)
    last = {k: v for row in log for k, v in row.items() if k == "loss" or k.endswith("/loss")}
    losses = ", ".join(f"{k} {v:.5f}" for k, v in sorted(last.items())) or "no loss logged"
    console.print(f"{method} student: {steps} steps ({time.time() - t0:.0f}s in this call), last {losses} -> {student}")
    console.print(f"try it: tandem generate --model {run.teacher} --mode student --student {student} "
                  f"--student-steps {try_steps} 'PROMPT' --out OUT")


@distill_command("consistency")
def distill_consistency_cmd(
    run: RunOptions,
    w_range: Annotated[tuple[float, float], typer.Option(help="Guidance scales sampled in training (the student "
                                                              "serves any scale in the range).")] = (1.0, 8.0),
    ddim_steps: Annotated[int, typer.Option(help="Teacher DDIM solver grid (N of the skipping schedule).")] = 50,
    loss: Annotated[str, typer.Option(help="'huber' (pseudo-Huber) or 'l2'.")] = "huber",
    target_ema: Annotated[float, typer.Option(help="EMA decay of the target network.")] = 0.95,
    sampling_ema: Annotated[float | None, typer.Option(help="Also keep an EMA with this decay and export it "
                                                            "[export the student itself].")] = None,
    ddil: DDILOption = None,
    reflect: ReflectOption = "off",
) -> None:
    """Consistency distillation (LCM-style): a student that samples in 1-8 steps, with guidance
    given through a w-embedding (lr 1e-5, 2000 steps by default). Writes the student to OUT/student."""
    from ..distill.consistency import ConsistencyConfig, distill_consistency

    cfg = ConsistencyConfig(num_ddim_timesteps=ddim_steps, w_min=w_range[0], w_max=w_range[1], loss=loss,
                            target_ema=target_ema, sampling_ema=sampling_ema, **run.method_overrides())
    options = ddil_options(ddil, reflect)
    steps = run.max_steps or 2000
    t0 = time.time()
    student = _train(distill_consistency, run.teacher, run.out, cfg, run.trainer_config(steps), data=run.data,
                     resume=run.resume, **options)
    _report("consistency", run, steps, student, t0, 4)


@distill_command("progressive")
def distill_progressive_cmd(
    run: RunOptions,
    start_steps: Annotated[int, typer.Option(help="The teacher's DDIM steps in the first halving round "
                                                  "(a power of two).")] = 32,
    end_steps: Annotated[int, typer.Option(help="The last round's student steps (a power of two).")] = 1,
    guidance_steps: Annotated[int, typer.Option(help="Optimisation steps of the guidance stage (the student "
                                                     "learns classifier-free guidance in one call).")] = 400,
    round_steps: Annotated[int, typer.Option(help="Optimisation steps per halving round.")] = 300,
    w_range: Annotated[tuple[float, float], typer.Option(help="Guidance scales sampled in training.")] = (1.0, 8.0),
    target: Annotated[str, typer.Option(help="'x0' (truncated-SNR weighting) or 'v'.")] = "x0",
    ddil: DDILOption = None,
    reflect: ReflectOption = "off",
) -> None:
    """Progressive distillation (Salimans & Ho; guidance first, Meng et al.): a guided student, then rounds
    that halve its DDIM steps (32 -> 16 -> ... -> 1 by default; lr 5e-5). Every finished round is a student
    in OUT/rounds/<N>-steps; the last one trained also in OUT/student. --max-steps stops before the
    plan's end (resume with more)."""
    from ..distill.progressive import ProgressiveConfig, distill_progressive

    cfg = ProgressiveConfig(start_steps=start_steps, end_steps=end_steps, guidance_steps=guidance_steps,
                            round_steps=round_steps, w_min=w_range[0], w_max=w_range[1], target=target,
                            **run.method_overrides())
    options = ddil_options(ddil, reflect)
    steps = run.max_steps or cfg.total_steps
    t0 = time.time()
    student = _train(distill_progressive, run.teacher, run.out, cfg, run.trainer_config(steps), data=run.data,
                     resume=run.resume, **options)
    _report("progressive", run, steps, student, t0, cfg.stages[cfg.stage_at(steps - 1)][2])


@distill_command("knowledge")
def distill_knowledge_cmd(
    run: RunOptions,
    arch: Annotated[str, typer.Option(help="Student width: 'half', 'quarter' or 'three-quarter' of the teacher's "
                                           "channels, or 'custom' with --channels.")] = "half",
    channels: Annotated[str | None, typer.Option(help="arch custom: block_out_channels, e.g. 32,64,64.")] = None,
    guidance: Annotated[str, typer.Option(help="'classifier-free' (Eq. 5 with the empty caption in a share of the "
                                               "batch) or 'w-embedding' (Eq. 6).")] = "classifier-free",
    cond_dropout: Annotated[float, typer.Option(help="classifier-free: share of empty captions.")] = 0.1,
    w_range: Annotated[tuple[float, float], typer.Option(help="w-embedding: guidance scales sampled.")] = (1.0, 8.0),
    alpha: Annotated[float, typer.Option(help="Eq. 8's weight of the data term; 1 = plain denoising score "
                                              "matching (Eq. 3), the from-scratch baseline.")] = 0.0,
    ema: Annotated[float, typer.Option(help="EMA decay of the exported weights.")] = 0.995,
    lr_stages: Annotated[str | None, typer.Option(help="A staged LR schedule instead of warm-up then constant: "
                                                       "'STEPS[:SHAPE[:PEAK[:WARMUP]]],...' (SHAPE constant or cosine, "
                                                       "PEAK a factor of --lr), adding up to --max-steps; e.g. the "
                                                       "world teacher's '7250:constant:1:500,3600:cosine:0.5:100,"
                                                       "3000:cosine:0.2:100'.")] = None,
) -> None:
    """Knowledge distillation into a smaller UNet (Dockhorn et al.), randomly initialised, trained at all
    noise levels against the teacher's denoiser (lr 5e-4, 200 warm-up steps, 3000 steps by default). The
    student samples like the teacher (DPM-Solver++); it can be a --teacher itself."""
    from ..distill.knowledge import KnowledgeConfig, distill_knowledge

    block = None
    if channels is not None:
        try:
            block = tuple(int(c) for c in channels.split(","))
        except ValueError:
            raise UserError(f"--channels must be integers separated by commas, got {channels!r}") from None
    overrides = run.method_overrides()
    if lr_stages is not None:
        if "warmup_steps" in overrides:
            raise UserError("--lr-stages carries its own warm-ups; drop --warmup-steps")
        from ..training.schedules import parse_lr_stages

        total = sum(stage.steps for stage in parse_lr_stages(lr_stages))
        if run.max_steps is not None and run.max_steps != total:
            raise UserError(f"--lr-stages add up to {total} steps, not --max-steps {run.max_steps}")
        run = dataclasses.replace(run, max_steps=total)
        overrides["warmup_steps"] = 0
    cfg = KnowledgeConfig(arch=arch, block_out_channels=block, guidance=guidance, cond_dropout=cond_dropout,
                          w_min=w_range[0], w_max=w_range[1], alpha=alpha, ema=ema, lr_stages=lr_stages, **overrides)
    steps = run.max_steps or 3000
    t0 = time.time()
    student = _train(distill_knowledge, run.teacher, run.out, cfg, run.trainer_config(steps), data=run.data,
                     resume=run.resume)
    _report("knowledge", run, steps, student, t0, 25)


@distill_command("dmd2")
def distill_dmd2_cmd(
    run: RunOptions,
    steps: Annotated[int, typer.Option(help="Student sampling steps (trailing grid: 4 = 999/749/499/249).")] = 4,
    real_guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance of the real score (the "
                                                             "teacher) [the teacher's default scale].")] = None,
    critic_updates: Annotated[int, typer.Option(help="Critic (fake score) updates per student update.")] = 5,
    backward_simulation: Annotated[bool | None, typer.Option(
        "--backward-simulation/--no-backward-simulation",
        help="Train a multi-step student on its own rollouts (else on noised data) [on for --steps > 1].")] = None,
    gan_weight: Annotated[float, typer.Option(help="The student's GAN loss weight; > 0 adds DMD2's classifier on "
                                                   "the critic's bottleneck (DMD2: 1e-3 SD 1.5, 5e-3 SDXL).")] = 0.0,
    gan_critic_weight: Annotated[float, typer.Option(help="The critic's classification loss weight.")] = 1e-2,
    gan_max_timestep: Annotated[int, typer.Option(help="The classifier sees latents noised to t < this (0: "
                                                       "clean).")] = 1000,
    regression_weight: Annotated[float, typer.Option(help="Weight of the MSE to the teacher's DDIM sample from "
                                                          "the same noise (original DMD's regression loss).")] = 0.0,
    regression_steps: Annotated[int, typer.Option(help="The teacher's DDIM steps for the regression target.")] = 25,
    critic_lr: Annotated[float | None, typer.Option(help="The critic's peak learning rate [--lr].")] = None,
    ema: Annotated[float | None, typer.Option(help="Export this EMA of the student [the student itself].")] = None,
    ddil: DDILOption = None,
    reflect: ReflectOption = "off",
) -> None:
    """DMD2 (Yin et al. 2024): distribution matching against the guided teacher with a trained fake-score
    critic, optionally a GAN on the critic's bottleneck; the student samples in --steps DDIM steps without
    guidance (lr 1e-5, 2000 steps by default; --max-steps counts critic updates). The log holds every step
    (the student's losses on the steps it updates)."""
    import dataclasses

    from ..distill.dmd2 import DMD2Config, distill_dmd2

    cfg = DMD2Config(steps=steps, real_guidance=real_guidance, critic_updates=critic_updates,
                     backward_simulation=backward_simulation, gan_weight=gan_weight,
                     gan_critic_weight=gan_critic_weight, gan_max_timestep=gan_max_timestep,
                     regression_weight=regression_weight, regression_steps=regression_steps, critic_lr=critic_lr,
                     ema=ema, **run.method_overrides())
    options = ddil_options(ddil, reflect)
    max_steps = run.max_steps or 2000
    t0 = time.time()
    trainer_cfg = dataclasses.replace(run.trainer_config(max_steps), log_every=1)
    student = _train(distill_dmd2, run.teacher, run.out, cfg, trainer_cfg, data=run.data, resume=run.resume,
                     **options)
    log_path = run.out / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    last = {k: v for record in log for k, v in record.items() if k.startswith(("student/", "critic/"))}
    console.print(f"dmd2 student: {max_steps} steps ({time.time() - t0:.0f}s in this call), last distribution-"
                  f"matching loss {last.get('student/dm_loss', float('nan')):.5f}, critic loss "
                  f"{last.get('critic/loss', float('nan')):.5f} -> {student}")
    console.print(f"try it: tandem generate --model {run.teacher} --mode student --student {student} "
                  f"--student-steps {steps} 'PROMPT' --out OUT")


@distill_command("adversarial")
def distill_adversarial_cmd(
    run: RunOptions,
    steps: Annotated[int, typer.Option(help="N student timesteps (trailing grid: 4 = 999/749/499/249); the student "
                                            "samples in 1..N steps.")] = 4,
    student_schedule: Annotated[str, typer.Option(help="'teacher' (the teacher's schedule and parametrisation: the "
                                                       "student starts as its teacher's denoiser) or 'zero-snr' (the "
                                                       "first release's: zero terminal SNR, v or sample).")] = "teacher",
    guidance_scale: Annotated[float | None, typer.Option(help="The teacher's classifier-free guidance in the "
                                                              "distillation loss [the teacher's default].")] = None,
    distill_weighting: Annotated[str, typer.Option(help="c(t) of the distillation loss: 'exponential' (alpha_t), "
                                                        "'sds' or 'nfsd'.")] = "exponential",
    distill_lambda: Annotated[float, typer.Option(help="Weight of the distillation loss (lambda).")] = 2.5,
    distill_reduction: Annotated[str, typer.Option(help="The distillation loss's squared norm over latent elements: "
                                                        "'sum' or 'mean' (the first release's).")] = "sum",
    r1_gamma: Annotated[float, typer.Option(help="R1 penalty on the discriminator heads' inputs (gamma).")] = 1e-5,
    features: Annotated[str | None, typer.Option(help="The discriminator's frozen feature network: 'world-clip' "
                                                      "or a DINOv2 hub id or path [world-clip for a world teacher, "
                                                      "facebook/dinov2-small otherwise].")] = None,
    feature_layers: Annotated[int | None, typer.Option(help="Discriminator heads, on this many blocks of the "
                                                            "feature network [min(4, its blocks)].")] = None,
    feature_resolution: Annotated[int | None, typer.Option(help="Image size the feature network sees [its own, "
                                                                "at most 224].")] = None,
    prediction_type: Annotated[str | None, typer.Option(help="--student-schedule zero-snr: what the student "
                                                             "predicts, 'v_prediction' or 'sample' [v_prediction]."
                                                             )] = None,
    hinge: Annotated[str, typer.Option(help="'per-token' (StyleGAN-T: the hinge on each token's logit, averaged) or "
                                            "'per-image' (on the tokens' average logit).")] = "per-token",
    spectral_norm: Annotated[bool, typer.Option(help="Spectral normalisation in the discriminator heads.")] = True,
    augment: Annotated[str, typer.Option(help="DiffAugment before the feature network: any of color,translation,"
                                              "cutout, or 'none'.")] = "color,translation,cutout",
    real_images: Annotated[str, typer.Option(help="The discriminator's real images: 'pixels' (the data) or 'vae' "
                                                  "(their VAE reconstruction, as the fakes are decoded).")] = "pixels",
    disc_lr: Annotated[float, typer.Option(help="The discriminator heads' learning rate.")] = 1e-4,
    ema: Annotated[float, typer.Option(help="Export this EMA of the student; 0: the student itself (on the world "
                                            "the 0.99 EMA scored 5 points above its own run's student).")] = 0.99,
) -> None:
    """Adversarial diffusion distillation (ADD, Sauer et al.): a student trained from the teacher's UNet with a
    hinge GAN loss (frozen ViT features, trainable heads conditioned on text and image) plus the teacher's
    score-distillation loss; it samples in 1-4 DDIM steps without guidance (lr 2e-5, 2000 steps by default)."""
    from ..distill.adversarial import AdversarialConfig, distill_adversarial

    cfg = AdversarialConfig(student_steps=steps, student_schedule=student_schedule, guidance_scale=guidance_scale,
                            distill_weighting=distill_weighting, distill_lambda=distill_lambda,
                            distill_reduction=distill_reduction, r1_gamma=r1_gamma, features=features,
                            feature_layers=feature_layers, feature_resolution=feature_resolution,
                            prediction_type=prediction_type, hinge=hinge, spectral_norm=spectral_norm,
                            augment="" if augment == "none" else augment, real_images=real_images, disc_lr=disc_lr,
                            ema=ema or None, **run.method_overrides())
    max_steps = run.max_steps or 2000
    t0 = time.time()
    student = _train(distill_adversarial, run.teacher, run.out, cfg, run.trainer_config(max_steps), data=run.data,
                     resume=run.resume)
    log_path = run.out / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    last = log[-1] if log else {}
    console.print(f"adversarial student: {max_steps} steps ({time.time() - t0:.0f}s in this call), last adversarial "
                  f"loss {last.get('student/g_adv', float('nan')):.5f}, distillation loss "
                  f"{last.get('student/distill', float('nan')):.5f}, discriminator loss "
                  f"{last.get('discriminator/d_loss', float('nan')):.5f} -> {student}")
    console.print(f"try it: tandem generate --model {run.teacher} --mode student --student {student} "
                  f"--student-steps {steps} 'PROMPT' --out OUT")
