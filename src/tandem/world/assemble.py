"""Put trained components together into a world directory: a Stable Diffusion repository
(``StableDiffusionPipeline.from_pretrained(<dir>)`` loads it) plus tandem's own files.

    <dir>/model_index.json, scheduler/, vae/, text_encoder/, tokenizer/, unet/   (diffusers)
    <dir>/clip/          the full world CLIP (its image tower is the world's feature network)
    <dir>/tandem.json    preset defaults (teacher steps, scheduler, best guidance scale)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..calibration import Calibration
from ..checks import load_pretrained, read_json_file
from ..hub import quiet_hub_libraries
from ..models import STUDY_STUDENTS, world_dir
from ..outputs import atomic_write_text, staged_dir
from ..pipeline import load_preset
from ..presets import compose
from ..students import load_student_parts
from .models import build_noise_scheduler


def text_encoder_of(clip):
    """The text tower of a ``CLIPModel`` as a standalone ``CLIPTextModel`` (what SD pipelines load)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


def write_world(
    out: str | Path,
    vae,
    clip,
    tokenizer,
    unet,
    guidance_scale: float,
    unet_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a world directory from in-memory components (``clip`` is the full ``CLIPModel``)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    quiet_hub_libraries()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    scheduler = DPMSolverMultistepScheduler.from_config(build_noise_scheduler().config, algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder_of(clip),
        tokenizer=tokenizer,
        unet=unet.to(unet_dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    meta = {
        "world": True,
        "spec": "ShapesWorld v1",
        "teacher": {"steps": 25, "scheduler": "dpm", "guidance_scale": guidance_scale},
    }
    with staged_dir(out) as staging:  # an earlier world in ``out`` is replaced only once this one is whole
        pipe.save_pretrained(staging)
        clip.save_pretrained(staging / "clip")
        (staging / "tandem.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def assemble_world(
    out: str | Path,
    vae_dir: str | Path,
    clip_run_dir: str | Path,
    unet_dir: str | Path,
    guidance_scale: float,
    unet_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write the world directory ``out`` from a VAE export, a CLIP run and a teacher UNet export,
    copying each component's training config beside its weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTokenizer

    clip_run_dir = Path(clip_run_dir)
    out = write_world(
        out,
        vae=load_pretrained(AutoencoderKL.from_pretrained, vae_dir, "VAE"),
        clip=load_pretrained(CLIPModel.from_pretrained, clip_run_dir / "clip", "CLIP"),
        tokenizer=load_pretrained(CLIPTokenizer.from_pretrained, clip_run_dir / "tokenizer", "tokenizer"),
        unet=load_pretrained(UNet2DConditionModel.from_pretrained, unet_dir, "teacher UNet"),
        guidance_scale=guidance_scale,
        unet_dtype=unet_dtype,
        overwrite=overwrite,
    )
    for component, src in (("vae", Path(vae_dir)), ("unet", Path(unet_dir)),
                           ("text_encoder", clip_run_dir / "clip"), ("clip", clip_run_dir / "clip")):
        if (src / "train_config.json").exists():
            shutil.copy(src / "train_config.json", out / component / "train_config.json")
    # a fine-tuned decoder names the VAE run whose encoder it kept: ship that config too
    vae_config = Path(vae_dir) / "train_config.json"
    if vae_config.exists():
        encoder_from = json.loads(vae_config.read_text()).get("encoder_from")
        if encoder_from and (Path(encoder_from) / "train_config.json").exists():
            shutil.copy(Path(encoder_from) / "train_config.json", out / "vae" / "train_config_base.json")
    return out


def add_student(world: str | Path, student_dir: str | Path, steps: int, guidance_scale: float,
                fp16: bool = True, overwrite: bool = False, name: str | None = None, preset: bool | None = None,
                evaluations: dict[str, str | Path] | None = None) -> Path:
    """Ship the student in ``student_dir`` (``student/`` of a ``tandem distill`` run, or a round of one) with
    the world: copied (UNet in float16 if ``fp16``) with its run's training config and ``evaluations``
    (``{"eval_test.json": results.json of `tandem world evaluate`, ...}``), and recorded in
    ``world/tandem.json`` with its default steps and guidance scale.

    Args:
        name: ship it as ``students/NAME`` under that name (``--student NAME``); None: as the preset
            student in ``student/``.
        preset: also make it the preset's default student [True without a name, False with one].
    """
    import re

    world, student_dir = Path(world), Path(student_dir)
    meta_path = world / "tandem.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{world} is not a world directory (no tandem.json)")
    meta = read_json_file(meta_path, "model metadata")
    for sub in ("unet", "scheduler"):
        if not (student_dir / sub).is_dir():
            raise FileNotFoundError(f"{student_dir} lacks {sub}/ (expected the student/ of a `tandem distill` run)")
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", name):
        raise ValueError(f"student name {name!r}: use lower-case letters, digits, '.', '+' and '-'")
    preset = name is None if preset is None else preset
    # the shipped world's study students (tandem.json says "study") are replaced where they live, in the checkout's
    # study/ rather than the package; in any other world directory a student lives in that world
    study = (name is not None and meta.get("students", {}).get(name, {}).get("study") is True
             and world.resolve() == world_dir().resolve())
    relative = "student" if name is None else name if study else f"students/{name}"
    target = (STUDY_STUDENTS if study else world) / relative
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace that student")
    for source in (evaluations or {}).values():
        if not Path(source).is_file():
            raise FileNotFoundError(f"evaluation {source} does not exist")
    # the new student loads whole (weights included) before anything in the world changes: a damaged one is
    # refused, naming its file, and the student it would replace stays as it was
    _, unet, _ = load_student_parts(student_dir)
    run_dir = student_dir.parent.parent if student_dir.parent.name == "rounds" else student_dir.parent
    with staged_dir(target) as staging:
        unet.to(torch.float16 if fp16 else torch.float32).save_pretrained(staging / "unet")
        shutil.copytree(student_dir / "scheduler", staging / "scheduler")
        if (student_dir / "student.json").exists():
            shutil.copy(student_dir / "student.json", staging / "student.json")
        if (run_dir / "train_config.json").exists():
            shutil.copy(run_dir / "train_config.json", staging / "train_config.json")
        for file_name, source in (evaluations or {}).items():
            shutil.copy(source, staging / file_name)
    entry = {"path": relative, **({"study": True} if study else {}), "steps": steps, "guidance_scale": guidance_scale}
    if name is not None:
        meta.setdefault("students", {})[name] = entry
    if preset:
        meta["student"] = entry
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return target


def add_calibration(world: str | Path, name: str, calibration: str | Path, overwrite: bool = False) -> Path:
    """Ship ``calibration`` (a ``tandem calibrate`` file) with the world's student ``name`` as
    ``calibration-NAME.json``, recorded in ``tandem.json``: ``--student NAME`` then brings it, and
    ``tandem eval students`` can build an adaptive pipeline on that student.

    The calibration must have been made for that very student at its shipped steps and guidance and with
    the world's oracle on generation (``Calibration.check`` against the pipeline ``--student NAME`` builds);
    anything else is refused, naming the difference."""
    world, calibration = Path(world), Path(calibration)
    meta_path = world / "tandem.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{world} is not a world directory (no tandem.json)")
    meta = json.loads(meta_path.read_text())
    entry = meta.get("students", {}).get(name)
    if entry is None:
        raise ValueError(f"the world ships no student named {name!r}; expected one of "
                         f"{', '.join(meta.get('students', {})) or '(none)'}")
    file_name = f"calibration-{name}.json"
    target = world / file_name
    if entry.get("calibration") not in (None, file_name):
        raise ValueError(f"student {name!r} already ships the calibration {entry['calibration']}; replace "
                         "that file itself (save the new calibration over it with overwrite=True) rather than add "
                         "a second one")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace that calibration")
    table = Calibration.load(calibration)
    shipped_world = world.resolve() == world_dir().resolve()
    preset = compose("world" if shipped_world else str(world), student=name,
                     scorer=None if shipped_world else f"world-oracle:{world / 'oracle'}")
    pipe = load_preset(preset, calibration=table)
    fingerprint = pipe.calibration_fingerprint(int(entry["steps"]), float(entry["guidance_scale"]))
    table.check(fingerprint, remake=f"pipe.calibrate(prompts) for student={name!r}")
    shutil.copy(calibration, target)
    entry["calibration"] = file_name
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return target
