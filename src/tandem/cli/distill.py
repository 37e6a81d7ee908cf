"""`tandem distill ...`: distil a teacher into a few-step student."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    UserError,
    console,
    distill_app,
)


@distill_app.command("consistency")
def distill_consistency_cmd(
    out: Annotated[Path, typer.Option(help="Run directory (config, log.jsonl, checkpoint/, student/).")],
    teacher: Annotated[str, typer.Option(help="'world', a diffusers model directory, or a hub id.")] = "world",
    data: Annotated[str, typer.Option(help="'world' (ShapesWorld's stream), an image folder (metadata.jsonl or "
                                           "caption .txt files), webdataset shards, or a saved HF dataset.")] = "world",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    max_steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per process and micro-batch.")] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimisation step.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate (constant after warm-up).")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    w_range: Annotated[tuple[float, float], typer.Option(help="Guidance scales sampled in training (the student "
                                                              "serves any scale in the range).")] = (1.0, 8.0),
    ddim_steps: Annotated[int, typer.Option(help="Teacher DDIM solver grid (N of the skipping schedule).")] = 50,
    loss: Annotated[str, typer.Option(help="'huber' (pseudo-Huber) or 'l2'.")] = "huber",
    target_ema: Annotated[float, typer.Option(help="EMA decay of the target network.")] = 0.95,
    sampling_ema: Annotated[float | None, typer.Option(help="Also keep an EMA with this decay and export it "
                                                            "[export the student itself].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and of every random draw.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="'no', 'bf16' or 'fp16' (where the device supports it).")] = "no",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 250,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process [torch default].")] = None,
) -> None:
    """Consistency distillation (LCM-style): a student that samples in 1-8 steps, with guidance
    given through a w-embedding. Writes the student to OUT/student."""
    import json
    import time

    from ..distill.consistency import ConsistencyConfig, distill_consistency
    from ..distill.trainer import TrainerConfig

    if max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    cfg = ConsistencyConfig(num_ddim_timesteps=ddim_steps, w_min=w_range[0], w_max=w_range[1], loss=loss,
                            target_ema=target_ema, sampling_ema=sampling_ema, lr=lr, warmup_steps=warmup_steps)
    tcfg = TrainerConfig(max_steps=max_steps, seed=seed, batch_size=batch_size, grad_accum=grad_accum,
                         mixed_precision=mixed_precision, checkpoint_every=checkpoint_every, threads=threads)
    t0 = time.time()
    student = distill_consistency(teacher, out, cfg, tcfg, data=data, resume=resume)
    log_path = out / "log.jsonl"  # absent when a resumed run had nothing left to train and its log was removed
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    last = log[-1] if log else {}
    console.print(f"consistency student: {max_steps} steps ({time.time() - t0:.0f}s in this call), "
                  f"last loss {last.get('loss', float('nan')):.5f} -> {student}")
    console.print(f"try it: tandem generate --model {teacher} --mode student --student {student} "
                  f"--student-steps 4 'PROMPT' --out OUT")


