"""Where models come from: the embedded ``world`` preset (shipped inside the package) or a
diffusers Stable Diffusion repository given by local path or hub id."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from .checks import quote, read_json_file
from .hub import check_model_dir, from_hub, is_dir, quiet_hub_libraries, written_as_path
from .students import _load_student_dir, check_student_dir, has_description, read_student_info

WORLD = "world"
SCHEDULERS = ("dpm", "ddim", "unipc")


# The world's study students (ablations and baselines: ``"study": true`` in ``tandem.json``, their ``path``
# relative to this folder) live in the repository beside the package, not in it: a checkout has them, an
# installed wheel lists them without their weights.
STUDY_STUDENTS = Path(__file__).resolve().parents[2] / "study" / "world-students"


def world_dir() -> Path:
    """The shipped ShapesWorld model directory (a Stable Diffusion repository layout)."""
    return Path(str(files("tandem") / "assets" / "world"))


@dataclass(frozen=True)
class TeacherDefaults:
    steps: int = 25
    scheduler: str = "dpm"
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class StudentDefaults:
    path: str  # the student directory (unet/, scheduler/, student.json), relative to the model or absolute
    steps: int = 4
    guidance_scale: float = 4.0
    calibration: str | None = None  # its oracle calibration (`tandem calibrate`), relative to the model or absolute
    study: bool = False  # a study student: ``path`` is under STUDY_STUDENTS (a checkout's), not the model's


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # a local directory or a hub id
    is_world: bool
    teacher: TeacherDefaults = field(default_factory=TeacherDefaults)
    student: StudentDefaults | None = None  # the model's preset student, if it ships one
    students: dict[str, StudentDefaults] = field(default_factory=dict)  # shipped students by name
    unet: str | None = None  # a student directory whose UNet and scheduler replace the teacher's


def resolve_model(name: str) -> ModelSpec:
    """``world`` -> the shipped world; an existing directory -> that repository; ``org/name`` -> a hub id.

    A name written as a path (``/``, ``./``, ``../`` or ``~`` in front, more than one ``/``, or ``org/name``
    where ``org/`` is a directory here) that is not a directory is an error naming it, not a hub id
    that the hub would be asked for."""
    if name == WORLD:
        root = world_dir()
        if not (root / "model_index.json").exists():
            raise FileNotFoundError(f"the shipped world is missing from {root}; reinstall tandem")
        meta = _read_meta(root / "tandem.json")
        return ModelSpec(WORLD, str(root), True, _teacher_defaults(root / "tandem.json", meta), _student(root, meta),
                         _students(root, meta))
    path = Path(name).expanduser() if name.startswith("~") else Path(name)
    if is_dir(path):
        if not (path / "model_index.json").exists() and (path / "student.json").is_file():
            return _student_as_teacher(name, path)
        if not (path / "model_index.json").exists():
            raise ValueError(f"model directory {quote(name)} has no model_index.json (not a diffusers pipeline)")
        meta_path = path / "tandem.json"
        if meta_path.exists():
            meta = _read_meta(meta_path)
            return ModelSpec(name, str(path), bool(meta.get("world", False)), _teacher_defaults(meta_path, meta),
                             _student(path, meta), _students(path, meta))
        return ModelSpec(name, str(path), False)
    why_a_path = written_as_path(name)
    if _exists(path):
        raise ValueError(f"model {quote(name)} is a file, not a directory (expected 'world', a diffusers model "
                         "directory or a hub id 'org/name')")
    if why_a_path:
        raise ValueError(f"model {quote(name)}: no such directory ({why_a_path}, so it is not read as a hub id "
                         "'org/name')")
    if name.count("/") == 1 and all(name.split("/")):
        return ModelSpec(name, name, False)
    raise ValueError(f"unknown model {quote(name)}; expected 'world', a diffusers model directory or a hub id "
                     "'org/name'")


def _student_as_teacher(name: str, path: Path) -> ModelSpec:
    """A ``tandem distill`` student used as a teacher: its UNet and sampler on its own teacher's VAE and
    text encoder. Only a student sampled with classifier-free guidance (a knowledge-distilled one) is a
    teacher as the pipelines and distillations expect one (an ε-model called with and without the caption)."""
    import dataclasses
    info = read_student_info(path)
    if info.guidance != "classifier-free":
        raise ValueError(f"student {quote(str(path))} takes guidance through a {info.guidance}, so it cannot be a "
                         "teacher (a teacher is guided classifier-free, e.g. a knowledge-distilled student)")
    source = info.teacher.get("name") if info.teacher.get("name") == WORLD else info.teacher.get("path")
    if not source:
        raise ValueError(f"student {quote(str(path))} does not say which teacher it came from (student.json 'teacher')")
    base = resolve_model(source)
    if base.unet is not None:
        raise ValueError(f"student {quote(str(path))} was distilled from another student; give that chain's first "
                         "teacher's student directly")
    defaults = TeacherDefaults(steps=info.steps, scheduler=base.teacher.scheduler, guidance_scale=info.guidance_scale,
                               height=base.teacher.height, width=base.teacher.width)
    return dataclasses.replace(base, name=name, teacher=defaults, unet=str(path))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _read_meta(path: Path) -> dict:
    """A world's ``tandem.json`` (preset defaults), or a ``ValueError`` naming the file."""
    meta = read_json_file(path, "model metadata")
    if not isinstance(meta.get("teacher"), dict):
        raise ValueError(f"{path} has no 'teacher' settings object (expected tandem's model metadata)")  # noqa: TRY004
    return meta


