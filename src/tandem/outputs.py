"""The output-directory contract shared by ``tandem generate``, ``tandem edit``, ``tandem world render`` and
``tandem world evaluate``:

    DIR/00000.png, 00001.png, ...   one image per prompt, in input order
    DIR/records.jsonl               one JSON line per image (``tandem generate``, every mode:
                                    ``tandem.pipeline.RECORD_FIELDS``, then ``RUN_RECORD_FIELDS``)
    DIR/config.json                 the exact settings of the run
    DIR/.tandem-run.json            the run record: says that DIR is a finished tandem run

A run directory is written whole or not at all. Everything goes into a staging directory of its
own beside ``DIR`` (``DIR.incomplete-XXXXXXXX/``, a new name for every run, with an ``INCOMPLETE``
marker file naming the process) and replaces ``DIR`` only when the run has finished: a run that
fails or is killed leaves ``DIR`` exactly as it was, and at most a staging directory that says
what it is (the next run into ``DIR`` removes those whose process has ended; a live one, another
run writing the same ``DIR`` at the same time, is left alone). A non-empty ``DIR`` is refused
unless ``overwrite=True``, and even then it is replaced only if its run record says it is a
finished tandem run: a directory of the user's own (or the current directory, or one holding an
input of the run) is never replaced. The earlier run is moved aside under a new name of its own
and removed only once the new run is in place.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INCOMPLETE = "INCOMPLETE"  # marker file of a staging directory
RUN_RECORD = ".tandem-run.json"  # the record of a finished run: what --overwrite may replace
RUN_KIND = "tandem run"
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
        overwrite: replace an earlier tandem run in ``path`` (it stays in place until the new one is complete);
            a non-empty directory without a run record is refused all the same.
        info: written into the ``INCOMPLETE`` marker and the run record (e.g. the command).
        flag: the name the caller gave ``path`` (an argument's, or the command line's option), for error messages;
            a command-line option (``--out``) has the messages spell the overwrite switch ``--overwrite`` too,
            any other name ``overwrite=True``.
        inputs: ``(option, path)`` pairs of the files the run reads; with ``overwrite`` none may lie inside ``path``.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, info: dict[str, Any] | None = None,
                 flag: str = "--out", inputs: Iterable[tuple[str, str | Path | None]] = ()):
        final = Path(path)  # an empty path is the current directory, refused below
        if final.is_symlink():
            if not final.exists():
                raise OutputError(f"{flag} {final} is a symlink to {os.readlink(final)}, which does not exist")
            final = final.resolve()
        final = Path(os.path.abspath(final))
        if final.exists() and not final.is_dir():
            raise OutputError(f"{flag} {final} exists and is not a directory")
        _check_not_cwd(final, flag)
        if final.exists() and any(final.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{flag} {final} is not empty; pass {_overwrite(flag)} to replace its contents")
            check_replaceable(final, flag, inputs)
        self.final, self.flag, self.overwrite, self.info = final, flag, overwrite, dict(info or {})
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            clear_stale_staging(final)
            self.staging = new_staging_dir(final, f"{final.name}.incomplete-")
            marker = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), "out": str(final),
                      **self.info}
            (self.staging / INCOMPLETE).write_text(
                "This run did not finish (it failed or was killed, or it is still running); it is not a result. "
                f"The next run into {final} removes it once its process has ended.\n"
                + json.dumps(marker, indent=1) + "\n")
        except OSError as e:
            if hasattr(self, "staging"):
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
        """Swap the finished run in for ``path``: an earlier run (checked again to be a tandem run) is replaced by
        :func:`swap_in` (renamed aside, the new one renamed in, then the earlier one removed). If another process
        filled ``path`` meanwhile and this run may not replace it, the finished run stays in its staging
        directory (its marker removed, its run record written) and a FileExistsError says where."""
        names = sorted(p.name for p in self.staging.iterdir() if p.name != INCOMPLETE)
        record = {"kind": RUN_KIND, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.info, "files": names}
        atomic_write_text(self.staging / RUN_RECORD, json.dumps(record, indent=1, default=str) + "\n")
        (self.staging / INCOMPLETE).unlink()
        final = self.final
        if final.is_dir() and not final.is_symlink() and any(final.iterdir()):
            if not self.overwrite:
                raise FileExistsError(f"{self.flag} {final} was filled by another run while this one ran; "
                                      f"this run's finished result is in {self.staging}")
            check_replaceable(final, self.flag)
            swap_in(self.staging, final)
        else:
            os.rename(self.staging, final)  # absent or empty (rename replaces an empty directory)
        self.path, self.committed = final, True

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
        atomic_write_text(self.path / "records.jsonl", "".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                                                               for r in records))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.json", json.dumps(json_safe(config), indent=2, allow_nan=False) + "\n")


def json_safe(value, nan: bool = False):
    """``value`` with every infinite float as None (JSON has no such numbers: a cut-off of -inf, which keeps every
    image, reads null, as where a run had no cut-off); NaN too where ``nan``, else a NaN stays for the writer to
    refuse (a run's files never hide a number that went wrong)."""
    if isinstance(value, float):
        return None if math.isinf(value) or (nan and math.isnan(value)) else value
    if isinstance(value, dict):
        return {k: json_safe(v, nan) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nan) for v in value]
    return value


