"""Where models come from: the embedded ``world`` preset (shipped inside the package) or a
diffusers Stable Diffusion repository given by local path or hub id."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from .checks import load_pretrained, quote, read_json_file

WORLD = "world"
SCHEDULERS = ("dpm", "ddim", "unipc")
# A diffusers Stable Diffusion directory: each component's folder and the file that configures it.
SD_LAYOUT = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "tokenizer": None, "scheduler": "scheduler_config.json"}


def check_model_dir(path: str | Path, components: tuple[str, ...] | None = None,
                    layout: dict[str, str | None] = SD_LAYOUT,
                    expected: str = "a diffusers Stable Diffusion directory") -> None:
    """Raise a ``ValueError`` naming the first folder or config file of ``layout`` (only ``components`` of
    it, if given) that ``path`` lacks; diffusers would report only "no file named config.json"."""
    path = Path(path)
    folders = ", ".join(f"{name}/" for name in layout)
    for name, config in layout.items():
        if components is not None and name not in components:
            continue
        if not (path / name).is_dir():
            raise ValueError(f"{path} has no {name}/ (expected {expected} with {folders})")
        if config is not None and not (path / name / config).is_file():
            raise ValueError(f"{path / name} has no {config} (expected {expected} with {folders})")


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
    if _is_dir(path):
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
    why_a_path = _written_as_path(name)
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

    from .students import read_student_info

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


def _written_as_path(name: str) -> str | None:
    """Why ``name`` (not an existing directory) is a path rather than a hub id ``org/name``, or None."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return "it is written as a path"
    if "\\" in name or name.count("/") > 1:
        return "a hub id has one '/'"
    org = name.split("/")[0] if name.count("/") == 1 else None
    if org and _is_dir(Path(org)):
        return f"{org}/ exists here"
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to be a path, say
        return False


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
    try:
        paths = {k: str(root / entry[k]) for k in ("path", "calibration") if isinstance(entry.get(k), str)}
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
    from .students import check_student_dir

    if student is None:
        if spec.student is None:
            raise ValueError(f"model {spec.name!r} ships no student; pass --student DIR "
                             "(the student/ directory written by `tandem distill`)")
        return Path(spec.student.path)
    if str(student) in spec.students:
        return Path(spec.students[str(student)].path)
    path = Path(student)
    if not path.is_dir() and spec.students and "/" not in str(student):
        raise ValueError(f"no student {quote(str(student))}: not a directory, nor a student {spec.name} ships "
                         f"({', '.join(spec.students)})")
    return check_student_dir(path)


def student_defaults(spec: ModelSpec, student: str | Path | None) -> StudentDefaults:
    """Path, default steps and guidance of a student: the model's entry for a shipped (or the preset)
    student, else what the student's own ``student.json`` says."""
    from .students import has_description, read_student_info

    if student is None and spec.student is not None:
        return spec.student
    if student is not None and str(student) in spec.students:
        return spec.students[str(student)]
    path = student_dir(spec, student)
    if not has_description(path):  # an LCM student without student.json: the teacher's guidance
        return StudentDefaults(path=str(path), steps=4, guidance_scale=spec.teacher.guidance_scale)
    info = read_student_info(path)
    return StudentDefaults(path=str(path), steps=info.steps, guidance_scale=info.guidance_scale)


