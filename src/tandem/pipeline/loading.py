"""Composing a :class:`~tandem.pipeline.TandemPipeline` from a preset (names of a teacher, a student, an
oracle, a ControlNet, and the files of its calibrations and route table), and saving one as a directory that
``from_pretrained`` reads back: a preset file whose models are named (a hub id, a directory, or the shipped
world) and whose calibrations and route table are files beside it (diffusers' ``save_pretrained`` convention)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..calibration import Calibration
from ..loaders import load_controlnet, load_preset_student, load_preset_teacher
from ..outputs import atomic_write_text
from ..prerouting import ScorePredictor
from ..presets import (
    PRESETS,
    Preset,
    parse_student,
    preset_to_json,
    read_preset_file,
    world_calibration_path,
    world_file,
)
from ..routes import RouteTable
from ..scorers import load_scorer

PRESET_FILE = "tandem_pipeline.json"  # the preset file of a saved pipeline, in its directory


def build_from_preset(cls, name: str | Preset, device: str = "cpu", dtype: torch.dtype = torch.float32, scorer=None,
                calibration: Calibration | str | Path | None = None, routes=None):
    """Build a ``cls`` (a ``TandemPipeline``) from a preset name (or a ``Preset``). ``scorer``/``calibration``/``routes``
    override the preset's (a calibration or route table may be given as a file path; a calibration given
    without a route table drops the preset's, whose percentiles refer to the preset's calibration)."""
    given_calibration = calibration

    preset = name if isinstance(name, Preset) else PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    teacher = load_preset_teacher(preset, device, dtype)
    student = load_preset_student(preset, teacher, device, dtype)
    if scorer is None and preset.scorer is not None:
        scorer = load_scorer(preset.scorer, device=device)
    if calibration is None and preset.calibration == "world":
        path = world_calibration_path()
        calibration = Calibration.load(path) if path.exists() else None
    elif calibration is None and preset.calibration:
        path = world_file(preset.calibration)
        shipped = preset.calibration.startswith("world:")
        calibration = Calibration.load(path) if path.exists() or not shipped else None
    elif isinstance(calibration, str | Path):
        calibration = Calibration.load(calibration)
    edit_student = None
    if preset.edit_student is not None:
        kind, source = parse_student(preset.edit_student, preset.teacher)
        edit_student = load_preset_student(dataclasses.replace(preset, student=source, student_kind=kind), teacher,
                                    device, dtype)
    pipe = cls(student, teacher, scorer, None if preset.controlnet else calibration,
                          defaults=preset.defaults, name=preset.name, edit_student=edit_student)
    if preset.controlnet:
        pipe = pipe.with_controlnet(load_controlnet(preset.controlnet, device, dtype), calibration=calibration,
                                    name=preset.name)
    for strength, spec in preset.edit_calibrations.items():
        path = world_file(spec)
        if path.exists():
            pipe.edit_calibrations[float(strength)] = Calibration.load(path)
    if given_calibration is None:  # like the route table, they belong to the preset's own calibration's models
        for n, spec in preset.draft_calibrations.items():
            pipe.draft_calibrations[int(n)] = Calibration.load(world_file(spec))
        if preset.predictor is not None:
            pipe.predictor = ScorePredictor.load(world_file(preset.predictor))
    # the preset's route table refers to the preset's calibration: a calibration given here drops it
    if routes is None and preset.routes and not preset.controlnet and given_calibration is None:
        path = world_file(preset.routes)
        routes = path if path.exists() or not preset.routes.startswith("world:") else None
    if routes is not None:
        pipe.routes = routes if isinstance(routes, RouteTable) else RouteTable.load(routes)
    pipe.preset = preset
    return pipe



def preset_of(source: str | os.PathLike) -> Preset:
    """The preset ``source`` names: a preset's name (``world``, ``sd15-lcm``, ...), a directory written by
    ``save_pretrained``, or a preset file (``tandem preset save``)."""
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if path.is_dir():
        if not (path / PRESET_FILE).is_file():
            raise ValueError(f"{path} holds no {PRESET_FILE}: not a directory written by save_pretrained")
        return read_preset_file(path / PRESET_FILE)
    if path.is_file():
        return read_preset_file(path)
    raise ValueError(f"no preset, saved pipeline directory or preset file {str(source)!r}; the presets are "
                     f"{', '.join(PRESETS)}")


def save_pipeline(pipe, directory: str | os.PathLike) -> Path:
    """Write ``pipe`` (composed from a preset) to ``directory``, a new or empty directory: its preset file
    (:data:`PRESET_FILE`: model names, defaults) and its calibration, edit and best-of-N calibrations, route table
    and pre-routing predictor as files beside it, so that ``from_pretrained(directory)`` composes the same
    pipeline."""
    preset = getattr(pipe, "preset", None)
    if preset is None:
        raise ValueError("save_pretrained saves a pipeline composed from a preset or a saved directory "
                         "(TandemPipeline.from_pretrained): its models are stored by name, and this one's were "
                         "built in Python")
    if getattr(pipe.student, "controlnet", None) is not None and not preset.controlnet:
        raise ValueError("this pipeline's ControlNet was added in Python (with_controlnet); save the pipeline "
                         "without it, or compose a preset that names the ControlNet")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory; save_pretrained writes a new "
                              "one and replaces nothing")
    directory.mkdir(parents=True, exist_ok=True)
    files = {"calibration": None, "routes": None, "predictor": None}
    if pipe.calibration is not None:
        pipe.calibration.save(directory / "calibration.json")
        files["calibration"] = "calibration.json"
    if pipe.routes is not None:
        pipe.routes.save(directory / "routes.json")
        files["routes"] = "routes.json"
    edits, drafts = {}, {}
    for strength, table in sorted(pipe.edit_calibrations.items()):
        name = f"calibration-edit-{strength:g}.json"
        table.save(directory / name)
        edits[f"{strength:g}"] = name
    for n, table in sorted(pipe.draft_calibrations.items()):
        name = f"calibration-drafts-{n}.json"
        table.save(directory / name)
        drafts[str(n)] = name
    if pipe.predictor is not None:
        pipe.predictor.save(directory / "predictor.json")
        files["predictor"] = "predictor.json"
    data = {**preset_to_json(dataclasses.replace(preset, defaults=dict(pipe.defaults))), **files,
            "edit_calibrations": edits, "draft_calibrations": drafts, "name": pipe.name}
    atomic_write_text(directory / PRESET_FILE, json.dumps(data, indent=2) + "\n")
    return directory
