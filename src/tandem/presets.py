"""Presets: a student, a teacher, an oracle and the settings that make them work in tandem,
written as data. Real-tier settings come from the adaptive teacher-student paper (Tables 4-5);
``world`` is the shipped ShapesWorld with its consistency student, oracle and calibration.

Student kinds:

* ``world``: the shipped world's student (``<world>/student``), sharing the teacher's VAE and text encoder.
* ``unet``: a consistency-distilled UNet (a repository or directory holding ``config.json``) swapped into
  the teacher's components, with an ``LCMScheduler``: nothing but the UNet is loaded twice.
* ``pipeline``: a complete diffusers pipeline of its own (e.g. SDXL-Turbo, LCM-Dreamshaper).

Teacher kinds: ``text2img`` (can refine and regenerate) or ``img2img`` (refine only, e.g. the SDXL refiner).

A preset with a ``controlnet`` plugs that ControlNet into both student and teacher (section 4.3 and
appendix D.6); its calls then need a control image per prompt. ``world-mask`` and ``world-edges`` are
the shipped world with its mask and edge ControlNets (``tandem world train controlnet``).

``edit_calibrations`` are the student's *edit* score tables (``tandem calibrate --edits``), one per
SDEdit strength, that ``TandemPipeline.edit`` takes tau from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import Calibration


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    teacher: str
    student: str
    student_kind: str  # world | unet | pipeline
    scorer: str        # a tandem.scorers.load_scorer spec
    defaults: dict = field(default_factory=dict)  # TandemPipeline call defaults
    teacher_kind: str = "text2img"
    calibration: str | None = None  # a calibration file shipped with the preset
    source: str = ""
    controlnet: str | None = None   # a ControlNetModel (hub id or directory; "world:KIND" for the shipped ones)
    edit_calibrations: dict = field(default_factory=dict)  # SDEdit strength -> calibration file ("world:NAME")


PRESETS: dict[str, Preset] = {
    "world": Preset(
        name="world",
        description="ShapesWorld: shipped teacher, consistency student, world oracle and calibration",
        teacher="world", student="world", student_kind="world", scorer="world-oracle",
        calibration="world", edit_calibrations={0.6: "world:calibration-edit-0.6.json"},
        defaults=dict(num_inference_steps=4, guidance_scale=6.0, teacher_steps=10, teacher_guidance_scale=5.0,
                      teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.7, percentile=50,
                      edit_strength=0.6, edit_num_inference_steps=8),
        source="measured on ShapesWorld's validation prompts (README, 'Adaptive generation')",
    ),
    "sd15-lcm": Preset(
        name="sd15-lcm",
        description="Dreamshaper v7 (SD1.5) teacher, its LCM student, ImageReward",
        teacher="Lykon/dreamshaper-7", student="SimianLuo/LCM_Dreamshaper_v7", student_kind="pipeline",
        scorer="imagereward:ImageReward-v1.0",
        defaults=dict(num_inference_steps=5, guidance_scale=8.5, teacher_steps=10, teacher_guidance_scale=7.5,
                      teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.7, percentile=50),
        source="paper Table 4 (SD1.5 human evaluation: CD 5 + refinement 10 steps, sigma 0.7, k 50)",
    ),
    "sdxl-lcm": Preset(
        name="sdxl-lcm",
        description="SDXL-Base teacher, LCM-SDXL (CD-SDXL) student, ImageReward",
        teacher="stabilityai/stable-diffusion-xl-base-1.0", student="latent-consistency/lcm-sdxl",
        student_kind="unet", scorer="imagereward:ImageReward-v1.0",
        defaults=dict(num_inference_steps=4, guidance_scale=8.0, teacher_steps=12, teacher_guidance_scale=5.0,
                      teacher_scheduler="unipc", strategy="refine", rollback_sigma=0.85, percentile=70),
        source="paper Table 5 (CD-SDXL 4 + SDXL-Base refinement 12 UniPC steps, sigma 0.85, k 70)",
    ),
    "sdxl-turbo": Preset(
        name="sdxl-turbo",
        description="SDXL-Turbo (ADD) student refined by the SDXL refiner, ImageReward",
        teacher="stabilityai/stable-diffusion-xl-refiner-1.0", teacher_kind="img2img",
        student="stabilityai/sdxl-turbo", student_kind="pipeline", scorer="imagereward:ImageReward-v1.0",
        defaults=dict(num_inference_steps=2, guidance_scale=0.0, teacher_steps=4, teacher_guidance_scale=5.0,
                      teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.4, percentile=50),
        source="paper Table 5 (ADD-XL 2 + SDXL-Refiner 4 steps, sigma 0.4, k 50)",
    ),
}


# The world with its ControlNets (the generation settings of `world`; docs/results/eval_control_*).
for _kind, _what in (("mask", "object silhouettes"), ("edges", "object outlines")):
    PRESETS[f"world-{_kind}"] = Preset(
        name=f"world-{_kind}", description=f"ShapesWorld with its {_kind} ControlNet ({_what}) in student and teacher",
        teacher="world", student="world", student_kind="world", scorer="world-oracle", controlnet=f"world:{_kind}",
        calibration=f"world:controlnet-{_kind}/calibration.json",
        defaults={k: v for k, v in PRESETS["world"].defaults.items() if not k.startswith("edit_")},
        source="the world preset's generation settings")

# Real-tier ControlNet presets: paper appendix D.6 (student 5 steps; refinement 10 UniPC steps, sigma 0.5;
# k 50 for Canny edges, 70 for segmentation masks), on the sd15-lcm pair with SD1.5's ControlNets.
for _name, _controlnet, _k in (("sd15-lcm-canny", "lllyasviel/control_v11p_sd15_canny", 50),
                               ("sd15-lcm-seg", "lllyasviel/control_v11p_sd15_seg", 70)):
    PRESETS[_name] = Preset(
        name=_name, description=f"sd15-lcm with the SD1.5 ControlNet {_controlnet} in student and teacher",
        teacher="Lykon/dreamshaper-7", student="SimianLuo/LCM_Dreamshaper_v7", student_kind="pipeline",
        scorer="imagereward:ImageReward-v1.0", controlnet=_controlnet,
        defaults=dict(num_inference_steps=5, guidance_scale=8.5, teacher_steps=10, teacher_guidance_scale=7.5,
                      teacher_scheduler="unipc", strategy="refine", rollback_sigma=0.5, percentile=_k),
        source="paper appendix D.6 (ControlNet: CD 5 steps + UniPC refinement 10 steps, sigma 0.5, "
               f"k {_k})")


def world_calibration_path() -> Path:
    from .models import world_dir

    return world_dir() / "calibration.json"


def _world_file(spec: str) -> Path:
    """``world:NAME`` -> the shipped world's file or directory NAME; anything else is a path."""
    from .models import world_dir

    return world_dir() / spec.split(":", 1)[1] if spec.startswith("world:") else Path(spec)


