"""The ``tandem`` command line."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import typer
from rich.console import Console

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="tandem: a few-step student and its slow teacher, working in tandem.")
world_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="ShapesWorld, the embedded text-to-image world.")
app.add_typer(world_app, name="world")
distill_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Distil a teacher into a few-step student (multi-GPU: launch with accelerate/torchrun).")
app.add_typer(distill_app, name="distill")
eval_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Evaluation experiments: results JSON, plots and a report in --out.")
app.add_typer(eval_app, name="eval")
preset_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Presets: a teacher, a student, an oracle and their settings, kept as a file.")
app.add_typer(preset_app, name="preset")
console = Console(stderr=True)


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


STUDENT_HELP = ("The student: a `tandem distill` student directory, a diffusers pipeline or UNet directory (e.g. "
                "LCM-Dreamshaper, LCM-SDXL), or a hub id (pipeline:ID or unet:ID) [the preset's].")
SCORER_HELP = "The oracle: clip:ID, pickscore:ID, imagereward[:PATH], world-oracle[:DIR] [the preset's]."
CONTROLNET_HELP = "Your own ControlNet (directory or hub id) in student and teacher; give --control-image."
PRESET_HELP = "A preset file (`tandem preset save`) instead of --model."


class Mode(str, Enum):
    teacher = "teacher"
    student = "student"
    adaptive = "adaptive"
    refine_all = "refine-all"


class Strategy(str, Enum):
    refine = "refine"
    regenerate = "regenerate"


class Scheduler(str, Enum):
    dpm = "dpm"
    ddim = "ddim"
    unipc = "unipc"


class Component(str, Enum):
    vae = "vae"
    vae_decoder = "vae-decoder"
    clip = "clip"
    teacher = "teacher"
    oracle = "oracle"
    controlnet = "controlnet"


class EditMode(str, Enum):
    adaptive = "adaptive"
    student = "student"
    teacher = "teacher"


class Split(str, Enum):
    val = "val"
    test = "test"


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=os.environ.get("TANDEM_PROGRESS", "1") == "0")


def _phase_bars(bar):
    """``progress(phase, done, total)``: one bar per phase (student, teacher, a sweep's runs) in ``bar``."""
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done)
    return progress


def _collect_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    from .world.prompts import read_prompt_file

    collected = list(prompts or [])
    if prompts_file is not None:
        collected += read_prompt_file(prompts_file)
    if not collected:
        raise UserError("no prompts: give PROMPT arguments or --prompts FILE")
    return collected


