"""The load benchmark of a served tandem (``tandem bench serve``): an open-loop client that sends image requests
to a ``tandem serve`` on this machine at scheduled times, and the report of what came back.

Arrivals (every draw from ``numpy.random.default_rng(seed)``, so one seed gives one schedule):

* ``poisson``: a Poisson process of ``rate`` requests/s (exponential gaps of mean ``1 / rate``).
* ``bursty``: on/off. The clock runs in cycles of ``on_s`` seconds "on" then ``off_s`` seconds "off", starting
  "on" at t = 0; during "on" requests arrive as a Poisson process of ``burst_rate`` requests/s, during "off"
  none do. The mean rate is ``burst_rate * on_s / (on_s + off_s)``.

Sending stops at ``duration_s`` (or after ``max_requests``); the requests still outstanding are then awaited up
to ``drain_timeout_s`` and counted as unfinished past it. Request ``i`` sends prompt ``i mod len(prompts)`` with
seed ``seed + i``. The client is open-loop: a slow answer never delays the next send, and a refused request
(429, 503) is not retried.

The report (:func:`summarize`): throughput, latency percentiles of the successful requests, the SLO violation
ratio (a request violates its SLO if it did not succeed, i.e. any status but 200, a transport error or no answer
by the end, or if its latency is over ``slo_ms``), the teacher's share (images whose path is ``refined``,
``regenerated`` or ``teacher`` over all images served), UNet evaluations per image, the server's cut-off and
teacher-share cap over time (``GET /metrics`` every ``metrics_interval_s``) and, when the server serves the
world, the exact checker's accuracy of the images it served (:func:`tandem.world.checker.check`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from ..outputs import OutputDir, atomic_write_text
from ..world.checker import check
from .serve_report import RequestResult, plot_load, summarize, timeline

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
GAUGES = ("tandem_teacher_share_cap", "tandem_threshold", "tandem_arrival_rate", "tandem_teacher_share")


class ServerUnavailable(RuntimeError):
    """The server did not answer ``GET /readyz`` with 200."""


@dataclass
class LoadConfig:
    """One load run: where, which arrivals, what each request asks, and the latency objective.

    ``api_key`` is sent as ``Authorization: Bearer`` and never written to a result file."""

    url: str = "http://127.0.0.1:8000"
    trace: str = "poisson"  # "poisson" or "bursty" (see the module docstring)
    rate: float | None = None  # poisson: requests/s
    on_s: float = 5.0  # bursty: seconds on per cycle
    off_s: float = 15.0  # bursty: seconds off per cycle
    burst_rate: float = 2.0  # bursty: requests/s while on
    duration_s: float = 60.0  # no request is sent after this
    max_requests: int | None = None  # nor more than this many
    n: int = 1  # images per request
    mode: str = "adaptive"
    percentile: float | None = None
    threshold: float | None = None
    budget: float | None = None
    slo_ms: float | None = None
    seed: int = 0
    drain_timeout_s: float = 120.0  # how long requests outstanding at duration_s are awaited
    metrics_interval_s: float = 1.0
    api_key: str | None = field(default=None, repr=False)

    def check(self) -> None:
        """Refuse a setting that cannot run, naming it."""
        check_local_url(self.url)
        if self.trace not in ("poisson", "bursty"):
            raise ValueError(f"unknown trace {self.trace!r}; expected 'poisson' or 'bursty'")
        if self.trace == "poisson" and not (self.rate is not None and 0 < self.rate < math.inf):
            raise ValueError(f"a poisson trace needs a rate > 0 (requests/s), got {self.rate}")
        positive = {"duration_s": self.duration_s, "metrics_interval_s": self.metrics_interval_s}
        if self.trace == "bursty":
            positive |= {"on_s": self.on_s, "burst_rate": self.burst_rate}
        if self.slo_ms is not None:
            positive["slo_ms"] = self.slo_ms
        for name, value in positive.items():
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name, value in (("off_s", self.off_s), ("drain_timeout_s", self.drain_timeout_s)):
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name, value in (("n", self.n), ("max_requests", self.max_requests)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        cutoffs = [k for k in ("percentile", "threshold", "budget") if getattr(self, k) is not None]
        if len(cutoffs) > 1:
            raise ValueError(f"give at most one of percentile, threshold and budget, got {' and '.join(cutoffs)}")
        if cutoffs and self.mode != "adaptive":
            raise ValueError(f"{cutoffs[0]} applies to mode='adaptive', not mode={self.mode!r}")

    def public(self) -> dict[str, Any]:
        """The settings as written to results.json (without the API key)."""
        out = asdict(self)
        out["api_key"] = None if self.api_key is None else "(set)"
        return out


def check_local_url(url: str) -> None:
    """Refuse a URL that is not http(s) on this machine: the benchmark loads 127.0.0.1, localhost or ::1 only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url {url!r}: expected http://127.0.0.1:PORT (the scheme must be http or https)")
    if parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"url {url!r}: the load benchmark sends only to this machine (host 127.0.0.1, localhost "
                         f"or ::1), not to {parts.hostname!r}")


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds, increasing, all < ``duration_s``) of a Poisson process of ``rate`` per second."""
    times, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration_s:
            return np.asarray(times, dtype=np.float64)
        times.append(t)


def bursty_arrivals(on_s: float, off_s: float, burst_rate: float, duration_s: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Send times of the on/off trace: a Poisson process of ``burst_rate`` on the "on" clock (the time spent on),
    each on-time ``u`` placed at ``floor(u / on_s) * (on_s + off_s) + (u mod on_s)`` on the wall clock."""
    cycles = duration_s / (on_s + off_s)
    on_clock = poisson_arrivals(burst_rate, (math.floor(cycles) + 1) * on_s, rng)
    wall = np.floor(on_clock / on_s) * (on_s + off_s) + np.mod(on_clock, on_s)
    return wall[wall < duration_s]