def _teacher_defaults(path: Path, meta: dict) -> TeacherDefaults:
    try:
        return TeacherDefaults(**meta["teacher"])
    except TypeError as e:
        raise ValueError(f"{path}: bad 'teacher' settings ({e})") from None


def _student(root: Path, meta: dict) -> StudentDefaults | None:
    if "student" not in meta:
        return None
    return _student_entry(root, meta["student"], root / "tandem.json", "student")


def _student_entry(root: Path, entry, where: Path, name: str) -> StudentDefaults:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ValueError(f"{where}: student {name!r} needs a 'path'")
    if not isinstance(entry.get("study", False), bool):
        raise ValueError(f"{where}: student {name!r}: 'study' must be true or false")
    try:
        paths = {k: str((STUDY_STUDENTS if k == "path" and entry.get("study") else root) / entry[k])
                 for k in ("path", "calibration") if isinstance(entry.get(k), str)}
        return StudentDefaults(**{**entry, **paths})
    except TypeError as e:
        raise ValueError(f"{where}: bad settings of student {name!r} ({e})") from None


def _students(root: Path, meta: dict) -> dict[str, StudentDefaults]:
    """The students a model ships, by name (``tandem.json``'s ``students``)."""
    entries = meta.get("students", {})
    if not isinstance(entries, dict):
        raise ValueError(f"{root / 'tandem.json'}: 'students' must be an object of name -> settings")
    return {name: _student_entry(root, entry, root / "tandem.json", name) for name, entry in entries.items()}


def student_dir(spec: ModelSpec, student: str | Path | None) -> Path:
    """The student directory to use: ``student`` (a directory, or the name of a student the model ships:
    ``tandem world students``) if given, else the model's preset student."""
    if student is None:
        if spec.student is None:
            raise ValueError(f"model {spec.name!r} ships no student; give student=... (the student/ directory "
                             "written by `tandem distill`)")
        return Path(spec.student.path)
    _check_study_student(spec, student)
    if str(student) in spec.students:
        return Path(spec.students[str(student)].path)
    path = Path(student)
    if not path.is_dir() and spec.students and "/" not in str(student):
        raise ValueError(f"no student {quote(str(student))}: not a directory, nor a student {spec.name} ships "
                         f"({', '.join(spec.students)})")
    return check_student_dir(path)


def _check_study_student(spec: ModelSpec, student: str | Path) -> None:
    """A ``ValueError`` saying where to get it if ``student`` (a name, or the path a name resolved to) is a
    study student whose folder is absent (an installed wheel: study students live in a checkout)."""
    for name, entry in spec.students.items():
        if entry.study and str(student) in (name, entry.path) and not is_dir(Path(entry.path)):
            raise ValueError(f"student {name!r} is a study student, not in the installed tandem package: use it from "
                             f"a checkout of the tandem repository (study/world-students/{name}), whose "
                             "study/world-students/README.md gives the command that remakes it")


def student_defaults(spec: ModelSpec, student: str | Path | None) -> StudentDefaults:
    """Path, default steps and guidance of a student: the model's entry for a shipped (or the preset)
    student, else what the student's own ``student.json`` says."""
    if student is None and spec.student is not None:
        return spec.student
    if student is not None and str(student) in spec.students:
        _check_study_student(spec, student)
        return spec.students[str(student)]
    path = student_dir(spec, student)
    if not has_description(path):  # an LCM student without student.json: the teacher's guidance
        return StudentDefaults(path=str(path), steps=4, guidance_scale=spec.teacher.guidance_scale)
    info = read_student_info(path)
    return StudentDefaults(path=str(path), steps=info.steps, guidance_scale=info.guidance_scale)


def encode_captions(tokenizer, text_encoder, captions: list[str], device=None) -> torch.Tensor:
    """Per-token text embeddings [B, L, D] as Stable Diffusion pipelines compute them (padded to the
    tokenizer's ``model_max_length``, last hidden state)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device if device is not None else text_encoder.device))[0]


def load_teacher_pipeline(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A ``diffusers.StableDiffusionPipeline`` for the teacher of ``spec``."""
    from diffusers import StableDiffusionPipeline

    quiet_hub_libraries()
    if is_dir(Path(spec.path)):
        check_model_dir(spec.path)
    if spec.unet is not None:  # a student as the teacher: its UNet and scheduler
        return _load_student_dir(spec.unet, spec.path, device=device, dtype=dtype)
    kwargs = {"dtype": dtype}
    if not spec.is_world:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = from_hub(StableDiffusionPipeline.from_pretrained, spec.path, "model", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_scheduler(name: str, base_config: dict):
    """A sampler for ``name`` (dpm = DPM-Solver++ 2M, ddim, unipc) built from a pipeline's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(base_config)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
