"""``tandem serve`` as a user runs it: a process on 127.0.0.1, called through OpenAI's own Python client, that
cancels the queued work of a client that leaves and drains on SIGTERM (the request in flight finishes, new
connections are refused, the process exits 0)."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from servetools import wait_until_ready

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TANDEM_TEST_KEY": KEY}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), "--threads", "1",
                                 "--api-key-env", "TANDEM_TEST_KEY", "--max-batch", "2", "--max-wait-ms", "5"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, 120, lambda: f"the server exited: {log.read_text()[-2000:]}" if proc.poll() is not None
                     else None)
    yield url, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_openais_client_generates_and_edits(server):
    from openai import OpenAI

    url, _, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    result = client.images.generate(model="world", prompt="a red circle", n=2, response_format="b64_json",
                                    extra_body={"seed": 3})
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in result.data]
    assert [im.shape for im in images] == [(32, 32, 3)] * 2 and not np.array_equal(images[0], images[1])
    record = result.data[0].model_extra["tandem"]
    assert record["prompt"] == "a red circle" and record["path"] in ("accepted", "refined")
    picture = io.BytesIO()
    Image.fromarray(images[0]).save(picture, format="PNG")
    edit = client.images.edit(image=("in.png", picture.getvalue(), "image/png"), prompt="a blue circle",
                              extra_body={"strength": 0.6, "seed": 1})
    assert edit.data[0].model_extra["tandem"]["edit_strength"] == 0.6
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="a red circle")


def test_a_client_that_leaves_has_its_queued_work_cancelled(server):
    url, _, log = server
    before = metric(url, "tandem_unet_evaluations_total{model=\"teacher\"}")
    with pytest.raises(httpx.ReadTimeout):  # 8 teacher images in batches of 2: seconds of work
        httpx.post(f"{url}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"prompt": "a green triangle", "n": 8, "mode": "teacher", "seed": 5})
    for _ in range(100):
        if "client left" in log.read_text() and metric(url, "tandem_queue_depth") == 0:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    spent = metric(url, "tandem_unet_evaluations_total{model=\"teacher\"}") - before
    assert "client left" in log.read_text()
    assert spent < 8 * 20  # 10 teacher steps, guided: 20 rows an image; the rest never ran


def test_sigterm_drains_the_requests_in_flight_and_exits_zero(server):
    url, proc, log = server
    answer = {}

    def slow():
        answer["r"] = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"prompt": "a small blue square", "n": 4, "mode": "teacher", "seed": 2},
                                 timeout=120)

    worker = threading.Thread(target=slow)
    worker.start()
    for _ in range(200):
        if metric(url, "tandem_queue_depth") > 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["data"]) == 4
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
    assert "draining" in log.read_text()
