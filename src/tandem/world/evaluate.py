"""Judge images against their captions with the exact checker and summarise: the share of
captions satisfied, overall, by number of objects and by attribute; and the experiment that judges a
world's teacher or student on a prompt list (:func:`evaluate_world`, ``tandem world evaluate``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..generate import StudentSettings, TeacherSettings, generate_student, generate_teacher
from ..loaders import load_student
from ..models import load_teacher_pipeline, resolve_model, student_defaults
from ..outputs import OutputDir, atomic_write_text
from ..plots import plot_quality_vs_steps
from ..sampling import unet_evals_per_step
from ..students import read_student_info, unet_cost
from .checker import CheckResult, check_batch
from .grammar import CaptionError, parse_caption
from .prompts import SPLIT_SEEDS, load_prompts, read_prompt_file
from .scene import relation_holds
from .stream import images_to_tensor, sample_batch, tensor_to_images

ATTRIBUTES = ("shape", "color", "size", "position", "relation")


def attribute_hits(result: CheckResult) -> dict[str, list[bool]]:
    """For each stated attribute of the caption: was it drawn (on the object's matched blob)?"""
    hits: dict[str, list[bool]] = defaultdict(list)
    for spec, b in zip(result.caption.objects, result.assignment):
        blob = result.blobs[b] if b is not None else None
        hits["shape"].append(blob is not None and blob.shape == spec.shape)
        for name in ("color", "size", "position"):
            wanted = getattr(spec, name)
            if wanted is not None:
                hits[name].append(blob is not None and getattr(blob, name) == wanted)
    if result.caption.relation is not None:
        a, b = result.assignment[:2]
        hits["relation"].append(
            a is not None and b is not None
            and relation_holds(result.caption.relation, result.blobs[a].center, result.blobs[b].center)
        )
    return hits


def summarize(results: Sequence[CheckResult]) -> dict:
    """Accuracy (share satisfied), mean soft score, and breakdowns by object count and attribute."""
    if not results:
        raise ValueError("no results to summarize")
    by_count: dict[int, list[bool]] = defaultdict(list)
    by_attr: dict[str, list[bool]] = defaultdict(list)
    count_right = []
    for r in results:
        by_count[len(r.caption.objects)].append(r.satisfied)
        for name, h in attribute_hits(r).items():
            by_attr[name].extend(h)
        count_right.append(len(r.blobs) == len(r.caption.objects))
    return {
        "n": len(results),
        "accuracy": float(np.mean([r.satisfied for r in results])),
        "mean_score": float(np.mean([r.score for r in results])),
        "by_objects": {str(k): {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_count.items())},
        "by_attribute": {k: {"n": len(by_attr[k]), "accuracy": float(np.mean(by_attr[k]))}
                         for k in ATTRIBUTES if by_attr[k]},
        "object_count_right": float(np.mean(count_right)),
    }


def judge(images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict:
    return summarize(check_batch(images, prompts))


@torch.no_grad()
def vae_reconstructions(vae, n: int = 1000, seed: int = 12345, batch_size: int = 250) -> dict:
    """Encode and decode ``n`` held-out renderings (a stream seed no training run uses) and judge
    each reconstruction against its scene's caption."""
    captions, images = sample_batch(seed, 0, n)
    recons = []
    for start in range(0, n, batch_size):
        x = images_to_tensor(images[start:start + batch_size])
        z = vae.encode(x).latent_dist.mean
        recons.append(tensor_to_images(vae.decode(z).sample))
    recon = np.concatenate(recons)
    summary = judge(recon, captions)
    summary["mean_abs_error"] = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
    return summary


EVALUATED_MODES = ("teacher", "student")  # what evaluate_world judges


@dataclass
class WorldEvaluation:
    """What :func:`evaluate_world` wrote: ``results`` (the content of ``path / "results.json"``) and the key of
    its best run (``best``: a guidance scale for the teacher, ``steps{n}_g{g}`` for the student)."""

    results: dict
    path: Path
    best: str


def evaluate_world(out: str | os.PathLike, model: str = "world", mode: str = "teacher",
                   prompts: str | os.PathLike | Sequence[str] = "test", *,
                   guidance_scales: Sequence[float] | None = None, teacher_steps: int = 25, scheduler: str = "dpm",
                   student: str | os.PathLike | None = None, student_steps: Sequence[int] | None = None,
                   student_noise: str = "stochastic", seed: int = 0, batch_size: int = 125, vae: bool = True,
                   reference: str | os.PathLike | None = None, overwrite: bool = False,
                   progress: Callable[[str, int, int], None] | None = None,
                   log: Callable[[str], None] = print) -> WorldEvaluation:
    """Judge a world's teacher (or student) with the exact checker: one run per guidance scale (and, for the
    student, per step count), each drawn for every prompt and summarised by :func:`summarize`, with its UNet
    evaluations and FLOPs per image; and the model's VAE on reconstructions of held-out renderings
    (:func:`vae_reconstructions`). ``tandem world evaluate`` is this function.

    Writes into the new directory ``out`` (whole or not at all, :class:`tandem.outputs.OutputDir`):
    ``results.json`` (the config, a summary per run keyed by guidance scale or ``steps{n}_g{g}``, the best run,
    the VAE's accuracy), each run's images as ``teacher_g{g}.npz`` / ``student_s{n}_g{g}.npz`` (uint8
    [N, H, W, 3] under ``images``) and, for the student, ``quality_vs_steps.png``.

    Args:
        out: the results directory (new or empty; an earlier evaluation's with ``overwrite``).
        model: a world model: ``"world"`` (the shipped one) or a world directory.
        mode: ``"teacher"`` or ``"student"``.
        prompts: ``"val"`` or ``"test"`` (a fixed list of the world), a prompt file (one per line), or the prompts.
        guidance_scales: the guidance scales to compare [the model's default for the teacher or the student].
        teacher_steps, scheduler: the teacher's sampling steps and sampler (``dpm``, ``ddim``, ``unipc``).
        student: a student the world ships by name, or a student directory [the model's preset student].
        student_steps: the student step counts to compare [1, 2, 4, 8 for a consistency student, else its
            default steps].
        student_noise: ``"stochastic"`` or ``"deterministic"`` (a consistency student's multistep noise).
        seed: the run seed; image i is drawn from the generator of ``(seed, i)``.
        batch_size: prompts per model call.
        vae: also judge the VAE's reconstructions of 1000 held-out renderings.
        reference: student mode: the ``results.json`` of a teacher evaluation of the same prompts, whose best
            run the plot draws as a reference line.
        overwrite: replace an earlier evaluation in ``out``.
        progress: ``progress(run, done, total)`` after each batch of a run (a run is named like its images).
        log: takes one line per finished run, the plot and the VAE's accuracy.
    Returns:
        A :class:`WorldEvaluation`: the results, the directory they are in and the best run's key.
    """
    if mode not in EVALUATED_MODES:
        raise ValueError(f"evaluate_world judges the teacher or the student: mode='teacher' or mode='student', "
                         f"not {mode!r}")
    spec = resolve_model(model)
    if not spec.is_world:
        raise ValueError(f"model {model!r} is not a ShapesWorld model; the exact checker judges world images only")
    ref = _reference_line(reference, mode) if reference is not None else None
    prompts, prompts_label, prompt_file = _prompt_list(prompts)
    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except CaptionError as e:
            raise ValueError(f"prompt {i} is outside ShapesWorld's grammar: {e}") from None
    config = {"command": "world evaluate", "tandem_version": __version__, "model": spec.name,
              "model_path": spec.path, "mode": mode, "prompts_file": prompts_label,
              "n_prompts": len(prompts), "seed": seed}
    if mode == "teacher":
        config.update(teacher_steps=teacher_steps, scheduler=scheduler)
        runs = [(str(g), f"teacher_g{g}", TeacherSettings(teacher_steps, scheduler, g))
                for g in guidance_scales or [spec.teacher.guidance_scale]]
    else:
        defaults = student_defaults(spec, student)
        path = Path(defaults.path)
        info = read_student_info(path)
        config.update(student=str(path), student_name=None if student is None else str(student),
                      student_method=info.method, student_noise=student_noise)
        default_steps = [1, 2, 4, 8] if info.base_method == "consistency" else [defaults.steps]
        runs = [(f"steps{n}_g{g}", f"student_s{n}_g{g}", StudentSettings(n, g, student_noise))
                for g in (guidance_scales or [defaults.guidance_scale]) for n in (student_steps or default_steps)]
    inputs = [(what, Path(str(where))) for what, where in (("the prompt file", prompt_file), ("the model", model),
                                                           ("the student", student))
              if where is not None and str(where) and Path(str(where)).exists()]  # what overwrite must not replace
    with OutputDir(out, overwrite, info={"command": "world evaluate"}, inputs=inputs) as output:
        if mode == "teacher":
            pipe, generate = load_teacher_pipeline(spec), generate_teacher
        else:
            pipe, generate = load_student(path, teacher_source=model), generate_student
        results = {"config": config, mode: {},
                   "unet": unet_cost(pipe.unet, context_length=pipe.tokenizer.model_max_length)}
        for key, name, settings in runs:
            def done(n: int, name=name) -> None:
                if progress is not None:
                    progress(name, n, len(prompts))

            images = generate(pipe, prompts, settings, seed, batch_size, on_batch=done)
            evals = settings.steps * unet_evals_per_step(pipe, settings.guidance_scale)
            summary = {**judge(images, prompts), "settings": settings.__dict__, "unet_evals_per_image": evals,
                       "unet_flops_per_image": evals * results["unet"]["flops_per_call"]}
            results[mode][key] = summary
            np.savez_compressed(output.path / f"{name}.npz", images=np.stack(images))
            log(f"{name}: accuracy {summary['accuracy']:.3f}, "
                f"1 object {summary['by_objects'].get('1', {}).get('accuracy', float('nan')):.3f}, "
                f"score {summary['mean_score']:.3f}")
        best = max(results[mode], key=lambda k: results[mode][k]["accuracy"])
        if mode == "teacher":
            results["best_guidance_scale"] = float(best)
        else:
            results["best"] = best
            if ref is not None:
                results["reference"] = {"file": str(reference), **{k: v[0] for k, v in ref.items()}}
            plot = plot_quality_vs_steps(results["student"], output.path / "quality_vs_steps.png", ref,
                                         title=f"{spec.name} student on {prompts_label or 'the given'} prompts")
            log(f"plot -> {output.final / plot.name}")
        if vae:
            results["vae_reconstruction"] = vae_reconstructions(pipe.vae)
            log(f"vae reconstructions: accuracy {results['vae_reconstruction']['accuracy']:.3f}")
        atomic_write_text(output.path / "results.json", json.dumps(results, indent=2) + "\n")
    return WorldEvaluation(results, output.path, best)


def _prompt_list(prompts: str | os.PathLike | Sequence[str]) -> tuple[list[str], str | None, Path | None]:
    """The prompts of :func:`evaluate_world`, what its record calls them (a split's name, the prompt file's path,
    or None for prompts given as a list) and the prompt file they were read from."""
    if isinstance(prompts, str) and prompts in SPLIT_SEEDS:
        return load_prompts(prompts), prompts, None
    if isinstance(prompts, str | os.PathLike):
        return read_prompt_file(prompts), str(prompts), Path(prompts)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be 'val', 'test', a prompt file or a non-empty list of captions")
    return prompts, None, None


def _reference_line(reference: str | os.PathLike, mode: str) -> dict[str, tuple[float, int | str]]:
    """The best run of a teacher evaluation's ``results.json`` as the student plot's reference line:
    ``{label: (accuracy, UNet evaluations per image)}``."""
    if mode != "student":
        raise ValueError("reference=... applies to mode='student'")
    try:
        ref_results = json.loads(Path(reference).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"reference={str(reference)!r}: cannot read a results.json ({e})") from None
    if "teacher" not in ref_results:
        raise ValueError(f"reference={str(reference)!r}: no teacher results in it")
    best_key = max(ref_results["teacher"], key=lambda k: ref_results["teacher"][k]["accuracy"])
    best_ref = ref_results["teacher"][best_key]
    steps = ref_results["config"].get("teacher_steps")
    return {f"teacher, {steps} steps, guidance {best_key}":
            (best_ref["accuracy"], best_ref.get("unet_evals_per_image", 2 * steps if steps else "?"))}
