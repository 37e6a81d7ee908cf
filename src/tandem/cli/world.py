"""`tandem world ...`: ShapesWorld's renderings, lists, trainings, evaluation and judge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from .common import (
    Component,
    Mode,
    Scheduler,
    Split,
    UserError,
    _check_out_file,
    _check_world_prompts,
    _collect_prompts,
    _phase_bars,
    _progress,
    cli_error,
    console,
    run_inputs,
    world_app,
)


@world_app.command("render")
def world_render(
    prompts_file: Annotated[Path, typer.Option("--prompts", help="File with one caption per line.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Run seed; caption i is drawn from (seed, i).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out.")] = False,
) -> None:
    """Ground-truth renderings: for each caption, a scene that satisfies it exactly."""
    from ..generate import prompt_seed
    from ..outputs import OutputDir
    from ..world.conditional import scenes_for_captions
    from ..world.scene import render

    prompts = _collect_prompts(None, prompts_file)
    _check_world_prompts(prompts)
    with OutputDir(out, overwrite, info={"command": "world render"},
                   inputs=run_inputs(prompts=prompts_file)) as output:
        records = []
        for i, (p, scene) in enumerate(zip(prompts, scenes_for_captions(prompts, seed))):
            output.save_image(i, render(scene))
            records.append({"index": i, "file": output.image_path(i).name, "prompt": p, "seed": seed,
                            "prompt_seed": prompt_seed(seed, i), "mode": "render", "scene": scene.to_dict()})
        output.write_records(records)
        output.write_config({"command": "world render", "tandem_version": __version__, "seed": seed,
                             "prompts_file": str(prompts_file), "n_prompts": len(prompts)})
    console.print(f"{len(prompts)} renderings -> {out}")


@world_app.command("prompts")
def world_prompts(
    split: Annotated[Split, typer.Option(help="Which fixed list.")],
    n: Annotated[int, typer.Option(help="Number of prompts.")],
    out: Annotated[Path, typer.Option(help="Output text file.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Regenerate a fixed prompt list (the shipped lists: val n=500, test n=1000)."""
    from ..outputs import atomic_write_text
    from ..world.prompts import generate_prompts

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    _check_out_file(out, overwrite)
    atomic_write_text(out, "\n".join(generate_prompts(split.value, n)) + "\n")
    console.print(f"{n} {split.value} prompts -> {out}")


