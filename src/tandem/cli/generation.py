"""`tandem generate`, `tandem calibrate` and `tandem edit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..pipeline.records import run_record
from .common import (
    CONTROLNET_HELP,
    PRESET_HELP,
    SCORER_HELP,
    STUDENT_HELP,
    EditMode,
    Mode,
    Scheduler,
    Strategy,
    UserError,
    _check_composition,
    _check_out_file,
    _check_world_prompts,
    _collect_prompts,
    _compose,
    _direct,
    _load_edit_cases,
    _phase_bars,
    _progress,
    _read_images,
    _tandem_pipeline,
    _warn_resized,
    app,
    cli_error,
    console,
    run_inputs,
)


@app.command()
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompts (one image each).")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="File with one prompt per line.")] = None,
    model: Annotated[str, typer.Option(help="A preset ('world', sd15-lcm, ...), or a teacher: a diffusers "
                                             "directory or hub id.")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    mode: Annotated[Mode, typer.Option(help="Which generator makes the images.")] = Mode.teacher,
    teacher_steps: Annotated[int | None, typer.Option(help="Teacher sampling steps [model default; mixed: 8 per "
                                                           "student step].")] = None,
    scheduler: Annotated[Scheduler | None, typer.Option(help="Teacher sampler [model default].")] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student sampling steps [model default].")] = None,
    student_noise: Annotated[str, typer.Option(help="Student sampler: 'stochastic' (LCM) or "
                                                    "'deterministic'.")] = "stochastic",
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance [model default].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed; prompt i uses a generator seeded from (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call (speed and memory). Every image keeps "
                                                 "its seed and noise; another batch size can change pixels by "
                                                 "float rounding (at most 1/255 measured on CPU).")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs, records.jsonl, config.json).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    strategy: Annotated[Strategy | None, typer.Option(help="adaptive: what the teacher does with a rejected "
                                                           "student image [preset default].")] = None,
    rollback_sigma: Annotated[float | None, typer.Option(help="adaptive/refine-all: rollback sigma in (0, 1] "
                                                              "[preset default].")] = None,
    rollback_convention: Annotated[str | None, typer.Option(help="'paper' (x = sqrt(1-s) x0 + sqrt(s) z, "
                                                                 "--teacher-steps run) or 'strength' (img2img)."
                                                            )] = None,
    handoff: Annotated[str, typer.Option(help="'latent' or 'pixel' (decode and re-encode) hand-off.")] = "latent",
    percentile: Annotated[float | None, typer.Option(help="adaptive: tau = this percentile k of the "
                                                          "calibration [preset default].")] = None,
    threshold: Annotated[float | None, typer.Option(help="adaptive: the cut-off tau itself.")] = None,
    budget: Annotated[float | None, typer.Option(help="adaptive: target average UNet evaluations per image "
                                                      "(k chosen from the calibration).")] = None,
    budget_exact: Annotated[bool, typer.Option(help="adaptive, with --budget: send exactly the lowest-scoring "
                                                    "images the budget pays for, so this run's mean cost never "
                                                    "exceeds it (no calibration needed).")] = False,
    routes: Annotated[Path | None, typer.Option(help="adaptive, --budget alone: a route table (`tandem eval "
                                                     "routes`) to pick the settings from [the preset's].")] = None,
    cascade: Annotated[Path | None, typer.Option(help="adaptive, --budget alone: a cascade table (`tandem "
                                                      "calibrate --cascade`): cheaper students first, each gated "
                                                      "by the oracle, thresholds chosen for the budget.")] = None,
    teacher_guidance_scale: Annotated[float | None, typer.Option(help="adaptive/refine-all: the teacher's "
                                                                      "guidance [preset default].")] = None,
    calibration: Annotated[Path | None, typer.Option(help="adaptive: calibration file from `tandem calibrate` "
                                                          "[the preset's].")] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help=CONTROLNET_HELP)] = None,
    control: Annotated[str | None, typer.Option(help="ControlNet conditioning: the preset's control kind "
                                                     "(world: mask or edges; sd15-lcm: canny or seg).")] = None,
    control_image: Annotated[list[Path] | None, typer.Option(help="--control: control image file(s), one per "
                                                                  "prompt or one for all (repeat the option).")] = None,
    teacher_prob: Annotated[float | None, typer.Option(help="mixed: the probability p_T that the teacher takes "
                                                            "each student transition (drawn per image from its "
                                                            "seed).")] = None,
    teacher_at: Annotated[list[str] | None, typer.Option(help="mixed: the student timesteps at which the teacher takes "
                                                              "the transition, e.g. 999 or 999,499 (or repeat the "
                                                              "option).")] = None,
    drafts: Annotated[int | None, typer.Option(help="adaptive/student: the student draws this many drafts per "
                                                    "prompt and the oracle keeps the best; adaptive routing then "
                                                    "needs a best-of-N calibration (`tandem calibrate --drafts N`, "
                                                    "given with --calibration) [1].")] = None,
    preroute: Annotated[float | None, typer.Option(help="adaptive: send a prompt straight to the teacher when the "
                                                        "predictor gives its student a probability of scoring "
                                                        "below tau at least this high (0 < P <= 1).")] = None,
    predictor: Annotated[Path | None, typer.Option(help="--preroute: the predictor (`tandem calibrate --predictor`) "
                                                        "[the preset's].")] = None,
    preroute_steps: Annotated[int | None, typer.Option(help="--preroute: the teacher's steps for a prompt sent "
                                                            "ahead [25].")] = None,
) -> None:
    """Generate one image per prompt: with the teacher, the student, or both in tandem
    (--mode adaptive: the student draws, the oracle scores, the teacher improves the rejected;
    --mode mixed: one DDIM trajectory whose student transitions the teacher takes with probability
    --teacher-prob or at --teacher-at, on a --teacher-steps grid [8 per student step]).
    With --control, one ControlNet conditions student and teacher alike (all modes but mixed)."""
    import time

    if (control is None and controlnet is None) != (control_image is None):
        raise UserError("--control (or --controlnet) and --control-image go together")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if mode is not Mode.adaptive and any(v is not None for v in (percentile, threshold, budget)):
        raise UserError("--percentile/--threshold/--budget apply to --mode adaptive")
    if drafts is not None and (drafts < 1 or (drafts > 1 and mode not in (Mode.adaptive, Mode.student))):
        raise UserError(f"--drafts must be >= 1, got {drafts}" if drafts < 1 else
                        "--drafts applies to --mode adaptive or student (the oracle keeps the best draft)")
    _check_budget_exact(budget_exact, budget, percentile, threshold)
    if (predictor is not None or preroute_steps is not None) and preroute is None:
        raise UserError("--predictor and --preroute-steps go with --preroute")
    if preroute is not None and mode is not Mode.adaptive:
        raise UserError("--preroute applies to --mode adaptive")
    if predictor is not None and not predictor.is_file():
        raise UserError(f"--predictor {predictor}: no such file (fit one with `tandem calibrate --predictor`)")
    if routes is not None and (mode is not Mode.adaptive or budget is None or budget_exact):
        raise UserError("--routes goes with --mode adaptive and --budget (without --budget-exact)")
    if cascade is not None and (mode is not Mode.adaptive or budget is None or budget_exact or routes is not None):
        raise UserError("--cascade goes with --mode adaptive and --budget (without --budget-exact or --routes)")
    if cascade is not None and not cascade.is_file():
        raise UserError(f"--cascade {cascade}: no such file (make one with `tandem calibrate --cascade STEPS`)")
    explicit = [flag for flag, value in (("--strategy", strategy), ("--teacher-steps", teacher_steps),
                                         ("--scheduler", scheduler), ("--rollback-sigma", rollback_sigma),
                                         ("--rollback-convention", rollback_convention), ("--percentile", percentile),
                                         ("--threshold", threshold)) if value is not None]
    for flag, table in (("--routes", routes), ("--cascade", cascade)):
        if table is not None and explicit:  # the table would be ignored (routes) or refused later (cascade)
            raise UserError(f"{flag} chooses the adaptive settings for --budget alone; it does not go with "
                            f"{', '.join(explicit)}")
    if mode not in (Mode.adaptive, Mode.refine_all):
        tandem_only = {"--strategy": strategy, "--rollback-sigma": rollback_sigma, "--calibration": calibration,
                       "--rollback-convention": rollback_convention}
        for flag, value in tandem_only.items():
            if value is not None:
                raise UserError(f"{flag} applies to --mode adaptive or refine-all")
        if teacher_guidance_scale is not None and mode is not Mode.mixed:
            raise UserError("--teacher-guidance-scale applies to --mode adaptive, refine-all or mixed")
    teacher_timesteps = _mixed_options(mode, teacher_prob, teacher_at, scheduler)
    if mode in (Mode.adaptive, Mode.refine_all, Mode.mixed) or (drafts or 1) > 1 or not _direct(
            model, preset_file, student, controlnet, control):
        preset = _compose(model, preset_file, student, scorer, controlnet, control)
        return _generate_tandem(
            prompt, prompts_file, preset, mode, teacher_steps, scheduler, student_steps, guidance_scale, seed,
            batch_size, out, overwrite, device, strategy, rollback_sigma, rollback_convention, handoff, percentile,
            threshold, budget, teacher_guidance_scale, calibration, control_image,
            {"teacher_prob": teacher_prob, "teacher_at": teacher_timesteps} if mode is Mode.mixed else {},
            "budget-exact" if budget_exact else None, routes, cascade, drafts,
            {"preroute": preroute, "preroute_steps": preroute_steps, "predictor": predictor} if preroute else None)
    if scorer is not None:  # a teacher or a `tandem distill` student alone, run directly: no oracle takes part
        raise UserError("--scorer applies to --mode adaptive or refine-all")

    from ..generate import StudentSettings, TeacherSettings
    from ..loaders import load_student
    from ..models import load_teacher_pipeline, resolve_model, student_defaults
    from ..outputs import OutputDir
    from ..pipeline import generate_alone

    prompts = _collect_prompts(prompt, prompts_file)
    spec = resolve_model(model)
    if spec.is_world:
        _check_world_prompts(prompts)
    if mode is Mode.teacher:
        settings = TeacherSettings(
            steps=teacher_steps if teacher_steps is not None else spec.teacher.steps,
            scheduler=scheduler.value if scheduler is not None else spec.teacher.scheduler,
            guidance_scale=guidance_scale if guidance_scale is not None else spec.teacher.guidance_scale,
        )
        student_path = None
    else:
        try:
            defaults = student_defaults(spec, student)  # a shipped student's, or its own student.json's
        except ValueError as e:
            raise cli_error(e) from None
        student_path = Path(defaults.path)
        settings = StudentSettings(
            steps=student_steps if student_steps is not None else defaults.steps,
            guidance_scale=guidance_scale if guidance_scale is not None else defaults.guidance_scale,
            noise=student_noise,
        )
    t0 = time.time()
    with OutputDir(out, overwrite, info={"command": "generate"},
                   inputs=run_inputs(prompts=prompts_file, model=model, student=student)) as output:
        with _progress("generating", len(prompts)) as bar:
            task = bar.add_task("generate", total=len(prompts))
            def done(n: int) -> None:
                bar.update(task, completed=n)

            try:  # the student alone: the model's VAE and text encoder, not its UNet
                pipe = (load_teacher_pipeline(spec, device=device) if mode is Mode.teacher
                        else load_student(student_path, teacher_source=model, device=device))
                result = generate_alone(pipe, prompts, settings, seed, batch_size, on_batch=done)
            except ValueError as e:
                raise cli_error(e) from None
        _save_run(output, result, seed, spec.name)
        output.write_config({
            "command": "generate", "tandem_version": __version__, "model": spec.name, "model_path": spec.path,
            "mode": mode.value,
            mode.value: {**settings.__dict__, **({"path": str(student_path)} if student_path else {})},
            "seed": seed, "batch_size": batch_size,
            "prompts_file": str(prompts_file) if prompts_file else None, "n_prompts": len(prompts), "device": device,
            "summary": {k: v for k, v in result.summary.items() if k != "settings"},
        })
    console.print(f"{len(prompts)} images in {time.time() - t0:.1f}s -> {out}")


def _calibrate_cascade(pipe, prompts, levels: list[int], seed: int, batch_size: int, out: Path,
                       overwrite: bool, prompts_file: Path | None) -> None:
    with _progress("cascade", len(prompts)) as bar:
        try:
            table = pipe.calibrate_cascade(prompts, levels, seed, batch_size, callback=_phase_bars(bar),
                                           config={"command": "calibrate --cascade", "tandem_version": __version__,
                                                   **run_record(pipe),
                                                   "prompts_file": str(prompts_file) if prompts_file else "val"})
        except ValueError as e:
            raise cli_error(e) from None
    table.save(out, overwrite=overwrite)
    front = table.front()
    console.print(f"cascade {' -> '.join(f'student{n}' for n in table.levels)} -> teacher "
                  f"({table.teacher['strategy']}): {len(front)} front points from {front[0]['cost']:.1f} to "
                  f"{front[-1]['cost']:.1f} UNet evaluations per image -> {out}")


MIXED_REFUSED = {"strategy": "--strategy", "rollback_sigma": "--rollback-sigma",
                 "rollback_convention": "--rollback-convention", "threshold": "--threshold",
                 "percentile": "--percentile", "budget": "--budget", "routing": "--budget-exact",
                 "cascade": "--cascade", "control_image": "--control", "handoff": "--handoff"}


def _refuse_in_mixed(**given) -> None:
    """Refuse, for --mode mixed, the options of the other modes that were given."""
    unused = [MIXED_REFUSED[name] for name, value in given.items() if value]
    if unused:
        raise UserError(f"{', '.join(unused)} do not apply to --mode mixed (the teacher takes whole transitions by "
                        "DDIM; no oracle or ControlNet takes part)")


def _mixed_options(mode, teacher_prob: float | None, teacher_at: list[str] | None, scheduler) -> list[int] | None:
    """--teacher-prob / --teacher-at checked (mixed mode only, exactly one, p_T in [0, 1]); the timesteps of
    --teacher-at (each option one or more, comma-separated)."""
    import math

    if mode is not Mode.mixed:
        if teacher_prob is not None or teacher_at:
            raise UserError("--teacher-prob/--teacher-at apply to --mode mixed")
        return None
    if (teacher_prob is None) == (not teacher_at):
        raise UserError("--mode mixed needs exactly one of --teacher-prob or --teacher-at, got "
                        + ("both" if teacher_prob is not None else "neither"))
    if scheduler is not None:
        raise UserError("--scheduler does not apply to --mode mixed (the teacher takes its steps by DDIM)")
    if teacher_prob is not None:
        if not (math.isfinite(teacher_prob) and 0 <= teacher_prob <= 1):
            raise UserError(f"--teacher-prob must lie in [0, 1], got {teacher_prob:g}")
        return None
    values = [v.strip() for option in teacher_at for v in option.split(",")]
    if not all(v.isdigit() for v in values):
        raise UserError(f"--teacher-at takes timesteps (whole numbers, comma-separated), got {', '.join(teacher_at)}")
    return [int(v) for v in values]


def _save_run(output, result, seed: int, model: str, control_image: list[Path] | None = None) -> None:
    """Save a `generate` run's images and records (``tandem.pipeline.RECORD_FIELDS``, both paths), each record
    with the fields the command adds (``RUN_RECORD_FIELDS``; ``control_image`` with --control-image)."""
    for i, (record, image) in enumerate(zip(result.records, result.images)):
        output.save_image(i, image)
        record.update(file=output.image_path(i).name, seed=seed, model=model)
        if control_image:
            record["control_image"] = str(control_image[i if len(control_image) > 1 else 0])
    output.write_records(result.records)


def _generate_tandem(prompt, prompts_file, preset, mode, teacher_steps, scheduler, student_steps,
                     guidance_scale, seed, batch_size, out, overwrite, device, strategy, rollback_sigma,
                     rollback_convention, handoff, percentile, threshold, budget, teacher_guidance_scale,
                     calibration, control_image=None, mixed: dict | None = None, routing: str | None = None,
                     routes: Path | None = None, cascade: Path | None = None, drafts: int | None = None,
                     prerouting: dict | None = None) -> None:
    """`generate` through a composed TandemPipeline (its options are checked by `generate`; ``mixed``: the
    arguments of mode "mixed"; ``routing``: "budget-exact" or None; ``prerouting``: preroute, preroute_steps and
    the predictor's file, or None)."""
    import time

    import numpy as np

    from ..outputs import OutputDir, image_grid, save_png

    _check_composition(preset, mode.value, calibration, threshold, percentile, budget,
                       budget_exact=routing == "budget-exact" or cascade is not None)
    prompts = _collect_prompts(prompt, prompts_file)
    controls = _read_images(control_image, "--control-image") if control_image else None
    if controls is not None and len(controls) not in (1, len(prompts)):
        raise UserError(f"--control-image: got {len(controls)} images for {len(prompts)} prompts "
                        "(one per prompt, or one for all)")
    output = OutputDir(out, overwrite, info={"command": f"generate --mode {mode.value}"},
                       inputs=run_inputs(prompts=prompts_file, calibration=calibration, routes=routes, cascade=cascade,
                                         control_image=control_image, model=preset.teacher,
                                         student=preset.student, scorer=preset.scorer))
    with output:  # a failure anywhere below leaves --out as it was
        if routes is not None and not routes.is_file():
            raise UserError(f"--routes {routes}: no such file (make one with `tandem eval routes`)")
        pipe = _tandem_pipeline(preset, device, calibration, routes)
        if preset.teacher == "world":
            _check_world_prompts(prompts)
        if mode is Mode.mixed:
            _refuse_in_mixed(strategy=strategy, rollback_sigma=rollback_sigma, rollback_convention=rollback_convention,
                             threshold=threshold, percentile=percentile, budget=budget, routing=routing,
                             cascade=cascade, control_image=control_image, handoff=handoff != "latent")
            kwargs = dict(num_inference_steps=student_steps, guidance_scale=guidance_scale,
                          teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale, seed=seed,
                          batch_size=batch_size, **(mixed or {}))
        else:
            kwargs = dict(mode=mode.value, num_inference_steps=student_steps, guidance_scale=guidance_scale,
                          teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale,
                          teacher_scheduler=scheduler.value if scheduler is not None else None,
                          strategy=strategy.value if strategy is not None else None, rollback_sigma=rollback_sigma,
                          rollback_convention=rollback_convention, handoff=handoff, accept_threshold=threshold,
                          percentile=percentile, budget=budget, seed=seed, batch_size=batch_size, drafts=drafts)
        if routing is not None:
            kwargs["routing"] = routing
        if prerouting is not None:
            kwargs.update(preroute=prerouting["preroute"], preroute_steps=prerouting["preroute_steps"])
            if prerouting["predictor"] is not None:
                from ..prerouting import ScorePredictor

                try:
                    pipe.predictor = ScorePredictor.load(prerouting["predictor"])
                except ValueError as e:
                    raise cli_error(e) from None
        if cascade is not None:
            from ..cascade import CascadeTable

            try:
                kwargs["cascade"] = CascadeTable.load(cascade)
            except ValueError as e:
                raise cli_error(e) from None
        if controls is not None:
            _warn_resized(controls, pipe.resolution(), "--control-image", control_image)
        t0 = time.time()
        with _progress("tandem", len(prompts)) as bar:
            progress = _phase_bars(bar)

            try:
                if mode is Mode.mixed:
                    result = pipe.mixed(prompts, callback=progress, **kwargs)
                else:
                    result = pipe(prompts, callback=progress, control_image=controls, **kwargs)
            except ValueError as e:
                raise cli_error(e) from None
        _save_run(output, result, seed, preset.name, control_image)
        summary = result.summary
        firsts = result.student_images if result.student_images is not None else result.images
        # a pre-routed prompt has no student image: black beside its teacher's
        firsts = [np.zeros_like(im) if first is None else first for first, im in zip(firsts, result.images)]
        grid_rows = ([im for pair in zip(firsts, result.images) for im in pair] if mode is not Mode.mixed
                     else list(result.images))  # mixed: no student image to set beside the final one
        save_png(output.path / "grid.png", image_grid(grid_rows[:128], columns=8))
        output.write_config({
            "command": "generate", "tandem_version": __version__, **run_record(pipe),
            "calibration": str(calibration) if calibration else preset.calibration,
            # the route table only where a budget alone took its route (explicit settings opt out of the preset's)
            "routes": (str(routes) if routes else preset.routes) if summary["settings"].get("route") else None,
            "cascade_table": str(cascade) if cascade else None,
            **({"predictor": str(prerouting["predictor"] or preset.predictor)} if prerouting else {}),
            "control_images": [str(c) for c in control_image or []] or None,
            **summary["settings"], "seed": seed, "batch_size": batch_size,
            "prompts_file": str(prompts_file) if prompts_file else None, "n_prompts": len(prompts), "device": device,
            "summary": {k: v for k, v in summary.items() if k != "settings"},
        })
    paths = ", ".join(f"{k} {v}" for k, v in summary["paths"].items())
    if mode is Mode.mixed:
        console.print(f"{len(prompts)} images in {time.time() - t0:.1f}s; the teacher took "
                      f"{100 * summary['teacher_share']:.0f}% of the student transitions; "
                      f"{summary['unet_evals_mean']:.1f} UNet evaluations per image on average (student "
                      f"{summary['unet_evals_student_mean']:.1f}, teacher {summary['unet_evals_teacher_mean']:.1f}) "
                      f"-> {out}")
        return
    console.print(f"{len(prompts)} images in {time.time() - t0:.1f}s ({paths}); "
                  f"{summary['unet_evals_mean']:.1f} UNet evaluations per image on average "
                  f"(student {summary['student_cost']}, teacher improvement {summary['improve_cost']}); "
                  f"tau {summary['settings']['accept_threshold']} -> {out}")
    if summary.get("calibration_note"):
        console.print(f"note: {summary['calibration_note']}")
    console.print(f"side by side (student | final): {output.path / 'grid.png'}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="Calibration file to write (JSON).")],
    model: Annotated[str, typer.Option(help="A preset (its student and oracle are calibrated), or a teacher "
                                             "directory or hub id with --student and --scorer.")] = "world",
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="Held-out prompts, one per line "
                                                                        "[world: the fixed validation list].")] = None,
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    controlnet: Annotated[str | None, typer.Option(help=CONTROLNET_HELP + " (calibrate with "
                                                   "--control-image).")] = None,
    control_image: Annotated[list[Path] | None, typer.Option(help="--controlnet: control image file(s), one per "
                                                                  "prompt or one for all.")] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student steps [preset default].")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Student guidance [preset default].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing calibration file.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    edits: Annotated[str | None, typer.Option(help="Calibrate *edits* instead: 'val' (the world's validation "
                                                   "edit list) or an edit list file (JSON lines).")] = None,
    strength: Annotated[float | None, typer.Option(help="--edits: the SDEdit strength [preset default].")] = None,
    control: Annotated[str | None, typer.Option(help="Calibrate the student with this ControlNet (world: mask or "
                                                     "edges, on the validation prompts' scenes).")] = None,
    cascade: Annotated[list[int] | None, typer.Option(help="Make a cascade table instead: the steps of a cheaper "
                                                           "student level run before the preset's student (repeat "
                                                           "for more levels, cheapest first).")] = None,
    drafts: Annotated[int, typer.Option(help="Calibrate the best of this many student drafts per prompt (for "
                                             "`tandem generate --drafts N`).")] = 1,
    predictor: Annotated[bool, typer.Option(help="Fit a pre-routing predictor on the prompts instead (the student's "
                                                 "scores regressed on their captions; the --out file "
                                                 "`tandem generate --preroute P --predictor FILE` takes).")] = False,
) -> None:
    """Score the student on held-out prompts and store the percentile table the cut-off tau comes from.
    With --edits, score the student's edits (the table `tandem edit` takes tau from); with --control,
    the student under that ControlNet; with --cascade, every level of a cascade and the teacher level
    (the table `tandem generate --cascade` chooses its thresholds from)."""
    from ..world.prompts import load_prompts

    _check_out_file(out, overwrite)
    if student_steps is not None and student_steps < 1:
        raise UserError(f"--student-steps must be >= 1, got {student_steps}")
    if strength is not None and edits is None:
        raise UserError("--strength applies to --edits")
    if edits is not None and control is not None:
        raise UserError("--edits and --control do not go together")
    if edits is not None and prompts_file is not None:
        raise UserError("--edits and --prompts do not go together (an edit list holds its own prompts)")
    if cascade and (edits is not None or control is not None or controlnet is not None or student_steps is not None
                    or guidance_scale is not None):
        raise UserError("--cascade calibrates the preset's own student and teacher settings; it does not go with "
                        "--edits, --control, --controlnet, --student-steps or --guidance-scale")
    if (controlnet is None) != (control_image is None):
        raise UserError("--controlnet and --control-image go together")
    if drafts < 1:
        raise UserError(f"--drafts must be >= 1, got {drafts}")
    if drafts > 1 and cascade:
        raise UserError("--drafts does not go with --cascade")
    if predictor and (cascade or edits is not None or control is not None or controlnet is not None
                      or student_steps is not None or guidance_scale is not None):
        raise UserError("--predictor fits the preset's student at its own settings; it does not go with --cascade, "
                        "--edits, --control, --controlnet, --student-steps or --guidance-scale")
    preset = _compose(model, preset_file, student, scorer, controlnet, control)
    _check_composition(preset, "calibrate", None)
    if cascade:
        from ..cascade import check_levels

        check_levels(cascade, preset.defaults.get("num_inference_steps"), "--cascade")  # before any model loads
    if edits is not None:
        return _calibrate_edits(out, preset, edits, strength, student_steps, guidance_scale, seed, batch_size,
                                overwrite, device, drafts)
    if prompts_file is None and preset.teacher != "world":
        raise UserError("--prompts is required off the world: held-out prompts like the ones you will generate")
    if control is not None and preset.teacher != "world":
        raise UserError("--control calibrates on the world's scenes; give your own ControlNet with --controlnet "
                        "and --control-image")
    prompts = _collect_prompts(None, prompts_file) if prompts_file else load_prompts("val")
    controls = _read_images(control_image, "--control-image") if control_image else None
    if controls is not None and len(controls) not in (1, len(prompts)):
        raise UserError(f"--control-image: got {len(controls)} images for {len(prompts)} prompts "
                        "(one per prompt, or one for all)")
    pipe = _tandem_pipeline(preset, device)
    if controls is not None:
        _warn_resized(controls, pipe.resolution(), "--control-image", control_image)
    if preset.teacher == "world":
        _check_world_prompts(prompts)
        if control is not None:
            from ..world.conditional import scenes_for_captions
            from ..world.control import control_image

            controls = [control_image(sc, control) for sc in scenes_for_captions(prompts, seed)]
    if cascade:
        return _calibrate_cascade(pipe, prompts, cascade, seed, batch_size, out, overwrite, prompts_file)
    if predictor:
        return _fit_predictor(pipe, prompts, drafts, seed, batch_size, out, overwrite)
    with _progress("calibrating", len(prompts)) as bar:
        task = bar.add_task("student", total=len(prompts))
        try:
            calib = pipe.calibrate(prompts, student_steps, guidance_scale, seed, batch_size,
                                   callback=lambda _p, done, _t: bar.update(task, completed=done),
                                   config={"command": "calibrate", "tandem_version": __version__,
                                           **run_record(pipe), "control": control,
                                           "control_images": "scenes_for_captions(prompts, seed)" if control else
                                           [str(c) for c in control_image or []] or None,
                                           "prompts_file": str(prompts_file) if prompts_file else "val"},
                                   control_image=controls, drafts=drafts)
        except ValueError as e:
            raise cli_error(e) from None
    calib.save(out, overwrite=overwrite)
    taus = ", ".join(f"k={k}: {calib.threshold(k):.4f}" for k in (30, 50, 70))
    what = f"prompts' best of {drafts} student drafts" if drafts > 1 else "student samples"
    console.print(f"{len(prompts)} {what} scored; tau {taus} -> {out}")


