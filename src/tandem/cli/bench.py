"""``tandem bench``: benchmarks of a running tandem. ``bench serve`` loads a ``tandem serve`` on this machine
(:mod:`tandem.eval.serve_load`)."""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import UserError, app, cli_error, console

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks of a running tandem: results JSON, per-request JSON lines and a plot in --out.")
app.add_typer(bench_app, name="bench")


class Trace(str, Enum):
    poisson = "poisson"
    bursty = "bursty"


class ServedMode(str, Enum):
    adaptive = "adaptive"
    student = "student"
    teacher = "teacher"


@bench_app.command("serve")
def bench_serve(
    out: Annotated[Path, typer.Option(help="A new directory for requests.jsonl, results.json and plot.png.")],
    url: Annotated[str, typer.Option(help="The server (127.0.0.1, localhost or ::1 only).")] = "http://127.0.0.1:8000",
    rate: Annotated[float | None, typer.Option(help="Poisson arrivals at this many requests/s.")] = None,
    trace: Annotated[Trace | None, typer.Option(help="bursty: on/off arrivals (--on-s, --off-s, --burst-rate) "
                                                "instead of --rate; poisson: the same as --rate alone.")] = None,
    on_s: Annotated[float | None, typer.Option(help="bursty: seconds on per cycle (cycles start on) [5].")] = None,
    off_s: Annotated[float | None, typer.Option(help="bursty: seconds off per cycle [15].")] = None,
    burst_rate: Annotated[float | None, typer.Option(help="bursty: Poisson requests/s while on [2].")] = None,
    duration: Annotated[float, typer.Option(help="Seconds during which requests are sent.")] = 60.0,
    max_requests: Annotated[int | None, typer.Option(help="Send at most this many requests.")] = None,
    drain_timeout_s: Annotated[float, typer.Option(help="Seconds the requests still outstanding at the end are "
                                                   "awaited; past it they count as unfinished.")] = 120.0,
    prompts: Annotated[Path | None, typer.Option(help="Prompts, one per line, sent in turn [the world's test "
                                                 "list].")] = None,
    n: Annotated[int, typer.Option(help="Images per request.")] = 1,
    mode: Annotated[ServedMode, typer.Option(help="What each request asks for.")] = ServedMode.adaptive,
    percentile: Annotated[float | None, typer.Option(help="Sent with each request: tau is this percentile of "
                                                     "the calibration.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Sent with each request: tau itself.")] = None,
    budget: Annotated[float | None, typer.Option(help="Sent with each request: mean UNet evaluations per "
                                                 "image.")] = None,
    slo_ms: Annotated[float | None, typer.Option(help="Latency objective (ms): a request violates it if it "
                                                 "fails or takes longer.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the arrivals; request i is sent with seed SEED + i.")] = 0,
    metrics_interval_s: Annotated[float, typer.Option(help="Seconds between samples of GET /metrics.")] = 1.0,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the server's API "
                                                    "key.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier benchmark in --out.")] = False,
) -> None:
    """Load a `tandem serve` on this machine with Poisson (--rate) or bursty (--trace bursty) arrivals and report
    throughput, latency percentiles, SLO violations, the teacher's share and tau over time and, on the world,
    the exact checker's accuracy of what was served."""
    from ..eval.serve_load import LoadConfig, ServerUnavailable
    from ..eval.serve_load import bench_serve as run_bench
    from ..world.prompts import load_prompts, read_prompt_file

    config = LoadConfig(url=url, duration_s=duration, max_requests=max_requests, n=n, mode=mode.value,
                        percentile=percentile, threshold=threshold, budget=budget, slo_ms=slo_ms, seed=seed,
                        drain_timeout_s=drain_timeout_s, metrics_interval_s=metrics_interval_s)
    bursty = {"--on-s": on_s, "--off-s": off_s, "--burst-rate": burst_rate}
    if trace == Trace.bursty:
        if rate is not None:
            raise UserError("--rate is for Poisson arrivals; with --trace bursty give --burst-rate")
        config.trace = "bursty"
        config.on_s, config.off_s, config.burst_rate = (v if v is not None else getattr(config, k) for k, v in
                                                        zip(("on_s", "off_s", "burst_rate"), bursty.values()))
    else:
        if rate is None:
            raise UserError("give --rate R (Poisson arrivals, requests/s) or --trace bursty")
        given = [flag for flag, v in bursty.items() if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to --trace bursty")
        config.rate = rate
    if api_key_env is not None:
        config.api_key = os.environ.get(api_key_env)
        if not config.api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    try:
        config.check()
        prompt_list = read_prompt_file(prompts) if prompts is not None else load_prompts("test")
    except ValueError as e:
        raise cli_error(ValueError(_in_flags(str(e)))) from None
    try:
        results = run_bench(config, prompt_list, out, overwrite=overwrite, prompts_file=prompts,
                            options={"api_key_env": api_key_env})
    except ServerUnavailable as e:
        raise UserError(str(e)) from None
    _print_summary(results)
    console.print(f"requests.jsonl, results.json and plot.png -> {out}", highlight=False)


# LoadConfig's field names -> the options that set them, for its messages
_FLAGS = {"duration_s": "--duration", "rate": "--rate", "on_s": "--on-s", "off_s": "--off-s",
          "burst_rate": "--burst-rate", "slo_ms": "--slo-ms", "n": "--n", "max_requests": "--max-requests",
          "drain_timeout_s": "--drain-timeout-s", "metrics_interval_s": "--metrics-interval-s", "url": "--url",
          "threshold": "--threshold"}


def _in_flags(message: str) -> str:
    return re.sub(r"(?<![\w'-])(" + "|".join(_FLAGS) + r")(?![\w'-])", lambda m: _FLAGS[m.group(1)], message)


def _print_summary(results: dict) -> None:
    latency, slo, accuracy = results["latency_s"], results["slo"], results["accuracy"]
    fmt = (lambda v, unit="": "-" if v is None else f"{v:.3g}{unit}")
    console.print(f"sent {results['sent']}, completed {results['completed']} ({results['by_status']}); "
                  f"{fmt(results['throughput']['images_per_s'])} images/s", highlight=False)
    console.print(f"latency p50 {fmt(latency['p50'], ' s')}, p95 {fmt(latency['p95'], ' s')}, "
                  f"p99 {fmt(latency['p99'], ' s')}"
                  + (f"; SLO {slo['slo_ms']:g} ms violated by {fmt(slo['ratio'])}" if slo else ""), highlight=False)
    console.print(f"teacher share {fmt(results['teacher_share'])}, UNet evaluations per image "
                  f"{fmt(results['unet_evals_per_image']['total'])}"
                  + (f"; exact checker accuracy {accuracy['accuracy']:.3f} of {accuracy['judged']}" if accuracy
                     else ""), highlight=False)
