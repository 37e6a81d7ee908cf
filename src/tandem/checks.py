"""Checks at the library's boundaries, each failing loudly with a ``ValueError`` that names the problem:
numbers that must be finite and in range, step counts a sampler can take, tensors a model produced,
JSON files that must hold an object, model weights on disk (whole safetensors, never pickles) and the
loading of a model directory, optional packages, and user text quoted in an error message (cut to a
readable length).

Imports no torch at module level: the caption grammar quotes with it, and the command line loads
the grammar before it knows whether it needs a model."""

from __future__ import annotations

import copy
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

QUOTE_LIMIT = 80  # characters of user text an error message quotes
# Upper bounds of the architecture options (channels, widths, depths) a user may ask for: anything past them is
# refused before a single tensor is allocated (Stable Diffusion's widest UNet block has 1280 channels).
MAX_WIDTH = 4096  # channels of a block, or the token width of a transformer
MAX_DEPTH = 64  # layers, blocks or levels of one stack
# Weights a ``torch.load`` would unpickle (and a pickle can run code): tandem reads safetensors only.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class NonFiniteError(ValueError):
    """A model produced NaN or infinity (broken weights, an overflowing dtype or extreme settings):
    the run stops instead of returning black or garbled images."""


class MissingPackageError(ImportError, ValueError):
    """An optional package a feature needs is missing (or fails to import); the message names it and the
    ``pip install`` that brings it. A ``ValueError`` too, so the command line reports it in one line."""