@world_app.command("edits")
def world_edits(
    split: Annotated[Split, typer.Option(help="Which edit list.")],
    out: Annotated[Path, typer.Option(help="Edit list to write (JSON lines).")],
    n: Annotated[int | None, typer.Option(help="Number of edits [the shipped size: val 200, test 500].")] = None,
    images: Annotated[Path | None, typer.Option(help="Also write each edit's source rendering here "
                                                     "(00000.png, ...), for `tandem edit --image`.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
) -> None:
    """Regenerate an editing benchmark list: renderings whose caption changes in one attribute."""
    from ..outputs import OutputDir, atomic_write_text
    from ..world.edits import EDIT_SIZES, generate_edits

    n = EDIT_SIZES[split.value] if n is None else n
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    _check_out_file(out, overwrite)
    folder = (OutputDir(images, overwrite, info={"command": "world edits"}, flag="--images",
                        inputs=[("--out", out)]) if images else None)
    cases = generate_edits(split.value, n)
    if folder is not None:
        with folder:
            for i, c in enumerate(cases):
                folder.save_image(i, c.image())
    atomic_write_text(out, "".join(c.to_json() + "\n" for c in cases))
    console.print(f"{n} {split.value} edits -> {out}" + (f" (source renderings in {images})" if images else ""))


@world_app.command("train")
def world_train(
    component: Annotated[Component, typer.Argument(help="Which component to train.")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, logs, exported weights).")],
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Training steps [component default].")] = None,
    vae: Annotated[Path | None, typer.Option(help="teacher, vae-decoder: the VAE directory "
                                                   "[the shipped world's vae/].")] = None,
    text_encoder: Annotated[Path | None, typer.Option(help="teacher: a directory with text_encoder/ and "
                                                            "tokenizer/ (a clip run) [the shipped world].")] = None,
    init_from: Annotated[Path | None, typer.Option(help="teacher: warm-start from this UNet directory "
                                                         "(e.g. a world's unet/) instead of random weights.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights' init and the data stream "
                                               "[component default].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [component default].")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps [component default].")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="teacher: 'constant' or 'cosine' (to 0 at --max-steps) "
                                                         "after warm-up [constant].")] = None,
    world: Annotated[Path | None, typer.Option(help="oracle, oracle-clip: the world whose models draw its "
                                                    "training images (oracle-clip: and whose clip/ it starts from); "
                                                    "controlnet: the world whose teacher it trains for "
                                                    "[the shipped world].")] = None,
    control: Annotated[str | None, typer.Option(help="controlnet: the control image kind, mask or edges.")] = None,
    data: Annotated[Path | None, typer.Option(help="oracle: the directory of its data shards (train/, eval/, "
                                                   "cal/) [RUN/data].")] = None,
    train_shards: Annotated[int | None, typer.Option(help="oracle: training shards to use (missing ones are "
                                                          "drawn first) [24].")] = None,
    channels: Annotated[str | None, typer.Option(help="oracle: the image encoder's channels per level, e.g. "
                                                      "24,48 [32,64].")] = None,
    width: Annotated[int | None, typer.Option(help="oracle: the token width of text, image grid and fusion "
                                                   "[64].")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads [component default].")] = None,
) -> None:
    """Train a ShapesWorld component from scratch (or --resume).

    Order: vae and clip (independent); then teacher (--vae RUN/vae --text-encoder CLIP_RUN)
    and vae-decoder (--vae RUN/vae: fine-tunes the decoder only, so the latent space the
    teacher learned is unchanged); then `tandem world assemble`. The oracle trains last, on
    samples of the world's models (the shipped ones), drawn into resumable shards in --data (or
    RUN/data; `tandem world oracle-data` draws them ahead); oracle-clip is the first oracle
    (a CLIP-initialised fusion network on a single cached sample set). A controlnet (--control mask or
    edges) trains for the teacher of --world, which stays frozen.
    """
    from ..models import world_dir
    from ..world import control as world_control
    from ..world import oracle, oracle_train, train

    configs = {"vae": train.VAETrainConfig, "vae-decoder": train.DecoderTrainConfig, "clip": train.CLIPTrainConfig,
               "teacher": train.TeacherTrainConfig, "oracle": oracle_train.OracleNetTrainConfig,
               "oracle-clip": oracle.OracleTrainConfig,
               "controlnet": world_control.ControlNetTrainConfig}
    cfg = configs[component.value]()
    teacher_only = {"init_from", "lr_schedule"}
    overrides = {  # field: (value, its check, what the check demands)
        "max_steps": (max_steps, lambda v: v >= 1, ">= 1"),
        "init_from": (str(init_from) if init_from is not None else None, lambda v: True, ""),
        "seed": (seed, lambda v: True, ""),
        "lr": (lr, lambda v: v > 0, "> 0"),
        "warmup_steps": (warmup_steps, lambda v: v >= 0, ">= 0"),
        "lr_schedule": (lr_schedule, lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
        "control": (control, lambda v: v in world_control.CONTROLS, " or ".join(world_control.CONTROLS)),
        "threads": (threads, lambda v: v >= 1, ">= 1"),
    }
    for name, (value, valid, demand) in overrides.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in teacher_only and component is not Component.teacher:
            raise UserError(f"{flag} applies to the teacher only")
        if name == "control" and component is not Component.controlnet:
            raise UserError(f"{flag} applies to the controlnet only")
        if not valid(value):
            raise UserError(f"{flag} must be {demand}, got {value!r}")
        cfg = dataclasses.replace(cfg, **{name: value})
    for flag, value in (("--data", data), ("--train-shards", train_shards), ("--channels", channels),
                        ("--width", width)):
        if value is not None and component is not Component.oracle:
            raise UserError(f"{flag} applies to the oracle only")
    if channels is not None or width is not None:
        arch = {}
        if channels is not None:
            try:
                arch["channels"] = tuple(int(c) for c in channels.split(","))
            except ValueError:
                raise UserError(f"--channels must be integers separated by commas, got {channels!r}") from None
        if width is not None:
            arch["width"] = width
        try:
            cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, **arch))
        except ValueError as error:
            raise UserError(str(error)) from None
    if data is not None:
        cfg = dataclasses.replace(cfg, data=str(data))
    if train_shards is not None:
        if train_shards < 1:
            raise UserError(f"--train-shards must be >= 1, got {train_shards}")
        cfg = dataclasses.replace(cfg, shards={**cfg.shards, "train": train_shards})
    if component is Component.controlnet and control is None:
        raise UserError("controlnet: give --control mask or --control edges")
    if world is not None:
        if component not in (Component.oracle, Component.oracle_clip, Component.controlnet):
            raise UserError("--world applies to the oracles and the controlnet only")
        if not (world / "model_index.json").exists():
            raise UserError(f"--world {world} is not a world directory (no model_index.json)")
        cfg = dataclasses.replace(cfg, world=str(world))
    if component in (Component.oracle, Component.oracle_clip, Component.controlnet) and (
            vae is not None or text_encoder is not None):
        raise UserError(f"--vae/--text-encoder do not apply to the {component.value} (it uses --world's)")
    try:
        if component is Component.vae:
            result = train.train_vae(out, cfg, resume)
        elif component is Component.vae_decoder:
            result = train.train_vae_decoder(out, vae or world_dir() / "vae", cfg, resume)
        elif component is Component.clip:
            result = train.train_clip(out, cfg, resume)
        elif component is Component.oracle:
            result = oracle_train.train_oracle_net(out, cfg, resume)
        elif component is Component.oracle_clip:
            result = oracle.train_oracle(out, cfg, resume)
        elif component is Component.controlnet:
            result = world_control.train_controlnet(out, cfg, resume)
        else:
            result = train.train_teacher(out, vae or world_dir() / "vae", text_encoder or world_dir(), cfg, resume)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        raise cli_error(e) from None  # the run directory's checks name out_dir, resume=True, max_steps
    console.print(f"{component.value} trained -> {result}")


@world_app.command("oracle-data")
def world_oracle_data(
    out: Annotated[Path, typer.Option(help="The shard directory: train/, eval/ and cal/ are made in it "
                                           "(give it to `tandem world train oracle --data`).")],
    train: Annotated[int, typer.Option(help="Training shards (each about 320 stream captions and 250 edits: "
                                            "about 3,000 images).")] = 24,
    held_out: Annotated[int, typer.Option("--eval", help="Held-out evaluation shards (another stream).")] = 2,
    cal: Annotated[int, typer.Option(help="Calibration shards (P(satisfied) is Platt-scaled on them).")] = 1,
    world: Annotated[Path | None, typer.Option(help="The world whose models draw the images [the shipped world].")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Draw the oracle's data ahead of training: the world's student, teacher, refinements, ControlNet
    generations, edits, exact renderings and targeted corruptions, labelled by the exact checker, in
    shards (`tandem.world.oracle_data`). Only missing shards are drawn: an interrupted run resumes, and
    more shards extend the set."""
    import torch

    from ..world.oracle_data import DataRecipe, build_shards
    from ..world.oracle_train import SPLITS

    counts = {"train": train, "eval": held_out, "cal": cal}
    for split, n in counts.items():
        if n < 0:
            raise UserError(f"--{split} must be >= 0, got {n}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if world is not None and not (world / "model_index.json").exists():
        raise UserError(f"--world {world} is not a world directory (no model_index.json)")
    from ..outputs import make_writable_dir

    make_writable_dir(out)  # an unwritable --out fails before any shard is drawn
    torch.set_num_threads(threads)
    for split in ("eval", "cal", "train"):
        if counts[split]:
            try:
                build_shards(out / split, SPLITS[split], counts[split], DataRecipe(), world)
            except ValueError as error:  # another recipe's shards in the directory
                raise UserError(str(error)) from error
    console.print(f"oracle data -> {out}")


@world_app.command("assemble")
def world_assemble(
    vae: Annotated[Path, typer.Option(help="VAE export (e.g. RUN/vae of the vae-decoder run).")],
    clip: Annotated[Path, typer.Option(help="CLIP run directory (holds clip/, text_encoder/, tokenizer/).")],
    unet: Annotated[Path, typer.Option(help="Teacher UNet export (RUN/unet of the teacher run).")],
    guidance_scale: Annotated[float, typer.Option(help="The teacher's default guidance scale "
                                                       "(the best one from `tandem world evaluate`).")],
    out: Annotated[Path, typer.Option(help="World directory to write.")],
    fp16: Annotated[bool, typer.Option(help="Store the UNet in float16 (half the size).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing world directory.")] = False,
) -> None:
    """Put trained components together into a world directory (a Stable Diffusion repository)."""
    import torch

    from ..world.assemble import assemble_world

    for name, path in (("--vae", vae), ("--clip", clip), ("--unet", unet)):
        if not path.is_dir():
            raise UserError(f"{name} {path} is not a directory")
    try:
        assemble_world(out, vae, clip, unet, guidance_scale, torch.float16 if fp16 else torch.float32, overwrite)
    except (ValueError, FileExistsError) as e:
        raise cli_error(e) from None
    console.print(f"world -> {out}")


@world_app.command("add-student")
def world_add_student(
    student: Annotated[Path, typer.Option(help="The student/ directory of a `tandem distill` run.")],
    steps: Annotated[int, typer.Option(help="The student's default sampling steps.")],
    guidance_scale: Annotated[float, typer.Option(help="The student's default guidance scale "
                                                       "(the best one from `tandem world evaluate --mode student`).")],
    world: Annotated[Path | None, typer.Option(help="World directory [the shipped world].")] = None,
    name: Annotated[str | None, typer.Option(help="Ship it under this name (--student NAME) in students/NAME "
                                                  "[as the preset student, in student/].")] = None,
    preset: Annotated[bool | None, typer.Option(help="Also make it the preset's default student [yes without "
                                                     "--name, no with it].")] = None,
    evaluation: Annotated[list[Path] | None, typer.Option(help="A `tandem world evaluate` results.json to ship "
                                                              "with it (the test prompts' is listed by `tandem "
                                                              "world students`).")] = None,
    fp16: Annotated[bool, typer.Option(help="Store the UNet in float16 (half the size).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace the student of that name.")] = False,
) -> None:
    """Ship a distilled student with the world, as its preset student or by name."""
    from ..models import world_dir
    from ..world.assemble import add_student

    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if guidance_scale < 1:
        raise UserError(f"--guidance-scale must be >= 1, got {guidance_scale}")
    evaluations = {}
    for path in evaluation or []:
        try:
            split = json.loads(path.read_text())["config"]["prompts_file"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--evaluation {path}: not a `tandem world evaluate` results.json") from None
        split = {"prompts_val.txt": "val", "prompts_test.txt": "test"}.get(Path(str(split)).name, split)
        if split not in ("val", "test"):
            raise UserError(f"--evaluation {path}: judged on {split}, not the world's val or test prompts")
        evaluations[f"eval_{split}.json"] = path
    try:
        target = add_student(world or world_dir(), student, steps, guidance_scale, fp16, overwrite, name=name,
                             preset=preset, evaluations=evaluations)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise cli_error(e) from None
    console.print(f"student -> {target}")


@world_app.command("add-calibration")
def world_add_calibration(
    student: Annotated[str, typer.Option(help="A student the world ships by name (`tandem world students`).")],
    calibration: Annotated[Path, typer.Option(help="Its `tandem calibrate --student NAME` file.")],
    world: Annotated[Path | None, typer.Option(help="World directory [the shipped world].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the student's shipped calibration.")] = False,
) -> None:
    """Ship a calibration with a named student (checked against it): --student NAME then brings it."""
    from ..models import world_dir
    from ..world.assemble import add_calibration

    if not calibration.is_file():
        raise UserError(f"--calibration {calibration}: no such file")
    try:
        target = add_calibration(world or world_dir(), student, calibration, overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise cli_error(e) from None
    console.print(f"calibration -> {target}")


@world_app.command("plot-cost")
def world_plot_cost(
    results: Annotated[list[Path], typer.Argument(help="results.json files of `tandem world evaluate` (teacher or "
                                                       "student; each becomes one line).")],
    out: Annotated[Path, typer.Option(help="The figure to write (PNG).")],
    label: Annotated[list[str] | None, typer.Option(help="A label per results file, in order [the model or "
                                                         "student it judged].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing figure.")] = False,
) -> None:
    """Accuracy against UNet FLOPs per image, one line per evaluation (the knowledge-distillation paper's
    Fig. 2 view): which model reaches a quality for the least compute."""
    from ..plots import plot_quality_vs_flops

    if label and len(label) != len(results):
        raise UserError(f"--label: got {len(label)} labels for {len(results)} results files")
    _check_out_file(out, overwrite)
    series = {}
    for i, path in enumerate(results):
        try:
            data = json.loads(path.read_text())
            mode = data["config"]["mode"]
            runs = data[mode]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a results.json of `tandem world evaluate`") from None
        if not all("unet_flops_per_image" in r for r in runs.values()):
            raise UserError(f"{path}: no FLOPs per image in it (written by an older tandem: evaluate again)")
        name = label[i] if label else (data["config"].get("student_name") or data["config"].get("student")
                                       if mode == "student" else f"teacher ({data['config']['model']})")
        series[str(name)] = [(r["unet_flops_per_image"], r["accuracy"],
                              f"{r['settings']['steps']}/{r['settings']['guidance_scale']:g}") for r in runs.values()]
    plot_quality_vs_flops(series, out)
    console.print(f"figure -> {out}")


@world_app.command("students")
def world_students(
    model: Annotated[str, typer.Option(help="A world model: 'world' or a world directory.")] = "world",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """The students the world ships: name, method, directory, default steps and guidance, parameters and
    FLOPs per UNet call, and accuracy on the test prompts with the command that measured it."""
    from ..models import STUDY_STUDENTS, resolve_model
    from ..students import shipped_students

    spec = resolve_model(model)
    # a study student whose folder is absent (an installed wheel carries none: they live in a checkout's study/)
    absent = [n for n, s in spec.students.items() if s.study and not Path(s.path).is_dir()]
    rows = shipped_students(dataclasses.replace(spec, students={
        n: s for n, s in spec.students.items() if n not in absent}))
    root = Path(spec.path)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table("name", "method", "steps", "guidance", "params", "MFLOPs/call", "test accuracy", "dir")
    for r in rows:
        acc = r.get("accuracy")
        where = Path(r["dir"])
        base = next((b for b in (root, STUDY_STUDENTS.parents[1]) if where.is_relative_to(b)), None)
        shown = where if base is None else where.relative_to(base)  # study/world-students/NAME from a checkout
        method = r["method"] + (" (baseline: no teacher)" if r["baseline"] else "")
        table.add_row(("* " if r["preset"] else "") + r["name"], method, str(r["steps"]),
                      f"{r['guidance_scale']:g}", f"{r['params'] / 1e6:.2f}M", f"{r['flops_per_call'] / 1e6:.1f}",
                      "-" if acc is None else f"{100 * acc:.1f}%", str(shown))
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    console.print("* the preset's default student; accuracy: exact checker on the 1000 test prompts, measured by "
                  "the command in --json's 'measured_by'")
    if absent:
        console.print(f"study students not installed (they live in a checkout's study/world-students/): "
                      f"{', '.join(absent)}")


@world_app.command("evaluate")
def world_evaluate(
    out: Annotated[Path, typer.Option(help="Results directory (results.json, sample grid).")],
    model: Annotated[str, typer.Option(help="A world model: 'world' or a world directory.")] = "world",
    mode: Annotated[Mode, typer.Option(help="Judge the teacher or the student.")] = Mode.teacher,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="Prompts [the fixed test list].")] = None,
    guidance_scale: Annotated[list[float] | None, typer.Option(help="Guidance scales to compare "
                                                                   "(repeat the option) [model default].")] = None,
    teacher_steps: Annotated[int, typer.Option(help="Teacher sampling steps.")] = 25,
    scheduler: Annotated[Scheduler, typer.Option(help="Teacher sampler.")] = Scheduler.dpm,
    student: Annotated[str | None, typer.Option(help="Student: a shipped name (`tandem world students`) or a "
                                                     "directory [the model's preset student].")] = None,
    student_steps: Annotated[list[int] | None, typer.Option(help="Student step counts to compare "
                                                                 "(repeat the option) [1 2 4 8].")] = None,
    student_noise: Annotated[str, typer.Option(help="'stochastic' or 'deterministic'.")] = "stochastic",
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per model call.")] = 125,
    vae: Annotated[bool, typer.Option(help="Also judge VAE reconstructions of 1000 held-out renderings.")] = True,
    reference: Annotated[Path | None, typer.Option(help="student mode: a teacher results.json (same prompts) "
                                                        "drawn as the reference line of the plot.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier results directory.")] = False,
) -> None:
    """Judge the world teacher (or student) on a prompt list with the exact checker (and its VAE's reconstructions)."""
    from ..world.evaluate import evaluate_world

    if mode not in (Mode.teacher, Mode.student):
        raise UserError(f"--mode {mode.value}: world evaluate judges the teacher or the student (--mode teacher|student)")
    with _progress("{task.description}", 1) as bar:  # a bar per run, named like its images
        try:
            evaluation = evaluate_world(
                out, model, mode.value, prompts_file or "test", guidance_scales=guidance_scale,
                teacher_steps=teacher_steps, scheduler=scheduler.value, student=student, student_steps=student_steps,
                student_noise=student_noise, seed=seed, batch_size=batch_size, vae=vae, reference=reference,
                overwrite=overwrite, progress=_phase_bars(bar), log=console.print)
        except ValueError as e:
            raise cli_error(e) from None
    console.print(f"best {evaluation.best} -> {evaluation.path / 'results.json'}")


def _mean_unet_evals(records: list[dict]) -> float | None:
    """Mean UNet evaluations per image of a `tandem generate` output's records (None if not recorded)."""
    costs = [r["unet_evals"]["total"] if isinstance(r.get("unet_evals"), dict) else r.get("unet_evals")
             for r in records]
    return float(sum(costs) / len(costs)) if costs and all(isinstance(c, int | float) for c in costs) else None


def _read_output_dir(path: Path) -> tuple[list[str], list, list[dict]]:
    """Prompts, images and records of a `tandem generate` output directory."""
    import json

    import numpy as np
    from PIL import Image

    from ..outputs import INCOMPLETE

    if not path.is_dir():
        raise UserError(f"{path} is not a directory (give the --out of a `tandem generate` run)")
    records_file = path / "records.jsonl"
    if not records_file.exists():
        raise UserError(f"{path} has no records.jsonl (not a `tandem generate` output directory)")
    if (path / INCOMPLETE).exists():
        raise UserError(f"{path} is an unfinished run (it holds {INCOMPLETE}); nothing in it is a result")
    records = []
    try:
        lines = records_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{records_file} is unreadable ({e.__class__.__name__}: {e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise UserError(f"{records_file} line {n} is not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not (
                isinstance(r.get("file"), str) or isinstance(r.get("index"), int)):
            raise UserError(f"{records_file} line {n} is not a tandem record (needs 'prompt' and 'file' or 'index')")
        records.append(r)
    images = []
    for r in records:
        file = path / r.get("file", f"{r.get('index', 0):05d}.png")
        if not file.exists():
            raise UserError(f"{file} is missing (listed in {records_file})")
        try:
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise UserError(f"{file} is not a readable image (truncated or corrupt: {e})") from None
    return [r["prompt"] for r in records], images, records


@world_app.command("judge")
def world_judge(
    run: Annotated[Path, typer.Argument(help="Output directory of `tandem generate` (PNGs + records.jsonl).")],
    against: Annotated[Path | None, typer.Option(help="Another output directory of the same prompts: "
                                                      "side-by-side win rate on the soft score.")] = None,
) -> None:
    """Judge generated world images against their prompts with the exact checker (writes RUN/judge.json)."""
    import json

    import numpy as np

    from ..eval.metrics import win_rate
    from ..outputs import atomic_write_text
    from ..world.checker import check_batch
    from ..world.evaluate import summarize

    prompts, images, records = _read_output_dir(run)
    _check_world_prompts(prompts)
    results = check_batch(images, prompts)
    report = {"run": str(run), "unet_evals_mean": _mean_unet_evals(records), **summarize(results)}
    if against is not None:
        other_prompts, other_images, other_records = _read_output_dir(against)
        if other_prompts != prompts:
            raise UserError(f"{against} holds other prompts than {run}; side by side needs the same ones")
        other = check_batch(other_images, other_prompts)
        side = win_rate(np.array([r.score for r in results]), np.array([r.score for r in other]))
        report["against"] = {"run": str(against), **side, "win_rate_ties_split": side["win_rate"],
                             "mean_score": float(np.mean([r.score for r in other])),
                             "unet_evals_mean": _mean_unet_evals(other_records),
                             "accuracy": float(np.mean([r.satisfied for r in other]))}
    atomic_write_text(run / "judge.json", json.dumps(report, indent=2) + "\n")
    line = f"accuracy {report['accuracy']:.3f}, mean soft score {report['mean_score']:.4f}"
    if against is not None:
        a = report["against"]
        line += (f"; vs {against}: win {a['win']:.3f} tie {a['tie']:.3f} loss {a['loss']:.3f} "
                 f"(win rate, ties split: {a['win_rate']:.3f}, 95% CI {a['ci'][0]:.3f}-{a['ci'][1]:.3f})")
    console.print(f"{line} -> {run / 'judge.json'}")


