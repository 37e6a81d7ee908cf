"""`tandem eval ...`: the evaluation experiments and their report."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..calibration import CalibrationMismatch
from ..pipeline.records import run_record
from .common import (
    PRESET_HELP,
    SCORER_HELP,
    STUDENT_HELP,
    UserError,
    _check_composition,
    _check_out_file,
    _check_world_prompts,
    _collect_prompts,
    _compose,
    _load_edit_cases,
    _parts_args,
    _phase_bars,
    _progress,
    _tandem_pipeline,
    cli_error,
    cli_message,
    console,
    eval_app,
)


class Experiment(str, Enum):
    budget = "budget"
    winners = "winners"
    threshold = "threshold"
    oracle = "oracle"
    diversity = "diversity"


def _check_eval_out(out: Path, resume: bool) -> None:
    """Refuse a non-empty --out without --resume; under ``accelerate launch`` every process checks
    before any writes."""
    from ..eval.sweep import _processes
    from ..outputs import make_writable_dir

    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    refuse = out.exists() and any(out.iterdir()) and not resume
    _processes()[2]()
    if refuse:
        raise UserError(f"--out {out} is not empty; pass --resume to continue that experiment (finished "
                        "configurations are reused) or choose another directory")
    make_writable_dir(out)


def _eval_measures(world: bool, model: str, judge: str | None, features: str | None, clip_score: str | None,
                   reference: Path | None, device: str, fid: str | None = None):
    """ShapesWorld: the exact checker (or --judge), world CLIP features and renderings. Real tier: --judge
    (required), --features, --clip-score, --reference and --fid as given."""
    from ..eval.judges import Measures, load_judge

    if world:
        if features is not None or clip_score is not None or reference is not None or fid is not None:
            raise UserError("--features, --clip-score, --reference and --fid are for real-tier models; the world "
                            "measures with its CLIP against exact renderings")
        if judge is None or judge == "world":
            return Measures.for_world()
        return Measures.for_world(_load(lambda: load_judge(judge, device), "--judge"), judge_spec=judge)
    if judge is None or judge == "world":
        raise UserError(f"--model {model} has no exact checker: choose a judge, e.g. --judge imagereward or "
                        "--judge pickscore (best not the pipeline's own oracle)")
    return _load(lambda: Measures.from_specs(judge, features, clip_score, reference, device, fid),
                 "--judge/--features/--clip-score/--reference/--fid")


def _prompt_list(which: str, world: bool, model: str, flag: str = "--prompts") -> list[str]:
    """'val' or 'test' (the world's fixed lists), or a prompts file (world captions checked on the world)."""
    from ..world.prompts import load_prompts

    if which in ("val", "test"):
        if not world:
            raise UserError(f"{flag} {which} is a ShapesWorld list; give --model {model} a prompts file")
        return load_prompts(which)
    prompts = _collect_prompts(None, Path(which))
    if world:
        _check_world_prompts(prompts)
    return prompts


def _load(make, what: str):
    try:
        return make()
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{what}: {cli_message(str(e))}") from e


def _eval(experiment: Experiment, model: str, prompts_name: str, n: int | None, seed: int, out: Path, resume: bool,
          batch_size: int, device: str, judge: str | None = None, features: str | None = None,
          clip_score: str | None = None, reference: Path | None = None, calibration: Path | None = None,
          fid: str | None = None, preset_file: Path | None = None, student: str | None = None,
          scorer: str | None = None, cascade: Path | None = None, images_from: Path | None = None,
          draft_calibration: list[Path] | None = None, preroute: list[float] | None = None,
          predictor: Path | None = None) -> None:
    import time

    from ..eval import experiments
    from ..routes import quality

    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    extra = {}
    if cascade is not None:
        from ..cascade import CascadeTable

        if experiment is not Experiment.budget:
            raise UserError("--cascade applies to eval budget")
        extra["cascade"] = _load(lambda: CascadeTable.load(cascade), "--cascade")
    if images_from is not None:
        if experiment not in (Experiment.budget, Experiment.oracle):
            raise UserError("--images-from applies to eval budget and eval oracle")
        if not (images_from / "cache" / "identity.json").is_file():
            raise UserError(f"--images-from {images_from}: not an output directory of an eval budget or oracle run "
                            "(no cache/identity.json)")
        extra["images_from"] = images_from
    if draft_calibration and experiment is not Experiment.budget:
        raise UserError("--draft-calibration applies to eval budget and eval routes")
    drafts = _draft_calibrations(draft_calibration or [])
    if (preroute or predictor is not None) and experiment is not Experiment.budget:
        raise UserError("--preroute and --predictor apply to eval budget")
    if bool(preroute) != (predictor is not None):
        raise UserError("--preroute and --predictor go together (fit a predictor with `tandem calibrate --predictor` "
                        "on other held-out prompts)")
    for limit in preroute or []:
        if not 0 < limit <= 1:
            raise UserError(f"--preroute must be in (0, 1], got {limit:g}")
    fitted = None
    if predictor is not None:
        from ..prerouting import ScorePredictor

        fitted = _load(lambda: ScorePredictor.load(predictor), "--predictor")
    preset = _compose(model, preset_file, student, scorer)
    _check_composition(preset, "eval", calibration)
    world = preset.teacher == "world"
    _check_eval_out(out, resume)
    prompts = _prompt_list(prompts_name, world, model)
    prompts = prompts[:n] if n is not None else prompts
    measures = _eval_measures(world, preset.name, judge, features, clip_score, reference, device, fid)
    needs_table = experiment in (Experiment.budget, Experiment.oracle, Experiment.diversity)
    if needs_table and calibration is None and not preset.calibration:
        raise UserError(f"eval {experiment.value} needs a calibration of this student and oracle: make one on "
                        f"held-out prompts (`tandem calibrate {_parts_args(preset)} --prompts FILE --out "
                        "calibration.json`) and pass --calibration")
    if preset.scorer is None:
        raise UserError("tandem eval needs the pipeline's oracle: give --scorer (e.g. clip:DIR, imagereward)")
    pipe = _tandem_pipeline(preset, device, calibration)
    if drafts or fitted is not None:
        from ..eval.experiments import BudgetConfig

        pipe.draft_calibrations.update(drafts)
        pipe.predictor = fitted
        extra["cfg"] = BudgetConfig(drafts=tuple(sorted(drafts)), preroute=tuple(sorted(set(preroute or []))))
    made_by = {"command": f"eval {experiment.value}", "tandem_version": __version__, "model": model,
               **run_record(pipe),
               "prompts": prompts_name, "n": len(prompts), "seed": seed, "batch_size": batch_size, "device": device,
               "calibration": str(calibration) if calibration else None,
               "cascade": str(cascade) if cascade else None,
               "images_from": str(images_from) if images_from else None, **measures.spec}
    if drafts:
        made_by["draft_calibrations"] = [str(p) for p in draft_calibration]
    if fitted is not None:
        made_by["predictor"] = str(predictor)
    t0 = time.time()
    with _progress(f"eval {experiment.value}", len(prompts)) as bar:
        progress = _phase_bars(bar)

        run = getattr(experiments, experiment.value)
        try:
            results = run(pipe, prompts, out, seed=seed, batch_size=batch_size, log=lambda m: console.print(m),
                          made_by=made_by, progress=progress, measures=measures, **extra)
        except CalibrationMismatch as e:
            raise UserError(f"--cascade: {e}") from None
        except ValueError as e:
            raise cli_error(e) from None
    if experiment is Experiment.budget:
        from ..eval.judges import format_quality

        for ref, a in results["acceleration"].items():
            best = a.get("best_adaptive_quality")
            reached = (f"reached at {a['adaptive']['unet_evals_mean']:.1f} UNet evals/image ({a['factor']:.2f}x "
                       f"cheaper)" if a["adaptive"]
                       else f"not reached (best {format_quality(best, results)})" if best is not None
                       else "no adaptive point")
            alone = a.get("student_alone")
            if alone:
                reached += (f"; the student alone (no image sent to the teacher) reaches it at "
                            f"{alone['unet_evals_mean']:.1f} UNet evals/image")
            console.print(f"{ref}: {format_quality(quality(a['teacher']), results)} at "
                          f"{a['teacher']['unet_evals_mean']:.0f} UNet evals/image; adaptive {reached}")
    elif experiment is Experiment.oracle:
        d = results["decisions"]
        best = max(d["no_reference"], key=lambda r: r["accuracy"])
        console.print(f"full-reference agreement {100 * d['full_reference']:.1f}%, best no-reference "
                      f"{100 * best['accuracy']:.1f}% at k = {best['k']:g}")
    elif experiment is Experiment.winners:
        w = results["student_vs_teacher"]
        console.print(f"student better on {100 * w['win']:.1f}% of prompts (win rate {w['win_rate']:.3f})")
    console.print(f"done in {time.time() - t0:.0f}s -> {out / 'report.md'}")


def _draft_calibrations(paths: list[Path]) -> dict:
    """The best-of-N calibrations of --draft-calibration by their N (each file's fingerprint says it)."""
    from ..calibration import Calibration

    out = {}
    for path in paths:
        calibration = _load(lambda p=path: Calibration.load(p), f"--draft-calibration {path}")
        n = int(calibration.fingerprint.get("drafts", 1))
        if n < 2:
            raise UserError(f"--draft-calibration {path} is a one-draft calibration; make a best-of-N one with "
                            "`tandem calibrate --drafts N`")
        if n in out:
            raise UserError(f"--draft-calibration: two calibrations of {n} drafts")
        out[n] = calibration
    return out


def _eval_command(experiment: Experiment, summary: str, default_n: int | None) -> None:
    """Register ``tandem eval <experiment>`` (every experiment takes the same options)."""

    def command(
        out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
        model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world'; real tier: e.g. sd15-lcm), or a "
                                                 "teacher directory or hub id with --student and --scorer.")] = "world",
        preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
        student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
        scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
        prompts: Annotated[str, typer.Option(help="'val', 'test' (the world's fixed lists) or a prompts file.")] = "test",
        n: Annotated[int | None, typer.Option(help="Use the first N prompts [all].")] = default_n,
        seed: Annotated[int, typer.Option(help="Run seed (prompt i draws from (seed, i)).")] = 0,
        resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
        batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 100,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
        judge: Annotated[str | None, typer.Option(
            help="Who decides which image is better: 'world' (the exact checker; the world's default) or a "
                 "scorer (imagereward[:PATH], pickscore[:ID], clip:ID, blip[:ID], world-oracle[:DIR]); required off "
                 "the world.")] = None,
        features: Annotated[str | None, typer.Option(
            help="Real tier: a CLIP or DINOv2 (hub id or directory) for the Fréchet distance, diversity and "
                 "student-teacher distance.")] = None,
        clip_score: Annotated[str | None, typer.Option(help="Real tier: a CLIP for the CLIP-score column.")] = None,
        reference: Annotated[Path | None, typer.Option(
            help="Real tier: a directory of reference images (e.g. COCO) for the Fréchet distance.")] = None,
        calibration: Annotated[Path | None, typer.Option(
            help="A calibration (tandem calibrate) for the preset's student and oracle [the preset's].")] = None,
        fid: Annotated[str | None, typer.Option(
            help="Real tier, budget: 'inception' or 'inception:WEIGHTS_FILE' for an Inception FID against "
                 "--reference (needs tandem[fid]).")] = None,
        cascade: Annotated[Path | None, typer.Option(
            help="budget: a cascade table (`tandem calibrate --cascade`, made on held-out prompts) whose "
                 "thresholds give the curve 'adaptive cascade'.")] = None,
        images_from: Annotated[Path | None, typer.Option(
            help="budget, oracle: an earlier run's --out of the same prompts, seed, models and judge; its images "
                 "are re-scored by this run's oracle instead of drawn again (to compare oracles).")] = None,
        draft_calibration: Annotated[list[Path] | None, typer.Option(
            help="budget: a best-of-N calibration (`tandem calibrate --drafts N`, on held-out prompts); adds the "
                 "curves of N oracle-chosen drafts, alone and refined below its percentiles (repeat for more "
                 "N).")] = None,
        preroute: Annotated[list[float] | None, typer.Option(
            help="budget, with --predictor: adds the refinement curves (of the drafts the predictor was fitted on) "
                 "with the prompts predicted to fail with at least this probability sent straight to the 25-step "
                 "teacher (repeat for more).")] = None,
        predictor: Annotated[Path | None, typer.Option(
            help="budget: a pre-routing predictor (`tandem calibrate --predictor`, on other held-out "
                 "prompts).")] = None,
    ) -> None:
        _eval(experiment, model, prompts, n, seed, out, resume, batch_size, device, judge, features, clip_score,
              reference, calibration, fid, preset_file, student, scorer, cascade, images_from, draft_calibration,
              preroute, predictor)

    command.__doc__ = summary
    eval_app.command(experiment.value)(command)