def arrival_times(config: LoadConfig) -> np.ndarray:
    """The run's send times (seconds from its start), at most ``max_requests`` of them."""
    rng = np.random.default_rng(config.seed)
    if config.trace == "poisson":
        times = poisson_arrivals(config.rate, config.duration_s, rng)
    else:
        times = bursty_arrivals(config.on_s, config.off_s, config.burst_rate, config.duration_s, rng)
    return times[:config.max_requests]


@dataclass
class LoadRun:
    results: list[RequestResult]
    samples: list[dict[str, float]]  # GET /metrics over time: {"t", gauge: value, ...}
    ready: dict[str, Any]  # the server's /readyz answer
    wall_s: float  # from the start to the end of sending or the last answer (or the drain's end), the later


async def run_load(config: LoadConfig, prompts: list[str], *, keep_images: bool | None = None,
                   transport=None) -> LoadRun:
    """Send the schedule of ``config`` to its server and gather every answer. ``keep_images`` keeps each PNG
    for judging (default: when the server's /readyz names the model "world"); ``transport`` is an httpx
    transport for tests."""
    config.check()
    if not prompts:
        raise ValueError("no prompts to send")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    schedule = arrival_times(config)
    limits = httpx.Limits(max_connections=max(len(schedule), 1) + 4, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(30.0, read=None), transport=transport) as client:
        ready = await _ready(client, config.url)
        keep_images = ready.get("model") == "world" if keep_images is None else keep_images
        loop = asyncio.get_running_loop()
        start = loop.time()
        samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(_sample_metrics(client, start, config.metrics_interval_s, samples))
        results, tasks = [], []
        for index, due in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + due - loop.time()))
            result = RequestResult(index, prompts[index % len(prompts)], config.seed + index, float(due))
            results.append(result)
            tasks.append(asyncio.create_task(_send(client, config, result, start, keep_images)))
        capped = config.max_requests is not None and len(schedule) == config.max_requests
        end_of_sending = float(schedule[-1]) if capped else config.duration_s
        await asyncio.sleep(max(0.0, start + end_of_sending - loop.time()))  # the answers come in meanwhile
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        wall = loop.time() - start
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        samples.append(await _metrics_sample(client, start) or {"t": wall})
    return LoadRun(results, samples, ready, wall)


async def _ready(client, url: str) -> dict[str, Any]:
    try:
        answer = await client.get("/readyz")
    except httpx.HTTPError as e:
        raise ServerUnavailable(f"no server answers at {url} ({type(e).__name__}: {e}); start one with "
                                "`tandem serve`") from None
    if answer.status_code != 200:
        raise ServerUnavailable(f"the server at {url} is not ready: GET /readyz answered {answer.status_code} "
                                f"{answer.text[:200]}")
    return answer.json()


