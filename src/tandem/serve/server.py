"""A served tandem put together: the engine with its policy and metrics, the API, and uvicorn."""

from __future__ import annotations

import contextlib
import logging

import torch

from .app import create_app
from .controller import LoadAwarePolicy
from .engine import Engine
from .metrics import ServeMetrics
from .profile import Profile, measure_profile
from .requests import Limits, default_plan

# what the stages are timed on: any captions do (the world's tokenizer reads words it does not know as unknown)
PROFILE_PROMPTS = ["a red circle above a blue square", "a small green triangle", "a photo of a cat on a sofa",
                   "two yellow stars"]


def build_app(pipe, *, policy: str = "fixed", profile: Profile | None = None, slo_s: float | None = None,
              api_key: str | None = None, max_batch: int = 8, max_wait: float = 0.02, max_queue: int = 64,
              deadline_s: float = 120.0, max_n: int = 8, backend=None, workers: dict | None = None):
    """The ASGI app serving ``pipe`` with ``policy`` ("fixed", or "load-aware" with ``profile`` and ``slo_s``);
    ``backend`` and ``workers`` as :class:`~tandem.serve.engine.Engine` takes them (the stages elsewhere, such as
    on Ray Serve: :func:`tandem.serve.ray_app.deploy_stages`)."""
    metrics = ServeMetrics(torch.get_num_threads())
    if policy == "load-aware":
        if profile is None or slo_s is None:
            raise ValueError("policy 'load-aware' needs a profile and slo_s")
        control = LoadAwarePolicy(profile, pipe.calibration, slo_s, max_batch, max_wait,
                                  reference=default_plan(pipe))  # the plan a profile is measured at
    elif policy == "fixed":
        control = None
    else:
        raise ValueError(f"unknown policy {policy!r}; expected 'fixed' or 'load-aware'")
    engine = Engine(pipe, max_batch=max_batch, max_wait=max_wait, max_queue=max_queue, policy=control,
                    metrics=metrics, backend=backend, workers=workers)
    return create_app(pipe, engine=engine, limits=Limits(max_n=max_n, deadline_s=deadline_s), api_key=api_key,
                      metrics=metrics)


def build_server(pipe, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options):
    """A uvicorn server of :func:`build_app` (``options`` are its). SIGTERM or Ctrl-C: the listening socket
    closes, the requests in flight finish, the engine drains, and the process exits 0."""
    import uvicorn

    log = logging.getLogger("tandem.serve")  # the engine's and the policy's messages, beside uvicorn's
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # uvicorn re-raises the signal it stopped on, for a parent that wants it; for a server a drained
                # SIGTERM is a clean stop: exit 0
                self._captured_signals.clear()

    return DrainingServer(uvicorn.Config(build_app(pipe, **options), host=host, port=port, log_level=log_level,
                                         lifespan="on"))


def startup_profile(pipe, batch_sizes=(1, 2, 4, 8), repeats: int = 2, callback=None) -> Profile:
    """The stages' profile measured now on ``pipe`` (:func:`~tandem.serve.profile.measure_profile`)."""
    return measure_profile(pipe, PROFILE_PROMPTS, batch_sizes=batch_sizes, repeats=repeats, callback=callback)