_eval_command(Experiment.budget, "Quality vs cost: teacher samplers, students, refine-all and the adaptive pipeline "
                                 "over k; acceleration factors (paper Fig. 9-10).", 500)
_eval_command(Experiment.winners, "Where students win: win rate vs student-teacher distance, scene complexity, "
                                  "prompt length and trajectory curvature (section 3.1).", None)
_eval_command(Experiment.threshold, "How tau settles with the number of calibration prompts, with timings "
                                    "(Table 2).", None)
_eval_command(Experiment.oracle, "Oracle accuracy: no-reference vs full-reference decisions over k (Fig. 7), "
                                 "synthetic oracles (D.4).", None)
_eval_command(Experiment.diversity, "Diversity over seeds (mean pairwise world-CLIP distance) of the student, the "
                                    "teacher and the adaptive pipeline, beside their accuracy.", 100)


@eval_app.command("students")
def eval_students(
    out: Annotated[Path, typer.Option(help="Output directory (results.json, students.png, report.md, caches).")],
    student: Annotated[list[str] | None, typer.Option(
        help="A student to build the tandem on (repeat for each): a name the model ships, or a `tandem distill` "
             "student directory with --calibration NAME=FILE [every shipped student with a calibration].")] = None,
    calibration: Annotated[list[str] | None, typer.Option(
        help="NAME=FILE: the calibration (tandem calibrate --student ...) of the student given as NAME.")] = None,
    model: Annotated[str, typer.Option(help="The teacher: a preset or a teacher directory that ships students "
                                            "('world').")] = "world",
    prompts: Annotated[str, typer.Option(help="The reported prompts: 'val', 'test' or a prompts file.")] = "test",
    choose_on: Annotated[str, typer.Option(help="The prompts each student's configuration at a cost is chosen on: "
                                                "'val', 'test', a prompts file, or 'none' (the reported prompts "
                                                "themselves: optimistic).")] = "val",
    n: Annotated[int | None, typer.Option(help="Use the first N reported prompts [all].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed (prompt i draws from (seed, i)).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Which student makes the best tandem at equal cost: the adaptive pipeline built on each student,
    each configuration chosen on --choose-on at each cost level and reported on --prompts."""
    import time

    from ..eval.students import StudentsConfig, students
    from ..models import resolve_model

    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    tables: dict[str, Path] = {}
    for item in calibration or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--calibration {item!r}: expected NAME=FILE")
        if not Path(path).is_file():
            raise UserError(f"--calibration {item!r}: {path} does not exist; make it with `tandem calibrate`")
        tables[name] = Path(path)
    teacher = _compose(model).teacher
    try:
        shipped = resolve_model(teacher).students
    except (ValueError, FileNotFoundError):
        shipped = {}
    names = list(student or [name for name, s in shipped.items() if s.calibration])
    if not names:
        raise UserError(f"--model {model} ships no calibrated student: give --student NAME_OR_DIR "
                        "--calibration NAME_OR_DIR=FILE for each")
    if len(set(names)) < len(names):
        raise UserError(f"--student: each student once, got {names}")
    if unknown := set(tables) - set(names):
        raise UserError(f"--calibration for {sorted(unknown)}, which is not among the --student list {names}")
    world = teacher == "world"
    reported = _prompt_list(prompts, world, model)[:n]
    choice = None if choose_on == "none" else _prompt_list(choose_on, world, model, "--choose-on")
    if choice is not None and choose_on == prompts:
        raise UserError(f"--choose-on {choose_on} is the reported list itself; choose on other prompts, or say "
                        "--choose-on none to read the envelope off the reported prompts")
    presets = {}
    for name in names:
        presets[name] = _compose(model, student=name)
        if name not in tables and not presets[name].calibration:
            raise UserError(f"--student {name} has no calibration: make one (`tandem calibrate --student {name} "
                            f"--out cal.json`) and pass --calibration {name}=cal.json")
        _check_composition(presets[name], "adaptive", tables.get(name))
    _check_eval_out(out, resume)
    pipes = {name: _tandem_pipeline(preset, device, tables.get(name)) for name, preset in presets.items()}
    measures = _eval_measures(world, model, None, None, None, None, device)
    made_by = {"command": "eval students", "tandem_version": __version__, "model": model, "students": names,
               "calibrations": {k: str(v) for k, v in tables.items()}, "prompts": prompts, "choose_on": choose_on,
               "n": len(reported), "seed": seed, "batch_size": batch_size, "device": device}
    t0 = time.time()
    with _progress("eval students", len(reported)) as bar:
        try:
            results = students(pipes, reported, out, seed, StudentsConfig(), choice, batch_size,
                               lambda m: console.print(m), made_by, _phase_bars(bar), measures)
        except ValueError as e:
            raise cli_error(e) from None
    for level in results["levels"]:
        console.print(f"cost <= {level['cost']:g}: best {' = '.join(level['best'])}")
    console.print(f"done in {time.time() - t0:.0f}s -> {out / 'report.md'}")


def _eval_task_run(name: str, out: Path, resume: bool, batch_size: int, run) -> dict:
    """Common checks, progress and timing of `tandem eval edit|control`."""
    import time

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    _check_eval_out(out, resume)
    t0 = time.time()
    with _progress(f"eval {name}", 1) as bar:
        progress = _phase_bars(bar)

        try:
            results = run(progress)
        except ValueError as e:
            raise cli_error(e) from None
    for name_, a in results["acceptance"].items():
        reached = (f"{a['adaptive']['label']} reaches {100 * a['adaptive']['accuracy']:.1f}% at "
                   f"{a['adaptive']['unet_evals_mean']:.1f} UNet evals/image" if a["adaptive"]
                   else "not reached below its cost")
        console.print(f"{name_}: {100 * a['teacher']['accuracy']:.1f}% at {a['teacher']['unet_evals_mean']:.0f} "
                      f"UNet evals/image; student {100 * a['student']['accuracy']:.1f}%; {reached}")
    console.print(f"done in {time.time() - t0:.0f}s -> {out / 'report.md'}")
    return results


@eval_app.command("edit")
def eval_edit(
    out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
    model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world').")] = "world",
    edits: Annotated[str, typer.Option(help="'test', 'val' or an edit list file (JSON lines).")] = "test",
    n: Annotated[int | None, typer.Option(help="Use the first N edits [all].")] = None,
    strengths: Annotated[str, typer.Option(help="Comma-separated SDEdit strengths.")] = "0.4,0.5,0.6,0.7,0.8",
    seed: Annotated[int, typer.Option(help="Run seed (edit i draws from (seed, i)).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Editing (SDEdit) in tandem: quality, reference preservation and cost of the student, the teacher
    and the adaptive pipeline over strengths; tau from the validation edits (paper Table 1, Fig. 13)."""
    from ..eval import tasks

    if model != "world":
        raise UserError(f"`tandem eval edit` judges with ShapesWorld's exact checker: --model world (got {model!r})")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    try:
        values = tuple(float(v) for v in strengths.split(","))
    except ValueError:
        raise UserError(f"--strengths must be comma-separated numbers, got {strengths!r}") from None
    if any(not 0 < v <= 1 for v in values):
        raise UserError(f"--strengths must lie in (0, 1], got {strengths!r}")
    cases = _load_edit_cases(edits)[:n]
    main_strength = 0.6 if 0.6 in values else values[0]
    cfg = tasks.EditConfig(strengths=values, main_strength=main_strength)
    pipe = _tandem_pipeline(_compose(model), device)
    made_by = {"command": "eval edit", "tandem_version": __version__, "model": model, "edits": edits,
               "n": len(cases), "seed": seed, "batch_size": batch_size, "device": device}
    _eval_task_run("edit", out, resume, batch_size, lambda progress: tasks.edit(
        pipe, cases, out, seed, cfg, batch_size, lambda m: console.print(m), made_by, progress))


@eval_app.command("control")
def eval_control(
    out: Annotated[Path, typer.Option(help="Output directory (results.json, PNG plots, report.md, cache/).")],
    control: Annotated[str, typer.Option(help="The world ControlNet: mask or edges.")] = "mask",
    model: Annotated[str, typer.Option(help="A preset (ShapesWorld: 'world').")] = "world",
    prompts: Annotated[str, typer.Option(help="'val', 'test' (the fixed lists) or a prompts file.")] = "test",
    n: Annotated[int | None, typer.Option(help="Use the first N prompts [all].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed (prompt i draws from (seed, i); its control image is "
                                           "that of the scene drawn for it with the same seed).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an experiment in --out, reusing finished runs.")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """ControlNet generation in tandem: the student, the teacher, refine-all and the adaptive pipeline with
    one ControlNet in both, on captions with exact control images (paper section 4.3, D.6)."""
    from ..eval import tasks

    if model != "world":
        raise UserError(f"`tandem eval control` judges with ShapesWorld's exact checker: --model world "
                        f"(got {model!r})")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    captions = _prompt_list(prompts, True, model)[:n]
    pipe = _tandem_pipeline(_compose(model, control=control), device)
    made_by = {"command": "eval control", "tandem_version": __version__, "model": model, "control": control,
               "prompts": prompts, "n": len(captions), "seed": seed, "batch_size": batch_size, "device": device}
    _eval_task_run("control", out, resume, batch_size, lambda progress: tasks.control(
        pipe, captions, control, out, seed, tasks.ControlConfig(), batch_size, lambda m: console.print(m), made_by,
        progress))


@eval_app.command("routes")
def eval_routes(
    budget_run: Annotated[Path, typer.Argument(help="A `tandem eval budget` output directory, run on held-out "
                                                    "prompts (the world: --prompts val).")],
    out: Annotated[Path, typer.Option(help="The route table to write (JSON).")],
    model: Annotated[str, typer.Option(help="The preset the budget run used.")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    calibration: Annotated[Path | None, typer.Option(help="The calibration the budget run used [the "
                                                          "preset's].")] = None,
    draft_calibration: Annotated[list[Path] | None, typer.Option(help="The best-of-N calibrations the budget run's "
                                                                      "drafts curves used (repeat).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing route table.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    rule: Annotated[str, typer.Option(help="What a budget's route maximises: 'quality' (the share satisfied, or the "
                                            "mean score) or 'win-rate' (side by side against the budget run's "
                                            "reference teacher, ties split).")] = "quality",
) -> None:
    """A route table from a budget run on held-out prompts: `tandem generate --mode adaptive --budget B`
    alone then takes the settings that were best there at that cost (--routes FILE, or ship it in a preset)."""
    from ..checks import read_json_file
    from ..routes import RouteTable

    results_path = budget_run / "results.json"
    if not results_path.is_file():
        raise UserError(f"{budget_run} has no results.json (run `tandem eval budget --prompts val --out DIR`)")
    results = read_json_file(results_path, "eval budget results")
    if results.get("made_by", {}).get("prompts") == "test":
        raise UserError(f"{budget_run} was run on the world's test prompts, which only report: choose routes on "
                        "held-out prompts (--prompts val)")
    _check_out_file(out, overwrite)
    drafts = _draft_calibrations(draft_calibration or [])
    preset = _compose(model, preset_file, student, scorer)
    _check_composition(preset, "calibrate", calibration)
    pipe = _tandem_pipeline(preset, device, calibration)
    pipe.draft_calibrations.update(drafts)
    try:
        table = RouteTable.from_budget(results, pipe, rule=rule)
    except ValueError as e:
        raise UserError(f"{budget_run}: {e}") from None
    table.config["command"] = (f"tandem eval routes {budget_run} --out {out}"
                               + "".join(f" --{flag} {value}" for flag, value in (
                                   ("model", model), ("preset", preset_file), ("student", student),
                                   ("scorer", scorer), ("calibration", calibration), ("rule", rule))
                                   if value is not None and (flag, value) not in (("model", "world"),
                                                                                  ("rule", "quality"))))
    try:
        table.save(out, overwrite=overwrite)
    except FileExistsError as e:  # another process wrote it since the check above
        raise cli_error(e) from None
    console.print(f"{len(table.routes)} routes (cost {table.routes[0].cost:.1f} to {table.routes[-1].cost:.1f} UNet "
                  f"evaluations per image) -> {out}")
    console.print(f"what --budget B alone takes, by {table.rule}"
                  f"{' against ' + table.config['win_rate_vs'] if table.rule == 'win-rate' else ''} (monotone: a "
                  "larger budget never takes a route worse on these prompts):")
    for choice in table.choices():
        route, best = choice["route"], choice["best"]
        line = f"  B >= {choice['from_cost']:5.1f}: {_route_words(route)}"
        if choice["simpler"]:
            line += f" (within one standard error of the best, {_route_words(best)}: the cheaper is taken)"
        console.print(line)


def _route_words(route) -> str:
    """A route in words; a share satisfied (a route with a standard error) in percent, a mean score as it is;
    the drafts it draws and its win rate where it has them."""
    quality = (f"{route.quality:.4f}" if route.se is None
               else f"{100 * route.quality:.1f}% +- {100 * route.se:.1f}")
    if route.win_rate is not None:
        quality += f", win rate {route.win_rate:.3f} +- {route.win_rate_se:.3f}"
    drafts = f"the best of {route.drafts} drafts" if route.drafts > 1 else "the student"
    if route.strategy is None:
        return f"{drafts} alone, {quality} at {route.cost:.1f}"
    how = (f"refine at sigma {route.rollback_sigma:g}" if route.strategy == "refine"
           else f"regenerate ({route.teacher_scheduler} {route.teacher_steps})")
    return f"k={route.percentile:g} {how}{', ' + drafts if route.drafts > 1 else ''}, {quality} at {route.cost:.1f}"


@eval_app.command("report")
def eval_report(
    experiments: Annotated[list[Path], typer.Argument(help="Experiment directories written by `tandem eval`.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")],
    title: Annotated[str, typer.Option(help="The page title.")] = "tandem evaluation",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """One self-contained HTML report (plots embedded) of several experiments, each with the command
    and configuration behind its numbers."""
    from ..eval.report import combined_report
    from ..outputs import atomic_write_text

    _check_out_file(out, overwrite)
    atomic_write_text(out, combined_report(experiments, title))
    console.print(f"{len(experiments)} experiments -> {out}")