def _fit_predictor(pipe, prompts, drafts, seed, batch_size, out, overwrite) -> None:
    with _progress("fitting the predictor", len(prompts)) as bar:
        task = bar.add_task("student", total=len(prompts))
        try:
            fitted = pipe.fit_predictor(prompts, drafts=drafts, seed=seed, batch_size=batch_size,
                                        callback=lambda _p, done, _t: bar.update(task, completed=done))
            fitted.save(out, overwrite=overwrite)
        except ValueError as e:
            raise cli_error(e) from None
    console.print(f"a score predictor fitted on {len(prompts)} prompts (leave-one-out spread {fitted.sigma:.3f}) "
                  f"-> {out}")


def _calibrate_edits(out, preset, edits, strength, student_steps, guidance_scale, seed, batch_size,
                     overwrite, device, drafts: int = 1) -> None:
    if preset.teacher != "world":
        raise UserError("--edits calibrates on ShapesWorld edit lists; off the world use the Python API "
                        "(TandemPipeline.calibrate_edits(images, prompts, strength))")
    if edits == "test":
        raise UserError("--edits test: calibrate on held-out edits ('val'), never on the test list")
    cases = _load_edit_cases(edits)
    pipe = _tandem_pipeline(preset, device)
    with _progress("calibrating edits", len(cases)) as bar:
        task = bar.add_task("student", total=len(cases))
        try:
            calib = pipe.calibrate_edits(
                [c.image() for c in cases], [c.prompt for c in cases], strength, student_steps, guidance_scale,
                seed, batch_size, callback=lambda _p, done, _t: bar.update(task, completed=done),
                config={"command": "calibrate --edits", "tandem_version": __version__,
                        **run_record(pipe, edit=True), "edits": edits}, drafts=drafts)
        except ValueError as e:
            raise cli_error(e) from None
    calib.save(out, overwrite=overwrite)
    taus = ", ".join(f"k={k}: {calib.threshold(k):.4f}" for k in (30, 50, 70))
    what = f"inputs' best of {drafts} student edits" if drafts > 1 else "student edits"
    console.print(f"{len(cases)} {what} scored at strength {calib.fingerprint['task']['edit_strength']}; "
                  f"tau {taus} -> {out}")


