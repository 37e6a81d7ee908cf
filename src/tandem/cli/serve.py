"""``tandem serve``: a tandem behind an image API (``tandem.serve``), or its stages' profile with ``--profile``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import UserError, _check_device, _compose, _tandem_pipeline, app, cli_error, console


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="A preset name, or a teacher directory or hub id (with --student).")] = "world",
    preset_file: Annotated[Path | None, typer.Option("--preset", help="A preset file (`tandem preset save`).")] = None,
    student: Annotated[str | None, typer.Option(help="The student (any kind `tandem generate` takes).")] = None,
    scorer: Annotated[str | None, typer.Option(help="The oracle (as for `tandem generate`).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="The student's calibration (default: the preset's).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    slo_ms: Annotated[float | None, typer.Option(help="Latency objective per request (ms); turns on the "
                                                 "load-aware policy unless --policy fixed.")] = None,
    policy: Annotated[str | None, typer.Option(help="'fixed' (every request keeps its cut-off) or 'load-aware' "
                                               "(the teacher's share follows the load; needs --slo-ms).")] = None,
    load_profile: Annotated[Path | None, typer.Option(help="The stages' profile for the load-aware policy "
                                                      "(`tandem serve --profile OUT`); default: measured at start.")] = None,
    profile: Annotated[Path | None, typer.Option(help="Measure the stages' profile, write it to this JSON file "
                                                 "and exit (no server).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key; requests "
                                                    "must send 'Authorization: Bearer <key>'.")] = None,
    threads: Annotated[int, typer.Option(help="PyTorch threads for the models. Give a server and its clients on "
                                         "one machine one thread each: two default-threaded processes on two "
                                         "cores run about 5x slower.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Largest batch of each stage.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a stage waits for its batch to fill (ms).")] = 20.0,
    max_queue: Annotated[int, typer.Option(help="Most images queued; past it, requests get 429.")] = 64,
    deadline_s: Annotated[float, typer.Option(help="A request still queued after this many seconds gets 503.")] = 120.0,
    max_n: Annotated[int, typer.Option(help="Most images per request.")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --profile file.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run the student, the oracle and the teacher as Ray Serve "
                                      "deployments (the 'ray' extra); the API and the router stay here.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="A Ray cluster to join (default: start one on this "
                                                    "machine).")] = None,
    replicas: Annotated[str, typer.Option(help="Replicas of each stage's deployment, e.g. "
                                          "'student=1,oracle=1,teacher=2'.")] = "student=1,oracle=1,teacher=1",
    ray_cpus: Annotated[float, typer.Option(help="CPUs each replica asks Ray for.")] = 1.0,
    ray_gpus: Annotated[float, typer.Option(help="GPUs each replica asks Ray for.")] = 0.0,
) -> None:
    """Serve a tandem behind OpenAI's image API (POST /v1/images/generations and /v1/images/edits), with health,
    readiness, Prometheus metrics (/metrics) and a playground page (/)."""
    import torch

    from ..serve.profile import Profile
    from ..serve.server import build_server, startup_profile

    for name, value, low in (("--port", port, 1), ("--threads", threads, 1), ("--max-batch", max_batch, 1),
                             ("--max-queue", max_queue, 1), ("--max-n", max_n, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    for name, value in (("--max-wait-ms", max_wait_ms), ("--deadline-s", deadline_s)):
        if not value >= 0 or value == float("inf"):
            raise UserError(f"{name} must be a finite number >= 0, got {value}")
    if slo_ms is not None and not (0 < slo_ms < float("inf")):
        raise UserError(f"--slo-ms must be a positive number, got {slo_ms}")
    policy = policy or ("load-aware" if slo_ms is not None else "fixed")
    if policy not in ("fixed", "load-aware"):
        raise UserError(f"--policy must be 'fixed' or 'load-aware', got {policy!r}")
    if policy == "load-aware" and slo_ms is None:
        raise UserError("--policy load-aware needs --slo-ms (the latency the teacher's share is chosen to keep)")
    if profile is not None and profile.exists() and not overwrite:
        raise UserError(f"--profile {profile} exists; pass --overwrite to replace it")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    _check_device(device)
    torch.set_num_threads(threads)
    preset = _compose(model, preset_file, student, scorer)
    pipe = _tandem_pipeline(preset, device, calibration)
    if profile is not None:
        measured = _measure(pipe, startup_profile, max_batch)
        measured.save(profile, overwrite=overwrite)
        console.print(f"profile of {pipe.name} at {threads} thread(s) -> {profile}")
        return
    stages_profile = None
    if policy == "load-aware":
        try:
            stages_profile = (Profile.load(load_profile) if load_profile is not None
                              else _measure(pipe, startup_profile, max_batch))
        except ValueError as e:
            raise cli_error(e) from None
    backend = workers = None
    if ray:
        counts = _replicas(replicas)
        try:
            from ..serve.ray_app import deploy_stages  # the optional 'ray' extra
        except ImportError:
            raise UserError("--ray needs Ray Serve: pip install 'tandem[ray]'") from None
        console.print(f"deploying the stages on Ray Serve ({replicas}) ...")
        backend = deploy_stages(preset, counts, cpus=ray_cpus, gpus=ray_gpus, threads=threads, device=device,
                                calibration=calibration, address=ray_address)
        workers = counts
    try:
        server = build_server(pipe, host=host, port=port, policy=policy, profile=stages_profile,
                              backend=backend, workers=workers,
                              slo_s=None if slo_ms is None else slo_ms / 1000, api_key=api_key,
                              max_batch=max_batch, max_wait=max_wait_ms / 1000, max_queue=max_queue,
                              deadline_s=deadline_s, max_n=max_n, log_level=log_level)
    except ValueError as e:
        raise cli_error(e) from None
    console.print(f"serving {pipe.name} on http://{host}:{port} ({policy} policy, {threads} thread(s)); "
                  "the playground is at /")
    server.run()


def _measure(pipe, startup_profile, max_batch: int):
    sizes = sorted({b for b in (1, 2, 4, 8, 16, 32) if b < max_batch} | {max_batch})
    console.print(f"timing the stages at batch sizes {', '.join(map(str, sizes))} ...")
    return startup_profile(pipe, batch_sizes=sizes, callback=lambda b: console.print(f"  batch {b}: done"))


def _replicas(spec: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        stage, _, count = part.partition("=")
        if stage not in ("student", "oracle", "teacher") or not count.isdigit() or int(count) < 1:
            raise UserError(f"--replicas {spec!r}: expected stage=count pairs such as 'student=1,oracle=1,teacher=2' "
                            "(stages student, oracle, teacher; counts at least 1)")
        out[stage] = int(count)
    return out
