"""Run directories and checkpoints of the Trainer (:mod:`tandem.training.trainer`, which runs the distillation
methods and the world's component trainings alike): the run-directory checks, the writing and reading of
checkpoint files, the RNG states a checkpoint keeps, and what a resumed run may change.

Run directories follow one contract:

- a new run needs a new or empty ``--out`` (a directory holding anything else, the user's own
  files above all, is refused before anything is written or loaded; ``keep`` names entries it may
  already hold, such as a data cache), and the directory must be writable (created and probed
  before any model is loaded);
- ``--resume`` continues the run whose ``train_config.json`` matches the requested config
  (except :data:`RESUMABLE_CHANGES`: ``max_steps``, ``threads``, ...), from its last checkpoint, or
  from step 0 when it was stopped before its first one; a checkpoint past ``max_steps`` is refused;
- checkpoints hold tensors and plain data only and are read with ``torch.load(weights_only=True)``:
  reading a checkpoint never runs code, and a file that would is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import read_json_file
from ..outputs import PROBE_PREFIX, atomic_write_text, make_writable_dir

RUN_CONFIG = "train_config.json"
# what a run killed before it wrote anything else may leave behind: a write probe, or the
# hidden temporary file of its train_config.json (tandem.outputs.atomic_path names it so)
_LEFTOVER = re.compile(rf"^({re.escape(PROBE_PREFIX)}|\.train_config\.json\.).*\.tmp$")
CHECKPOINT_DIR = "checkpoint"


# -- run directories -----------------------------------------------------------------------------------


def check_new_run_dir(path: Path, run_markers: tuple[str, ...], keep: tuple[str, ...] = (),
                      what: str = "a training run") -> None:
    """Refuse ``path`` for a new run unless it is absent or an empty directory (``keep``: names it may
    already hold, e.g. a data cache). Nothing is written."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise NotADirectoryError(f"out_dir {path} exists and is not a directory")
    try:
        names = sorted(p.name for p in path.iterdir() if not _LEFTOVER.match(p.name))
    except OSError as e:
        raise ValueError(f"out_dir {path} cannot be read ({e.strerror or e})") from None
    if any(n in run_markers for n in names):
        raise FileExistsError(f"{path} already holds {what}; pass resume=True to continue it or choose another out_dir")
    foreign = [n for n in names if n not in keep]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(f"out_dir {path} is not empty (it holds {foreign[0]!r}{more}); a new run needs a new "
                              "or empty directory (resume=True continues a run stopped in it)")


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


def check_run_dir(out_dir: str | Path, resume: bool, max_steps: int, num_processes: int | None = None,
                  keep: tuple[str, ...] = ()) -> Path | None:
    """Check that ``out_dir`` can hold this run before any model is loaded, and create it.

    A new run needs a new or empty directory (``keep``: names it may already hold, such as a data
    cache an earlier run left for this one); a resumed one a ``train_config.json`` (read as JSON
    here) and, if it checkpointed, a checkpoint at most at ``max_steps`` (written by ``num_processes``
    processes, when given). Either way the directory is created and proved writable; nothing is
    written in it.

    Returns:
        the checkpoint directory a resumed run continues from (``None`` for a new run, or for a run
        stopped before its first checkpoint, which starts again at step 0).
    """
    path = Path(out_dir)
    if not resume:
        check_new_run_dir(path, (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", "done.json"), keep)
        make_writable_dir(path, "out_dir")
        return None
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"resume=True: no checkpoint in {path} (no {RUN_CONFIG}: no run there)")
    read_json_file(path / RUN_CONFIG, "run config")
    ckpt = find_checkpoint(path)
    if ckpt is None and (path / "done.json").exists():  # finished, then its checkpoint was removed
        raise FileNotFoundError(f"resume=True: no checkpoint in {path} (the run finished; its checkpoint is gone)")
    if ckpt is not None:
        meta = read_checkpoint_meta(ckpt)
        if meta["step"] > max_steps:
            raise ValueError(f"the checkpoint in {path} is at step {meta['step']}, past max_steps {max_steps}; "
                             f"resume with max_steps {meta['step']} or more")
        if num_processes is not None and meta["num_processes"] != num_processes:
            raise ValueError(f"resume=True: the checkpoint was written by {meta['num_processes']} processes; "
                             f"resume it with the same number (this run has {num_processes})")
        # read (tensors memory-mapped, so cheaply) now rather than after the models load: a damaged or
        # foreign checkpoint file is refused first
        for name in ("state.pt", *(f"rng-{i}.pt" for i in range(meta["num_processes"]))):
            load_checkpoint_file(ckpt / name, mmap=True)
    make_writable_dir(path, "out_dir")
    return ckpt


def find_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoint/``, or ``checkpoint.old/`` after a crash between the two renames of a save; None if neither."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
            return run_dir / name
    return None


def read_checkpoint_meta(ckpt: Path) -> dict:
    meta = read_json_file(ckpt / "meta.json", "checkpoint")
    if not all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ("step", "num_processes")):
        raise ValueError(f"checkpoint {ckpt / 'meta.json'} lacks its step or number of processes; it is damaged")
    return meta


def write_checkpoint(run_dir: Path, accelerator, state: Callable[[], dict], step: int) -> None:
    """Write ``run_dir/checkpoint/`` atomically: every process writes its RNG states (:func:`rng_state`) into a
    temporary directory, the main process ``state()`` (tensors and plain data) and ``meta.json``, then the main
    process swaps it in by renames (the previous checkpoint survives a crash). Whatever lies at the temporary and
    old names (a symlink included) is removed, never followed. Every process of ``accelerator`` calls it."""
    tmp, final, old = (run_dir / f"{CHECKPOINT_DIR}{s}" for s in (".tmp", "", ".old"))
    is_main = accelerator.is_main_process
    if is_main:
        remove_path(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if is_main:
        torch.save(state(), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes}) + "\n")
    accelerator.wait_for_everyone()
    if is_main:
        if final.exists() or final.is_symlink():
            remove_path(old)
            os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    accelerator.wait_for_everyone()


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def rng_state() -> dict:
    """This process's RNG states as tensors and plain data (what ``torch.load(weights_only=True)`` reads)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Any, path: Path) -> None:
    """Restore what :func:`rng_state` saved (read from ``path``)."""
    try:
        numpy_state, python_state = state["numpy"], state["python"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
        raise ValueError(f"checkpoint {path} holds no valid RNG state; it is damaged or not tandem's") from None


# what a resume may change: how long, on how many threads, how often it snapshots, and its learning rates (lower
# ones, after a divergence)
RESUMABLE_CHANGES = ("max_steps", "threads", "snapshot_every", "lr", "disc_lr", "critic_lr")


def without_resumable_changes(cfg: dict) -> dict:
    """The run config less what a resume may change (:data:`RESUMABLE_CHANGES`: a longer run, another
    thread count), wherever a section records it."""
    out = json.loads(json.dumps(cfg))
    for section in out.values():
        if isinstance(section, dict):
            for key in RESUMABLE_CHANGES:
                section.pop(key, None)
    return out
