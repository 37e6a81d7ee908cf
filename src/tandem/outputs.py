"""The output-directory contract shared by ``tandem generate``, ``tandem edit`` and ``tandem world render``:

    DIR/00000.png, 00001.png, ...   one image per prompt, in input order
    DIR/records.jsonl               one JSON line per image (``tandem generate``, every mode:
                                    ``tandem.pipeline.RECORD_FIELDS``, then ``RUN_RECORD_FIELDS``)
    DIR/config.json                 the exact settings of the run

A run directory is written whole or not at all. Everything goes into ``DIR.incomplete/`` beside
``DIR`` (with an ``INCOMPLETE`` marker file) and replaces ``DIR`` only when the run has finished:
a run that fails or is killed leaves ``DIR`` exactly as it was, and at most a ``DIR.incomplete/``
that says what it is (the next run into ``DIR`` clears it). A non-empty ``DIR`` is refused unless
``overwrite=True``; with it, the whole earlier run is replaced (no stale file of it stays beside
the new one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INCOMPLETE = "INCOMPLETE"  # marker file of a staging directory
PROBE_PREFIX = ".tandem-write-probe."  # the hidden file make_writable_dir creates and removes


class OutputError(ValueError):
    """An output location that cannot be used (not writable, a file, a dangling symlink, ...)."""


class OutputDir:
    """A run directory written whole or not at all (see the module docstring).

    Construction checks ``path`` and creates the staging directory, so a bad or unwritable
    ``--out`` fails before any model is loaded. Use it as a context manager: leaving the block
    normally swaps the finished run in (:meth:`commit`); an exception removes the staging
    directory and leaves ``path`` untouched. While the run is open, :attr:`path` is the staging
    directory (write everything there); after the commit it is the final directory.

    Args:
        path: the run directory (``--out``); a symlink to a directory is followed.
        overwrite: replace an earlier run in ``path`` (it stays in place until the new one is complete).
        info: written into the ``INCOMPLETE`` marker (e.g. the command), for whoever finds a killed run.
        flag: the option that named ``path``, for error messages.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, info: dict[str, Any] | None = None,
                 flag: str = "--out"):
        final = Path(path)
        if final.is_symlink():
            if not final.exists():
                raise OutputError(f"{flag} {final} is a symlink to {os.readlink(final)}, which does not exist")
            final = final.resolve()
        final = Path(os.path.abspath(final))
        if final.exists() and not final.is_dir():
            raise OutputError(f"{flag} {final} exists and is not a directory")
        if final.exists() and any(final.iterdir()) and not overwrite:
            raise FileExistsError(f"{flag} {final} is not empty; pass --overwrite to replace its contents")
        self.final = final
        self.staging = final.with_name(final.name + ".incomplete")
        _clear_staging(self.staging)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
            marker = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), "out": str(final),
                      **(info or {})}
            (self.staging / INCOMPLETE).write_text(
                "This run did not finish (it failed or was killed); it is not a result. The next run into "
                f"{final} removes it.\n" + json.dumps(marker, indent=1) + "\n")
        except OSError as e:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise OutputError(f"{flag} {final} is not writable ({e.strerror or e})") from None
        self.path = self.staging
        self.committed = False

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> None:
        """Swap the finished run in for ``path`` (the earlier run, if any, is removed after the swap)."""
        (self.staging / INCOMPLETE).unlink()
        replaced = self.final.with_name(self.final.name + ".replaced")
        if self.final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(self.final, replaced)
            os.rename(self.staging, self.final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(self.staging, self.final)
        self.path, self.committed = self.final, True

    def discard(self) -> None:
        """Remove the staging directory; ``path`` stays as it was."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def image_path(self, index: int) -> Path:
        return self.path / f"{index:05d}.png"

    def save_image(self, index: int, image: np.ndarray) -> None:
        """Save a uint8 [H, W, 3] image as DIR/<index>.png."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        save_png(self.image_path(index), image)

    def write_records(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / "records.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n"
                                                               for r in records))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=2, allow_nan=False) + "\n")


def make_writable_dir(path: str | Path, flag: str = "--out") -> None:
    """Create ``path`` (with its parents) and prove it writable with a probe file, before anything is
    loaded or computed; an :class:`OutputError` names ``flag`` and the problem."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path} is not writable ({e.strerror or e})") from None


def _clear_staging(staging: Path) -> None:
    """Remove the staging directory a killed run left behind; refuse anything else by that name."""
    if not (staging.exists() or staging.is_symlink()):
        return
    if staging.is_dir() and not staging.is_symlink() and (staging / INCOMPLETE).is_file():
        shutil.rmtree(staging)
        return
    raise OutputError(f"{staging} exists and is not an unfinished tandem run; move it away first")


def save_png(path: str | Path, image: np.ndarray | Image.Image) -> None:
    """Write a PNG atomically (a crash never leaves half an image under ``path``)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` to write into; renamed onto ``path`` when the block ends
    without an error, removed when it raises. The temporary name is new and created exclusively, so a
    file or symlink already lying beside ``path`` is never followed or overwritten; a crash leaves
    ``path`` as it was (and at most a hidden ``.NAME.*.tmp`` beside it)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the permissions of a plain write
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_file(path: str | Path, data, overwrite: bool = False) -> None:
    """Write ``data`` as an indented JSON file, atomically; an existing file only with ``overwrite``."""
    import json

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def image_grid(images: list[np.ndarray] | np.ndarray, columns: int = 8, scale: int = 4, gap: int = 2) -> np.ndarray:
    """Tile uint8 [H, W, 3] images into one uint8 image (nearest-neighbour upscaled by ``scale``)."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.full((rows * cell_h + gap, columns * cell_w + gap, 3), 64, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        big = im.repeat(scale, axis=0).repeat(scale, axis=1)
        grid[gap + r * cell_h: gap + r * cell_h + h * scale, gap + c * cell_w: gap + c * cell_w + w * scale] = big
    return grid
