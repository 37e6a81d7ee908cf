"""`tandem preset ...`: a tandem composed from parts, kept as a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    SCORER_HELP,
    STUDENT_HELP,
    UserError,
    _check_out_file,
    cli_error,
    console,
    preset_app,
)


@preset_app.command("save")
def preset_save(
    out: Annotated[Path, typer.Option(help="The preset file to write (JSON).")],
    model: Annotated[str, typer.Option(help="A preset to start from, or a teacher directory or hub id.")] = "world",
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help="A ControlNet (directory or hub id) in student and "
                                                        "teacher.")] = None,
    teacher_kind: Annotated[str | None, typer.Option(help="'text2img' (refines and regenerates) or 'img2img' "
                                                          "(refines only, e.g. the SDXL refiner).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="The calibration (`tandem calibrate`) of this student "
                                                          "and oracle, used for --percentile and --budget.")] = None,
    name: Annotated[str | None, typer.Option(help="The preset's name [the file's name].")] = None,
    setting: Annotated[list[str] | None, typer.Option("--set", help="A default setting KEY=VALUE (repeat), e.g. "
                                                                   "teacher_steps=12, rollback_sigma=0.85.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Save a tandem composed from parts as a preset file, for `--preset FILE` on every command."""
    import dataclasses

    from ..presets import PRESET_SETTINGS, compose, write_preset_file

    _check_out_file(out, overwrite)
    if calibration is not None and not calibration.is_file():
        raise UserError(f"--calibration {calibration}: no such file (make one with `tandem calibrate`)")
    defaults = {}
    for item in setting or []:
        key, sep, value = item.partition("=")
        if not sep or key not in PRESET_SETTINGS:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(PRESET_SETTINGS)}")
        if key in defaults:
            raise UserError(f"--set {key} given twice ({key}={defaults[key]!r} and {item!r}); give each setting once")
        try:
            defaults[key] = PRESET_SETTINGS[key](value)
        except ValueError as e:
            raise UserError(f"--set {item!r}: {e}") from None
    try:
        preset = compose(model, student=student, scorer=scorer, controlnet=controlnet, teacher_kind=teacher_kind)
    except ValueError as e:
        raise cli_error(e) from None
    if calibration is not None:
        from ..calibration import Calibration

        Calibration.load(calibration)  # a damaged file is refused now, not at the first run
    preset = dataclasses.replace(preset, name=name or out.stem, defaults={**preset.defaults, **defaults},
                                 calibration=str(calibration) if calibration else preset.calibration)
    try:
        write_preset_file(preset, out, overwrite=overwrite)
    except FileExistsError as e:  # another process wrote it since the check above
        raise cli_error(e) from None
    console.print(f"preset {preset.name} -> {out}; use it with --preset {out}")


@preset_app.command("show")
def preset_show(
    preset: Annotated[str, typer.Argument(help="A preset name or a preset file.")],
) -> None:
    """Print a preset's fields as JSON (built-in presets: tandem.presets.PRESETS)."""
    import json

    from ..presets import PRESETS, preset_to_json, read_preset_file

    if preset in PRESETS:
        found = PRESETS[preset]
    elif Path(preset).is_file():
        found = read_preset_file(preset)
    else:
        raise UserError(f"unknown preset {preset!r}: neither a built-in preset ({', '.join(PRESETS)}) nor a file")
    print(json.dumps(preset_to_json(found), indent=2))


