"""Presets: a student, a teacher, an oracle and the settings that make them work in tandem,
written as data. Real-tier settings come from the adaptive teacher-student paper (Tables 4-5);
``world`` is the shipped ShapesWorld with its consistency student, oracle and calibration.

Student kinds:

* ``world``: the shipped world's student (``<world>/student``), sharing the teacher's VAE and text encoder.
* ``tandem``: a student directory written by ``tandem distill`` (``unet/``, ``scheduler/``, ``student.json``),
  sharing the teacher's VAE and text encoder.
* ``unet``: a consistency-distilled UNet (a repository or directory holding ``config.json``) swapped into
  the teacher's components, with an ``LCMScheduler``: nothing but the UNet is loaded twice.
* ``pipeline``: a complete diffusers pipeline of its own (e.g. SDXL-Turbo, LCM-Dreamshaper).

Teacher kinds: ``text2img`` (can refine and regenerate) or ``img2img`` (refine only, e.g. the SDXL refiner).

Presets are also files: :func:`compose` builds one from parts (a teacher directory or hub id, a
student, an oracle, a ControlNet) and :func:`write_preset_file` / :func:`read_preset_file` keep it as
JSON with the fields of :class:`Preset` (``tandem preset save``; ``--preset FILE`` on every command).

A preset with a ``controlnet`` plugs that ControlNet into both student and teacher (section 4.3 and
appendix D.6); its calls then need a control image per prompt. ``world-mask`` and ``world-edges`` are
the shipped world with its mask and edge ControlNets (``tandem world train controlnet``).

``edit_calibrations`` are the student's *edit* score tables (``tandem calibrate --edits``), one per
SDEdit strength, that ``TandemPipeline.edit`` takes tau from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .checks import count, finite_number, read_json_file
from .models import resolve_model, student_dir, world_dir
from .outputs import atomic_write_text
from .students import has_description, read_student_info


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    teacher: str
    student: str | None  # None: a teacher alone (generate --mode teacher)
    student_kind: str  # world | tandem | unet | pipeline
    scorer: str | None  # a tandem.scorers.load_scorer spec (None: no oracle; student/teacher/refine-all only)
    defaults: dict = field(default_factory=dict)  # TandemPipeline call defaults
    teacher_kind: str = "text2img"
    calibration: str | None = None  # a calibration file shipped with the preset
    source: str = ""
    controlnet: str | None = None   # a ControlNetModel (hub id or directory; "world:KIND" for the shipped ones)
    edit_calibrations: dict = field(default_factory=dict)  # SDEdit strength -> calibration file ("world:NAME")
    # a student that edits instead of ``student`` (a name the teacher ships, or a ``tandem distill`` directory);
    # its guidance is the ``edit_guidance_scale`` setting, its edit calibrations ``edit_calibrations``
    edit_student: str | None = None
    # a route table (tandem.routes; "world:NAME" for a shipped one): what a budget alone picks
    routes: str | None = None
    # best-of-N calibrations (drafts N -> calibration file), for drafts=N with a percentile or budget
    draft_calibrations: dict = field(default_factory=dict)
    # a pre-routing predictor's file (tandem.prerouting), for preroute=P
    predictor: str | None = None


PRESETS: dict[str, Preset] = {
    "world": Preset(
        name="world",
        description="ShapesWorld: shipped teacher, progressive-distillation student, world oracle and calibration",
        teacher="world", student="world", student_kind="world", scorer="world-oracle",
        calibration="world", edit_calibrations={0.6: "world:calibration-edit-0.6.json"}, edit_student="cd",
        routes="world:routes.json",
        draft_calibrations={n: f"world:calibration-drafts-{n}.json" for n in (2, 4, 8)},
        defaults=dict(num_inference_steps=4, guidance_scale=4.5, teacher_steps=10, teacher_guidance_scale=5.0,
                      teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.7, percentile=50,
                      edit_strength=0.6, edit_num_inference_steps=8, edit_guidance_scale=6.0),
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


# What a tandem composed from a teacher that is not a preset starts from: the paper's SD1.5 setting
# (Table 4: student 5 steps, refinement 10 steps at sigma 0.7, k 50) with the 4-step student of LCM.
# Guidance is left to the models: the teacher's default scale, which the student shares by default.
COMPOSED_DEFAULTS = dict(num_inference_steps=4, teacher_steps=10, teacher_scheduler="dpm", strategy="refine",
                         rollback_sigma=0.7, percentile=50)


# The settings a preset's ``defaults`` may hold (TandemPipeline call arguments) and the values each takes:
# ("whole", None) a whole number >= 1; ("number", bounds) a finite number within ``bounds`` (checks.finite_number's
# keywords); ("choice", options) one of ``options``. :func:`check_setting` applies them to every preset file read or
# written, and to each ``tandem preset save --set``.
SETTING_RULES = {
    "num_inference_steps": ("whole", None),
    "guidance_scale": ("number", {"low": 0}),
    "teacher_steps": ("whole", None),
    "teacher_guidance_scale": ("number", {"low": 0}),
    "teacher_scheduler": ("choice", ("dpm", "ddim", "unipc")),
    "strategy": ("choice", ("refine", "regenerate")),
    "rollback_sigma": ("number", {"low": 0, "low_open": True, "high": 1}),
    "rollback_convention": ("choice", ("paper", "strength")),
    "percentile": ("number", {"low": 0, "high": 100}),
    "edit_strength": ("number", {"low": 0, "low_open": True, "high": 1}),
    "edit_num_inference_steps": ("whole", None),
    "edit_teacher_steps": ("whole", None),
    "edit_guidance_scale": ("number", {"low": 0}),
    "controlnet_conditioning_scale": ("number", {}),
    "drafts": ("whole", None),
    "preroute": ("number", {"low": 0, "low_open": True, "high": 1}),
    "preroute_steps": ("whole", None),
}


def check_setting(key: str, value):
    """``value`` of the default setting ``key``, checked against :data:`SETTING_RULES`; a ``ValueError`` names the
    setting and the values it takes ("rollback_sigma must be in (0, 1], got 5")."""
    if key not in SETTING_RULES:
        raise ValueError(f"unknown default setting {key!r}; expected one of {', '.join(SETTING_RULES)}")
    kind, rule = SETTING_RULES[key]
    if kind == "whole":
        return count(value, key)
    if kind == "number":
        return finite_number(value, key, **rule)
    if not isinstance(value, str) or value not in rule:
        raise ValueError(f"{key} must be one of {', '.join(rule)}, got {value!r}")
    return value


def parse_setting(key: str, text: str):
    """The default setting ``key`` from command-line text (``--set KEY=VALUE``), checked by :func:`check_setting`."""
    kind, _ = SETTING_RULES[key]
    try:
        value = int(text) if kind == "whole" else float(text) if kind == "number" else text
    except ValueError:
        raise ValueError(f"{key} must be {'a whole number' if kind == 'whole' else 'a number'}, got {text!r}") from None
    return check_setting(key, value)


# Each setting's parser from text, checked (``tandem preset save --set``).
PRESET_SETTINGS = {key: (lambda text, key=key: parse_setting(key, text)) for key in SETTING_RULES}
STUDENT_KINDS = ("world", "tandem", "unet", "pipeline")
TEACHER_KINDS = ("text2img", "img2img")


def student_kind(source: str) -> str:
    """The kind of the student in ``source``: a directory by its layout (``pipeline``: ``model_index.json``;
    ``unet``: the ``config.json`` of a UNet, e.g. the LCM-SDXL layout; otherwise ``tandem``, a
    ``tandem distill`` student with ``unet/`` and ``scheduler/``, whose loader names what is missing).
    A hub id cannot be looked at offline: it is a ``pipeline`` unless it says ``unet:ID``
    (:func:`parse_student`)."""
    path = Path(source)
    if not path.is_dir():
        try:
            resolve_model(source)  # a mistyped path is an error, not a hub id
        except ValueError as e:
            raise ValueError(f"student: {e}") from None
        return "pipeline"
    if (path / "model_index.json").is_file():
        return "pipeline"
    config = path / "config.json"
    if config.is_file() and not (path / "unet").is_dir():
        try:
            cls = json.loads(config.read_text()).get("_class_name")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            cls = None
        if cls == "UNet2DConditionModel":
            return "unet"
    return "tandem"


def parse_student(spec: str, teacher: str | None = None) -> tuple[str, str]:
    """``(kind, source)`` of a ``--student`` value: the name of a student ``teacher`` ships (``tandem world
    students``: a ``tandem`` student, its directory), ``KIND:SOURCE`` with a kind of :data:`STUDENT_KINDS`,
    or a directory or hub id whose kind :func:`student_kind` finds (a hub id defaults to ``pipeline``)."""
    shipped = _shipped(teacher) if teacher is not None else {}
    if spec in shipped:
        return "tandem", shipped[spec].path
    if shipped and "/" not in spec and ":" not in spec and not Path(spec).is_dir():
        raise ValueError(f"student: no student {spec!r}: not a directory, nor a student {teacher} ships "
                         f"({', '.join(shipped)})")
    kind, sep, rest = spec.partition(":")
    if sep and kind in STUDENT_KINDS:
        return kind, rest
    return student_kind(spec), spec


def compose(model: str | Preset = "world", *, student: str | None = None, scorer: str | None = None,
            controlnet: str | None = None, teacher_kind: str | None = None) -> Preset:
    """A preset from parts: ``model`` is a preset name, a preset file (``*.json``) or a teacher (a
    diffusers directory or hub id), and each given part replaces the preset's.

    A calibration belongs to one student and oracle (and ControlNet): replacing any of them drops
    the preset's calibrations, so a percentile then needs a new one (``tandem calibrate``), except
    that a student the teacher ships with its own calibration (``tandem.json``) brings that one.

    Args:
        model: preset name, preset file, teacher directory / hub id, or a ``Preset``.
        student: ``--student``: a directory, a hub id or ``KIND:SOURCE`` (:func:`parse_student`).
        scorer: ``--scorer``: a :func:`tandem.scorers.load_scorer` spec.
        controlnet: ``--controlnet``: a ``ControlNetModel`` directory or hub id.
        teacher_kind: ``text2img`` (default) or ``img2img`` (a teacher that can only refine).
    """
    if isinstance(model, Preset):
        base = model
    elif model in PRESETS:
        base = PRESETS[model]
    elif model.endswith(".json") and Path(model).is_file():
        base = read_preset_file(model)
    else:
        spec = resolve_model(model)
        base = Preset(name=model, description=f"composed: teacher {model}", teacher=model, student=None,
                      student_kind="tandem", scorer=None,
                      defaults={**COMPOSED_DEFAULTS, "teacher_guidance_scale": spec.teacher.guidance_scale},
                      source="tandem.presets.COMPOSED_DEFAULTS")
        if spec.student is not None:  # a world directory ships its student
            base = dataclasses.replace(base, student=spec.student.path, student_kind="tandem", defaults={
                **base.defaults, "num_inference_steps": spec.student.steps,
                "guidance_scale": spec.student.guidance_scale})
    changes: dict = {}
    shipped = None
    if student is not None:
        shipped = _shipped(base.teacher).get(student)
        kind, source = parse_student(student, base.teacher)
        changes.update(student=source, student_kind=kind, edit_student=None)  # --student edits as well
        own = None
        if kind == "tandem":  # the student's own defaults (a shipped one's, or its student.json's)
            path = _tandem_student_path(base.teacher, source)
            own = shipped or (read_student_info(path) if has_description(path) else None)
        if own is not None:
            changes["defaults"] = {**base.defaults, "num_inference_steps": own.steps,
                                   "guidance_scale": own.guidance_scale}
    if scorer is not None:
        changes["scorer"] = scorer
    if controlnet is not None:
        changes["controlnet"] = controlnet
    if teacher_kind is not None:
        if teacher_kind not in TEACHER_KINDS:
            raise ValueError(f"teacher_kind must be one of {', '.join(TEACHER_KINDS)}, got {teacher_kind!r}")
        changes["teacher_kind"] = teacher_kind
    if not changes:
        return base
    parts = ", ".join(f"{k} {v}" for k, v in changes.items() if k not in ("student_kind", "edit_student"))
    # a calibration belongs to one student, oracle and ControlNet: a shipped student's own calibration (made
    # with the teacher's oracle) survives only the change of student
    calibration = None
    if student is not None and shipped is not None and shipped.calibration and not any(
            (scorer, controlnet, base.controlnet)):
        calibration = shipped.calibration
    return dataclasses.replace(base, **changes, name=base.name if base.name.endswith("+custom") else
                               f"{base.name}+custom", description=f"{base.name} with {parts}",
                               calibration=calibration, edit_calibrations={}, routes=None, draft_calibrations={},
                               predictor=None)


def _shipped(teacher: str) -> dict:
    """The students ``teacher`` ships, by name (``tandem world students``); none for a teacher that does not
    resolve here (a hub id is only looked at when it loads)."""
    try:
        return resolve_model(teacher).students
    except (ValueError, FileNotFoundError):
        return {}


def _tandem_student_path(teacher: str, source: str) -> Path:
    return student_dir(resolve_model(teacher), None if source == "world" else source)


def preset_to_json(preset: Preset) -> dict:
    """The fields of ``preset`` as JSON data (local paths made absolute, so the file works from anywhere)."""
    data = dataclasses.asdict(preset)
    for key in ("teacher", "student", "controlnet", "calibration", "edit_student", "routes", "predictor"):
        value = data.get(key)
        if isinstance(value, str) and value not in PRESETS and Path(value).exists():
            data[key] = str(Path(value).resolve())
    if isinstance(data.get("scorer"), str):
        kind, sep, rest = data["scorer"].partition(":")
        if sep and Path(rest).exists():
            data["scorer"] = f"{kind}:{Path(rest).resolve()}"
    for key in ("edit_calibrations", "draft_calibrations"):
        data[key] = {str(k): str(Path(v).resolve()) if Path(v).exists() else v for k, v in getattr(preset, key).items()}
    return data


def write_preset_file(preset: Preset, path: str | Path, overwrite: bool = False) -> Path:
    """Save ``preset`` as a JSON preset file (``tandem preset save``), checked first (:func:`validate_preset`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    validate_preset(preset, f"preset {preset.name} (not written to {path})")
    atomic_write_text(path, json.dumps(preset_to_json(preset), indent=2) + "\n")
    return path


def read_preset_file(path: str | Path) -> Preset:
    """A :class:`Preset` from a JSON preset file, checked (:func:`validate_preset`); relative paths in it are
    relative to the file. A ``ValueError`` names the file and the field that is wrong."""
    path = Path(path)
    data = read_json_file(path, "preset file")
    names = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"preset file {path}: unknown field(s) {', '.join(unknown)}; "
                         f"expected {', '.join(sorted(names))}")
    data.setdefault("name", path.stem)
    data.setdefault("description", f"preset file {path}")
    data.setdefault("scorer", None)
    for key in ("teacher", "student", "student_kind"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"preset file {path}: '{key}' must be a string")
    for key in ("defaults", "edit_calibrations", "draft_calibrations"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"preset file {path}: '{key}' must be an object")
    for key in ("teacher", "student", "controlnet", "edit_student"):  # a model: a local path, or a hub id
        value = data.get(key)
        if isinstance(value, str) and value not in ("world",) and not value.startswith("world:") and \
                not Path(value).is_absolute() and (path.parent / value).exists():
            data[key] = str(path.parent / value)
    for key in ("calibration", "routes", "predictor"):  # a file: the world's, or one relative to the preset file
        data[key] = _beside(path, data.get(key))
    edit_calibrations = {}
    for strength, spec in data.get("edit_calibrations", {}).items():
        try:
            strength = float(strength)
        except ValueError:
            raise ValueError(f"preset file {path}: edit_calibrations key {strength!r} is not an SDEdit strength "
                             "(a number in (0, 1])") from None
        edit_calibrations[strength] = _beside(path, spec)
    data["edit_calibrations"] = edit_calibrations
    drafts = {}
    for n, spec in data.get("draft_calibrations", {}).items():
        if not (isinstance(n, str) and n.isdigit() and int(n) > 1):
            raise ValueError(f"preset file {path}: draft_calibrations key {n!r} is not a number of drafts (an "
                             "integer above 1)")
        drafts[int(n)] = _beside(path, spec)
    data["draft_calibrations"] = drafts
    return validate_preset(Preset(**data), f"preset file {path}")


