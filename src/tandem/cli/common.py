"""What the command groups share: the Typer apps, the one-line error, option help, enums, and the
checks and loaders every command calls before it computes."""

from __future__ import annotations

import os
import re
import warnings
from enum import Enum
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# the model libraries' own deprecation notices (e.g. huggingface_hub on arguments diffusers still passes) are for
# their callers' developers, not for a user of the command line, whose stderr carries tandem's one-line errors
for _library in ("huggingface_hub", "diffusers", "transformers"):
    for _category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=_category, module=_library + r"(\.|$)")

import typer
from rich.console import Console

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


MAX_IMAGE_PIXELS = 4096 * 4096  # the largest input image tandem decodes (--image, --control-image)


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


# The library's messages name its Python arguments; the command line shows its options instead. Each key is
# the Python spelling (a regular expression, matched as whole words outside a `backticked command`, a 'quoted
# value' and a path), each value what a user of the command line types for it; the rules apply in this order.
CLI_SPELLINGS = {
    r"pass calibration=pipe\.calibrate_edits\(images, prompts, strength=([\d.]+), drafts=(\d+)\)":
        r"make one with `tandem calibrate --edits val --strength \1 --drafts \2`, then --calibration FILE",
    r"pipe\.calibration = pipe\.calibrate\(prompts\)": "`tandem calibrate`, then --calibration FILE",
    r"pipe\.calibrate\(prompts\)": "`tandem calibrate`",
    r"pipe\.draft_calibrations\[(\d+)\] = pipe\.calibrate\(prompts, drafts=\d+\)":
        r"`tandem calibrate --drafts \1`, then --calibration FILE",
    r"pipe\.calibrate\(prompts, drafts=(\d+)\) \(kept in pipe\.draft_calibrations\[\d+\]\)":
        r"`tandem calibrate --drafts \1`, then --calibration FILE",
    r"drafts=(\d+)": r"--drafts \1",
    r"draft_calibrations: pipe\.draft_calibrations\[N\] = Calibration\.load\(FILE\)": "--draft-calibration FILE",
    r"pipe\.edit_calibrations\[([\d.]+)\] = pipe\.calibrate_edits\(images, prompts, strength=[\d.]+\)":
        r"`tandem calibrate --edits val --strength \1`, then --calibration FILE",
    r"pipe\.calibrate_edits\(images, prompts, strength\)": "`tandem calibrate --edits`",
    r"pipe\.calibrate_cascade\(prompts, levels\)": "`tandem calibrate --cascade STEPS`",
    r"pipe\.predictor = pipe\.fit_predictor\(prompts\) \(on held-out prompts\), or "
    r"tandem\.prerouting\.ScorePredictor\.load\(path\)":
        "`tandem calibrate --predictor --out FILE` on held-out prompts, then --predictor FILE",
    r"pipe\.fit_predictor\(prompts\)": "`tandem calibrate --predictor`",
    r"preroute_steps": "--preroute-steps",
    r"preroute": "--preroute",
    r"TandemPipeline\.with_controlnet\(\.\.\.\)": "--controlnet",
    r"routing='budget-exact'": "--budget-exact",
    r"mode='([\w-]+)'": r"--mode \1",
    r"strategy='(\w+)'": r"--strategy \1",
    r"handoff='(\w+)'": r"--handoff \1",
    r"reference='([^']*)'": r"--reference \1",
    r"reference=\.\.\.": "--reference",
    r"scorer=\.\.\.": "--scorer",
    r"student=\.\.\.": "--student",
    r"overwrite=True": "--overwrite",
    r"student:": "--student:",
    r"accept_threshold": "--threshold",
    r"percentile": "--percentile",
    r"budget": "--budget",
    r"strategy": "--strategy",
    r"teacher_steps": "--teacher-steps",
    r"teacher_prob": "--teacher-prob",
    r"teacher_at": "--teacher-at",
    r"teacher_kind": "--teacher-kind",
    r"control_image": "--control-image",
    # the trainings' (tandem distill, tandem world train) and the experiments' (tandem eval)
    r"out_dir": "--out",
    r"out=\.\.\.": "--out",
    r"resume=True": "--resume",
    r"max_steps": "--max-steps",
    r"snapshot_every": "--snapshot-every",
    r"mixed_precision='(\w+)'": r"--mixed-precision \1",
    r"lr": "--lr",
    r"disc_lr": "--disc-lr",
    r"critic_lr": "--critic-lr",
    r"data='([^']*)'": r"--data \1",
    r"data=\.\.\.": "--data",
    r"features='([^']*)'": r"--features \1",
    r"features=\.\.\.": "--features",
    r"measures\.features": "--features",
    r"fid='([^']*)'": r"--fid \1",
    r"fid=\.\.\.": "--fid",
    r"ddil\.(\w+)": r"--ddil \1",
    r"(?<!\+)ddil": "--ddil",  # not the '+ddil' of a student's method name (consistency+ddil)
    r"steps > 1": "--steps > 1",
    r"backward_simulation": "--backward-simulation",
    r"student='([^']*)'": r"--student \1",
}
_SPELLINGS = [(re.compile(rf"(?<![\w/.-]){key}(?![\w/-]|\.\w)"), flag) for key, flag in CLI_SPELLINGS.items()]
_VERBATIM = re.compile(r"(`[^`]*`|(?<![\w=])'[^']*'(?!\w))")  # a command, a repr'd value: never translated
# a message that still gives the option itself, "control_image (--control-image)", shows it once
_SAID_TWICE = re.compile(r"(--[\w-]+(?: [\w-]+)?) \((?:command line: )?\1\)")


