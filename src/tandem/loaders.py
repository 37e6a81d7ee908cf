"""Loading models by name: one teacher loader (:func:`load_teacher`), one student loader (:func:`load_student`:
the world's and ``tandem distill`` students, a diffusers UNet or pipeline, by directory or hub id) and one for
ControlNets (:func:`load_controlnet`). Presets (:mod:`tandem.presets`) only compose names into these."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checks import quote
from .hub import check_model_dir, from_hub, is_dir, quiet_hub_libraries
from .models import load_teacher_pipeline, resolve_model, student_dir
from .presets import STUDENT_KINDS, Preset, parse_student, world_file
from .sampling import CONSISTENCY
from .students import _load_student_dir


def load_controlnet(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A ``diffusers.ControlNetModel`` from a hub id, a directory, or ``world:KIND`` (shipped)."""
    from diffusers import ControlNetModel

    quiet_hub_libraries()
    source = str(world_file(f"world:controlnet-{spec.split(':', 1)[1]}")) if spec.startswith("world:") else spec
    return from_hub(ControlNetModel.from_pretrained, source, "ControlNet", torch_dtype=dtype).to(device=device,
                                                                                                dtype=dtype)


def load_preset_teacher(preset: Preset, device: str, dtype: torch.dtype):
    """The teacher a preset names."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    if preset.teacher == "world" or Path(preset.teacher).is_dir() and preset.teacher_kind == "text2img":
        return load_teacher_pipeline(resolve_model(preset.teacher), device=device, dtype=dtype)
    resolve_model(preset.teacher)  # a mistyped path is an error, not a hub id
    quiet_hub_libraries()
    cls = AutoPipelineForText2Image if preset.teacher_kind == "text2img" else AutoPipelineForImage2Image
    return from_hub(cls.from_pretrained, preset.teacher, "teacher", dtype=dtype).to(device)


def _check_student_dir(preset: Preset) -> None:
    """A local student directory of the layout its kind needs (diffusers would say only "no file named ...")."""
    path = Path(preset.student)
    if preset.student_kind not in ("unet", "pipeline") or not path.is_dir():
        return
    needed, layout = (("config.json", "a diffusers UNet2DConditionModel directory") if preset.student_kind == "unet"
                      else ("model_index.json", "a diffusers pipeline directory"))
    if not (path / needed).is_file():
        raise ValueError(f"student {quote(preset.student)} has no {needed} (expected {layout})")


def load_preset_student(preset: Preset, teacher, device: str, dtype: torch.dtype):
    """The student a preset names, beside its loaded ``teacher`` (None: the student alone, as
    :func:`load_student` says)."""
    import diffusers
    from diffusers import AutoPipelineForText2Image, UNet2DConditionModel

    quiet_hub_libraries()
    if preset.student is None:
        raise ValueError(f"{preset.name} has no student; give student=... (a `tandem distill` student directory, "
                         "a diffusers pipeline or UNet directory, or a hub id)")
    _check_student_dir(preset)
    try:
        if preset.student_kind in ("world", "tandem"):
            spec = resolve_model(preset.teacher)
            if teacher is None and is_dir(Path(spec.path)):  # the model's parts first: a student needs them
                check_model_dir(spec.path, ("vae", "text_encoder", "tokenizer"))
            path = student_dir(spec, None if preset.student == "world" else preset.student)
            return _load_student_dir(path, spec.path if teacher is None else teacher, device=device, dtype=dtype)
        if teacher is None and preset.student_kind == "unet":  # a UNet alone needs the rest of its teacher
            teacher = load_preset_teacher(preset, device, dtype)
        if preset.student_kind == "unet":
            unet = from_hub(UNet2DConditionModel.from_pretrained, preset.student, "student", dtype=dtype).to(device)
            if unet.config.time_cond_proj_dim is None:
                raise ValueError(f"student UNet {preset.student!r} has no guidance embedding "
                                 "(time_cond_proj_dim): not a consistency-distilled UNet")
            return AutoPipelineForText2Image.from_pipe(
                teacher, unet=unet, scheduler=getattr(diffusers, CONSISTENCY.scheduler).from_config(teacher.scheduler.config))
        if preset.student_kind == "pipeline":
            return from_hub(AutoPipelineForText2Image.from_pretrained, preset.student, "student",
                            dtype=dtype).to(device)
    except OSError as e:
        raise ValueError(f"cannot load student {preset.student!r}: {str(e).splitlines()[0]}") from e
    raise ValueError(f"unknown student kind {preset.student_kind!r}; expected one of {', '.join(STUDENT_KINDS)}")


def load_teacher(source: str = "world", kind: str = "text2img", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A teacher pipeline: ``world`` (the shipped ShapesWorld), a diffusers directory or a hub id; ``kind``
    "img2img" for an image-to-image teacher (such as the SDXL refiner)."""
    return load_preset_teacher(Preset("teacher", "", source, None, "world", None, teacher_kind=kind), device, dtype)


def load_student(source: str | os.PathLike, teacher=None, teacher_source: str = "world", device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The one student loader: a student pipeline beside a loaded ``teacher`` (whose VAE and text encoder it
    shares), or alone.

    Args:
        source: a name the teacher ships (``tandem world students``), a ``tandem distill`` student directory
            (its ``student.json`` says its kind and sampler), a diffusers UNet or pipeline directory, or a hub id
            (``unet:ID`` or ``pipeline:ID``).
        teacher: the loaded teacher pipeline, whose components the student shares; None: the student alone, on
            the VAE, text encoder and tokenizer of ``teacher_source`` loaded without its UNet (a diffusers UNet
            student loads the teacher it plugs into).
        teacher_source: the teacher's own name, directory or hub id (where shipped students live).
    """
    kind, path = parse_student(str(source), teacher_source)
    preset = Preset("student", "", teacher_source, path, kind, None)
    return load_preset_student(preset, teacher, device, dtype)