def is_finished_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run record (a regular file, not a link) that says it is a finished tandem run."""
    record = Path(path) / RUN_RECORD
    if record.is_symlink() or not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == RUN_KIND


def check_replaceable(final: Path, flag: str = "--out", inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse to replace ``final`` unless it is a finished tandem run that holds neither the current directory
    nor any of ``inputs`` (``(option, path)`` pairs)."""
    _check_not_cwd(final, flag)
    if not is_finished_run(final):
        raise OutputError(f"{flag} {final} is not a finished tandem run (it has no {RUN_RECORD}); {_overwrite(flag)} "
                          "replaces only tandem's own runs: empty it yourself or choose another directory")
    for option, where in inputs:
        if where is None or not str(where):
            continue
        inside = Path(os.path.abspath(Path(where).resolve() if Path(where).exists() else where))
        if inside == final or final in inside.parents:
            raise OutputError(f"{option} {where} lies inside {flag} {final}, which {_overwrite(flag)} would replace; "
                              "move it out first")


def _overwrite(flag: str) -> str:
    """The overwrite switch in the words of the caller that named the output ``flag``: the command line's option
    after an option, else the argument."""
    return "--overwrite" if flag.startswith("--") else "overwrite=True"


def _check_not_cwd(final: Path, flag: str) -> None:
    """A run lands by renaming its directory into place: never onto the current directory or one holding it."""
    here = Path.cwd().resolve()
    if final == here or final in here.parents:
        raise OutputError(f"{flag} {final} is the current directory or holds it (an empty {flag} means the current "
                          "directory): name a directory of the run's own")


def clear_stale_staging(final: Path) -> None:
    """Remove the staging directories beside ``final`` that killed runs into it left behind: directories (not
    links) named ``NAME.incomplete-*`` (or ``NAME.incomplete``, an earlier release's) holding an ``INCOMPLETE``
    marker whose process has ended. A live run's staging and anything else by such a name are left alone."""
    for staging in final.parent.glob(f"{glob.escape(final.name)}.incomplete*"):
        suffix = staging.name[len(final.name):]
        if suffix != ".incomplete" and not suffix.startswith(".incomplete-"):
            continue
        if staging.is_symlink() or not staging.is_dir() or not (staging / INCOMPLETE).is_file():
            continue
        pid = _marker_pid(staging / INCOMPLETE)
        if pid is not None and _alive(pid):
            continue
        shutil.rmtree(staging, ignore_errors=True)


def _marker_pid(marker: Path) -> int | None:
    """The process id an ``INCOMPLETE`` marker names (None when it names none)."""
    try:
        text = marker.read_text()
        data = json.loads(text[text.index("{"):])
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    pid = data.get("pid") if isinstance(data, dict) else None
    return pid if isinstance(pid, int) and pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_staging_dir(target: Path, prefix: str) -> Path:
    """A new directory beside ``target`` to build its replacement in, named ``prefix`` and a suffix of its own (so
    it never meets another's), with the permissions a plain ``mkdir`` gives (``mkdtemp`` makes it private)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    os.chmod(staging, 0o777 & ~_UMASK)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Put the directory ``staging`` in ``target``'s place: an existing ``target`` (a directory, file or symlink,
    never followed) is first renamed into a new directory of its own beside it, ``staging`` renamed in, and only
    then the old one removed; if the second rename fails, the old one is put back."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    os.rename(target, aside / target.name)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside / target.name, target)
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # the replaced one, and the directory made for it here


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """``with staged_dir(target) as staging:`` a new directory beside ``target`` (:func:`new_staging_dir`) to write
    into; when the block ends without an error it takes ``target``'s place (:func:`swap_in`), and when it raises
    it is removed (with the folder made for it, if any) and ``target`` stays as it was."""
    target = Path(target)
    parent = target.parent
    made_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(target, f".{target.name}.incoming-")
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent:  # e.g. a world's students/, made for this one, if nothing else came into it
            with suppress(OSError):
                parent.rmdir()
        raise


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
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
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