def cli_message(message: str) -> str:
    """A library message in the command line's words: its Python spellings (:data:`CLI_SPELLINGS`) become the
    options; commands in backticks, quoted values and paths stay as they are."""
    for pattern, flag in _SPELLINGS:
        parts = _VERBATIM.split(message)  # text, verbatim, text, ...: split again after each rule, which may
        message = "".join(part if i % 2 else pattern.sub(flag, part) for i, part in enumerate(parts))  # quote
    return _SAID_TWICE.sub(r"\1", message)


def cli_error(error: Exception) -> UserError:
    """The one-line error a library error (a ValueError) becomes, in the command line's words
    (:func:`cli_message`)."""
    return UserError(cli_message(str(error)))


STUDENT_HELP = ("The student: a `tandem distill` student directory, a diffusers pipeline or UNet directory (e.g. "
                "LCM-Dreamshaper, LCM-SDXL), or a hub id (pipeline:ID or unet:ID) [the preset's].")
SCORER_HELP = ("The oracle: clip:ID, pickscore:ID, imagereward[:PATH], blip[:ID], world-oracle[:DIR] "
               "[the preset's].")
CONTROLNET_HELP = "Your own ControlNet (directory or hub id) in student and teacher; give --control-image."
PRESET_HELP = "A preset file (`tandem preset save`) instead of --model."


class Mode(str, Enum):
    teacher = "teacher"
    student = "student"
    adaptive = "adaptive"
    refine_all = "refine-all"
    mixed = "mixed"


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
    oracle_clip = "oracle-clip"
    controlnet = "controlnet"


class EditMode(str, Enum):
    adaptive = "adaptive"
    student = "student"
    teacher = "teacher"


class Split(str, Enum):
    val = "val"
    test = "test"


def run_inputs(**options) -> list[tuple[str, Path]]:
    """``(--flag, path)`` for each option value that names an existing file or directory (lists flattened): what a
    run reads, which ``--overwrite`` must not replace (``OutputDir(inputs=...)``)."""
    pairs = []
    for name, value in options.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and str(v) and Path(str(v)).exists():
                pairs.append(("--" + name.replace("_", "-"), Path(str(v))))
    return pairs


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
    from ..world.prompts import read_prompt_file

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
        if Path(file).exists() and not Path(file).is_file():
            raise UserError(f"{flag} {file}: not a regular file")
        try:
            with Image.open(file) as im:  # reads the header only: the size is known before any pixel is decoded
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{flag} {file}: {im.width}x{im.height} pixels is over tandem's limit of "
                                    f"{MAX_IMAGE_PIXELS} pixels; give a smaller image")
                images.append(_to_rgb8(im))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{flag} {file}: cannot read the image ({e})") from None
    return images