def _read_images(files: list[Path], flag: str) -> list:
    """RGB images from files, with a one-line error naming an unreadable one."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                images.append(_to_rgb8(im))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"{flag} {file}: cannot read the image ({e})") from None
    return images


def _to_rgb8(im):
    """An 8-bit RGB copy of a PIL image. 16- and 32-bit greyscale (modes I;16*, I) are scaled from their
    full range (PIL's own conversion would clip them to black and white); float images are refused."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(2**32 - 1)
        if a.min(initial=0) < 0:
            raise ValueError(f"a {im.mode} image with negative values")
        grey = np.round(a * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    if im.mode == "F":
        raise ValueError("a floating-point image (mode F); give an 8- or 16-bit PNG")
    return im.convert("RGB")


def _control_preset(model: str, control: str | None) -> str:
    """The preset that adds the ``control`` ControlNet to ``model`` (``world`` + ``mask`` -> ``world-mask``)."""
    from .presets import PRESETS

    if control is None:
        return model
    name = f"{model}-{control}"
    if name not in PRESETS:
        options = sorted(p.rsplit("-", 1)[1] for p in PRESETS if p.startswith(f"{model}-") and PRESETS[p].controlnet)
        raise UserError(f"--control {control}: preset {model!r} has no such ControlNet preset "
                        f"(it has: {', '.join(options) or 'none'})")
    return name


def _check_out_file(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Before any compute: ``out`` is a file name that may be written (not an existing file without
    --overwrite, not a directory or a dangling symlink, in a writable directory)."""
    import tempfile

    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None


def _check_world_prompts(prompts: list[str]) -> None:
    from .world.grammar import CaptionError, parse_caption

    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except CaptionError as e:
            raise UserError(f"prompt {i} is outside ShapesWorld's grammar: {e}") from None


@app.command()
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompts (one image each).")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="File with one prompt per line.")] = None,
    model: Annotated[str, typer.Option(help="A preset ('world', sd15-lcm, ...), or a teacher: a diffusers "
                                             "directory or hub id.")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    mode: Annotated[Mode, typer.Option(help="Which generator makes the images.")] = Mode.teacher,
    teacher_steps: Annotated[int | None, typer.Option(help="Teacher sampling steps [model default].")] = None,
    scheduler: Annotated[Scheduler | None, typer.Option(help="Teacher sampler [model default].")] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student sampling steps [model default].")] = None,
    student_noise: Annotated[str, typer.Option(help="Student sampler: 'stochastic' (LCM) or "
                                                    "'deterministic'.")] = "stochastic",
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance [model default].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed; prompt i uses a generator seeded from (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call (speed and memory). Every image keeps "
                                                 "its seed and noise; another batch size can change pixels by "
                                                 "float rounding (at most 1/255 measured on CPU).")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs, records.jsonl, config.json).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    strategy: Annotated[Strategy | None, typer.Option(help="adaptive: what the teacher does with a rejected "
                                                           "student image [preset default].")] = None,
    rollback_sigma: Annotated[float | None, typer.Option(help="adaptive/refine-all: rollback sigma in (0, 1] "
                                                              "[preset default].")] = None,
    rollback_convention: Annotated[str | None, typer.Option(help="'paper' (x = sqrt(1-s) x0 + sqrt(s) z, "
                                                                 "--teacher-steps run) or 'strength' (img2img)."
                                                            )] = None,
    handoff: Annotated[str, typer.Option(help="'latent' or 'pixel' (decode and re-encode) hand-off.")] = "latent",
    percentile: Annotated[float | None, typer.Option(help="adaptive: tau = this percentile k of the "
                                                          "calibration [preset default].")] = None,
    threshold: Annotated[float | None, typer.Option(help="adaptive: the cut-off tau itself.")] = None,
    budget: Annotated[float | None, typer.Option(help="adaptive: target average UNet evaluations per image "
                                                      "(k chosen from the calibration).")] = None,
    teacher_guidance_scale: Annotated[float | None, typer.Option(help="adaptive/refine-all: the teacher's "
                                                                      "guidance [preset default].")] = None,
    calibration: Annotated[Path | None, typer.Option(help="adaptive: calibration file from `tandem calibrate` "
                                                          "[the preset's].")] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help=CONTROLNET_HELP)] = None,
    control: Annotated[str | None, typer.Option(help="ControlNet conditioning: the preset's control kind "
                                                     "(world: mask or edges; sd15-lcm: canny or seg).")] = None,
    control_image: Annotated[list[Path] | None, typer.Option(help="--control: control image file(s), one per "
                                                                  "prompt or one for all (repeat the option).")] = None,
) -> None:
    """Generate one image per prompt: with the teacher, the student, or both in tandem
    (--mode adaptive: the student draws, the oracle scores, the teacher improves the rejected).
    With --control, one ControlNet conditions student and teacher alike (all modes)."""
    import time

    if (control is None and controlnet is None) != (control_image is None):
        raise UserError("--control (or --controlnet) and --control-image go together")
    if mode in (Mode.adaptive, Mode.refine_all) or not _direct(model, preset_file, student, controlnet, control):
        preset = _compose(model, preset_file, student, scorer, controlnet, control)
        return _generate_tandem(
            prompt, prompts_file, preset, mode, teacher_steps, scheduler, student_steps, guidance_scale, seed,
            batch_size, out, overwrite, device, strategy, rollback_sigma, rollback_convention, handoff, percentile,
            threshold, budget, teacher_guidance_scale, calibration, control_image)
    tandem_only = {"--scorer": scorer, "--strategy": strategy, "--rollback-sigma": rollback_sigma,
                   "--percentile": percentile,
                   "--threshold": threshold, "--budget": budget, "--teacher-guidance-scale": teacher_guidance_scale,
                   "--calibration": calibration, "--rollback-convention": rollback_convention}
    for flag, value in tandem_only.items():
        if value is not None:
            raise UserError(f"{flag} applies to --mode adaptive or refine-all")

    from .generate import StudentSettings, TeacherSettings, generate_student, generate_teacher, prompt_seed
    from .models import load_student_pipeline, load_teacher_pipeline, resolve_model, student_dir
    from .outputs import OutputDir

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    prompts = _collect_prompts(prompt, prompts_file)
    spec = resolve_model(model)
    if spec.is_world:
        _check_world_prompts(prompts)
    if mode is Mode.teacher:
        settings = TeacherSettings(
            steps=teacher_steps if teacher_steps is not None else spec.teacher.steps,
            scheduler=scheduler.value if scheduler is not None else spec.teacher.scheduler,
            guidance_scale=guidance_scale if guidance_scale is not None else spec.teacher.guidance_scale,
        )
        student_path = None
    else:
        student_path = student_dir(spec, student)
        preset = spec.student if student is None else None
        settings = StudentSettings(
            steps=student_steps if student_steps is not None else (preset.steps if preset else 4),
            guidance_scale=(guidance_scale if guidance_scale is not None
                            else preset.guidance_scale if preset else spec.teacher.guidance_scale),
            noise=student_noise,
        )
    t0 = time.time()
    with OutputDir(out, overwrite, info={"command": "generate"}) as output:
        with _progress("generating", len(prompts)) as bar:
            task = bar.add_task("generate", total=len(prompts))
            def done(n: int) -> None:
                bar.update(task, completed=n)

            if mode is Mode.teacher:
                pipe = load_teacher_pipeline(spec, device=device)
                images = generate_teacher(pipe, prompts, settings, seed, batch_size, on_batch=done)
            else:
                pipe = load_student_pipeline(spec, student_path, device=device)
                images = generate_student(pipe, prompts, settings, seed, batch_size, on_batch=done)
        mode_fields = ({"teacher_steps": settings.steps, "scheduler": settings.scheduler} if mode is Mode.teacher
                       else {"student": str(student_path), "student_steps": settings.steps,
                             "student_noise": settings.noise})
        records = []
        for i, (p, image) in enumerate(zip(prompts, images)):
            output.save_image(i, image)
            records.append({
                "index": i, "file": output.image_path(i).name, "prompt": p, "seed": seed,
                "prompt_seed": prompt_seed(seed, i), "mode": mode.value, "model": spec.name, **mode_fields,
                "guidance_scale": settings.guidance_scale, "unet_evals": settings.unet_evals_per_image,
                "vae_decodes": 1,
            })
        output.write_records(records)
        output.write_config({
            "command": "generate", "tandem_version": __version__, "model": spec.name, "model_path": spec.path,
            "mode": mode.value,
            mode.value: {**settings.__dict__, **({"path": str(student_path)} if student_path else {})},
            "seed": seed, "batch_size": batch_size,
            "prompts_file": str(prompts_file) if prompts_file else None, "n_prompts": len(prompts), "device": device,
        })
    console.print(f"{len(prompts)} images in {time.time() - t0:.1f}s -> {out}")


def _direct(model: str, preset_file: Path | None, student: str | None, controlnet: str | None,
            control: str | None) -> bool:
    """Whether ``generate --mode teacher|student`` runs the model's diffusers pipeline directly (a world or
    diffusers teacher, with a `tandem distill` student), rather than through a composed TandemPipeline."""
    from .presets import PRESETS, parse_student

    if preset_file is not None or controlnet is not None or control is not None:
        return False
    if model in PRESETS and model != "world":
        return False
    return student is None or parse_student(student)[0] in ("tandem", "world")


def _compose(model: str, preset_file: Path | None = None, student: str | None = None, scorer: str | None = None,
             controlnet: str | None = None, control: str | None = None):
    """The preset a command runs: ``--preset FILE`` or ``--model`` (a preset name, or a teacher directory
    or hub id), with the ControlNet preset of ``--control`` and the parts given on the command line."""
    from .presets import compose, read_preset_file

    if preset_file is not None:
        if model != "world":
            raise UserError("--preset and --model do not go together (the preset file names its teacher)")
        if control is not None:
            raise UserError("--control names a built-in ControlNet preset; with --preset, give --controlnet")
        if not preset_file.is_file():
            raise UserError(f"--preset {preset_file}: no such file (write one with `tandem preset save`)")
        base = read_preset_file(preset_file)
    else:
        if control is not None and controlnet is not None:
            raise UserError("--control (a preset's ControlNet) and --controlnet (your own) do not go together")
        base = _control_preset(model, control)
    return compose(base, student=student, scorer=scorer, controlnet=controlnet)


def _check_composition(preset, mode: str, calibration: Path | None, threshold: float | None = None,
                       percentile: float | None = None, budget: float | None = None, edit: bool = False) -> None:
    """What a tandem run needs of its parts, checked before any model loads, in the command line's words."""
    if preset.student is None and mode != "teacher":
        raise UserError(f"--model {preset.teacher} has no student: give --student (a `tandem distill` student "
                        "directory, a diffusers pipeline or UNet directory, or a hub id)")
    if calibration is not None and not calibration.exists():
        raise UserError(f"--calibration {calibration} does not exist; make one with `tandem calibrate`")
    if mode not in ("adaptive", "calibrate"):
        return
    if preset.scorer is None:
        raise UserError(f"{'calibrate' if mode == 'calibrate' else '--mode adaptive'} needs an oracle: give "
                        "--scorer (e.g. clip:DIR, pickscore:ID, imagereward, world-oracle:DIR)")
    given = [flag for flag, v in (("--percentile", percentile), ("--threshold", threshold), ("--budget", budget))
             if v is not None]
    if len(given) > 1:
        raise UserError(f"give one of --percentile, --threshold or --budget, not {' and '.join(given)}")
    has_table = calibration is not None or (preset.edit_calibrations if edit else preset.calibration)
    if mode == "adaptive" and threshold is None and not has_table:
        make = ("`tandem calibrate --edits val` (world) or TandemPipeline.calibrate_edits (Python)" if edit
                else f"`tandem calibrate {_parts_args(preset)} --prompts HELD_OUT.txt --out calibration.json`")
        raise UserError(f"{', '.join(given) or 'the percentile k'} needs a calibration of this student and oracle: "
                        f"make one with {make} and pass --calibration, or give --threshold")


def _parts_args(preset) -> str:
    """The command-line options that rebuild ``preset``'s parts, for messages."""
    from .presets import PRESETS

    base = preset.name.removesuffix("+custom")
    if base in PRESETS and not preset.name.endswith("+custom"):
        return f"--model {base}"
    args = [f"--model {base if base in PRESETS else preset.teacher}"]
    if base not in PRESETS or PRESETS[base].student != preset.student:
        args.append(f"--student {preset.student}")
    if preset.scorer and (base not in PRESETS or PRESETS[base].scorer != preset.scorer):
        args.append(f"--scorer {preset.scorer}")
    return " ".join(args)


def _tandem_pipeline(preset, device: str, calibration: Path | None = None):
    """Load the TandemPipeline of ``preset`` (with ``--calibration``); says which VAE and text encoder
    a student that brings its own uses."""
    from .presets import load_preset

    pipe = load_preset(preset, device=device, calibration=calibration)
    own = [name.replace("_", " ") for name in pipe.student_own_components]
    if own:
        console.print(f"note: student {preset.student} brings its own {' and '.join(own)}: the student draws with "
                      f"them, the teacher with its own, and the student's latents go to the teacher directly "
                      f"(--handoff pixel decodes and re-encodes instead)")
    return pipe


def _preset_record(preset, pipe) -> dict:
    """What a run's config.json says about its models: the preset's fields and the scorer's fingerprint."""
    from .presets import preset_to_json

    return {"preset": preset.name, "teacher": preset.teacher, "student": preset.student, "scorer": preset.scorer,
            "scorer_fingerprint": pipe.scorer.fingerprint() if pipe.scorer is not None else None,
            "controlnet": preset.controlnet, "student_own_components": list(pipe.student_own_components) or None,
            "preset_fields": preset_to_json(preset)}


def _generate_tandem(prompt, prompts_file, preset, mode, teacher_steps, scheduler, student_steps,
                     guidance_scale, seed, batch_size, out, overwrite, device, strategy, rollback_sigma,
                     rollback_convention, handoff, percentile, threshold, budget, teacher_guidance_scale,
                     calibration, control_image=None) -> None:
    import time

    from .outputs import OutputDir, image_grid, save_png

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if mode is not Mode.adaptive and any(v is not None for v in (percentile, threshold, budget)):
        raise UserError("--percentile/--threshold/--budget apply to --mode adaptive")
    if mode not in (Mode.adaptive, Mode.refine_all):
        tandem_only = {"--strategy": strategy, "--rollback-sigma": rollback_sigma,
                       "--teacher-guidance-scale": teacher_guidance_scale, "--calibration": calibration,
                       "--rollback-convention": rollback_convention}
        for flag, value in tandem_only.items():
            if value is not None:
                raise UserError(f"{flag} applies to --mode adaptive or refine-all")
    _check_composition(preset, mode.value, calibration, threshold, percentile, budget)
    prompts = _collect_prompts(prompt, prompts_file)
    controls = _read_images(control_image, "--control-image") if control_image else None
    if controls is not None and len(controls) not in (1, len(prompts)):
        raise UserError(f"--control-image: got {len(controls)} images for {len(prompts)} prompts "
                        "(one per prompt, or one for all)")
    output = OutputDir(out, overwrite, info={"command": f"generate --mode {mode.value}"})
    with output:  # a failure anywhere below leaves --out as it was
        pipe = _tandem_pipeline(preset, device, calibration)
        if preset.teacher == "world":
            _check_world_prompts(prompts)
        kwargs = dict(mode=mode.value, num_inference_steps=student_steps, guidance_scale=guidance_scale,
                      teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale,
                      teacher_scheduler=scheduler.value if scheduler is not None else None,
                      strategy=strategy.value if strategy is not None else None, rollback_sigma=rollback_sigma,
                      rollback_convention=rollback_convention, handoff=handoff, accept_threshold=threshold,
                      percentile=percentile, budget=budget, seed=seed, batch_size=batch_size)
        t0 = time.time()
        with _progress("tandem", len(prompts)) as bar:
            progress = _phase_bars(bar)

            try:
                result = pipe(prompts, callback=progress, control_image=controls, **kwargs)
            except ValueError as e:
                raise UserError(str(e)) from None
        for i, (record, image) in enumerate(zip(result.records, result.images)):
            output.save_image(i, image)
            record.update(file=output.image_path(i).name, seed=seed, model=preset.name)
            if control_image:
                record["control_image"] = str(control_image[i if len(control_image) > 1 else 0])
        output.write_records(result.records)
        summary = result.summary
        firsts = result.student_images if result.student_images is not None else result.images
        grid_rows = [im for pair in zip(firsts, result.images) for im in pair]
        save_png(output.path / "grid.png", image_grid(grid_rows[:128], columns=8))
        output.write_config({
            "command": "generate", "tandem_version": __version__, **_preset_record(preset, pipe),
            "calibration": str(calibration) if calibration else preset.calibration,
            "control_images": [str(c) for c in control_image or []] or None,
            **summary["settings"], "seed": seed, "batch_size": batch_size,
            "prompts_file": str(prompts_file) if prompts_file else None, "n_prompts": len(prompts), "device": device,
            "summary": {k: v for k, v in summary.items() if k != "settings"},
        })
    paths = ", ".join(f"{k} {v}" for k, v in summary["paths"].items())
    console.print(f"{len(prompts)} images in {time.time() - t0:.1f}s ({paths}); "
                  f"{summary['unet_evals_mean']:.1f} UNet evaluations per image on average "
                  f"(student {summary['student_cost']}, teacher improvement {summary['improve_cost']}); "
                  f"tau {summary['settings']['accept_threshold']} -> {out}")
    if summary.get("calibration_note"):
        console.print(f"note: {summary['calibration_note']}")
    console.print(f"side by side (student | final): {output.path / 'grid.png'}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="Calibration file to write (JSON).")],
    model: Annotated[str, typer.Option(help="A preset (its student and oracle are calibrated), or a teacher "
                                             "directory or hub id with --student and --scorer.")] = "world",
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="Held-out prompts, one per line "
                                                                        "[world: the fixed validation list].")] = None,
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help=CONTROLNET_HELP + " (calibrate with "
                                                   "--control-image).")] = None,
    control_image: Annotated[list[Path] | None, typer.Option(help="--controlnet: control image file(s), one per "
                                                                  "prompt or one for all.")] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student steps [preset default].")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Student guidance [preset default].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing calibration file.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    edits: Annotated[str | None, typer.Option(help="Calibrate *edits* instead: 'val' (the world's validation "
                                                   "edit list) or an edit list file (JSON lines).")] = None,
    strength: Annotated[float | None, typer.Option(help="--edits: the SDEdit strength [preset default].")] = None,
    control: Annotated[str | None, typer.Option(help="Calibrate the student with this ControlNet (world: mask or "
                                                     "edges, on the validation prompts' scenes).")] = None,
) -> None:
    """Score the student on held-out prompts and store the percentile table the cut-off tau comes from.
    With --edits, score the student's edits (the table `tandem edit` takes tau from); with --control,
    the student under that ControlNet."""
    from .world.prompts import load_prompts

    _check_out_file(out, overwrite)
    if student_steps is not None and student_steps < 1:
        raise UserError(f"--student-steps must be >= 1, got {student_steps}")
    if strength is not None and edits is None:
        raise UserError("--strength applies to --edits")
    if edits is not None and control is not None:
        raise UserError("--edits and --control do not go together")
    if (controlnet is None) != (control_image is None):
        raise UserError("--controlnet and --control-image go together")
    preset = _compose(model, preset_file, student, scorer, controlnet, control)
    _check_composition(preset, "calibrate", None)
    if edits is not None:
        return _calibrate_edits(out, preset, edits, strength, student_steps, guidance_scale, seed, batch_size,
                                overwrite, device)
    if prompts_file is None and preset.teacher != "world":
        raise UserError("--prompts is required off the world: held-out prompts like the ones you will generate")
    if control is not None and preset.teacher != "world":
        raise UserError("--control calibrates on the world's scenes; give your own ControlNet with --controlnet "
                        "and --control-image")
    prompts = _collect_prompts(None, prompts_file) if prompts_file else load_prompts("val")
    controls = _read_images(control_image, "--control-image") if control_image else None
    if controls is not None and len(controls) not in (1, len(prompts)):
        raise UserError(f"--control-image: got {len(controls)} images for {len(prompts)} prompts "
                        "(one per prompt, or one for all)")
    pipe = _tandem_pipeline(preset, device)
    if preset.teacher == "world":
        _check_world_prompts(prompts)
        if control is not None:
            from .world.conditional import scenes_for_captions
            from .world.control import control_image

            controls = [control_image(sc, control) for sc in scenes_for_captions(prompts, seed)]
    with _progress("calibrating", len(prompts)) as bar:
        task = bar.add_task("student", total=len(prompts))
        calib = pipe.calibrate(prompts, student_steps, guidance_scale, seed, batch_size,
                               callback=lambda _p, done, _t: bar.update(task, completed=done),
                               config={"command": "calibrate", "tandem_version": __version__,
                                       **_preset_record(preset, pipe), "control": control,
                                       "control_images": "scenes_for_captions(prompts, seed)" if control else
                                       [str(c) for c in control_image or []] or None,
                                       "prompts_file": str(prompts_file) if prompts_file else "val"},
                               control_image=controls)
    calib.save(out, overwrite=overwrite)
    taus = ", ".join(f"k={k}: {calib.threshold(k):.4f}" for k in (30, 50, 70))
    console.print(f"{len(prompts)} student samples scored; tau {taus} -> {out}")