def _beside(preset_path: Path, spec):
    """A file a preset file names: ``world``, ``world:NAME`` and absolute paths as they are, others relative to
    the preset file."""
    if not isinstance(spec, str) or spec == "world" or spec.startswith("world:") or Path(spec).is_absolute():
        return spec
    return str(preset_path.parent / spec)


def preset_file_path(spec: str) -> Path:
    """Where a preset's calibration, route table or edit calibration ``spec`` lies: ``world`` is the shipped
    calibration, ``world:NAME`` the shipped world's file NAME, anything else a path."""
    return world_calibration_path() if spec == "world" else world_file(spec)


def validate_preset(preset: Preset, where: str) -> Preset:
    """The one check of a preset kept as a file, which :func:`read_preset_file` and :func:`write_preset_file`
    both make: its kinds, each default setting in its range (:func:`check_setting`), and the calibration, route
    table and edit calibrations it names, which must exist. A ``ValueError`` starts with ``where`` (the file) and
    names the field; returns ``preset``."""
    if preset.student_kind not in STUDENT_KINDS:
        raise ValueError(f"{where}: student_kind must be one of {', '.join(STUDENT_KINDS)}, "
                         f"got {preset.student_kind!r}")
    if preset.teacher_kind not in TEACHER_KINDS:
        raise ValueError(f"{where}: teacher_kind must be one of {', '.join(TEACHER_KINDS)}, "
                         f"got {preset.teacher_kind!r}")
    for key in ("defaults", "edit_calibrations", "draft_calibrations"):
        if not isinstance(getattr(preset, key), dict):
            raise ValueError(f"{where}: '{key}' must be an object")  # noqa: TRY004
    unknown = sorted(set(preset.defaults) - set(SETTING_RULES))
    if unknown:
        raise ValueError(f"{where}: unknown default setting(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(SETTING_RULES)}")
    for key, value in preset.defaults.items():
        try:
            check_setting(key, value)
        except ValueError as e:
            raise ValueError(f"{where}: default setting {e}") from None
    files = {"calibration": preset.calibration, "routes": preset.routes, "predictor": preset.predictor}
    for strength, spec in preset.edit_calibrations.items():
        try:
            finite_number(strength, "strength", low=0, low_open=True, high=1)
        except ValueError as e:
            raise ValueError(f"{where}: edit_calibrations key: SDEdit {e}") from None
        files[f"edit_calibrations[{strength:g}]"] = spec
    for n, spec in preset.draft_calibrations.items():
        files[f"draft_calibrations[{n}]"] = spec
    for key, spec in files.items():
        if spec is None:
            continue
        if not isinstance(spec, str):
            raise ValueError(f"{where}: '{key}' must be a file path (a string), got {spec!r}")  # noqa: TRY004
        found = preset_file_path(spec)
        if not found.is_file():
            looked = f" (looked for {found})" if str(found) != spec else ""
            raise ValueError(f"{where}: '{key}' names {spec}, which does not exist{looked}")
    return preset


def world_calibration_path() -> Path:
    return world_dir() / "calibration.json"


def world_file(spec: str) -> Path:
    """``world:NAME`` -> the shipped world's file or directory NAME; anything else is a path."""
    return world_dir() / spec.split(":", 1)[1] if spec.startswith("world:") else Path(spec)


