"""What every distillation method takes from its teacher, and the run around a method.

:class:`TeacherParts` holds the frozen teacher UNet, VAE and text encoder with the noise schedule
(one :class:`~tandem.denoiser.NoiseSchedule`), and the pieces every method's step needs: caption
embeddings, VAE latents of a batch of images, the empty caption, the teacher's guided prediction.
:func:`run_method` is the run of any method: check ``--out`` before a model loads, open the data,
train on the shared Trainer, export the student by the one student contract.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..denoiser import NoiseSchedule
from ..models import WORLD, encode_captions, resolve_model
from ..training.checkpoints import check_run_dir
from ..training.config import check_precision
from ..training.trainer import Trainer
from .data import WorldSource, open_source


class TeacherParts:
    """The frozen parts of a teacher pipeline (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``), in float32, with its noise schedule."""

    def __init__(self, teacher):
        self.teacher_unet = teacher.unet.float()
        self.vae = teacher.vae.float()
        self.text_encoder = teacher.text_encoder.float()
        self.tokenizer = teacher.tokenizer
        self.scheduler_config = dict(teacher.scheduler.config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler_config)
        self.reflect = None  # a tandem.reflect.Reflection of the teacher's x₀ estimates (DDIL section 3), if set
        self._uncond: torch.Tensor | None = None

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher_unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @torch.no_grad()
    def encode_text(self, captions: list[str], device) -> torch.Tensor:
        return encode_captions(self.tokenizer, self.text_encoder, captions, device)

    def uncond(self, batch: int, device) -> torch.Tensor:
        """The empty caption's embeddings, [batch, L, D] (computed once)."""
        if self._uncond is None:
            self._uncond = self.encode_text([""], device)
        return self._uncond.to(device).expand(batch, -1, -1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents of ``pixels`` in [-1, 1], a sample of each posterior (noise from ``generator``)."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    @torch.no_grad()
    def teacher_x0(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                   w: torch.Tensor | None) -> torch.Tensor:
        """The teacher's x₀ at ``x_t``: classifier-free guided ``ε_u + w (ε_c - ε_u)`` (per-sample ``w``), or
        its conditional prediction alone when ``w`` is None; thresholded by ``reflect`` when one is set."""
        x0 = self.schedule.to_x0(self.teacher_eps(x, t, cond, uncond, w), x, t)
        return x0 if self.reflect is None else self.reflect(x0)

    def guided_x0(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
        """:meth:`teacher_x0` under classifier-free guidance ``w`` (per sample, or one scale for all) against the
        empty caption: the teacher as DDIL's rollouts call it."""
        w = torch.full((x.shape[0],), float(w), device=x.device) if isinstance(w, int | float) else w
        return self.teacher_x0(x, t, cond, self.uncond(x.shape[0], x.device), w)

    @torch.no_grad()
    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                    w: torch.Tensor | None) -> torch.Tensor:
        unet = self.teacher_unet
        pred_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_c = self.schedule.to_eps(pred_c, x, t, self.prediction_type)
        if w is None:
            return eps_c
        pred_u = unet(x, t, encoder_hidden_states=uncond).sample
        eps_u = self.schedule.to_eps(pred_u, x, t, self.prediction_type)
        w = w.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return eps_u + w * (eps_c - eps_u)


def teacher_record(spec) -> dict:
    """How a run and its student name their teacher: ``world`` for the shipped world (wherever tandem is
    installed, so a run resumes and a student loads after a reinstall), else its name and path."""
    if spec.name == WORLD:
        return {"name": WORLD, "path": WORLD}
    return {"name": spec.name, "path": spec.path}


def variants(method: str, ddil=None, reflect=None) -> tuple[str, dict]:
    """A student's method name with the DDIL / reflection options it was trained with
    (``progressive+ddil+reflected``, see ``tandem.students.VARIANTS``) and the ``details`` recording them
    (the reflection is what the student samples with: ``tandem.reflect.student_reflection``)."""
    details = {}
    if ddil is not None:
        method, details["ddil"] = method + "+ddil", ddil.to_json()
    if reflect is not None:
        method, details["reflect"] = method + "+reflected", reflect.to_json()
    return method, details


def resolve_reflection(teacher: str, reflect):
    """``reflect`` (a :class:`tandem.reflect.Reflection` or None) with its defaults from the teacher's measured
    latent range, before any model loads (an error naming the missing ``latent_range.json``)."""
    return reflect.resolved(resolve_model(teacher).path) if reflect is not None else None


def options_config(ddil=None, reflect=None) -> dict:
    """The run configuration's entries for DDIL and reflection, present only when they are on (so that the
    runs made without them resume as they were saved)."""
    return {**({"ddil": ddil.to_json()} if ddil is not None else {}),
            **({"reflect": reflect.to_json()} if reflect is not None else {})}


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """``n`` draws from U[low, high] (CPU, float32)."""
    return low + (high - low) * torch.rand((n,), generator=generator)


def run_method(*, method_name: str, teacher: str, out_dir: str | Path, trainer_cfg, data: str, resume: bool,
               make_method: Callable, run_config: Callable[[object, object], dict],
               export: Callable[[object, object, object, Path], None], snapshots: bool = True) -> Path:
    """Train one distillation method end to end; returns ``out_dir/student``.

    Args:
        make_method: ``(teacher_pipe, spec, out_dir) -> method``.
        run_config: ``(spec, source) -> dict`` saved as the run's configuration (beside the trainer's).
        export: ``(trainer, method, spec, student_dir) -> None`` writes the student (main process only); also
            the snapshots of ``trainer_cfg.snapshot_every`` into ``out_dir/snapshots/step-N``.
        snapshots: False for a method whose export cannot be taken mid-run (``snapshot_every`` is then refused).
    """
    from ..models import load_teacher_pipeline  # looked up at call time: tests replace it

    spec = resolve_model(teacher)
    if data == "world" and not spec.is_world:
        raise ValueError(f"data='world' (ShapesWorld renderings) only fits a world teacher, not {teacher!r}; "
                         "give data=... a folder, webdataset shards or a saved HF dataset")
    if trainer_cfg.snapshot_every is not None and not snapshots:
        raise ValueError(f"{method_name} takes no snapshot_every")
    check_precision(trainer_cfg.mixed_precision)  # before the teacher loads, as a bad --out
    check_run_dir(out_dir, resume, trainer_cfg.max_steps)  # a bad --out fails before the teacher loads
    pipe = load_teacher_pipeline(spec)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    source = WorldSource(trainer_cfg.seed) if data == "world" else open_source(data, resolution, trainer_cfg.seed)
    method = make_method(pipe, spec, Path(out_dir))
    config = {"teacher": teacher_record(spec), **run_config(spec, source),
              "data": source.describe()}

    def snapshot(where: Path) -> None:
        export(trainer, method, spec, where)

    trainer = Trainer(method, source, trainer_cfg, out_dir, resume=resume, run_config=config,
                      snapshot=snapshot if snapshots else None)
    trainer.train()
    student_dir = Path(out_dir) / "student"
    if trainer.is_main:
        export(trainer, method, spec, student_dir)
    trainer.finish({"method": method_name, "steps": trainer_cfg.max_steps, "student": str(student_dir)})
    return student_dir