def quote(text, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, or for text longer than ``limit`` characters its first ``limit`` characters,
    an ellipsis and the full length: ``'a red circle a red ...'… (100000 characters)``."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _show(value) -> str:
    """A value for an error message: strings and long reprs cut by ``quote``."""
    return quote(value) if isinstance(value, str) else repr(value) if len(repr(value)) <= QUOTE_LIMIT \
        else quote(repr(value))


def _real(value, name: str) -> float:
    """``value`` as a float if it is one real number (not a bool, a string or a multi-element tensor)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array or torch tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a ValueError, as every bad argument is
        raise ValueError(f"{name} must be a number, got {_show(value)}")  # noqa: TRY004
    try:
        return float(value)
    except OverflowError:  # an integer past float's range (10**400): as infinite as a float can say
        return math.inf if value > 0 else -math.inf


def finite_number(value, name: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` when it is not a real number, is NaN or
    infinite, or lies outside ``[low, high]`` (an end excluded where ``low_open``/``high_open``)."""
    x = _real(value, name)
    interval = _interval(low, high, low_open, high_open)
    if not math.isfinite(x):
        got = (f"a whole number of {int(math.log10(abs(value))) + 1} digits" if isinstance(value, numbers.Integral)
               else x)  # past float's range: 10**400 is no infinity
        raise ValueError(f"{name} must be a finite number{' ' + interval if interval else ''}, got {got}")
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    if below or above:
        raise ValueError(f"{name} must be {interval}, got {x:g}")
    return x


def _interval(low, high, low_open, high_open) -> str:
    """The allowed range in words: ">= 0", "> 0", "<= 1", "in (0, 1]"."""
    if low is None and high is None:
        return ""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def threshold_value(value, name: str = "accept_threshold") -> float:
    """A cut-off tau: any real number but NaN (every comparison with NaN is false, so no image would go
    to the teacher). +inf sends every image to the teacher, -inf none."""
    x = _real(value, name)
    if math.isnan(x):
        raise ValueError(f"{name} must be a number, got nan (no score is below a NaN threshold)")
    return x


def count(value, name: str, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (steps, batch sizes, seeds): ints and whole floats (4.0) pass;
    NaN, infinity, 2.5, bools and strings are a ``ValueError`` naming ``name``."""
    whole = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral)
        or isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if not whole:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {_show(value)}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _runs(scheduler, steps: int) -> bool:
    """Whether ``scheduler`` (modified) takes ``steps`` steps at distinct timesteps inside its training range."""
    if steps > scheduler.config.num_train_timesteps:  # never: and a linspace of 10**9 steps would fill the memory
        return False
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, IndexError, ZeroDivisionError):
        return False
    ts = scheduler.timesteps
    ts = np.asarray(ts.cpu() if hasattr(ts, "cpu") else ts)
    total = scheduler.config.num_train_timesteps
    # second-order samplers (Heun) repeat each timestep by design: count distinct ones
    return len(np.unique(ts)) >= steps and ts.min() >= 0 and ts.max() < total


def sampler_step_limit(scheduler) -> int:
    """The most steps ``scheduler`` (not modified) can take: an LCM scheduler's distillation grid
    (``original_inference_steps``), any other at most its ``num_train_timesteps``, fewer where its
    spacing rounds two steps onto one timestep (DPM-Solver++ and UniPC with linspace spacing: 999 of 1000)."""
    sched = copy.deepcopy(scheduler)
    lo, hi = 0, int(sched.config.num_train_timesteps)
    if _runs(sched, hi):
        return hi
    while hi - lo > 1:  # _runs holds below the limit and fails above it
        mid = (lo + hi) // 2
        if _runs(sched, mid):
            lo = mid
        else:
            hi = mid
    return lo


def sampler_steps(value, scheduler, name: str, who: str = "the sampler") -> int:
    """``value`` as a step count that ``scheduler`` can take, checked before any model runs: a
    ``ValueError`` naming ``name`` and the limit (``who`` says whose sampler it is: "the teacher")."""
    steps = count(value, name)
    if _runs(copy.deepcopy(scheduler), steps):
        return steps
    limit = sampler_step_limit(scheduler)
    total = scheduler.config.num_train_timesteps
    original = scheduler.config.get("original_inference_steps")
    why = (f"its distillation grid has {original} timesteps" if original is not None and limit == min(original, total)
           else f"more would repeat or overrun its {total} training timesteps")
    raise ValueError(f"{name} must be at most {limit} for {who}'s {type(scheduler).__name__} ({why}), got {steps}")


MAX_TEXT_BYTES = 64 * 2**20  # the largest text input tandem reads (prompt lists, calibrations, configs)


def read_file_bytes(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (a device, a FIFO or a file without end is
    refused without reading it whole); a missing file is a ``FileNotFoundError``, anything else a ``ValueError``,
    each reading ``<what> <path> <why>``."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError(f"{what} {path} is missing")
        if not path.is_file():
            raise ValueError(f"{what} {path} is not a regular file")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} {path} is missing") from e
    except OSError as e:
        raise ValueError(f"{what} {path} is unreadable ({e.strerror or e})") from None
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit // 2**20} MB; it is not a text input of tandem's")
    return data


def read_text_file(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """:func:`read_file_bytes` as UTF-8 text (other bytes are a ``ValueError`` naming ``what`` and the file)."""
    data = read_file_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text; it is damaged, or it is not tandem's") from None


def cannot_read(error: Exception, path: str | Path, what: str) -> ValueError:
    """A :func:`read_file_bytes` failure reworded for a user's input: ``cannot read <what> '<path>': it <why>``."""
    reason = str(error).replace(f"{what} {path} ", "")
    return ValueError(f"cannot read {what} {str(path)!r}: it {reason}")


def read_text_input(path: str | Path, what: str) -> str:
    """:func:`read_text_file` for a user's input list (prompts, edits): every failure, a missing file included, is a
    ``ValueError`` that reads ``cannot read <what> '<path>': it ...`` (:func:`cannot_read`)."""
    try:
        return read_text_file(path, what)
    except (FileNotFoundError, ValueError) as error:
        raise cannot_read(error, path, what) from None


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (``what`` it is: "run config", "preset file"); a missing file is a
    ``FileNotFoundError``, anything else that is not a JSON object a ``ValueError``, each naming the file."""
    text = read_text_file(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                         "it is damaged, or it is not tandem's") from None
    if not isinstance(data, dict):  # bad file content, not a bad argument: a ValueError, which the CLI reports
        raise ValueError(f"{what} {path} does not hold a JSON object; it is not tandem's")  # noqa: TRY004
    return data


def check_finite(x, what: str, indices: Sequence[int] | None = None) -> None:
    """Raise ``NonFiniteError`` if any row of ``x`` [B, ...] holds NaN or infinity.

    Args:
        x: a model's output (a tensor or array [B, ...]), one row per image.
        what: what it is, as the subject of the message ("the student's latents").
        indices: the prompt index of each row (default 0 .. B-1), named in the message.
    """
    import torch

    t = torch.as_tensor(x)
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1) if t.ndim else ~torch.isfinite(t).reshape(1)
    if not bool(bad.any()):
        return
    rows = [int(i) for i in torch.nonzero(bad).flatten()]
    prompts = [int(indices[r]) if indices is not None else r for r in rows]
    shown = ", ".join(map(str, prompts[:10])) + (f" and {len(prompts) - 10} more" if len(prompts) > 10 else "")
    raise NonFiniteError(f"{what} are not finite (NaN/inf) for prompt{'s' if len(prompts) > 1 else ''} {shown}: "
                         "the model's weights, dtype or settings produce NaN; no image is returned")


# -- model files -----------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def check_weights(path: str | Path, what: str, skip: Sequence[str] = ()) -> Path:
    """``path``, or a ``ValueError`` naming the file a load would fail on with a library traceback, or would
    unpickle: a safetensors file cut short or not a safetensors file at all (its header must parse and
    cover the whole file), or pickled weights (``.bin``, ``.pt``, ...) with no safetensors beside them.
    Only headers are read: the tensors stay on disk.

    Args:
        path: a weights file, or a model directory (its own files; for a diffusers pipeline, those of the
            component folders its ``model_index.json`` names).
        what: what it is, for the message ("student UNet", "ControlNet").
        skip: component folders of a pipeline not to check (those given to the loader ready-made).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {quote(str(path))} does not exist")
    if path.is_file():
        _check_weight_file(path, what)
        return path
    folders = [path]
    if (path / "model_index.json").is_file():
        index = read_json_file(path / "model_index.json", "pipeline index")
        folders += [path / name for name in index if not name.startswith("_") and name not in skip]
    for folder in folders:
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        safetensors = [f for f in files if f.suffix == ".safetensors"]
        pickled = [f for f in files if f.suffix in PICKLED_SUFFIXES]
        if pickled and not safetensors:
            _refuse_pickle(pickled[0], what)
        for file in safetensors:
            _check_weight_file(file, what)
    return path


def _refuse_pickle(file: Path, what: str):
    raise ValueError(f"{what} {file} holds pickled weights ({file.suffix}): tandem loads safetensors only and never "
                     "unpickles (a pickle can run code); convert it once, where you trust it, with "
                     "save_pretrained(..., safe_serialization=True)")


def _check_weight_file(file: Path, what: str) -> None:
    from safetensors import SafetensorError, safe_open

    if file.suffix in PICKLED_SUFFIXES:
        _refuse_pickle(file, what)
    try:
        with safe_open(str(file), framework="pt") as f:  # parses the header and checks it covers the file
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what} {file} is damaged: not a whole safetensors file ({_first_line(e)}); it was cut "
                         "short or is not a safetensors file") from None


