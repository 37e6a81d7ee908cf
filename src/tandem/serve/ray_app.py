"""Serving past one machine on Ray Serve (the ``ray`` extra; ``tandem serve --ray``).

The student, the oracle and the teacher run as three Ray Serve deployments, each with its own replica count and
resources (a deployment's replica loads the tandem and computes one stage: :func:`tandem.serve.compute.run_stage`).
The API, the batching queues and the load-aware router stay those of :class:`~tandem.serve.engine.Engine`: its
backend sends each stage's batch to the stage's deployment (the images' generators travel as their states and come
back advanced), and it runs as many batches of a stage at once as the stage has replicas. So the same requests with
the same seeds give the same images as the in-process server, wherever the stages ran.
"""

from __future__ import annotations

import torch

from ..pipeline import load_preset
from .compute import STAGES, StageBatch, StageResult, generator_states, generators_from, run_stage


class StageReplica:
    """One replica of a stage's deployment: the tandem of ``preset`` (a preset's name or a ``Preset``, with an
    optional calibration file, as :func:`tandem.pipeline.load_preset` takes them), computing batches of ``stage``
    at ``threads`` PyTorch threads."""

    def __init__(self, preset, stage: str, threads: int = 1, device: str = "cpu", calibration=None):
        torch.set_num_threads(threads)
        self.stage = stage
        self.pipe = load_preset(preset, device=device, calibration=calibration)

    def run(self, batch: StageBatch, states: list) -> tuple[StageResult, list]:
        batch.generators = generators_from(states)
        out = run_stage(self.pipe, batch)
        return out, generator_states(batch.generators)


class RayBackend:
    """The engine's backend on Ray Serve: ``handles`` by stage (deployment handles of :class:`StageReplica`)."""

    def __init__(self, handles: dict):
        self.handles = handles

    def __call__(self, batch: StageBatch) -> StageResult:
        gens = batch.generators
        batch.generators = None  # a torch.Generator does not pickle: its state goes instead
        out, states = self.handles[batch.stage].run.remote(batch, generator_states(gens)).result()
        for g, state in zip(gens, states):
            g.set_state(state)
        return out


def deploy_stages(preset, replicas: dict | None = None, cpus: float = 1.0, gpus: float = 0.0, threads: int = 1,
                  device: str = "cpu", calibration=None, address: str | None = None) -> RayBackend:
    """Start (or join, with ``address``) a Ray instance and deploy the three stages of ``preset`` (and
    ``calibration``; see :class:`StageReplica`) as Serve applications ``tandem-student``, ``tandem-oracle`` and
    ``tandem-teacher``; ``replicas`` by stage [1 each], each replica asking Ray for ``cpus`` CPUs and ``gpus``
    GPUs. The ingress (the API and the engine) runs in the calling process."""
    import ray
    from ray import serve

    replicas = {stage: 1 for stage in STAGES} | dict(replicas or {})
    unknown = sorted(set(replicas) - set(STAGES))
    if unknown:
        raise ValueError(f"replicas names unknown stages {unknown}; expected some of {', '.join(STAGES)}")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # the API is the engine's own, not Serve's HTTP proxy
    handles = {}
    for stage in STAGES:
        deployment = serve.deployment(StageReplica, name=f"{stage}-stage", num_replicas=replicas[stage],
                                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                                      max_ongoing_requests=4)
        handles[stage] = serve.run(deployment.bind(preset, stage, threads, device, calibration),
                                   name=f"tandem-{stage}", route_prefix=None)
    return RayBackend(handles)


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
