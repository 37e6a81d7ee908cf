"""What the wheel carries (issue 28): PyPI refuses a wheel over 100 MB, so the package holds the preset's
models and the world's study students (ablations, baselines) live in the repository's study/world-students/.
From a checkout they resolve by name; where they are absent (an installed wheel) naming one is an error
that says where to get it. No wheel is built here: the files the package data selects are summed instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem import models
from tandem.models import resolve_model, student_defaults, student_dir, world_dir
from tandem.presets import compose
from tandem.students import read_student_info

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tandem"
PYPI_LIMIT = 100e6
HEADROOM = 5e6  # the code, metadata and zip overhead beside the package data


def study_names() -> list[str]:
    meta = json.loads((world_dir() / "tandem.json").read_text())
    return [name for name, entry in meta["students"].items() if entry.get("study")]


def package_files() -> set[Path]:
    """The files setuptools puts in the wheel: the package's modules and what package-data selects."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tandem"]
    selected = {p for pattern in patterns for p in PACKAGE.glob(pattern) if p.is_file()}
    return selected | set(PACKAGE.rglob("*.py"))


def test_the_package_data_fits_a_pypi_wheel_and_holds_no_study_student():
    files = package_files()
    assert world_dir() / "unet" / "diffusion_pytorch_model.safetensors" in files  # the globs select the world
    total = sum(p.stat().st_size for p in files)
    assert total < PYPI_LIMIT - HEADROOM, f"the package data is {total / 1e6:.1f} MB"
    spec = resolve_model("world")
    names = study_names()
    assert {"pd-1", "kd-quarter", "dsm-half", "cd-study"} <= set(names)
    for name in names:
        study = Path(spec.students[name].path)
        assert not study.is_relative_to(PACKAGE) and not any(p.is_relative_to(study) for p in files), name
    # the preset's students and each method's best are in the package
    for name in ("pd", "cd", "add", "dmd2", "kd-half"):
        assert not spec.students[name].study and Path(spec.students[name].path).is_relative_to(world_dir())


def test_every_study_student_resolves_by_name_from_the_checkout():
    spec = resolve_model("world")
    readme = (models.STUDY_STUDENTS / "README.md").read_text()
    for name in study_names():
        path = student_dir(spec, name)
        assert path.parent == models.STUDY_STUDENTS and read_student_info(path).steps > 0
        assert f"--name {name} " in readme, f"{name}: the study README gives no command that remakes it"
    assert compose("world", student="pd-1").defaults["num_inference_steps"] == 1


def test_naming_a_study_student_without_the_checkout_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "STUDY_STUDENTS", tmp_path / "study" / "world-students")  # as an installed wheel
    spec = resolve_model("world")
    assert "kd-quarter" in spec.students  # still listed
    for call in (lambda: student_dir(spec, "kd-quarter"), lambda: student_defaults(spec, "kd-quarter"),
                 lambda: compose("world", student="kd-quarter")):
        with pytest.raises(ValueError, match=r"'kd-quarter' is a study student, not in the installed tandem package"
                                             r".*checkout.*study/world-students/kd-quarter"):
            call()
    assert student_dir(spec, "kd-half") == Path(spec.students["kd-half"].path)  # the package's own still load
