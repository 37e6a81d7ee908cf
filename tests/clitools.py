"""Running the ``tandem`` command line in tests: as a subprocess (what a shell sees) or in-process
through ``tandem.cli.main`` (same exit status and stderr, without seconds of imports per call)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One thread per process: the suite must not fight the machine's other jobs for cores.
ENV = {**os.environ, "TANDEM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def tandem(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2 and one line on stderr that names the problem."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def tandem_in_process(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    from tandem.cli import main

    monkeypatch.setattr(sys, "argv", ["tandem", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, symlink targets, directories (to compare a workspace before and
    after a command that must change nothing)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[key] = "dir"
            elif path.is_file():
                out[key] = path.read_bytes()
            else:
                out[key] = "special"  # a FIFO or a device: never read
    return out


def assert_refused_changing_nothing(run, workspace: Path, args: list, needles: list,
                                    **fill) -> subprocess.CompletedProcess:
    """Run ``args`` (each "WS" standing for ``workspace``, each key of ``fill`` for its value) with ``run``: exit 2, one
    stderr line holding every needle (filled alike), and every byte of ``workspace`` as it was."""
    fill = {"WS": str(workspace), **{k: str(v) for k, v in fill.items()}}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    before = snapshot(workspace)
    result = run(*map(filled, args))
    assert_user_error(result, *map(filled, needles))
    assert snapshot(workspace) == before
    return result