async def _send(client, config: LoadConfig, result: RequestResult, start: float, keep_images: bool) -> None:
    body: dict[str, Any] = {"prompt": result.prompt, "n": config.n, "seed": result.seed, "mode": config.mode}
    body |= {k: getattr(config, k) for k in ("percentile", "threshold", "budget") if getattr(config, k) is not None}
    loop = asyncio.get_running_loop()
    sent = loop.time()
    result.sent_s = sent - start
    try:
        answer = await client.post("/v1/images/generations", json=body)
    except asyncio.CancelledError:
        result.error = f"unfinished: no answer within {config.drain_timeout_s:g} s after the run's end"
        raise
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return
    finally:
        result.latency_s = loop.time() - sent
    result.status = answer.status_code
    try:
        payload = answer.json()
    except ValueError:
        result.error = f"not JSON: {answer.text[:200]}"
        return
    if answer.status_code != 200:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        result.error = str(error.get("message", payload))
        if "retry-after" in answer.headers:
            result.error += f" (Retry-After: {answer.headers['retry-after']})"
        return
    meta = payload.get("tandem", {})
    result.request_id, result.tau = meta.get("request_id"), meta.get("tau")
    result.teacher_share_cap, result.server_latency_s = meta.get("teacher_share_cap"), meta.get("latency_s")
    for item in payload.get("data", []):
        record = item.get("tandem", {})
        result.images.append({k: record.get(k) for k in ("path", "student_score", "tau", "unet_evals", "serving")})
        if keep_images:
            result.pngs.append(base64.b64decode(item["b64_json"]))


async def _sample_metrics(client, start: float, interval: float, samples: list) -> None:
    while True:
        sample = await _metrics_sample(client, start)
        if sample is not None:
            samples.append(sample)
        await asyncio.sleep(interval)


async def _metrics_sample(client, start: float) -> dict[str, float] | None:
    """``{"t", gauge: value}`` of one ``GET /metrics`` (None if it did not answer)."""
    try:
        answer = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    sample = {"t": asyncio.get_running_loop().time() - start}
    return sample | parse_gauges(answer.text)


def parse_gauges(text: str) -> dict[str, float]:
    """The unlabelled :data:`GAUGES` and the summed ``tandem_queue_depth`` of a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name in GAUGES:
            out[name.removeprefix("tandem_")] = float(value)
        elif name.startswith("tandem_queue_depth{"):
            out["queue_depth"] = out.get("queue_depth", 0.0) + float(value)
    return out


def judge_world(results: list[RequestResult]) -> None:
    """Mark every served image ``satisfied`` (True/False) by the world's exact checker against its prompt, or
    None with ``judge_error`` where it cannot be judged (a prompt outside the grammar, an image not 32x32)."""
    from PIL import Image

    for result in results:
        for image, png in zip(result.images, result.pngs):
            try:
                with Image.open(io.BytesIO(png)) as im:
                    pixels = np.asarray(im.convert("RGB"))
                image["satisfied"] = bool(check(pixels, result.prompt).satisfied)
            except ValueError as e:  # CaptionError included
                image["satisfied"], image["judge_error"] = None, str(e)


def bench_serve(config: LoadConfig, prompts: list[str], out: str | Path, overwrite: bool = False,
                prompts_file: str | Path | None = None, window_s: float | None = None,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the load of ``config`` against its server and write ``out`` (whole or not at all,
    :class:`tandem.outputs.OutputDir`): ``requests.jsonl`` (one line per request), ``results.json`` (settings,
    the server's /readyz answer, :func:`summarize`'s statistics, the /metrics samples and the timeline) and
    ``plot.png`` (:func:`plot_load`). The world's images are judged by its exact checker. Returns the results.

    Args:
        window_s: the rolling window of the timeline (default: a tenth of the duration, at least 5 s).
        options: more settings to record in results.json (e.g. the command line's own).
    """
    config.check()
    window_s = window_s or max(5.0, config.duration_s / 10)
    inputs = [("--prompts", prompts_file)] if prompts_file is not None else []
    with OutputDir(out, overwrite, info={"command": "bench serve"}, inputs=inputs) as output:
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        run = asyncio.run(run_load(config, prompts))
        world = run.ready.get("model") == "world"
        if world:
            judge_world(run.results)
        rows = timeline(run.results, window_s)
        results = {"config": config.public() | {"prompts": str(prompts_file) if prompts_file else "world test list",
                                                "n_prompts": len(prompts), "window_s": window_s, **(options or {})},
                   "server": run.ready, "started": started, "judged_by": "tandem.world.checker" if world else None,
                   **summarize(run.results, run.wall_s, config.slo_ms),
                   "metrics_over_time": run.samples, "timeline": rows}
        atomic_write_text(output.path / "requests.jsonl",
                          "".join(json.dumps(r.row()) + "\n" for r in run.results))
        atomic_write_text(output.path / "results.json", json.dumps(results, indent=1) + "\n")
        plot_load(rows, run.samples, config.slo_ms, output.path / "plot.png", window_s,
                  title=f"{run.ready.get('model')}: {_describe_trace(config)}")
    return results


def _describe_trace(config: LoadConfig) -> str:
    if config.trace == "poisson":
        return f"Poisson {config.rate:g} req/s, n={config.n}, {config.duration_s:g} s"
    return (f"bursty {config.burst_rate:g} req/s for {config.on_s:g} s, off {config.off_s:g} s, n={config.n}, "
            f"{config.duration_s:g} s")
