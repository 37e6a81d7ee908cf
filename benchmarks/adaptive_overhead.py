"""Overhead of the adaptive pipeline, and the oracle's cost in teacher steps.

Runs ``TandemPipeline`` (the ``world`` preset by default) in adaptive mode while recording every
model evaluation it makes (student and teacher UNets, text encoder, VAE decodes and encodes,
oracle) with its exact inputs; then replays each recorded call alone, timed, in the same process.
The overhead is the run's wall time over the sum of its replayed model evaluations, minus one
(goal: <= 3%). The oracle's cost is its time per image over the time of one teacher step per
image (one CFG-doubled UNet call; paper: < 0.1 for ImageReward vs SD). ``--also-scorer SPEC``
(repeatable) times other oracles on the very images and prompts the pipeline's oracle scored, in the
same run, for a side-by-side cost.

    python benchmarks/adaptive_overhead.py [--prompts 200] [--batch-size 50] [--percentile 50]
    python benchmarks/adaptive_overhead.py --also-scorer world-oracle:runs/oracle2/oracle

Prints one JSON object (and writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager

import torch
from _common import emit

os.environ.setdefault("TANDEM_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextmanager
def recording(targets: dict[str, tuple[object, str]], calls: list):
    """Wrap ``getattr(obj, attr)`` for each role so each call appends (role, fn, args, kwargs, seconds)."""
    originals = {}
    for role, (obj, attr) in targets.items():
        fn = getattr(obj, attr)
        originals[role] = (obj, attr, fn, attr in vars(obj))

        def wrapped(*args, _fn=fn, _role=role, **kwargs):
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            calls.append((_role, _fn, args, kwargs, time.perf_counter() - t0))
            return out

        setattr(obj, attr, wrapped)
    try:
        yield calls
    finally:
        for obj, attr, fn, own in originals.values():
            if own:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="world")
    parser.add_argument("--prompts", type=int, default=200, help="number of validation prompts")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--percentile", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--also-scorer", action="append", default=[],
                        help="another oracle (a --scorer spec) timed on the same images and prompts")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tandem.pipeline import TandemPipeline
    from tandem.world.prompts import load_prompts

    pipe = TandemPipeline.from_preset(args.preset)
    prompts = load_prompts("val")[: args.prompts]
    kwargs = dict(percentile=args.percentile, seed=0, batch_size=args.batch_size)
    pipe(prompts[: args.batch_size], **kwargs)  # warm-up: first-call allocations

    teacher = pipe.teacher if pipe.teacher is not None else pipe.teacher_img2img
    targets = {
        "student_unet": (pipe.student.unet, "forward"),
        "teacher_unet": (teacher.unet, "forward"),
        "text_encoder": (pipe.student.text_encoder, "forward"),
        "vae_decode": (pipe.student.vae, "decode"),
        "vae_encode": (pipe.student.vae, "encode"),
        "oracle": (pipe, "_score"),  # the scorer's call on a batch (its __call__ is looked up on its type)
    }
    if teacher.text_encoder is not pipe.student.text_encoder:
        targets["teacher_text_encoder"] = (teacher.text_encoder, "forward")
    calls: list = []
    with torch.no_grad(), recording(targets, calls):
        t0 = time.perf_counter()
        out = pipe(prompts, **kwargs)
        wall = time.perf_counter() - t0

    in_run: dict[str, float] = {}
    alone: dict[str, float] = {}
    counts: dict[str, int] = {}
    rows: dict[str, int] = {}
    with torch.no_grad():
        for role, fn, a, kw, seconds in calls:
            t0 = time.perf_counter()
            fn(*a, **kw)
            alone[role] = alone.get(role, 0.0) + time.perf_counter() - t0
            in_run[role] = in_run.get(role, 0.0) + seconds
            counts[role] = counts.get(role, 0) + 1
            if role.endswith("unet"):
                rows[role] = rows.get(role, 0) + int(a[0].shape[0])
    models_alone = sum(alone.values())
    n = len(prompts)
    teacher_rows = rows.get("teacher_unet", 0)
    teacher_step_per_image = alone["teacher_unet"] / (teacher_rows / 2) if teacher_rows else None
    oracle_per_image = alone.get("oracle", 0.0) / n
    also = {}
    if args.also_scorer:
        from tandem.scorers import load_scorer

        oracle_calls = [(a, kw) for role, _, a, kw, _ in calls if role == "oracle"]
        for spec in args.also_scorer:
            other = load_scorer(spec)
            pipe.scorer, own = other, pipe.scorer
            with torch.no_grad():
                pipe._score(*oracle_calls[0][0], **oracle_calls[0][1])  # warm-up
                t0 = time.perf_counter()
                for a, kw in oracle_calls:
                    pipe._score(*a, **kw)
                seconds = (time.perf_counter() - t0) / n
            pipe.scorer = own
            also[spec] = {"seconds_per_image": seconds, "cost_in_teacher_steps": (
                seconds / teacher_step_per_image if teacher_step_per_image else None),
                "ratio_to_pipeline_oracle": seconds / oracle_per_image if oracle_per_image else None}
    result = {
        "benchmark": "adaptive_overhead",
        "preset": args.preset,
        "n_prompts": n,
        "batch_size": args.batch_size,
        "percentile": args.percentile,
        "settings": out.summary["settings"],
        "paths": out.summary["paths"],
        "unet_evals_mean": out.summary["unet_evals_mean"],
        "wall_seconds": wall,
        "model_seconds_alone": models_alone,
        "model_seconds_alone_by_role": alone,
        "model_seconds_in_run_by_role": in_run,
        "calls_by_role": counts,
        "overhead_ratio": wall / models_alone - 1,
        "oracle_seconds_per_image": oracle_per_image,
        "teacher_step_seconds_per_image": teacher_step_per_image,
        "oracle_cost_in_teacher_steps": (oracle_per_image / teacher_step_per_image
                                         if teacher_step_per_image else None),
        "also_scorers": also,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