@app.command()
def edit(
    image: Annotated[list[Path] | None, typer.Option(help="Input image file(s) (repeat the option).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="The edited prompt(s): one per image, or one for all "
                                                          "(repeat the option).")] = None,
    edits: Annotated[str | None, typer.Option(help="world: edit an edit list instead of --image/--prompt: "
                                                   "'test', 'val' or a JSON-lines file (its source renderings "
                                                   "and edited captions).")] = None,
    n: Annotated[int | None, typer.Option(help="--edits: only the first N edits.")] = None,
    model: Annotated[str, typer.Option(help="A preset (its student, teacher and oracle), or a teacher directory "
                                             "or hub id with --student and --scorer.")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help=PRESET_HELP)] = None,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    scorer: Annotated[str | None, typer.Option(help=SCORER_HELP)] = None,
    mode: Annotated[EditMode, typer.Option(help="adaptive (student, teacher where the oracle rejects), or one "
                                                "model alone.")] = EditMode.adaptive,
    strength: Annotated[float | None, typer.Option(help="SDEdit strength in (0, 1] [preset default].")] = None,
    student_steps: Annotated[int | None, typer.Option(help="Student steps of its img2img schedule "
                                                           "[preset default].")] = None,
    teacher_steps: Annotated[int | None, typer.Option(help="Teacher steps run from the noised input "
                                                           "[preset default].")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Student guidance [preset default].")] = None,
    teacher_guidance_scale: Annotated[float | None, typer.Option(help="Teacher guidance [preset default].")] = None,
    percentile: Annotated[float | None, typer.Option(help="adaptive: tau = this percentile k of the edit "
                                                          "calibration [preset default].")] = None,
    threshold: Annotated[float | None, typer.Option(help="adaptive: the cut-off tau itself.")] = None,
    budget: Annotated[float | None, typer.Option(help="adaptive: target average UNet evaluations per image.")] = None,
    budget_exact: Annotated[bool, typer.Option(help="adaptive, with --budget: edit exactly the lowest-scoring "
                                                    "images the budget pays for by the teacher (no calibration "
                                                    "needed).")] = False,
    calibration: Annotated[Path | None, typer.Option(help="adaptive: an edit calibration (`tandem calibrate "
                                                          "--edits`) [the preset's, for its strength].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed; image i uses a generator seeded from (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per model call (speed and memory). Every image keeps "
                                                 "its seed and noise; another batch size can change pixels by "
                                                 "float rounding (at most 1/255 measured on CPU).")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs, inputs, records.jsonl, config.json).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    drafts: Annotated[int | None, typer.Option(help="adaptive/student: the student edits each input this many times "
                                                    "from different noise and the oracle keeps the best; a percentile "
                                                    "or budget then needs a best-of-N edit calibration (`tandem "
                                                    "calibrate --edits val --drafts N`, given with --calibration) "
                                                    "[1].")] = None,
) -> None:
    """Text-guided editing (SDEdit) in tandem: the student edits each noised input; where the oracle
    scores the edit below tau, the teacher edits the same noised input instead (regeneration)."""
    import time

    import numpy as np
    from PIL import Image

    from ..calibration import Calibration
    from ..outputs import OutputDir, image_grid, save_png

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    for flag, value in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps), ("--n", n)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if mode is not EditMode.adaptive and any(v is not None for v in (percentile, threshold, budget, calibration)):
        raise UserError("--percentile/--threshold/--budget/--calibration apply to --mode adaptive")
    if drafts is not None and (drafts < 1 or (drafts > 1 and mode is EditMode.teacher)):
        raise UserError(f"--drafts must be >= 1, got {drafts}" if drafts < 1 else
                        "--drafts applies to --mode adaptive or student (the oracle keeps the best draft)")
    _check_budget_exact(budget_exact, budget, percentile, threshold)
    preset = _compose(model, preset_file, student, scorer)
    _check_composition(preset, mode.value, calibration, threshold, percentile, budget, edit=True,
                       budget_exact=budget_exact)
    cases = None
    if edits is not None:
        if image or prompt:
            raise UserError("--edits replaces --image and --prompt")
        if preset.teacher != "world":
            raise UserError("--edits lists are ShapesWorld edits (--model world)")
        cases = _load_edit_cases(edits)[:n]
        inputs, prompts = [Image.fromarray(c.image()) for c in cases], [c.prompt for c in cases]
    else:
        if not image or not prompt:
            raise UserError("give --image and --prompt (or --edits)")
        if n is not None:
            raise UserError("--n applies to --edits")
        inputs, prompts = _read_images(image, "--image"), list(prompt)
        if len(prompts) == 1 and len(inputs) > 1:
            prompts = prompts * len(inputs)
        if len(inputs) == 1 and len(prompts) > 1:
            inputs = inputs * len(prompts)
        if len(inputs) != len(prompts):
            raise UserError(f"got {len(inputs)} images and {len(prompts)} prompts (one each, or one for all)")
    with OutputDir(out, overwrite, info={"command": "edit"},  # a failure leaves --out as it was
                   inputs=run_inputs(image=image, edits=edits, calibration=calibration, preset=preset_file,
                                     model=preset.teacher, student=preset.student, scorer=preset.scorer)) as output:
        pipe = _tandem_pipeline(preset, device)
        if image:
            _warn_resized(inputs[:len(image)], pipe.resolution(), "--image", image)
        if preset.teacher == "world":
            _check_world_prompts(prompts)
        t0 = time.time()
        with _progress("editing", len(prompts)) as bar:
            progress = _phase_bars(bar)

            try:
                result = pipe.edit(inputs, prompts, strength=strength, mode=mode.value,
                                   num_inference_steps=student_steps, guidance_scale=guidance_scale,
                                   teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale,
                                   accept_threshold=threshold,
                                   percentile=percentile, budget=budget,
                                   routing="budget-exact" if budget_exact else None,
                                   calibration=Calibration.load(calibration) if calibration else None, seed=seed,
                                   batch_size=batch_size, callback=progress, drafts=drafts)
            except ValueError as e:
                raise cli_error(e) from None
        size = pipe.resolution()
        for i, (record, result_image) in enumerate(zip(result.records, result.images)):
            output.save_image(i, result_image)
            source = inputs[i].convert("RGB")
            if source.size != (size[1], size[0]):
                source = source.resize((size[1], size[0]), Image.BICUBIC)
            input_path = output.path / f"{i:05d}_input.png"
            save_png(input_path, source)
            record.update(file=output.image_path(i).name, input_file=input_path.name, seed=seed, model=preset.name)
            if cases is not None:
                record["edit"] = {k: getattr(cases[i], k) for k in ("split", "index", "source", "object", "attribute",
                                                                     "before", "after")}
            elif image:
                record["input_path"] = str(image[i if len(image) > 1 else 0])
        output.write_records(result.records)
        summary = result.summary
        rows = [np.asarray(im) for i in range(len(prompts)) for im in (inputs[i].convert("RGB").resize(
            (size[1], size[0])), result.images[i])]
        save_png(output.path / "grid.png", image_grid(rows[:128], columns=8))
        output.write_config({
            "command": "edit", "tandem_version": __version__, **run_record(pipe, edit=True),
            "calibration": str(calibration) if calibration else (
                preset.edit_calibrations.get(summary["settings"]["edit_strength"]) if mode is EditMode.adaptive
                else None),
            **summary["settings"], "seed": seed, "batch_size": batch_size, "edits": edits, "n_prompts": len(prompts),
            "device": device, "summary": {k: v for k, v in summary.items() if k != "settings"},
        })
    paths = ", ".join(f"{k} {v}" for k, v in summary["paths"].items())
    console.print(f"{len(prompts)} edits in {time.time() - t0:.1f}s ({paths}); "
                  f"{summary['unet_evals_mean']:.1f} UNet evaluations per image on average; "
                  f"tau {summary['settings']['accept_threshold']} -> {out}")
    if summary.get("calibration_note"):
        console.print(f"note: {summary['calibration_note']}")
    console.print(f"side by side (input | edit): {output.path / 'grid.png'}")


def _check_budget_exact(budget_exact: bool, budget, percentile, threshold) -> None:
    if budget_exact and (budget is None or percentile is not None or threshold is not None):
        raise UserError("--budget-exact goes with --budget alone (not --percentile or --threshold)")