def _load_edit_cases(edits: str):
    from .world.edits import EDIT_SEEDS, load_edits, read_edit_file

    try:
        return load_edits(edits) if edits in EDIT_SEEDS else read_edit_file(edits)
    except ValueError as e:
        raise UserError(str(e)) from None


def _calibrate_edits(out, preset, edits, strength, student_steps, guidance_scale, seed, batch_size,
                     overwrite, device) -> None:
    if preset.teacher != "world":
        raise UserError("--edits calibrates on ShapesWorld edit lists; off the world use the Python API "
                        "(TandemPipeline.calibrate_edits(images, prompts, strength))")
    if edits == "test":
        raise UserError("--edits test: calibrate on held-out edits ('val'), never on the test list")
    cases = _load_edit_cases(edits)
    pipe = _tandem_pipeline(preset, device)
    with _progress("calibrating edits", len(cases)) as bar:
        task = bar.add_task("student", total=len(cases))
        try:
            calib = pipe.calibrate_edits(
                [c.image() for c in cases], [c.prompt for c in cases], strength, student_steps, guidance_scale,
                seed, batch_size, callback=lambda _p, done, _t: bar.update(task, completed=done),
                config={"command": "calibrate --edits", "tandem_version": __version__,
                        **_preset_record(preset, pipe), "edits": edits})
        except ValueError as e:
            raise UserError(str(e)) from None
    calib.save(out, overwrite=overwrite)
    taus = ", ".join(f"k={k}: {calib.threshold(k):.4f}" for k in (30, 50, 70))
    console.print(f"{len(cases)} student edits scored at strength {calib.fingerprint['task']['edit_strength']}; "
                  f"tau {taus} -> {out}")


