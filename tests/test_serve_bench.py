"""``tandem bench serve`` (tandem.eval.serve_load): the arrival schedules, the report's statistics, the
this-machine-only rule, and one run against a stub server (uvicorn on 127.0.0.1) whose images the world's
exact checker can judge. No model is loaded."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from clitools import tandem_in_process
from fastapi import FastAPI, Request  # at module level: the stub's annotations are resolved in these globals
from fastapi.responses import JSONResponse, Response

from tandem.eval.serve_load import (
    LoadConfig,
    RequestResult,
    arrival_times,
    bursty_arrivals,
    check_local_url,
    parse_gauges,
    poisson_arrivals,
    summarize,
)


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = poisson_arrivals(4.0, 2500.0, np.random.default_rng(0))
    gaps = np.diff(times)
    assert abs(len(times) / 2500.0 - 4.0) < 0.1  # 10,000 expected; the count's sd is 100 (1%)
    assert abs(gaps.mean() - 0.25) < 0.01
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # an exponential's coefficient of variation is 1
    assert np.all(gaps > 0) and times[-1] < 2500.0


def test_a_seed_gives_one_schedule_and_another_seed_another():
    config = LoadConfig(rate=2.0, duration_s=50.0, seed=3)
    again = arrival_times(LoadConfig(rate=2.0, duration_s=50.0, seed=3))
    other = arrival_times(LoadConfig(rate=2.0, duration_s=50.0, seed=4))
    assert np.array_equal(arrival_times(config), again)
    assert len(other) != len(again) or not np.array_equal(other, again)
    assert len(arrival_times(LoadConfig(rate=2.0, duration_s=50.0, seed=3, max_requests=7))) == 7


def test_bursty_arrivals_fall_only_in_the_on_periods_at_the_burst_rate():
    on_s, off_s, burst_rate, duration = 2.0, 3.0, 10.0, 5000.0
    times = bursty_arrivals(on_s, off_s, burst_rate, duration, np.random.default_rng(1))
    phase = np.mod(times, on_s + off_s)
    assert np.all(phase < on_s)  # none while off
    assert np.all(np.diff(times) > 0) and times[-1] < duration
    mean_rate = burst_rate * on_s / (on_s + off_s)  # 4 requests/s
    assert abs(len(times) / duration - mean_rate) < 0.15
    cycles = np.floor(times / (on_s + off_s)).astype(int)
    per_cycle = np.bincount(cycles, minlength=int(duration / (on_s + off_s)))
    assert abs(per_cycle.mean() - burst_rate * on_s) < 0.5 and per_cycle.var() > 5  # Poisson(20) per burst
    # a burst that straddles the end is cut at the duration
    short = bursty_arrivals(on_s, off_s, burst_rate, 6.0, np.random.default_rng(1))
    assert np.all(short < 6.0) and np.all(np.mod(short, 5.0) < 2.0)


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.2:8000", "http://127.0.0.1.nip.io/",
                                 "http://0.0.0.0:8000", "ftp://127.0.0.1/"])
def test_only_this_machine_is_loaded(url):
    with pytest.raises(ValueError, match="127.0.0.1|scheme"):
        check_local_url(url)


def test_this_machine_is_accepted():
    for url in ("http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:8123", "https://127.0.0.1"):
        check_local_url(url)


def test_the_command_refuses_a_remote_url_in_one_line(capsys, monkeypatch, tmp_path):
    result = tandem_in_process(capsys, monkeypatch, "bench", "serve", "--url", "http://example.com:8000",
                               "--rate", "1", "--out", tmp_path / "out")
    assert result.returncode == 2 and "only to this machine" in result.stderr and "--url" in result.stderr
    assert not (tmp_path / "out").exists()
    both = tandem_in_process(capsys, monkeypatch, "bench", "serve", "--rate", "1", "--trace", "bursty",
                             "--out", tmp_path / "out")
    assert both.returncode == 2 and "--burst-rate" in both.stderr


def _result(index, status=200, latency=1.0, paths=("accepted",), evals=2, error=None) -> RequestResult:
    r = RequestResult(index, "a red circle", index, float(index), sent_s=float(index), status=status,
                      latency_s=latency, error=error)
    if status == 200:
        r.images = [{"path": p, "student_score": 0.5, "tau": 0.4, "unet_evals": {"student": 2, "teacher":
                     evals - 2, "total": evals}, "serving": {"stages": {"draw": {"queue_s": 0.1, "compute_s": 0.3}}}}
                    for p in paths]
    return r


def test_the_report_counts_percentiles_slo_violations_and_the_teacher_share():
    # 100 successes with latencies 0.01 .. 1.00 s, then a 429, a 503 and a request that never got an answer
    results = [_result(i, latency=(i + 1) / 100, paths=("accepted", "refined") if i < 10 else ("student",),
                       evals=22 if i < 10 else 2) for i in range(100)]
    results += [_result(100, status=429, latency=0.002, error="queue full"), _result(101, status=503),
                _result(102, status=None, latency=3.0, error="unfinished: no answer")]
    report = summarize(results, wall_s=50.0, slo_ms=900.0)
    assert report["sent"] == 103 and report["completed"] == 100
    assert report["by_status"] == {"200": 100, "429": 1, "503": 1, "unfinished": 1}
    latency = report["latency_s"]  # linear interpolation between order statistics, by hand
    assert latency["p50"] == pytest.approx(0.505) and latency["p95"] == pytest.approx(0.9505)
    assert latency["p99"] == pytest.approx(0.9901) and latency["max"] == pytest.approx(1.0)
    # over 0.9 s: the 10 successes at 0.91 .. 1.00 s; failed: 3
    assert report["slo"]["violations"] == 13 and report["slo"]["ratio"] == pytest.approx(13 / 103)
    assert report["images"] == 110 and report["paths"] == {"accepted": 10, "refined": 10, "student": 90}
    assert report["teacher_share"] == pytest.approx(10 / 110)
    assert report["unet_evals_per_image"]["total"] == pytest.approx((10 * 22 + 10 * 22 + 90 * 2) / 110)
    assert report["throughput"]["images_per_s"] == pytest.approx(110 / 50.0)
    assert report["accuracy"] is None and report["stages"]["draw"]["compute_s"] == pytest.approx(0.3)
    assert summarize(results, 50.0, None)["slo"] is None


def test_gauges_are_read_from_the_prometheus_page():
    text = ("# HELP tandem_threshold x\n# TYPE tandem_threshold gauge\ntandem_threshold 0.61\n"
            "tandem_teacher_share_cap 0.25\ntandem_queue_depth{stage=\"draw\"} 3.0\n"
            "tandem_queue_depth{stage=\"improve\"} 2.0\ntandem_teacher_share_total 9\n")
    assert parse_gauges(text) == {"threshold": 0.61, "teacher_share_cap": 0.25, "queue_depth": 5.0}


# ---- one run against a stub server -------------------------------------------------------------------------


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _stub_app(renderings: dict[str, np.ndarray]):
    """The response shape of ``tandem serve`` for model "world": requests with an even seed get the exact
    rendering of their prompt (path "accepted"), odd seeds a black image (path "refined"), and every seed
    divisible by 5 a 429."""
    app = FastAPI()
    black = _png(np.zeros((32, 32, 3), dtype=np.uint8))

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready", "model": "world", "queued": {}}

    @app.get("/metrics")
    async def metrics():
        return Response("tandem_teacher_share_cap 0.5\ntandem_threshold 0.7\ntandem_arrival_rate 3\n")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await request.json()
        seed = body["seed"]
        if seed % 5 == 0:
            return JSONResponse({"error": {"message": "queues full", "type": "rate_limit_error", "param": None,
                                           "code": 429}}, status_code=429, headers={"Retry-After": "1"})
        even = seed % 2 == 0
        record = {"path": "accepted" if even else "refined", "student_score": 0.9 if even else 0.1, "tau": 0.5,
                  "unet_evals": {"student": 4, "teacher": 0 if even else 20, "total": 4 if even else 24},
                  "serving": {"request_id": f"r{seed}", "latency_s": 0.01, "teacher_share_cap": 0.5,
                              "stages": {"draw": {"queue_s": 0.0, "compute_s": 0.01, "batch": 1, "batch_size": 1}}}}
        image = _png(renderings[body["prompt"]]) if even else black
        data = [{"b64_json": image, "revised_prompt": body["prompt"], "tandem": record} for _ in range(body["n"])]
        return {"created": int(time.time()), "data": data,
                "tandem": {"request_id": f"r{seed}", "seed": seed, "mode": body["mode"], "tau": 0.5,
                           "teacher_share_cap": 0.5, "latency_s": 0.01, "model": "world"}}

    return app


@pytest.fixture
def stub_server():
    import uvicorn

    from tandem.world.scene import make_example

    examples = [make_example((7, i)) for i in range(6)]
    renderings = {caption: image for caption, image, _ in examples}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_stub_app(renderings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", list(renderings)
    server.should_exit = True
    thread.join(timeout=5)


def test_a_run_against_a_stub_server_writes_its_report(stub_server, tmp_path, capsys, monkeypatch):
    url, captions = stub_server
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    out = tmp_path / "bench"
    result = tandem_in_process(capsys, monkeypatch, "bench", "serve", "--url", url, "--rate", "20",
                               "--duration", "1.5", "--max-requests", "20", "--n", "2", "--prompts", prompts,
                               "--slo-ms", "2000", "--seed", "10", "--metrics-interval-s", "0.2", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    report = json.loads((out / "results.json").read_text())
    expected = len(arrival_times(LoadConfig(rate=20.0, duration_s=1.5, max_requests=20, seed=10)))
    assert len(rows) == report["sent"] == expected > 5
    assert [r["seed"] for r in rows] == [10 + i for i in range(expected)]
    assert [r["prompt"] for r in rows] == [captions[i % len(captions)] for i in range(expected)]
    refused = sum(1 for r in rows if r["seed"] % 5 == 0)
    assert report["by_status"] == {"200": expected - refused, **({"429": refused} if refused else {})}
    assert all("Retry-After" in r["error"] for r in rows if r["status"] == 429)
    served = [r for r in rows if r["status"] == 200]
    even = sum(1 for r in served if r["seed"] % 2 == 0)
    assert report["images"] == 2 * len(served)
    assert report["teacher_share"] == pytest.approx((len(served) - even) / len(served))
    # the exact checker passes the stub's renderings of even seeds and fails its black images of odd ones
    assert report["accuracy"]["judged"] == 2 * len(served)
    assert report["accuracy"]["accuracy"] == pytest.approx(even / len(served))
    assert all(image["satisfied"] == (r["seed"] % 2 == 0) for r in served for image in r["images"])
    assert report["slo"]["violations"] == refused  # the stub answers in far under 2 s
    assert report["server"]["model"] == "world" and report["config"]["rate"] == 20.0
    assert report["metrics_over_time"] and report["metrics_over_time"][0]["teacher_share_cap"] == 0.5
    assert (out / "plot.png").stat().st_size > 1000
    again = tandem_in_process(capsys, monkeypatch, "bench", "serve", "--url", url, "--rate", "20",
                              "--duration", "0.2", "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_a_server_that_does_not_answer_is_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = tandem_in_process(capsys, monkeypatch, "bench", "serve", "--url", f"http://127.0.0.1:{port}",
                               "--rate", "1", "--duration", "1", "--out", tmp_path / "out")
    assert result.returncode == 2 and "no server answers" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bursty_run_sends_each_request_on_time_and_none_while_off(stub_server):
    import asyncio

    from tandem.eval.serve_load import run_load

    url, captions = stub_server
    config = LoadConfig(url=url, trace="bursty", on_s=0.3, off_s=0.5, burst_rate=25.0, duration_s=1.4, seed=2,
                        drain_timeout_s=5.0)
    run = asyncio.run(run_load(config, captions, keep_images=False))
    scheduled = np.array([r.scheduled_s for r in run.results])
    sent = np.array([r.sent_s for r in run.results])
    assert np.array_equal(scheduled, arrival_times(config)) and len(scheduled) > 5
    assert np.all(np.mod(scheduled, 0.8) < 0.3)
    assert np.all(sent >= scheduled - 1e-3) and np.all(sent - scheduled < 0.25)  # the client keeps the schedule
    assert all(r.status in (200, 429) for r in run.results) and not any(r.pngs for r in run.results)
    assert run.wall_s >= 1.4  # the run lasts the whole duration, answers or not
