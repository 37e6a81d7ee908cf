"""Training throughput of the shared Trainer, and how much of a step is Trainer overhead.

Runs consistency distillation of the shipped ShapesWorld teacher (or ``--teacher``) for a few
steps and splits each step's wall time into the networks' forward passes (every call of the
teacher, student, target network, VAE encoder and text encoder, timed by module hooks), the
backward pass, and the rest: data, noise draws, optimizer step, clipping, EMA updates, logging
and checkpoint bookkeeping. The rest is the Trainer's overhead; the goal is <= 10%.

    python benchmarks/train_throughput.py [--steps 20] [--batch-size 32] [--threads 2]

Prints one JSON object (and writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
from _common import emit

os.environ.setdefault("TANDEM_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="world")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tandem.distill.consistency import ConsistencyConfig, ConsistencyDistillation
    from tandem.distill.data import WorldSource
    from tandem.models import load_teacher_pipeline, resolve_model
    from tandem.training.config import TrainerConfig
    from tandem.training.trainer import Trainer

    pipe = load_teacher_pipeline(resolve_model(args.teacher))
    method = ConsistencyDistillation(pipe, ConsistencyConfig())
    total = args.warmup + args.steps
    cfg = TrainerConfig(max_steps=total, batch_size=args.batch_size, checkpoint_every=10**9, log_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, WorldSource(0), cfg, tmp, cpu=True)
        timers = {"forward": 0.0, "backward": 0.0}
        depth = [0]

        def pre(module, inputs):
            if depth[0] == 0:
                timers["_t"] = time.perf_counter()
            depth[0] += 1

        def post(module, inputs, output):
            depth[0] -= 1
            if depth[0] == 0:
                timers["forward"] += time.perf_counter() - timers["_t"]

        for net in (trainer.ctx.model("student"), trainer.ctx.ema("student", "target"), method.teacher_unet):
            net.register_forward_pre_hook(pre)
            net.register_forward_hook(post)
        for name in ("encode_images", "encode_text"):  # the VAE encoder and the text encoder
            fn = getattr(method, name)

            def timed(*a, _fn=fn, **kw):
                pre(None, a)
                try:
                    return _fn(*a, **kw)
                finally:
                    post(None, a, None)

            setattr(method, name, timed)
        backward = trainer.accelerator.backward

        def timed_backward(loss, **kw):
            t = time.perf_counter()
            backward(loss, **kw)
            timers["backward"] += time.perf_counter() - t

        trainer.accelerator.backward = timed_backward
        for step in range(args.warmup):
            trainer.train_step(step)
        timers.update(forward=0.0, backward=0.0)
        t0 = time.perf_counter()
        for step in range(args.warmup, total):
            trainer.train_step(step)
        wall = time.perf_counter() - t0
    networks_s = timers["forward"] + timers["backward"]
    result = {
        "benchmark": "train_throughput",
        "method": "consistency",
        "teacher": args.teacher,
        "config": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                   "threads": torch.get_num_threads(), "consistency": vars(ConsistencyConfig())},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
        "steps_per_s": args.steps / wall,
        "images_per_s": args.steps * args.batch_size / wall,
        "step_s": wall / args.steps,
        "forward_s_per_step": timers["forward"] / args.steps,
        "backward_s_per_step": timers["backward"] / args.steps,
        "overhead_s_per_step": (wall - networks_s) / args.steps,
        "overhead_share": (wall - networks_s) / wall,
        "goal_overhead_share": 0.10,
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