def load_controlnet(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A ``diffusers.ControlNetModel`` from a hub id, a directory, or ``world:KIND`` (shipped)."""
    from diffusers import ControlNetModel

    from .models import quiet_hub_libraries

    quiet_hub_libraries()
    source = str(_world_file(f"world:controlnet-{spec.split(':', 1)[1]}")) if spec.startswith("world:") else spec
    try:
        return ControlNetModel.from_pretrained(source, torch_dtype=dtype).to(device=device, dtype=dtype)
    except OSError as e:
        raise ValueError(f"cannot load ControlNet {spec!r}: {str(e).splitlines()[0]}") from e


def load_preset(name: str | Preset, device: str = "cpu", dtype: torch.dtype = torch.float32, scorer=None,
                calibration: Calibration | str | Path | None = None):
    """Build a ``TandemPipeline`` from a preset name (or a ``Preset``). ``scorer``/``calibration``
    override the preset's (a calibration may be given as a file path)."""
    from .pipeline import TandemPipeline
    from .scorers import load_scorer

    preset = name if isinstance(name, Preset) else PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    teacher = load_teacher(preset, device, dtype)
    student = load_student(preset, teacher, device, dtype)
    if scorer is None:
        scorer = load_scorer(preset.scorer, device=device)
    if calibration is None and preset.calibration == "world":
        path = world_calibration_path()
        calibration = Calibration.load(path) if path.exists() else None
    elif calibration is None and preset.calibration:
        path = _world_file(preset.calibration)
        shipped = preset.calibration.startswith("world:")
        calibration = Calibration.load(path) if path.exists() or not shipped else None
    elif isinstance(calibration, str | Path):
        calibration = Calibration.load(calibration)
    pipe = TandemPipeline(student, teacher, scorer, None if preset.controlnet else calibration,
                          defaults=preset.defaults, name=preset.name)
    if preset.controlnet:
        pipe = pipe.with_controlnet(load_controlnet(preset.controlnet, device, dtype), calibration=calibration,
                                    name=preset.name)
    for strength, spec in preset.edit_calibrations.items():
        path = _world_file(spec)
        if path.exists():
            pipe.edit_calibrations[float(strength)] = Calibration.load(path)
    return pipe


def load_teacher(preset: Preset, device: str, dtype: torch.dtype):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    from .models import load_teacher_pipeline, quiet_hub_libraries, resolve_model

    if preset.teacher == "world" or Path(preset.teacher).is_dir() and preset.teacher_kind == "text2img":
        return load_teacher_pipeline(resolve_model(preset.teacher), device=device, dtype=dtype)
    quiet_hub_libraries()
    cls = AutoPipelineForText2Image if preset.teacher_kind == "text2img" else AutoPipelineForImage2Image
    try:
        pipe = cls.from_pretrained(preset.teacher, dtype=dtype)
    except OSError as e:
        raise ValueError(f"cannot load teacher {preset.teacher!r}: {str(e).splitlines()[0]}") from e
    return pipe.to(device)


def _check_student_dir(preset: Preset) -> None:
    """A local student directory of the layout its kind needs (diffusers would say only "no file named ...")."""
    from .checks import quote

    path = Path(preset.student)
    if preset.student_kind not in ("unet", "pipeline") or not path.is_dir():
        return
    needed, layout = (("config.json", "a diffusers UNet2DConditionModel directory") if preset.student_kind == "unet"
                      else ("model_index.json", "a diffusers pipeline directory"))
    if not (path / needed).is_file():
        raise ValueError(f"student {quote(preset.student)} has no {needed} (expected {layout})")


def load_student(preset: Preset, teacher, device: str, dtype: torch.dtype):
    from diffusers import (
        AutoPipelineForText2Image,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        UNet2DConditionModel,
    )

    from .models import quiet_hub_libraries, resolve_model, student_dir

    quiet_hub_libraries()
    _check_student_dir(preset)
    try:
        if preset.student_kind == "world":
            path = student_dir(resolve_model(preset.teacher), None if preset.student == "world" else preset.student)
            unet = UNet2DConditionModel.from_pretrained(path / "unet").to(device=device, dtype=dtype)
            return LatentConsistencyModelPipeline(
                vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
                scheduler=LCMScheduler.from_pretrained(path / "scheduler"), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        if preset.student_kind == "unet":
            unet = UNet2DConditionModel.from_pretrained(preset.student, dtype=dtype).to(device)
            if unet.config.time_cond_proj_dim is None:
                raise ValueError(f"student UNet {preset.student!r} has no guidance embedding "
                                 "(time_cond_proj_dim): not a consistency-distilled UNet")
            return AutoPipelineForText2Image.from_pipe(
                teacher, unet=unet, scheduler=LCMScheduler.from_config(teacher.scheduler.config))
        if preset.student_kind == "pipeline":
            return AutoPipelineForText2Image.from_pretrained(preset.student, dtype=dtype).to(device)
    except OSError as e:
        raise ValueError(f"cannot load student {preset.student!r}: {str(e).splitlines()[0]}") from e
    raise ValueError(f"unknown student kind {preset.student_kind!r}; expected world, unet or pipeline")