def _warn_resized(images: list, size: tuple[int, int], flag: str, files: list[Path] | None) -> None:
    """Say (one stderr line each) which input images the pipeline will resize to its ``size`` (height, width)."""
    for i, im in enumerate(images):
        if im.size != (size[1], size[0]):
            name = files[i] if files and i < len(files) else f"image {i}"
            console.print(f"warning: {flag} {name} is {im.width}x{im.height}; it is resized to {size[1]}x{size[0]} "
                          "(bicubic), the model's resolution", highlight=False, soft_wrap=True)


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
    from ..presets import PRESETS

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
    from ..outputs import make_writable_dir

    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out} exists; pass --overwrite to replace it")
    make_writable_dir(out.parent, flag)


def _check_world_prompts(prompts: list[str]) -> None:
    from ..world.grammar import CaptionError, parse_caption

    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except CaptionError as e:
            raise UserError(f"prompt {i} is outside ShapesWorld's grammar: {e}") from None


def _direct(model: str, preset_file: Path | None, student: str | None, controlnet: str | None,
            control: str | None) -> bool:
    """Whether ``generate --mode teacher|student`` runs the model's diffusers pipeline directly (a world or
    diffusers teacher, with a `tandem distill` student), rather than through a composed TandemPipeline."""
    from ..presets import PRESETS, parse_student

    if preset_file is not None or controlnet is not None or control is not None:
        return False
    if model in PRESETS and model != "world":
        return False
    teacher = PRESETS[model].teacher if model in PRESETS else model
    return student is None or parse_student(student, teacher)[0] in ("tandem", "world")


def _compose(model: str, preset_file: Path | None = None, student: str | None = None, scorer: str | None = None,
             controlnet: str | None = None, control: str | None = None):
    """The preset a command runs: ``--preset FILE`` or ``--model`` (a preset name, or a teacher directory
    or hub id), with the ControlNet preset of ``--control`` and the parts given on the command line."""
    from ..presets import compose, read_preset_file

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
    try:
        return compose(base, student=student, scorer=scorer, controlnet=controlnet)
    except ValueError as e:
        raise cli_error(e) from None


def _check_composition(preset, mode: str, calibration: Path | None, threshold: float | None = None,
                       percentile: float | None = None, budget: float | None = None, edit: bool = False,
                       budget_exact: bool = False) -> None:
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
    if mode == "adaptive" and threshold is None and not budget_exact and not has_table:
        make = ("`tandem calibrate --edits val` (world) or TandemPipeline.calibrate_edits (Python)" if edit
                else f"`tandem calibrate {_parts_args(preset)} --prompts HELD_OUT.txt --out calibration.json`")
        raise UserError(f"{', '.join(given) or 'the percentile k'} needs a calibration of this student and oracle: "
                        f"make one with {make} and pass --calibration, or give --threshold")


def _parts_args(preset) -> str:
    """The command-line options that rebuild ``preset``'s parts, for messages."""
    from ..presets import PRESETS

    base = preset.name.removesuffix("+custom")
    if base in PRESETS and not preset.name.endswith("+custom"):
        return f"--model {base}"
    args = [f"--model {base if base in PRESETS else preset.teacher}"]
    if base not in PRESETS or PRESETS[base].student != preset.student:
        args.append(f"--student {preset.student}")
    if preset.scorer and (base not in PRESETS or PRESETS[base].scorer != preset.scorer):
        args.append(f"--scorer {preset.scorer}")
    return " ".join(args)


def _tandem_pipeline(preset, device: str, calibration: Path | None = None, routes: Path | None = None):
    """Load the TandemPipeline of ``preset`` (with ``--calibration`` and ``--routes``; a calibration of your
    own drops the preset's route table, whose percentiles refer to the preset's); says which VAE and text
    encoder a student that brings its own uses."""
    from ..pipeline import load_preset

    pipe = load_preset(preset, device=device, calibration=calibration, routes=routes)
    own = [name.replace("_", " ") for name in pipe.student_own_components]
    if own:
        console.print(f"note: student {preset.student} brings its own {' and '.join(own)}: the student draws with "
                      f"them, the teacher with its own, and the student's latents go to the teacher directly "
                      f"(--handoff pixel decodes and re-encodes instead)")
    return pipe


def _load_edit_cases(edits: str):
    from ..world.edits import EDIT_SEEDS, load_edits, read_edit_file

    try:
        return load_edits(edits) if edits in EDIT_SEEDS else read_edit_file(edits)
    except ValueError as e:
        raise cli_error(e) from None


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


