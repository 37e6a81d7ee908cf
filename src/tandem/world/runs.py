"""What every training shares besides the Trainer itself (:mod:`tandem.distill.trainer`, which runs
the distillation methods and the world's component trainings alike): the checks of a training
config's numbers, the run-directory checks and the reading of checkpoint files.

Run directories follow one contract:

- a new run needs a new or empty ``--out`` (a directory holding anything else, the user's own
  files above all, is refused before anything is written or loaded), and the directory must
  be writable (created and probed before any model is loaded);
- ``--resume`` continues the run whose ``train_config.json`` matches the requested config
  (except ``max_steps``), from its last checkpoint, or from step 0 when it was stopped before
  its first one; a checkpoint past ``max_steps`` is refused;
- checkpoints hold tensors and plain data only and are read with ``torch.load(weights_only=True)``:
  reading a checkpoint never runs code, and a file that would is refused.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..checks import count, finite_number
from ..outputs import PROBE_PREFIX, atomic_write_text

RUN_CONFIG = "train_config.json"
# what a run killed before it wrote anything else may leave behind: a write probe, or the
# hidden temporary file of its train_config.json (tandem.outputs.atomic_path names it so)
_LEFTOVER = re.compile(rf"^({re.escape(PROBE_PREFIX)}|\.train_config\.json\.).*\.tmp$")


# -- configuration checks ------------------------------------------------------------------------------


def require_number(value: Any, name: str, *, integer: bool = False, at_least: float | None = None,
                   above: float | None = None, below: float | None = None, at_most: float | None = None) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number (a whole number if
    ``integer``) within the given bounds: ``at_least <= value``, ``above < value``, ``value < below``,
    ``value <= at_most`` (the checks of :mod:`tandem.checks`)."""
    if integer:
        n = count(value, name, minimum=int(at_least) if at_least is not None else -(2**63))
        finite_number(n, name, high=at_most)
        return
    low, low_open = (above, True) if above is not None else (at_least, False)
    high, high_open = (below, True) if below is not None else (at_most, False)
    finite_number(value, name, low=low, high=high, low_open=low_open, high_open=high_open)


def require_decay(value: Any, name: str) -> None:
    """An EMA decay: a finite number in [0, 1)."""
    require_number(value, name, at_least=0.0, below=1.0)


def require_probability(value: Any, name: str) -> None:
    require_number(value, name, at_least=0.0, at_most=1.0)


def require_training_fields(cfg: Any) -> None:
    """The fields every world training config has: ``seed``, ``max_steps``, ``lr`` (0 is allowed: a run
    that must leave its warm start unchanged), ``warmup_steps``, ``checkpoint_every`` and ``threads``."""
    require_number(cfg.seed, "seed", integer=True, at_least=0)
    require_number(cfg.max_steps, "max_steps", integer=True, at_least=1)
    require_number(cfg.lr, "lr", at_least=0.0)
    require_number(cfg.warmup_steps, "warmup_steps", integer=True, at_least=0)
    require_number(cfg.checkpoint_every, "checkpoint_every", integer=True, at_least=1)
    require_number(cfg.threads, "threads", integer=True, at_least=1)


# -- run directories -----------------------------------------------------------------------------------


def check_new_run_dir(path: Path, run_markers: tuple[str, ...], keep: tuple[str, ...] = (),
                      what: str = "a training run") -> None:
    """Refuse ``path`` for a new run unless it is absent or an empty directory (``keep``: names it may
    already hold, e.g. a data cache). Nothing is written."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise NotADirectoryError(f"--out {path} exists and is not a directory")
    try:
        names = sorted(p.name for p in path.iterdir() if not _LEFTOVER.match(p.name))
    except OSError as e:
        raise ValueError(f"--out {path} cannot be read ({e.strerror or e})") from None
    if any(n in run_markers for n in names):
        raise FileExistsError(f"{path} already holds {what}; pass --resume to continue it or choose another --out")
    foreign = [n for n in names if n not in keep]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(f"--out {path} is not empty (it holds {foreign[0]!r}{more}); a new run needs a new "
                              "or empty directory (--resume continues a run stopped in it)")


def trim_log(path: Path, step: int) -> None:
    """Drop a resumed run's log records past its checkpoint ``step`` (the resumed run logs them again)
    and a last line a crash cut short, so the log reads as an uninterrupted run's."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # only the last line can lack its newline: a write cut short by a crash
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            continue
        keep.append(line)
    atomic_write_text(path, "".join(keep))


# -- checkpoint files ------------------------------------------------------------------------------------


def load_checkpoint_file(path: Path, mmap: bool = False) -> Any:
    """A file written by ``torch.save`` of tensors and plain data, read with ``weights_only=True``: a
    file that holds anything else (an object whose unpickling would run code) is refused, never run.
    A missing, truncated or corrupt file is a one-line error naming it. ``mmap``: map the tensors
    instead of reading them (a cheap check of a large file)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one lacks its directory
        raise ValueError(f"checkpoint {path} is unreadable (truncated?): it is not the archive torch.save writes")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if str(e).startswith("Weights only load failed"):
            raise ValueError(f"checkpoint {path} holds objects other than tensors and plain data; tandem "
                             "never unpickles code, so it refuses to load it (not a tandem checkpoint?)") from None
        raise ValueError(f"checkpoint {path} is unreadable (truncated?): {type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file (EOFError, OSError, RuntimeError)
        raise ValueError(f"checkpoint {path} is unreadable (truncated?): {type(e).__name__}") from None


def restore_entry(obj: Any, checkpoint: Any, keys: tuple[str, ...], path: Path) -> None:
    """``obj.load_state_dict(checkpoint[keys[0]][keys[1]]...)``, with a one-line error naming the file
    ``path`` and the entry when the checkpoint lacks it or its state does not fit ``obj``."""
    entry = "/".join(keys)
    state = checkpoint
    for key in keys:
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"checkpoint {path} holds no {entry!r}; it is not this run's")
        state = state[key]
    try:
        obj.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} ({entry}) does not fit this run: {first}") from None


def config_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