@app.command()
def edit(
    image: Annotated[list[Path] | None, typer.Option(help="Input image file(s) (repeat the option).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="The edited prompt(s): one per image, or one for all "
                                                          "(repeat the option).")] = None,
    edits: Annotated[str | None, typer.Option(help="world: edit an edit list instead of --image/--prompt: "
                                                   "'test', 'val' or a JSON-lines file (its source renderings "
                                                   "and edited captions).")] = None,
    n: Annotated[int | None, typer.Option(help="--edits: only the first N edits.")] = None,
    model: Annotated[str, typer.Option(help="A preset (its student, teacher and oracle), or a teacher directory "
                                             "or hub id with --student and --scorer.")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    mode: Annotated[EditMode, typer.Option(help="adaptive (student, teacher where the oracle rejects), or one "
                                                "model alone.")] = EditMode.adaptive,
    strength: Annotated[float | None, typer.Option(help="SDEdit strength in (0, 1] [preset default].")] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student steps of its img2img schedule "
                                                           "[preset default].")] = None,
    teacher_steps: Annotated[int | None, typer.Option(help="Teacher steps run from the noised input "
                                                           "[preset default].")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Student guidance [preset default].")] = None,
    teacher_guidance_scale: Annotated[float | None, typer.Option(help="Teacher guidance [preset default].")] = None,
    percentile: Annotated[float | None, typer.Option(help="adaptive: tau = this percentile k of the edit "
                                                          "calibration [preset default].")] = None,
    threshold: Annotated[float | None, typer.Option(help="adaptive: the cut-off tau itself.")] = None,
    budget: Annotated[float | None, typer.Option(help="adaptive: target average UNet evaluations per image.")] = None,
    calibration: Annotated[Path | None, typer.Option(help="adaptive: an edit calibration (`tandem calibrate "
                                                          "--edits`) [the preset's, for its strength].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed; image i uses a generator seeded from (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per model call (speed and memory). Every image keeps "
                                                 "its seed and noise; another batch size can change pixels by "
                                                 "float rounding (at most 1/255 measured on CPU).")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs, inputs, records.jsonl, config.json).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Text-guided editing (SDEdit) in tandem: the student edits each noised input; where the oracle
    scores the edit below tau, the teacher edits the same noised input instead (regeneration)."""
    import time

    import numpy as np
    from PIL import Image

    from .calibration import Calibration
    from .outputs import OutputDir, image_grid, save_png

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps), ("--n", n)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if mode is not EditMode.adaptive and any(v is not None for v in (percentile, threshold, budget, calibration)):
        raise UserError("--percentile/--threshold/--budget/--calibration apply to --mode adaptive")
    preset = _compose(model, preset_file, student, scorer)
    _check_composition(preset, mode.value, calibration, threshold, percentile, budget, edit=True)
    cases = None
    if edits is not None:
        if image or prompt:
            raise UserError("--edits replaces --image and --prompt")
        if preset.teacher != "world":
            raise UserError("--edits lists are ShapesWorld edits (--model world)")
        cases = _load_edit_cases(edits)[:n]
        inputs, prompts = [Image.fromarray(c.image()) for c in cases], [c.prompt for c in cases]
    else:
        if not image or not prompt:
            raise UserError("give --image and --prompt (or --edits)")
        if n is not None:
            raise UserError("--n applies to --edits")
        inputs, prompts = _read_images(image, "--image"), list(prompt)
        if len(prompts) == 1 and len(inputs) > 1:
            prompts = prompts * len(inputs)
        if len(inputs) == 1 and len(prompts) > 1:
            inputs = inputs * len(prompts)
        if len(inputs) != len(prompts):
            raise UserError(f"got {len(inputs)} images and {len(prompts)} prompts (one each, or one for all)")
    with OutputDir(out, overwrite, info={"command": "edit"}) as output:  # a failure leaves --out as it was
        pipe = _tandem_pipeline(preset, device)
        if preset.teacher == "world":
            _check_world_prompts(prompts)
        t0 = time.time()
        with _progress("editing", len(prompts)) as bar:
            progress = _phase_bars(bar)

            try:
                result = pipe.edit(inputs, prompts, strength=strength, mode=mode.value,
                                   num_inference_steps=student_steps, guidance_scale=guidance_scale,
                                   teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale,
                                   accept_threshold=threshold,
                                   percentile=percentile, budget=budget,
                                   calibration=Calibration.load(calibration) if calibration else None, seed=seed,
                                   batch_size=batch_size, callback=progress)
            except ValueError as e:
                raise UserError(str(e)) from None
        size = pipe.resolution()
        for i, (record, result_image) in enumerate(zip(result.records, result.images)):
            output.save_image(i, result_image)
            source = inputs[i].convert("RGB")
            if source.size != (size[1], size[0]):
                source = source.resize((size[1], size[0]), Image.BICUBIC)
            input_path = output.path / f"{i:05d}_input.png"
            save_png(input_path, source)
            record.update(file=output.image_path(i).name, input_file=input_path.name, seed=seed, model=preset.name)
            if cases is not None:
                record["edit"] = {k: getattr(cases[i], k) for k in ("split", "index", "source", "object", "attribute",
                                                                     "before", "after")}
            elif image:
                record["input_path"] = str(image[i if len(image) > 1 else 0])
        output.write_records(result.records)
        summary = result.summary
        rows = [np.asarray(im) for i in range(len(prompts)) for im in (inputs[i].convert("RGB").resize(
            (size[1], size[0])), result.images[i])]
        save_png(output.path / "grid.png", image_grid(rows[:128], columns=8))
        output.write_config({
            "command": "edit", "tandem_version": __version__, **_preset_record(preset, pipe),
            "calibration": str(calibration) if calibration else (
                preset.edit_calibrations.get(summary["settings"]["edit_strength"]) if mode is EditMode.adaptive
                else None),
            **summary["settings"], "seed": seed, "batch_size": batch_size, "edits": edits, "n_prompts": len(prompts),
            "device": device, "summary": {k: v for k, v in summary.items() if k != "settings"},
        })
    paths = ", ".join(f"{k} {v}" for k, v in summary["paths"].items())
    console.print(f"{len(prompts)} edits in {time.time() - t0:.1f}s ({paths}); "
                  f"{summary['unet_evals_mean']:.1f} UNet evaluations per image on average; "
                  f"tau {summary['settings']['accept_threshold']} -> {out}")
    if summary.get("calibration_note"):
        console.print(f"note: {summary['calibration_note']}")
    console.print(f"side by side (input | edit): {output.path / 'grid.png'}")


@distill_app.command("consistency")
def distill_consistency_cmd(
    out: Annotated[Path, typer.Option(help="Run directory (config, log.jsonl, checkpoint/, student/).")],
    teacher: Annotated[str, typer.Option(help="'world', a diffusers model directory, or a hub id.")] = "world",
    data: Annotated[str, typer.Option(help="'world' (ShapesWorld's stream), an image folder (metadata.jsonl or "
                                           "caption .txt files), webdataset shards, or a saved HF dataset.")] = "world",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    max_steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per process and micro-batch.")] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimisation step.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate (constant after warm-up).")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    w_range: Annotated[tuple[float, float], typer.Option(help="Guidance scales sampled in training (the student "
                                                              "serves any scale in the range).")] = (1.0, 8.0),
    ddim_steps: Annotated[int, typer.Option(help="Teacher DDIM solver grid (N of the skipping schedule).")] = 50,
    loss: Annotated[str, typer.Option(help="'huber' (pseudo-Huber) or 'l2'.")] = "huber",
    target_ema: Annotated[float, typer.Option(help="EMA decay of the target network.")] = 0.95,
    sampling_ema: Annotated[float | None, typer.Option(help="Also keep an EMA with this decay and export it "
                                                            "[export the student itself].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and of every random draw.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="'no', 'bf16' or 'fp16' (where the device supports it).")] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 250,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process [torch default].")] = None,
) -> None:
    """Consistency distillation (LCM-style): a student that samples in 1-8 steps, with guidance
    given through a w-embedding. Writes the student to OUT/student."""
    import json
    import time

    from .distill.consistency import ConsistencyConfig, distill_consistency
    from .distill.trainer import TrainerConfig

    if max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    cfg = ConsistencyConfig(num_ddim_timesteps=ddim_steps, w_min=w_range[0], w_max=w_range[1], loss=loss,
                            target_ema=target_ema, sampling_ema=sampling_ema, lr=lr, warmup_steps=warmup_steps)
    tcfg = TrainerConfig(max_steps=max_steps, seed=seed, batch_size=batch_size, grad_accum=grad_accum,
                         mixed_precision=mixed_precision, checkpoint_every=checkpoint_every, threads=threads)
    t0 = time.time()
    student = distill_consistency(teacher, out, cfg, tcfg, data=data, resume=resume)
    log_path = out / "log.jsonl"  # absent when a resumed run had nothing left to train and its log was removed
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    last = log[-1] if log else {}
    console.print(f"consistency student: {max_steps} steps ({time.time() - t0:.0f}s in this call), "
                  f"last loss {last.get('loss', float('nan')):.5f} -> {student}")
    console.print(f"try it: tandem generate --model {teacher} --mode student --student {student} "
                  f"--student-steps 4 'PROMPT' --out OUT")


@world_app.command("render")
def world_render(
    prompts_file: Annotated[Path, typer.Option("--prompts", help="File with one caption per line.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Run seed; caption i is drawn from (seed, i).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
) -> None:
    """Ground-truth renderings: for each caption, a scene that satisfies it exactly."""
    from .generate import prompt_seed
    from .outputs import OutputDir
    from .world.conditional import scenes_for_captions
    from .world.scene import render

    prompts = _collect_prompts(None, prompts_file)
    _check_world_prompts(prompts)
    with OutputDir(out, overwrite, info={"command": "world render"}) as output:
        records = []
        for i, (p, scene) in enumerate(zip(prompts, scenes_for_captions(prompts, seed))):
            output.save_image(i, render(scene))
            records.append({"index": i, "file": output.image_path(i).name, "prompt": p, "seed": seed,
                            "prompt_seed": prompt_seed(seed, i), "mode": "render", "scene": scene.to_dict()})
        output.write_records(records)
        output.write_config({"command": "world render", "tandem_version": __version__, "seed": seed,
                             "prompts_file": str(prompts_file), "n_prompts": len(prompts)})
    console.print(f"{len(prompts)} renderings -> {out}")


@world_app.command("prompts")
def world_prompts(
    split: Annotated[Split, typer.Option(help="Which fixed list.")],
    n: Annotated[int, typer.Option(help="Number of prompts.")],
    out: Annotated[Path, typer.Option(help="Output text file.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Regenerate a fixed prompt list (the shipped lists: val n=500, test n=1000)."""
    from .outputs import atomic_write_text
    from .world.prompts import generate_prompts

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    _check_out_file(out, overwrite)
    atomic_write_text(out, "\n".join(generate_prompts(split.value, n)) + "\n")
    console.print(f"{n} {split.value} prompts -> {out}")


@world_app.command("edits")
def world_edits(
    split: Annotated[Split, typer.Option(help="Which edit list.")],
    out: Annotated[Path, typer.Option(help="Edit list to write (JSON lines).")],
    n: Annotated[int | None, typer.Option(help="Number of edits [the shipped size: val 200, test 500].")] = None,
    images: Annotated[Path | None, typer.Option(help="Also write each edit's source rendering here "
                                                     "(00000.png, ...), for `tandem edit --image`.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
) -> None:
    """Regenerate an editing benchmark list: renderings whose caption changes in one attribute."""
    from .outputs import OutputDir, atomic_write_text
    from .world.edits import EDIT_SIZES, generate_edits

    n = EDIT_SIZES[split.value] if n is None else n
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    _check_out_file(out, overwrite)
    folder = OutputDir(images, overwrite, info={"command": "world edits"}, flag="--images") if images else None
    cases = generate_edits(split.value, n)
    if folder is not None:
        with folder:
            for i, c in enumerate(cases):
                folder.save_image(i, c.image())
    atomic_write_text(out, "".join(c.to_json() + "\n" for c in cases))
    console.print(f"{n} {split.value} edits -> {out}" + (f" (source renderings in {images})" if images else ""))


@world_app.command("train")
def world_train(
    component: Annotated[Component, typer.Argument(help="Which component to train.")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, logs, exported weights).")],
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Training steps [component default].")] = None,
    vae: Annotated[Path | None, typer.Option(help="teacher, vae-decoder: the VAE directory "
                                                   "[the shipped world's vae/].")] = None,
    text_encoder: Annotated[Path | None, typer.Option(help="teacher: a directory with text_encoder/ and "
                                                            "tokenizer/ (a clip run) [the shipped world].")] = None,
    init_from: Annotated[Path | None, typer.Option(help="teacher: warm-start from this UNet directory "
                                                         "(e.g. a world's unet/) instead of random weights.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights' init and the data stream "
                                               "[component default].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [component default].")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps [component default].")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="teacher: 'constant' or 'cosine' (to 0 at --max-steps) "
                                                         "after warm-up [constant].")] = None,
    world: Annotated[Path | None, typer.Option(help="oracle: the world whose student and teacher draw its "
                                                    "training images and whose clip/ it starts from; "
                                                    "controlnet: the world whose teacher it trains for "
                                                    "[the shipped world].")] = None,
    control: Annotated[str | None, typer.Option(help="controlnet: the control image kind, mask or edges.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads [component default].")] = None,
) -> None:
    """Train a ShapesWorld component from scratch (or --resume).

    Order: vae and clip (independent); then teacher (--vae RUN/vae --text-encoder CLIP_RUN)
    and vae-decoder (--vae RUN/vae: fine-tunes the decoder only, so the latent space the
    teacher learned is unchanged); then `tandem world assemble`. The oracle trains last, on
    samples of the world's teacher and student (the shipped ones). A controlnet (--control mask or
    edges) trains for the teacher of --world, which stays frozen.
    """
    import dataclasses

    from .models import world_dir
    from .world import control as world_control
    from .world import oracle, train

    configs = {"vae": train.VAETrainConfig, "vae-decoder": train.DecoderTrainConfig, "clip": train.CLIPTrainConfig,
               "teacher": train.TeacherTrainConfig, "oracle": oracle.OracleTrainConfig,
               "controlnet": world_control.ControlNetTrainConfig}
    cfg = configs[component.value]()
    teacher_only = {"init_from", "lr_schedule"}
    overrides = {  # field: (value, its check, what the check demands)
        "max_steps": (max_steps, lambda v: v >= 1, ">= 1"),
        "init_from": (str(init_from) if init_from is not None else None, lambda v: True, ""),
        "seed": (seed, lambda v: True, ""),
        "lr": (lr, lambda v: v > 0, "> 0"),
        "warmup_steps": (warmup_steps, lambda v: v >= 0, ">= 0"),
        "lr_schedule": (lr_schedule, lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
        "control": (control, lambda v: v in world_control.CONTROLS, " or ".join(world_control.CONTROLS)),
        "threads": (threads, lambda v: v >= 1, ">= 1"),
    }
    for name, (value, valid, demand) in overrides.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in teacher_only and component is not Component.teacher:
            raise UserError(f"{flag} applies to the teacher only")
        if name == "control" and component is not Component.controlnet:
            raise UserError(f"{flag} applies to the controlnet only")
        if not valid(value):
            raise UserError(f"{flag} must be {demand}, got {value!r}")
        cfg = dataclasses.replace(cfg, **{name: value})
    if component is Component.controlnet and control is None:
        raise UserError("controlnet: give --control mask or --control edges")
    if world is not None:
        if component not in (Component.oracle, Component.controlnet):
            raise UserError("--world applies to the oracle and the controlnet only")
        if not (world / "model_index.json").exists():
            raise UserError(f"--world {world} is not a world directory (no model_index.json)")
        cfg = dataclasses.replace(cfg, world=str(world))
    if component in (Component.oracle, Component.controlnet) and (vae is not None or text_encoder is not None):
        raise UserError(f"--vae/--text-encoder do not apply to the {component.value} (it uses --world's)")
    if component is Component.vae:
        result = train.train_vae(out, cfg, resume)
    elif component is Component.vae_decoder:
        result = train.train_vae_decoder(out, vae or world_dir() / "vae", cfg, resume)
    elif component is Component.clip:
        result = train.train_clip(out, cfg, resume)
    elif component is Component.oracle:
        result = oracle.train_oracle(out, cfg, resume)
    elif component is Component.controlnet:
        result = world_control.train_controlnet(out, cfg, resume)
    else:
        result = train.train_teacher(out, vae or world_dir() / "vae", text_encoder or world_dir(), cfg, resume)
    console.print(f"{component.value} trained -> {result}")


@world_app.command("assemble")
def world_assemble(
    vae: Annotated[Path, typer.Option(help="VAE export (e.g. RUN/vae of the vae-decoder run).")],
    clip: Annotated[Path, typer.Option(help="CLIP run directory (holds clip/, text_encoder/, tokenizer/).")],
    unet: Annotated[Path, typer.Option(help="Teacher UNet export (RUN/unet of the teacher run).")],
    guidance_scale: Annotated[float, typer.Option(help="The teacher's default guidance scale "
                                                       "(the best one from `tandem world evaluate`).")],
    out: Annotated[Path, typer.Option(help="World directory to write.")],
    fp16: Annotated[bool, typer.Option(help="Store the UNet in float16 (half the size).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing world directory.")] = False,
) -> None:
    """Put trained components together into a world directory (a Stable Diffusion repository)."""
    import torch

    from .world.assemble import assemble_world

    for name, path in (("--vae", vae), ("--clip", clip), ("--unet", unet)):
        if not path.is_dir():
            raise UserError(f"{name} {path} is not a directory")
    assemble_world(out, vae, clip, unet, guidance_scale, torch.float16 if fp16 else torch.float32, overwrite)
    console.print(f"world -> {out}")


@world_app.command("add-student")
def world_add_student(
    student: Annotated[Path, typer.Option(help="The student/ directory of a `tandem distill` run.")],
    steps: Annotated[int, typer.Option(help="The student's default sampling steps.")],
    guidance_scale: Annotated[float, typer.Option(help="The student's default guidance scale "
                                                       "(the best one from `tandem world evaluate --mode student`).")],
    world: Annotated[Path | None, typer.Option(help="World directory [the shipped world].")] = None,
    fp16: Annotated[bool, typer.Option(help="Store the UNet in float16 (half the size).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace the world's current student.")] = False,
) -> None:
    """Make a distilled student the world's preset student (`tandem generate --mode student`)."""
    from .models import world_dir
    from .world.assemble import add_student

    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if guidance_scale < 1:
        raise UserError(f"--guidance-scale must be >= 1, got {guidance_scale}")
    target = add_student(world or world_dir(), student, steps, guidance_scale, fp16, overwrite)
    console.print(f"student -> {target}")


@world_app.command("evaluate")
def world_evaluate(
    out: Annotated[Path, typer.Option(help="Results directory (results.json, sample grid).")],
    model: Annotated[str, typer.Option(help="A world model: 'world' or a world directory.")] = "world",
    mode: Annotated[Mode, typer.Option(help="Judge the teacher or the student.")] = Mode.teacher,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="Prompts [the fixed test list].")] = None,
    guidance_scale: Annotated[list[float] | None, typer.Option(help="Guidance scales to compare "
                                                                   "(repeat the option) [model default].")] = None,
    teacher_steps: Annotated[int, typer.Option(help="Teacher sampling steps.")] = 25,
    scheduler: Annotated[Scheduler, typer.Option(help="Teacher sampler.")] = Scheduler.dpm,
    student: Annotated[Path | None, typer.Option(help="Student directory [the model's preset student].")] = None,
    student_steps: Annotated[list[int] | None, typer.Option(help="Student step counts to compare "
                                                                 "(repeat the option) [1 2 4 8].")] = None,
    student_noise: Annotated[str, typer.Option(help="'stochastic' or 'deterministic'.")] = "stochastic",
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 125,
    vae: Annotated[bool, typer.Option(help="Also judge VAE reconstructions of 1000 held-out renderings.")] = True,
    reference: Annotated[Path | None, typer.Option(help="student mode: a teacher results.json (same prompts) "
                                                        "drawn as the reference line of the plot.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier results directory.")] = False,
) -> None:
    """Judge the world teacher (or student) on a prompt list with the exact checker (and its VAE's reconstructions)."""
    import json

    import numpy as np

    from .generate import StudentSettings, TeacherSettings, generate_student, generate_teacher
    from .models import load_student_pipeline, load_teacher_pipeline, resolve_model, student_dir
    from .outputs import OutputDir, atomic_write_text
    from .world.evaluate import judge, vae_reconstructions
    from .world.prompts import load_prompts

    spec = resolve_model(model)
    if not spec.is_world:
        raise UserError(f"model {model!r} is not a ShapesWorld model; the exact checker judges world images only")
    ref = None
    if reference is not None:
        if mode is not Mode.student:
            raise UserError("--reference applies to --mode student")
        try:
            ref_results = json.loads(reference.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--reference {reference}: cannot read a results.json ({e})") from None
        if "teacher" not in ref_results:
            raise UserError(f"--reference {reference}: no teacher results in it")
        best_key = max(ref_results["teacher"], key=lambda k: ref_results["teacher"][k]["accuracy"])
        best_ref = ref_results["teacher"][best_key]
        steps = ref_results["config"].get("teacher_steps")
        ref = {f"teacher, {steps} steps, guidance {best_key}":
               (best_ref["accuracy"], best_ref.get("unet_evals_per_image", 2 * steps if steps else "?"))}
    prompts = _collect_prompts(None, prompts_file) if prompts_file else load_prompts("test")
    _check_world_prompts(prompts)
    config = {"command": "world evaluate", "tandem_version": __version__, "model": spec.name,
              "model_path": spec.path, "mode": mode.value, "prompts_file": str(prompts_file) if prompts_file else "test",
              "n_prompts": len(prompts), "seed": seed}
    if mode is Mode.teacher:
        config.update(teacher_steps=teacher_steps, scheduler=scheduler.value)
        scales = guidance_scale or [spec.teacher.guidance_scale]
        runs = [(str(g), f"teacher_g{g}", TeacherSettings(teacher_steps, scheduler.value, g)) for g in scales]
    else:
        path = student_dir(spec, student)
        default_g = spec.student.guidance_scale if spec.student and student is None else spec.teacher.guidance_scale
        config.update(student=str(path), student_noise=student_noise)
        runs = [(f"steps{n}_g{g}", f"student_s{n}_g{g}", StudentSettings(n, g, student_noise))
                for g in (guidance_scale or [default_g]) for n in (student_steps or [1, 2, 4, 8])]
    with OutputDir(out, overwrite, info={"command": "world evaluate"}) as output:
        if mode is Mode.teacher:
            pipe, generate = load_teacher_pipeline(spec), generate_teacher
        else:
            pipe, generate = load_student_pipeline(spec, path), generate_student
        results = {"config": config, mode.value: {}}
        for key, name, settings in runs:
            with _progress(name, len(prompts)) as bar:
                task = bar.add_task("generate", total=len(prompts))

                def done(n: int, bar=bar, task=task) -> None:
                    bar.update(task, completed=n)

                images = generate(pipe, prompts, settings, seed, batch_size, on_batch=done)
            summary = {**judge(images, prompts), "settings": settings.__dict__,
                       "unet_evals_per_image": settings.unet_evals_per_image}
            results[mode.value][key] = summary
            np.savez_compressed(output.path / f"{name}.npz", images=np.stack(images))
            console.print(f"{name}: accuracy {summary['accuracy']:.3f}, "
                          f"1 object {summary['by_objects'].get('1', {}).get('accuracy', float('nan')):.3f}, "
                          f"score {summary['mean_score']:.3f}")
        best = max(results[mode.value], key=lambda k: results[mode.value][k]["accuracy"])
        if mode is Mode.teacher:
            results["best_guidance_scale"] = float(best)
        else:
            from .plots import plot_quality_vs_steps

            results["best"] = best
            if ref is not None:
                results["reference"] = {"file": str(reference), **{k: v[0] for k, v in ref.items()}}
            plot = plot_quality_vs_steps(results["student"], output.path / "quality_vs_steps.png", ref,
                                         title=f"{spec.name} student on {config['prompts_file']} prompts")
            console.print(f"plot -> {output.final / plot.name}")
        if vae:
            results["vae_reconstruction"] = vae_reconstructions(pipe.vae)
            console.print(f"vae reconstructions: accuracy {results['vae_reconstruction']['accuracy']:.3f}")
        atomic_write_text(output.path / "results.json", json.dumps(results, indent=2) + "\n")
    console.print(f"best {best} -> {output.path / 'results.json'}")


def _mean_unet_evals(records: list[dict]) -> float | None:
    """Mean UNet evaluations per image of a `tandem generate` output's records (None if not recorded)."""
    costs = [r["unet_evals"]["total"] if isinstance(r.get("unet_evals"), dict) else r.get("unet_evals")
             for r in records]
    return float(sum(costs) / len(costs)) if costs and all(isinstance(c, int | float) for c in costs) else None


def _read_output_dir(path: Path) -> tuple[list[str], list, list[dict]]:
    """Prompts, images and records of a `tandem generate` output directory."""
    import json

    import numpy as np
    from PIL import Image

    from .outputs import INCOMPLETE

    if not path.is_dir():
        raise UserError(f"{path} is not a directory (give the --out of a `tandem generate` run)")
    records_file = path / "records.jsonl"
    if not records_file.exists():
        raise UserError(f"{path} has no records.jsonl (not a `tandem generate` output directory)")
    if (path / INCOMPLETE).exists():
        raise UserError(f"{path} is an unfinished run (it holds {INCOMPLETE}); nothing in it is a result")
    records = []
    try:
        lines = records_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{records_file} is unreadable ({e.__class__.__name__}: {e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise UserError(f"{records_file} line {n} is not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not (
                isinstance(r.get("file"), str) or isinstance(r.get("index"), int)):
            raise UserError(f"{records_file} line {n} is not a tandem record (needs 'prompt' and 'file' or 'index')")
        records.append(r)
    images = []
    for r in records:
        file = path / r.get("file", f"{r.get('index', 0):05d}.png")
        if not file.exists():
            raise UserError(f"{file} is missing (listed in {records_file})")
        try:
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise UserError(f"{file} is not a readable image (truncated or corrupt: {e})") from None
    return [r["prompt"] for r in records], images, records


@world_app.command("judge")
def world_judge(
    run: Annotated[Path, typer.Argument(help="Output directory of `tandem generate` (PNGs + records.jsonl).")],
    against: Annotated[Path | None, typer.Option(help="Another output directory of the same prompts: "
                                                      "side-by-side win rate on the soft score.")] = None,
) -> None:
    """Judge generated world images against their prompts with the exact checker (writes RUN/judge.json)."""
    import json

    import numpy as np

    from .eval.metrics import win_rate
    from .outputs import atomic_write_text
    from .world.checker import check_batch
    from .world.evaluate import summarize

    prompts, images, records = _read_output_dir(run)
    _check_world_prompts(prompts)
    results = check_batch(images, prompts)
    report = {"run": str(run), "unet_evals_mean": _mean_unet_evals(records), **summarize(results)}
    if against is not None:
        other_prompts, other_images, other_records = _read_output_dir(against)
        if other_prompts != prompts:
            raise UserError(f"{against} holds other prompts than {run}; side by side needs the same ones")
        other = check_batch(other_images, other_prompts)
        side = win_rate(np.array([r.score for r in results]), np.array([r.score for r in other]))
        report["against"] = {"run": str(against), **side, "win_rate_ties_split": side["win_rate"],
                             "mean_score": float(np.mean([r.score for r in other])),
                             "unet_evals_mean": _mean_unet_evals(other_records),
                             "accuracy": float(np.mean([r.satisfied for r in other]))}
    atomic_write_text(run / "judge.json", json.dumps(report, indent=2) + "\n")
    line = f"accuracy {report['accuracy']:.3f}, mean soft score {report['mean_score']:.4f}"
    if against is not None:
        a = report["against"]
        line += (f"; vs {against}: win {a['win']:.3f} tie {a['tie']:.3f} loss {a['loss']:.3f} "
                 f"(win rate, ties split: {a['win_rate']:.3f}, 95% CI {a['ci'][0]:.3f}-{a['ci'][1]:.3f})")
    console.print(f"{line} -> {run / 'judge.json'}")


class Experiment(str, Enum):
    budget = "budget"
    winners = "winners"
    threshold = "threshold"
    oracle = "oracle"
    diversity = "diversity"


def _check_eval_out(out: Path, resume: bool) -> None:
    """Refuse a non-empty --out without --resume; under ``accelerate launch`` every process checks
    before any writes."""
    from .eval.sweep import _processes

    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    refuse = out.exists() and any(out.iterdir()) and not resume
    _processes()[2]()
    if refuse:
        raise UserError(f"--out {out} is not empty; pass --resume to continue that experiment (finished "
                        "configurations are reused) or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _eval_measures(world: bool, model: str, judge: str | None, features: str | None, clip_score: str | None,
                   reference: Path | None, device: str, fid: str | None = None):
    """ShapesWorld: the exact checker (or --judge), world CLIP features and renderings. Real tier: --judge
    (required), --features, --clip-score, --reference and --fid as given."""
    from .eval.judges import Measures, load_judge

    if world:
        if features is not None or clip_score is not None or reference is not None or fid is not None:
            raise UserError("--features, --clip-score, --reference and --fid are for real-tier models; the world "
                            "measures with its CLIP against exact renderings")
        if judge is None or judge == "world":
            return Measures.for_world()
        return Measures.for_world(_load(lambda: load_judge(judge, device), "--judge"), judge_spec=judge)
    if judge is None or judge == "world":
        raise UserError(f"--model {model} has no exact checker: choose a judge, e.g. --judge imagereward or "
                        "--judge pickscore (best not the pipeline's own oracle)")
    return _load(lambda: Measures.from_specs(judge, features, clip_score, reference, device, fid),
                 "--judge/--features/--clip-score/--reference/--fid")


def _load(make, what: str):
    try:
        return make()
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{what}: {e}") from e


def _eval(experiment: Experiment, model: str, prompts_name: str, n: int | None, seed: int, out: Path, resume: bool,
          batch_size: int, device: str, judge: str | None = None, features: str | None = None,
          clip_score: str | None = None, reference: Path | None = None, calibration: Path | None = None,
          fid: str | None = None, preset_file: Path | None = None, student: str | None = None,
          scorer: str | None = None) -> None:
    import time

    from .eval import experiments
    from .eval.judges import quality
    from .world.prompts import load_prompts

    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    preset = _compose(model, preset_file, student, scorer)
    _check_composition(preset, "eval", calibration)
    world = preset.teacher == "world"
    _check_eval_out(out, resume)
    if prompts_name in ("val", "test"):
        if not world:
            raise UserError(f"--prompts {prompts_name} is a ShapesWorld list; give --model {model} a prompts file")
        prompts = load_prompts(prompts_name)
    else:
        prompts = _collect_prompts(None, Path(prompts_name))
        if world:
            _check_world_prompts(prompts)
    prompts = prompts[:n] if n is not None else prompts
    measures = _eval_measures(world, preset.name, judge, features, clip_score, reference, device, fid)
    needs_table = experiment in (Experiment.budget, Experiment.oracle, Experiment.diversity)
    if needs_table and calibration is None and not preset.calibration:
        raise UserError(f"eval {experiment.value} needs a calibration of this student and oracle: make one on "
                        f"held-out prompts (`tandem calibrate {_parts_args(preset)} --prompts FILE --out "
                        "calibration.json`) and pass --calibration")
    if preset.scorer is None:
        raise UserError("tandem eval needs the pipeline's oracle: give --scorer (e.g. clip:DIR, imagereward)")
    pipe = _tandem_pipeline(preset, device, calibration)
    made_by = {"command": f"eval {experiment.value}", "tandem_version": __version__, "model": model,
               **_preset_record(preset, pipe),
               "prompts": prompts_name, "n": len(prompts), "seed": seed, "batch_size": batch_size, "device": device,
               "calibration": str(calibration) if calibration else None, **measures.spec}
    t0 = time.time()
    with _progress(f"eval {experiment.value}", len(prompts)) as bar:
        progress = _phase_bars(bar)

        run = getattr(experiments, experiment.value)
        results = run(pipe, prompts, out, seed=seed, batch_size=batch_size, log=lambda m: console.print(m),
                      made_by=made_by, progress=progress, measures=measures)
    if experiment is Experiment.budget:
        from .eval.judges import format_quality

        for ref, a in results["acceleration"].items():
            best = a.get("best_adaptive_quality")
            reached = (f"reached at {a['adaptive']['unet_evals_mean']:.1f} UNet evals/image ({a['factor']:.2f}x "
                       f"cheaper)" if a["adaptive"]
                       else f"not reached (best {format_quality(best, results)})" if best is not None
                       else "no adaptive point")
            alone = a.get("student_alone")
            if alone:
                reached += (f"; the student alone (no image sent to the teacher) reaches it at "
                            f"{alone['unet_evals_mean']:.1f} UNet evals/image")
            console.print(f"{ref}: {format_quality(quality(a['teacher']), results)} at "
                          f"{a['teacher']['unet_evals_mean']:.0f} UNet evals/image; adaptive {reached}")
    elif experiment is Experiment.oracle:
        d = results["decisions"]
        best = max(d["no_reference"], key=lambda r: r["accuracy"])
        console.print(f"full-reference agreement {100 * d['full_reference']:.1f}%, best no-reference "
                      f"{100 * best['accuracy']:.1f}% at k = {best['k']:g}")
    elif experiment is Experiment.winners:
        w = results["student_vs_teacher"]
        console.print(f"student better on {100 * w['win']:.1f}% of prompts (win rate {w['win_rate']:.3f})")
    console.print(f"done in {time.time() - t0:.0f}s -> {out / 'report.md'}")


def _eval_command(experiment: Experiment, summary: str, default_n: int | None) -> None:
    """Register ``tandem eval <experiment>`` (every experiment takes the same options)."""

    def command(
        out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
        model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world'; real tier: e.g. sd15-lcm), or a "
                                                 "teacher directory or hub id with --student and --scorer.")] = "world",
        preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
        student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
        scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
        prompts: Annotated[str, typer.Option(help="'val', 'test' (the world's fixed lists) or a prompts file.")] = "test",
        n: Annotated[int | None, typer.Option(help="Use the first N prompts [all].")] = default_n,
        seed: Annotated[int, typer.Option(help="Run seed (prompt i draws from (seed, i)).")] = 0,
        resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
        batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 100,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
        judge: Annotated[str | None, typer.Option(
            help="Who decides which image is better: 'world' (the exact checker; the world's default) or a "
                 "scorer (imagereward[:PATH], pickscore[:ID], clip:ID, world-oracle[:DIR]); required off the "
                 "world.")] = None,
        features: Annotated[str | None, typer.Option(
            help="Real tier: a CLIP or DINOv2 (hub id or directory) for the Fréchet distance, diversity and "
                 "student-teacher distance.")] = None,
        clip_score: Annotated[str | None, typer.Option(help="Real tier: a CLIP for the CLIP-score column.")] = None,
        reference: Annotated[Path | None, typer.Option(
            help="Real tier: a directory of reference images (e.g. COCO) for the Fréchet distance.")] = None,
        calibration: Annotated[Path | None, typer.Option(
            help="A calibration (tandem calibrate) for the preset's student and oracle [the preset's].")] = None,
        fid: Annotated[str | None, typer.Option(
            help="Real tier, budget: 'inception' or 'inception:WEIGHTS_FILE' for an Inception FID against "
                 "--reference (needs tandem[fid]).")] = None,
    ) -> None:
        _eval(experiment, model, prompts, n, seed, out, resume, batch_size, device, judge, features, clip_score,
              reference, calibration, fid, preset_file, student, scorer)

    command.__doc__ = summary
    eval_app.command(experiment.value)(command)


_eval_command(Experiment.budget, "Quality vs cost: teacher samplers, students, refine-all and the adaptive pipeline "
                                 "over k; acceleration factors (paper Fig. 9-10).", 500)
_eval_command(Experiment.winners, "Where students win: win rate vs student-teacher distance, scene complexity, "
                                  "prompt length and trajectory curvature (section 3.1).", None)
_eval_command(Experiment.threshold, "How tau settles with the number of calibration prompts, with timings "
                                    "(Table 2).", None)
_eval_command(Experiment.oracle, "Oracle accuracy: no-reference vs full-reference decisions over k (Fig. 7), "
                                 "synthetic oracles (D.4).", None)
_eval_command(Experiment.diversity, "Diversity over seeds (mean pairwise world-CLIP distance) of the student, the "
                                    "teacher and the adaptive pipeline, beside their accuracy.", 100)


def _eval_task_run(name: str, out: Path, resume: bool, batch_size: int, run) -> dict:
    """Common checks, progress and timing of `tandem eval edit|control`."""
    import time

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    _check_eval_out(out, resume)
    t0 = time.time()
    with _progress(f"eval {name}", 1) as bar:
        progress = _phase_bars(bar)

        results = run(progress)
    for name_, a in results["acceptance"].items():
        reached = (f"{a['adaptive']['label']} reaches {100 * a['adaptive']['accuracy']:.1f}% at "
                   f"{a['adaptive']['unet_evals_mean']:.1f} UNet evals/image" if a["adaptive"]
                   else "not reached below its cost")
        console.print(f"{name_}: {100 * a['teacher']['accuracy']:.1f}% at {a['teacher']['unet_evals_mean']:.0f} "
                      f"UNet evals/image; student {100 * a['student']['accuracy']:.1f}%; {reached}")
    console.print(f"done in {time.time() - t0:.0f}s -> {out / 'report.md'}")
    return results


@eval_app.command("edit")
def eval_edit(
    out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
    model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world').")] = "world",
    edits: Annotated[str, typer.Option(help="'test', 'val' or an edit list file (JSON lines).")] = "test",
    n: Annotated[int | None, typer.Option(help="Use the first N edits [all].")] = None,
    strengths: Annotated[str, typer.Option(help="Comma-separated SDEdit strengths.")] = "0.4,0.5,0.6,0.7,0.8",
    seed: Annotated[int, typer.Option(help="Run seed (edit i draws from (seed, i)).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Editing (SDEdit) in tandem: quality, reference preservation and cost of the student, the teacher
    and the adaptive pipeline over strengths; tau from the validation edits (paper Table 1, Fig. 13)."""
    from .eval import tasks

    if model != "world":
        raise UserError(f"`tandem eval edit` judges with ShapesWorld's exact checker: --model world (got {model!r})")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    try:
        values = tuple(float(v) for v in strengths.split(","))
    except ValueError:
        raise UserError(f"--strengths must be comma-separated numbers, got {strengths!r}") from None
    if any(not 0 < v <= 1 for v in values):
        raise UserError(f"--strengths must lie in (0, 1], got {strengths!r}")
    cases = _load_edit_cases(edits)[:n]
    main_strength = 0.6 if 0.6 in values else values[0]
    cfg = tasks.EditConfig(strengths=values, main_strength=main_strength)
    pipe = _tandem_pipeline(_compose(model), device)
    made_by = {"command": "eval edit", "tandem_version": __version__, "model": model, "edits": edits,
               "n": len(cases), "seed": seed, "batch_size": batch_size, "device": device}
    _eval_task_run("edit", out, resume, batch_size, lambda progress: tasks.edit(
        pipe, cases, out, seed, cfg, batch_size, lambda m: console.print(m), made_by, progress))


@eval_app.command("control")
def eval_control(
    out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
    control: Annotated[str, typer.Option(help="The world ControlNet: mask or edges.")] = "mask",
    model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world').")] = "world",
    prompts: Annotated[str, typer.Option(help="'val', 'test' (the fixed lists) or a prompts file.")] = "test",
    n: Annotated[int | None, typer.Option(help="Use the first N prompts [all].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed (prompt i draws from (seed, i); its control image is "
                                           "that of the scene drawn for it with the same seed).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """ControlNet generation in tandem: the student, the teacher, refine-all and the adaptive pipeline with
    one ControlNet in both, on captions with exact control images (paper section 4.3, D.6)."""
    from .eval import tasks
    from .world.prompts import load_prompts

    if model != "world":
        raise UserError(f"`tandem eval control` judges with ShapesWorld's exact checker: --model world "
                        f"(got {model!r})")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if prompts in ("val", "test"):
        captions = load_prompts(prompts)
    else:
        captions = _collect_prompts(None, Path(prompts))
        _check_world_prompts(captions)
    captions = captions[:n]
    pipe = _tandem_pipeline(_compose(model, control=control), device)
    made_by = {"command": "eval control", "tandem_version": __version__, "model": model, "control": control,
               "prompts": prompts, "n": len(captions), "seed": seed, "batch_size": batch_size, "device": device}
    _eval_task_run("control", out, resume, batch_size, lambda progress: tasks.control(
        pipe, captions, control, out, seed, tasks.ControlConfig(), batch_size, lambda m: console.print(m), made_by,
        progress))


@eval_app.command("report")
def eval_report(
    experiments: Annotated[list[Path], typer.Argument(help="Experiment directories written by `tandem eval`.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")],
    title: Annotated[str, typer.Option(help="The page title.")] = "tandem evaluation",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """One self-contained HTML report (plots embedded) of several experiments, each with the command
    and configuration behind its numbers."""
    from .eval.report import combined_report
    from .outputs import atomic_write_text

    _check_out_file(out, overwrite)
    atomic_write_text(out, combined_report(experiments, title))
    console.print(f"{len(experiments)} experiments -> {out}")


@preset_app.command("save")
def preset_save(
    out: Annotated[Path, typer.Option(help="The preset file to write (JSON).")],
    model: Annotated[str, typer.Option(help="A preset to start from, or a teacher directory or hub id.")] = "world",
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help="A ControlNet (directory or hub id) in student and "
                                                        "teacher.")] = None,
    teacher_kind: Annotated[str | None, typer.Option(help="'text2img' (refines and regenerates) or 'img2img' "
                                                          "(refines only, e.g. the SDXL refiner).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="The calibration (`tandem calibrate`) of this student "
                                                          "and oracle, used for --percentile and --budget.")] = None,
    name: Annotated[str | None, typer.Option(help="The preset's name [the file's name].")] = None,
    setting: Annotated[list[str] | None, typer.Option("--set", help="A default setting KEY=VALUE (repeat), e.g. "
                                                                   "teacher_steps=12, rollback_sigma=0.85.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Save a tandem composed from parts as a preset file, for `--preset FILE` on every command."""
    import dataclasses

    from .presets import PRESET_SETTINGS, compose, write_preset_file

    _check_out_file(out, overwrite)
    if calibration is not None and not calibration.is_file():
        raise UserError(f"--calibration {calibration}: no such file (make one with `tandem calibrate`)")
    defaults = {}
    for item in setting or []:
        key, sep, value = item.partition("=")
        if not sep or key not in PRESET_SETTINGS:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(PRESET_SETTINGS)}")
        try:
            defaults[key] = PRESET_SETTINGS[key](value)
        except ValueError as e:
            raise UserError(f"--set {item!r}: {e}") from None
    preset = compose(model, student=student, scorer=scorer, controlnet=controlnet, teacher_kind=teacher_kind)
    if calibration is not None:
        from .calibration import Calibration

        Calibration.load(calibration)  # a damaged file is refused now, not at the first run
    preset = dataclasses.replace(preset, name=name or out.stem, defaults={**preset.defaults, **defaults},
                                 calibration=str(calibration) if calibration else preset.calibration)
    write_preset_file(preset, out, overwrite=overwrite)
    console.print(f"preset {preset.name} -> {out}; use it with --preset {out}")


@preset_app.command("show")
def preset_show(
    preset: Annotated[str, typer.Argument(help="A preset name or a preset file.")],
) -> None:
    """Print a preset's fields as JSON (built-in presets: tandem.presets.PRESETS)."""
    import json

    from .presets import PRESETS, preset_to_json, read_preset_file

    if preset in PRESETS:
        found = PRESETS[preset]
    elif Path(preset).is_file():
        found = read_preset_file(preset)
    else:
        raise UserError(f"unknown preset {preset!r}: neither a built-in preset ({', '.join(PRESETS)}) nor a file")
    print(json.dumps(preset_to_json(found), indent=2))


def _check_device(device: str) -> None:
    """A torch device that exists on this machine, or a one-line error."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: tandem runs on cpu, cuda or mps")


def _checked(command):
    """Checks every command's options share, before the command runs: every number finite (typer reads
    'nan' and 'inf' as floats), seeds >= 0, the device present on this machine."""
    import functools
    import inspect
    import math

    signature = inspect.signature(command)

    @functools.wraps(command)
    def run(*args, **kwargs):
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            flag = "--" + name.replace("_", "-")
            for v in value if isinstance(value, list | tuple) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise UserError(f"{flag} must be a finite number, got {v}")
            if name == "seed" and value is not None and value < 0:
                raise UserError(f"--seed must be >= 0, got {value}")
            if name == "device" and value is not None:
                _check_device(value)
        return command(*args, **kwargs)
    return run


for _app in (app, world_app, distill_app, eval_app, preset_app):
    for _info in _app.registered_commands:
        _info.callback = _checked(_info.callback)


def main() -> None:
    import warnings

    from typer import Abort

    from .calibration import CalibrationTieWarning
    from .world.grammar import CaptionError

    warnings.simplefilter("ignore", CalibrationTieWarning)  # the commands print it as a note
    try:  # newer typer vendors its own click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - typer on upstream click
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        sys.exit(0)
    except UsageError as e:  # bad options: one line, like every other input error
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        sys.exit(1)
    except (UserError, CaptionError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
