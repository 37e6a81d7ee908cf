"""The served tandem under load, side by side in one run: teacher only, student only, the fixed-threshold tandem
and the load-aware tandem, at three Poisson arrival rates (light; about the teacher-only capacity; twice it), the
same SLO, prompts and seeds; and the server's saturated throughput against the offline batched pipeline's, the
latter timed just before and just after the saturated run.

Each configuration runs ``tandem bench serve`` against a ``tandem serve`` process on 127.0.0.1 (the world, one
PyTorch thread each; the load generator is a second process). The teacher-only capacity is measured first in the
same run: the images per second the server serves when teacher-only requests flood it (its bounded queue full
throughout). The stages' profile (``tandem serve --profile``) is measured first too, for the load-aware server. At the light rate, the tandem's served accuracy is compared with the offline pipeline
(``TandemPipeline.__call__``, the images ``tandem generate --mode adaptive`` draws) on the very prompts and seeds
that were served.

    python benchmarks/serve_load.py --out runs/serve-load [--duration 60] [--slo-ms 5000]

Prints one JSON object (and writes it to ``--json`` if given); each run's directory (requests.jsonl, results.json,
plot.png) stays in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _common import emit

os.environ.setdefault("TANDEM_PROGRESS", "0")
CLI = [sys.executable, "-m", "tandem.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, out: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(out / f"server-{name}.log", "w")  # noqa: SIM115  (kept open for the process's lifetime)
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--threads", "1", "--max-batch", str(args.max_batch),
                             "--max-queue", str(args.max_queue), "--deadline-s", str(args.deadline_s), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited; see {out / f'server-{name}.log'}")
        time.sleep(0.25)
    raise RuntimeError(f"server {name} did not become ready")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=300)


def bench(args, url: str, out: Path, name: str, rate: float, mode: str, duration: float | None = None) -> dict:
    duration = args.duration if duration is None else duration
    subprocess.run([*CLI, "bench", "serve", "--url", url, "--rate", f"{rate:.4f}", "--duration", str(duration),
                    "--mode", mode, "--slo-ms", str(args.slo_ms), "--seed", str(args.seed), "--prompts",
                    str(args.prompts), "--drain-timeout-s", "300", "--out", str(out / name)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)
    r = json.loads((out / name / "results.json").read_text())
    return {"rate": rate, "mode": mode, "sent": r["sent"], "completed": r["completed"], "by_status": r["by_status"],
            "images_per_s": r["throughput"]["images_per_s"], "latency_s": r["latency_s"], "slo": r["slo"],
            "teacher_share": r["teacher_share"], "unet_evals_per_image": r["unet_evals_per_image"],
            "accuracy": r["accuracy"]}


def offline(args, out: Path, light_run: str) -> dict:
    """The offline pipeline on the prompts and seeds served in ``light_run``: does it judge them as served?"""
    import numpy as np

    from tandem.world.checker import check

    pipe = offline_pipe()
    rows = [json.loads(line) for line in (out / light_run / "requests.jsonl").read_text().splitlines()]
    served = [(r["prompt"], r["seed"], img["satisfied"]) for r in rows if r["status"] == 200 for img in r["images"]]
    ok = [bool(check(pipe([p], seed=s).images[0], p).satisfied) for p, s, _ in served]
    return {"n": len(served), "accuracy_offline": float(np.mean(ok)),
            "accuracy_served": float(np.mean([bool(s) for _, _, s in served])),
            "same_verdicts": sum(a == bool(b) for a, (_, _, b) in zip(ok, served))}


def offline_pipe():
    import torch

    from tandem import TandemPipeline

    torch.set_num_threads(1)
    return TandemPipeline.from_pretrained("world")


def offline_throughput(args, prompts: list[str]) -> dict:
    """The offline pipeline's batched throughput (adaptive, batches of ``--max-batch``, one thread) on ``prompts``,
    after one batch of warm-up: the reference the saturated server is held to, timed beside its run."""
    pipe = offline_pipe()
    pipe(prompts[:args.max_batch], seed=args.seed, batch_size=args.max_batch)
    t0 = time.perf_counter()
    result = pipe(prompts, seed=args.seed, batch_size=args.max_batch)
    seconds = time.perf_counter() - t0
    paths = [r["path"] for r in result.records]
    return {"images": len(prompts), "seconds": seconds, "images_per_s": len(prompts) / seconds,
            "teacher_share": sum(p not in ("student", "accepted") for p in paths) / len(paths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--slo-ms", type=float, default=5000.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=30.0)
    ap.add_argument("--probe-s", type=float, default=30.0, help="seconds of the teacher-only flood that measures "
                    "its capacity")
    ap.add_argument("--light", type=float, default=0.25, help="the light rate, as a share of the teacher's capacity")
    ap.add_argument("--prompts", type=Path, default=None, help="default: 400 of the world's test prompts")
    ap.add_argument("--offline-images", type=int, default=160, help="prompts the offline throughput is timed on "
                    "(twice: just before and just after the saturated run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    if args.prompts is None:
        args.prompts = args.out / "prompts.txt"
        subprocess.run([*CLI, "world", "prompts", "--split", "test", "--n", "400", "--out", str(args.prompts)],
                       check=True, env=ENV, stdout=subprocess.DEVNULL)
    profile = args.out / "profile.json"
    subprocess.run([*CLI, "serve", "--profile", str(profile), "--threads", "1", "--max-batch", str(args.max_batch)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages = json.loads(profile.read_text())["stages"]
    refine_capacity = max(int(b) / s for b, s in stages["teacher"].items())  # the profile's teacher stage refines
    runs: dict[str, dict] = {}
    proc, url = start_server(args, args.out, "fixed", [])
    try:
        # the teacher-only capacity, measured: teacher-only requests flooding the server (past what even refinement
        # serves), its bounded queue full throughout; what it serves per second is what it can serve
        probe = bench(args, url, args.out, "teacher_only@probe", 3 * refine_capacity, "teacher",
                      duration=args.probe_s)
        capacity = probe["images_per_s"]
        rates = {"light": args.light * capacity, "capacity": capacity, "twice": 2 * capacity}
        for label, rate in rates.items():
            for config, mode in (("teacher_only", "teacher"), ("student_only", "student"), ("fixed_tandem", "adaptive")):
                runs[f"{config}@{label}"] = bench(args, url, args.out, f"{config}@{label}", rate, mode)
        # the offline reference timed just before and just after the flood (the server idle meanwhile), so that
        # the ratio compares the same machine at the same time
        reference_prompts = args.prompts.read_text().splitlines()[:args.offline_images]
        before = offline_throughput(args, reference_prompts)
        saturation = bench(args, url, args.out, "fixed_tandem@saturation", 3 * capacity, "adaptive")
        after = offline_throughput(args, reference_prompts)
    finally:
        fixed_exit = stop(proc)
    batched = {"before": before, "after": after,
               "images_per_s": (before["images"] + after["images"]) / (before["seconds"] + after["seconds"])}
    proc, url = start_server(args, args.out, "load-aware", ["--slo-ms", str(args.slo_ms), "--load-profile", str(profile)])
    try:
        for label, rate in rates.items():
            runs[f"load_aware@{label}"] = bench(args, url, args.out, f"load_aware@{label}", rate, "adaptive")
    finally:
        aware_exit = stop(proc)
    reference = offline(args, args.out, "fixed_tandem@light")
    emit({"benchmark": "serve_load", "machine": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "threads": {"server": 1, "client": 1}, "settings": vars(args) | {
              "out": str(args.out), "prompts": str(args.prompts)},
          "profile": stages, "teacher_capacity_images_per_s": capacity, "capacity_probe": probe,
          "refine_capacity_from_profile": refine_capacity, "rates": rates, "runs": runs,
          "saturation": saturation, "offline": reference, "offline_batched": batched,
          "throughput_ratio_saturated_vs_offline": saturation["images_per_s"] / batched["images_per_s"],
          "server_exit_codes": {"fixed": fixed_exit, "load_aware": aware_exit}}, args.json)


if __name__ == "__main__":
    main()
