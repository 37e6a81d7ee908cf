"""``tandem serve --ray``: the stages as Ray Serve deployments on a local Ray instance, behind the same API and
router, serve the in-process server's images for the same requests and seeds (within one grey level) and the same
records. Slow (Ray starts and three replicas load the world); needs the ``ray`` extra."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REQUESTS = [{"prompt": "a red circle", "n": 2, "seed": 5},
            {"prompt": "a big red square below a blue circle", "n": 3, "seed": 8, "percentile": 80},
            {"prompt": "two green triangles", "n": 2, "seed": 7, "mode": "teacher"},
            {"prompt": "a yellow star", "n": 1, "seed": 3, "mode": "student"}]


def served(app) -> list[dict]:
    with TestClient(app) as client:
        answers = [client.post("/v1/images/generations", json=body) for body in REQUESTS]
    assert [a.status_code for a in answers] == [200] * len(REQUESTS), [a.text for a in answers]
    return [a.json() for a in answers]


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))).astype(int)


def test_ray_serve_stages_serve_the_in_process_images():
    import ray

    from tandem.pipeline import load_preset
    from tandem.serve.ray_app import deploy_stages, shutdown
    from tandem.serve.server import build_app

    pipe = load_preset("world")
    local = served(build_app(pipe, max_wait=0.01))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        backend = deploy_stages("world", {"student": 1, "oracle": 1, "teacher": 2}, cpus=0.5)
        remote = served(build_app(pipe, max_wait=0.01, backend=backend,
                                  workers={"student": 1, "oracle": 1, "teacher": 2}))
    finally:
        shutdown()
    for here, there in zip(local, remote):
        for a, b in zip(here["data"], there["data"]):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
            ra, rb = a["tandem"], b["tandem"]
            assert (ra["path"], ra["unet_evals"], ra["tau"]) == (rb["path"], rb["unet_evals"], rb["tau"])
            if ra["student_score"] is not None:
                assert rb["student_score"] == pytest.approx(ra["student_score"], abs=1e-3)
