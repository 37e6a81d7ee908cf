"""The served tandem's saturated throughput against the offline batched pipeline on the very same requests,
interleaved: each round floods a ``tandem serve`` process (fixed policy, one PyTorch thread) with adaptive
requests well past what it serves, then draws the requests it answered (their prompts and seeds) with the
offline pipeline (``TandemPipeline.__call__``, batches of ``--max-batch``, one thread) while the server idles.
Interleaving the two and repeating the round measures the ratio where this machine's speed drifts between runs
(two shared cores: repeated offline runs differ by up to 15%), and drawing the same requests keeps the work the
same (the teacher's share depends on the prompts).

    python benchmarks/serve_saturation.py --out runs/serve-saturation [--rounds 3] [--seconds 30]

Prints one JSON object (and writes it to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from _common import emit
from serve_load import CLI, ENV, bench, offline_pipe, start_server, stop


def served_requests(run: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    return [(r["prompt"], r["seed"]) for r in rows if r["status"] == 200]


def offline_on(pipe, requests: list[tuple[str, int]], max_batch: int) -> dict:
    """The offline pipeline on served requests: each with its own seed (its one image draws from (seed, 0)), in
    batches of ``max_batch``; the images the server served, drawn offline."""
    from tandem.generate import prompt_generator

    prompts = [p for p, _ in requests]
    pipe(prompts[:max_batch], generator=[prompt_generator(s, 0) for _, s in requests[:max_batch]],
         batch_size=max_batch)  # warm-up
    t0 = time.perf_counter()
    out = pipe(prompts, generator=[prompt_generator(s, 0) for _, s in requests], batch_size=max_batch)
    seconds = time.perf_counter() - t0
    improved = [r["path"] not in ("student", "accepted") for r in out.records]
    return {"images": len(prompts), "seconds": seconds, "images_per_s": len(prompts) / seconds,
            "teacher_share": float(np.mean(improved))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of each flood")
    ap.add_argument("--rate", type=float, default=16.0, help="requests per second of the flood (the world's server "
                    "serves about 7-10)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--slo-ms", type=float, default=5000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    args.prompts = args.out / "prompts.txt"
    args.duration, args.deadline_s = args.seconds, 30.0
    subprocess.run([*CLI, "world", "prompts", "--split", "test", "--n", "400", "--out", str(args.prompts)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)
    pipe = offline_pipe()
    rounds = []
    proc, url = start_server(args, args.out, "fixed", [])
    try:
        for r in range(args.rounds):
            args.seed = r  # each round its own arrivals and requests
            served = bench(args, url, args.out, f"saturation{r}", args.rate, "adaptive")
            offline = offline_on(pipe, served_requests(args.out / f"saturation{r}"), args.max_batch)
            rounds.append({"served": served, "offline": offline,
                           "ratio": served["images_per_s"] / offline["images_per_s"]})
            print(f"round {r}: served {served['images_per_s']:.2f} images/s (teacher share "
                  f"{served['teacher_share']:.2f}), offline {offline['images_per_s']:.2f} (teacher share "
                  f"{offline['teacher_share']:.2f}): {rounds[-1]['ratio']:.3f}", flush=True)
    finally:
        exit_code = stop(proc)
    ratios = [r["ratio"] for r in rounds]
    emit({"benchmark": "serve_saturation", "machine": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "threads": {"server": 1, "client": 1, "offline": 1},
          "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
          "rounds": rounds, "ratio_mean": float(np.mean(ratios)), "ratio_min": float(np.min(ratios)),
          "ratio_max": float(np.max(ratios)),
          "ratio_of_totals": sum(r["served"]["images_per_s"] for r in rounds)
          / sum(r["offline"]["images_per_s"] for r in rounds),
          "server_exit_code": exit_code}, args.json)


if __name__ == "__main__":
    main()