def load_student_pipeline(spec: ModelSpec, student: str | Path | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The student (``student``, a directory or a shipped name; default: the model's preset student) as a
    diffusers pipeline with the model's VAE and text encoder (:func:`tandem.students.load_student`)."""
    from .students import load_student

    quiet_hub_libraries()
    if _is_dir(Path(spec.path)):  # the model's parts first: a student is no use without them
        check_model_dir(spec.path, ("vae", "text_encoder", "tokenizer"))
    path = student_dir(spec, student)
    return load_student(path, spec, device=device, dtype=dtype)


# -- the hub ---------------------------------------------------------------------------------------

HUB_PROBE_SECONDS = 60.0  # how long one answer to "is the hub reachable?" is reused
_hub_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when asked, why unreachable or None)
# Exceptions (by class name, anywhere in their hierarchy) that mean the hub did not answer, for the
# HTTP clients of old and new huggingface_hub (requests, httpx) and the OS underneath.
_NETWORK_ERRORS = frozenset({
    "ConnectionError", "ConnectTimeout", "ConnectError", "ProxyError", "ReadTimeout", "Timeout", "TimeoutError",
    "TimeoutException", "TransportError", "NetworkError", "gaierror", "OfflineModeIsEnabled",
    "LocalEntryNotFoundError"})
_NETWORK_WORDS = ("couldn't connect", "offline", "max retries", "name or service not known",
                  "connection refused", "network is unreachable")


def hub_unreachable(timeout: float | None = None) -> str | None:
    """None when the Hugging Face hub answers one request (no retries) within ``timeout`` seconds
    [``HF_HUB_ETAG_TIMEOUT``, 10]; else why not, in one line: offline mode (``HF_HUB_OFFLINE=1``) or the
    connection's error. An answer is reused for ``HUB_PROBE_SECONDS``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is enabled (HF_HUB_OFFLINE=1)"
    endpoint = constants.ENDPOINT
    asked = _hub_probes.get(endpoint)
    if asked is not None and time.monotonic() - asked[0] < HUB_PROBE_SECONDS:
        return asked[1]
    from huggingface_hub.utils import get_session

    why = None
    try:
        get_session().head(endpoint, timeout=timeout if timeout is not None else constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # noqa: BLE001 -- whatever stops one request stops the loading after it
        why = f"{endpoint}: {_first_line(e)}"
    _hub_probes[endpoint] = (time.monotonic(), why)
    return why


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _network_cause(exc: BaseException) -> BaseException | None:
    """The innermost exception in ``exc``'s chain (``__cause__``/``__context__``) that says the hub did not
    answer (a connection or timeout error, offline mode, a file neither on the hub nor cached), or None."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc).lower()
        if names & _NETWORK_ERRORS or any(word in text for word in _NETWORK_WORDS):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


def hub_error(source: str, what: str, exc: BaseException, unreachable: str | None = None) -> ValueError:
    """A one-line ``ValueError`` for a failure to load ``what`` ("model", "student", "scorer") from ``source``:
    for a hub id that failed because the hub did not answer (``unreachable``, from :func:`hub_unreachable`,
    or a network error in ``exc``'s chain), "{what} {source!r} is not a local directory, and the hub is
    unreachable: <why>"; otherwise "cannot load {what} {source!r}: <first line of exc>"."""
    if not _is_dir(Path(source)):
        cause = _network_cause(exc)
        why = unreachable or (_first_line(cause) if cause is not None else None)
        if why:
            return ValueError(f"{what} {quote(source)} is not a local directory, and the hub is unreachable: {why}")
    return ValueError(f"cannot load {what} {quote(source)}: {_first_line(exc)}")


def from_hub(load: Callable, source: str, what: str, **kwargs):
    """``load(source, **kwargs)`` (a diffusers or transformers ``from_pretrained``) for a local directory or
    a hub id, failing with one line: for a directory, :func:`tandem.checks.load_pretrained`'s (damaged or
    pickled weights, a directory of another model class, missing weights, named); for a hub id,
    :func:`hub_error`'s. The hub is asked first (:func:`hub_unreachable`): if it does not answer, only the
    local cache is read (``local_files_only``), so an unreachable hub costs one request, not
    huggingface_hub's ~25 s of retries per file."""
    if _is_dir(Path(source)):
        return load_pretrained(load, source, what, **kwargs)
    why_a_path = _written_as_path(source)
    if why_a_path:
        raise ValueError(f"{what} {quote(source)}: no such directory ({why_a_path}, so it is not read as a hub "
                         "id 'org/name')")
    unreachable = hub_unreachable()
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        return load(source, **kwargs)
    except Exception as e:
        if isinstance(e, OSError) or unreachable or _network_cause(e) is not None \
                or type(e).__module__.startswith("huggingface_hub"):
            raise hub_error(source, what, e, unreachable) from e
        raise


def encode_captions(tokenizer, text_encoder, captions: list[str], device=None) -> torch.Tensor:
    """Per-token text embeddings [B, L, D] as Stable Diffusion pipelines compute them (padded to the
    tokenizer's ``model_max_length``, last hidden state)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device if device is not None else text_encoder.device))[0]


def quiet_hub_libraries() -> None:
    """Silence diffusers/transformers loading bars and info logs (tandem shows its own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_teacher_pipeline(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A ``diffusers.StableDiffusionPipeline`` for the teacher of ``spec``."""
    from diffusers import StableDiffusionPipeline

    quiet_hub_libraries()
    if _is_dir(Path(spec.path)):
        check_model_dir(spec.path)
    if spec.unet is not None:  # a student as the teacher: its UNet and scheduler
        from .students import load_student

        return load_student(spec.unet, spec, device=device, dtype=dtype)
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