def check_model_class(path: str | Path, cls, what: str) -> None:
    """A diffusers model directory (``config.json`` with ``_class_name``) holds a ``cls``, or a ``ValueError``
    saying what it holds: diffusers would load a UNet given as a ControlNet, its missing parts left unset."""
    from diffusers import ModelMixin

    path = Path(path)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)) or not (path / "config.json").is_file():
        return
    held = read_json_file(path / "config.json", f"{what} config").get("_class_name")
    if isinstance(held, str) and held != cls.__name__:
        raise ValueError(f"{what} {quote(str(path))} holds a model of class {held} (its config.json says so), "
                         f"not {cls.__name__}")


def load_safetensors(file: str | Path, what: str) -> dict:
    """The tensors of a safetensors ``file`` (on the CPU), or a ``ValueError`` naming it (:func:`check_weights`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = check_weights(file, what)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot load {what} {file}: {_first_line(e)}") from None


def load_pretrained(load, path: str | Path, what: str, **kwargs):
    """``load(path, **kwargs)``, a diffusers or transformers ``from_pretrained`` (or any callable whose
    ``__self__`` is such a class), for a local directory, failing with one ``ValueError`` that names the
    directory or file: damaged or pickled weights (:func:`check_weights`), a model directory of another class
    (:func:`check_model_class`), weights that leave some of the model's tensors unset (the libraries would
    draw them at random, or leave them empty), and whatever else the library raises while loading.

    Args:
        what: what it is, for the message ("student UNet", "clip scorer").
        kwargs: for ``from_pretrained``; a pipeline's ready-made components (``unet=...``) are not checked.
    """
    from diffusers import ModelMixin
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    path = Path(path)
    cls = getattr(load, "__self__", None)
    check_weights(path, what, skip=tuple(kwargs))
    check_model_class(path, cls, what)
    is_model = isinstance(cls, type) and issubclass(cls, ModelMixin | PreTrainedModel)
    try:
        loaded = load(str(path), **({"output_loading_info": True} if is_model else {}), **kwargs)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, NotImplementedError, SafetensorError) as e:
        raise ValueError(f"cannot load {what} {quote(str(path))}: {_first_line(e)}") from e
    if not is_model:
        return loaded
    model, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{what} {quote(str(path))} has no weights for {len(missing)} of the {cls.__name__}'s "
                         f"tensors (e.g. {missing[0]}): it holds another model")
    return model


def first_difference(saved, requested, where: str = "") -> str | None:
    """Where two JSON-like values first differ, as ``"key.path: saved X, requested Y"`` (None if equal): what a
    mismatch message names instead of both values whole."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        for key in sorted(set(saved) | set(requested), key=str):
            if key not in saved or key not in requested:
                side = "saved only" if key in saved else "requested only"
                return f"{where}{key} ({side})"
            found = first_difference(saved[key], requested[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(requested, list) and len(saved) == len(requested):
        for i, (a, b) in enumerate(zip(saved, requested)):
            found = first_difference(a, b, f"{where}{i}.")
            if found:
                return found
        return None
    if saved != requested:
        return f"{where.rstrip('.') or 'value'}: saved {_short(saved)}, requested {_short(requested)}"
    return None


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
