"""``tandem serve`` in process: the engine batches each stage across requests and serves the offline pipeline's
images; the API refuses bad requests naming the field, wants its key, answers 429/503/500 as documented, and
reports Prometheus metrics; the load-aware rule against a hand-computed case. The shipped world, its oracle and
calibration (a served image is compared with ``TandemPipeline.__call__`` on the same prompt and seed)."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tandem import TandemPipeline
from tandem.serve.app import create_app
from tandem.serve.controller import LoadAwarePolicy, largest_share
from tandem.serve.engine import Engine
from tandem.serve.profile import Profile
from tandem.serve.requests import Limits, default_plan, plan_request
from tandem.serve.requests import Tandem as Fields

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread):
    return TandemPipeline.from_pretrained("world")


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_each_stage_batches_across_requests_and_serves_the_pipelines_images(pipe):
    engine = Engine(pipe, max_batch=8, max_wait=0.0)
    asks = [(["a red circle"] * 2, 5, {}), (["a small blue square at the top left"], 6, {"percentile": 90}),
            (["two green triangles", "a yellow star"], 7, {"mode": "student"}),
            (["a big red square below a blue circle"] * 2, 8, {"percentile": 80})]
    jobs = [engine.submit(prompts, plan_request(pipe, Fields(**kw), len(prompts)), seed, deadline_s=600)
            for prompts, seed, kw in asks]  # queued before the worker starts: the stages batch across them
    engine.start()
    results = [job.future.result(timeout=300) for job in jobs]
    assert engine.drain(timeout=60)
    student_batches = {r["serving"]["stages"]["student"]["batch_size"] for res in results for r in res.records}
    assert student_batches == {7}  # every student image in one batch (same steps and guidance)
    routed = [r for res in results for r in res.records if r["path"] == "refined"]
    assert routed and {r["serving"]["stages"]["teacher"]["batch_size"] for r in routed} == {len(routed)}
    for (prompts, seed, kw), res in zip(asks, results):
        args = {"mode": "adaptive", **kw}
        offline = pipe(prompts, seed=seed, **args)
        for got, want, rec, ref in zip(res.images, offline.images, res.records, offline.records):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # another batch shape: one grey level
            assert rec["path"] == ref["path"] and rec["unet_evals"] == ref["unet_evals"]
            assert rec["tau"] == ref["tau"]
            if ref["student_score"] is not None:
                assert rec["student_score"] == pytest.approx(ref["student_score"], abs=1e-3)


@pytest.fixture(scope="module")
def client(pipe):
    app = create_app(pipe, api_key=None, limits=Limits(max_n=4, max_prompt_chars=200, max_body_bytes=200_000))
    with TestClient(app) as c:
        yield c


def test_generations_answer_openais_shape_with_the_records(client, pipe):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 3, "model": "world",
                                                    "size": "32x32", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["tandem"]["seed"] == 3
    offline = pipe(["a red circle"] * 2, seed=3)
    for item, want in zip(body["data"], offline.images):
        assert np.abs(png(item["b64_json"]).astype(int) - want.astype(int)).max() <= 1
        assert item["tandem"]["path"] in ("accepted", "refined") and item["tandem"]["serving"]["latency_s"] > 0


def nan_body(field: str) -> str:
    return f'{{"prompt": "a red circle", "{field}": NaN}}'


BAD = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "a" * 201}, 400, "prompt"),
    ({"prompt": "a red circle", "n": 0}, 422, "n"),
    ({"prompt": "a red circle", "n": 5}, 400, "n"),
    ({"prompt": "a red circle", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "a red circle", "num_inference_steps": 51}, 400, "num_inference_steps"),
    ({"prompt": "a red circle", "teacher_steps": 10_000}, 400, "teacher_steps"),
    (nan_body("percentile"), 422, "percentile"),
    ('{"prompt": "a red circle", "threshold": Infinity}', 422, "threshold"),
    ({"prompt": "a red circle", "percentile": 101}, 422, "percentile"),
    ({"prompt": "a red circle", "percentile": 50, "budget": 10}, 400, "budget"),
    ({"prompt": "a red circle", "mode": "student", "percentile": 50}, 400, "percentile"),
    ({"prompt": "a red circle", "mode": "mixed"}, 422, "mode"),
    ({"prompt": "a red circle", "image_path": "/etc/passwd"}, 422, "image_path"),
    ({"prompt": "a red circle", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "a red circle", "size": "1024x1024"}, 400, "size"),
    ({"prompt": "a red circle", "model": "dall-e-3"}, 400, "model"),
    ({"prompt": "a red circle", "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": "a red circle", "seed": -1}, 422, "seed"),
    ("{not json", 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD, ids=[f"{f}-{s}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_a_bad_request_is_refused_naming_its_field(client, body, status, field):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = client.post("/v1/images/generations", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"].startswith(field) and error["code"] == status
    if field != "body":
        assert error["param"] == field


def edit_form(picture: bytes, **fields):
    data = {"prompt": "a blue circle", "strength": "0.6", "seed": "2", **fields}
    return {"files": {"image": ("in.png", picture, "image/png")}, "data": data}


def test_edits_run_adaptive_sdedit_and_refuse_a_non_image(client, pipe):
    picture = io.BytesIO()
    Image.fromarray(pipe(["a red circle"], mode="student", seed=1).images[0]).save(picture, format="PNG")
    r = client.post("/v1/images/edits", **edit_form(picture.getvalue()))
    assert r.status_code == 200, r.text
    rec = r.json()["data"][0]["tandem"]
    assert rec["edit_strength"] == 0.6 and rec["path"] in ("accepted", "regenerated")
    offline = pipe.edit(np.asarray(Image.open(picture)), ["a blue circle"], strength=0.6, seed=2)
    assert np.array_equal(png(r.json()["data"][0]["b64_json"]), offline.images[0])
    r = client.post("/v1/images/edits", **edit_form(b"%PDF-1.4 not an image"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = client.post("/v1/images/edits", **edit_form(picture.getvalue(), strength="nan"))
    assert r.status_code == 400 and "strength" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", **edit_form(b"\0" * 300_000))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_the_api_key_is_required_and_compared(pipe):
    with TestClient(create_app(pipe, api_key="s3cret")) as c:
        body = {"prompt": "a red circle", "mode": "student"}
        assert c.post("/v1/images/generations", json=body).status_code == 401
        assert c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_a_full_queue_answers_429_and_a_request_past_its_deadline_503(pipe):
    engine = Engine(pipe, max_batch=8, max_wait=60.0, max_queue=4)  # a batch waits a minute to fill
    with TestClient(create_app(pipe, engine=engine, limits=Limits(deadline_s=1.5))) as c:
        first = {}
        waiting = threading.Thread(target=lambda: first.update(r=c.post(
            "/v1/images/generations", json={"prompt": "a red circle", "n": 3, "mode": "student"})))
        waiting.start()
        while engine.queued()["student"] < 3:
            time.sleep(0.01)
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        waiting.join(timeout=30)
        assert first["r"].status_code == 503 and "deadline" in first["r"].json()["error"]["message"]
        assert engine.queued() == {"student": 0, "oracle": 0, "teacher": 0}
        metrics = c.get("/metrics").text
    assert 'tandem_requests_total{endpoint="generations",status="429"} 1.0' in metrics
    assert 'tandem_jobs_failed_total{reason="DeadlineExceeded"} 1.0' in metrics


class Exploding:
    """The shipped oracle, as far as calibration can tell, that fails when called."""

    def __init__(self, real):
        self.real = real

    def fingerprint(self):
        return self.real.fingerprint()

    def __call__(self, images, prompts):
        raise RuntimeError("the oracle's GPU fell over")


def test_a_model_error_fails_its_requests_with_an_id_not_the_server(pipe, caplog):
    broken = TandemPipeline(pipe.student, pipe.teacher, Exploding(pipe.scorer), pipe.calibration, defaults=pipe.defaults,
                            name="world")
    with TestClient(create_app(broken)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 1})
        assert r.status_code == 500
        error_id = r.json()["error"]["message"].split("error id ")[1].split(";")[0]
        assert error_id in caplog.text
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "mode": "student"})
        assert r.status_code == 200


def test_cancelled_work_leaves_the_queues(pipe):
    engine = Engine(pipe, max_wait=60.0)
    job = engine.submit(["a red circle"] * 3, default_plan(pipe, 3), 0, deadline_s=60)
    other = engine.submit(["a green triangle"], default_plan(pipe, 1), 1, deadline_s=60)
    engine.cancel(job)
    assert engine.queued()["student"] == 1 and job.future.cancelled() and not other.future.done()


def test_metrics_are_prometheus_text(client):
    client.post("/v1/images/generations", json={"prompt": "a green triangle", "seed": 4})
    text = client.get("/metrics").text
    for line in ('tandem_requests_total{endpoint="generations",status="200"}', "tandem_torch_threads 1.0",
                 'tandem_batch_size_bucket{le="1.0",stage="student"}', 'tandem_queue_depth{stage="teacher"} 0.0',
                 "tandem_threshold ", 'tandem_unet_evaluations_total{model="student"}', "tandem_teacher_share "):
        assert line in text, line


def test_the_playground_page_is_served(client):
    page = client.get("/").text
    assert "tandem playground" in page and "v1/images/generations" in page and "world" in page


PROFILE = Profile({"student": {1: 0.2, 8: 0.8}, "oracle": {1: 0.02, 8: 0.08}, "teacher": {1: 1.0, 8: 4.0}}, 1)


def test_the_load_aware_share_by_hand():
    # t (seconds per image at batch 8): student 0.1, oracle 0.01, teacher 0.5; at 1.5 images/s and a 10 ms wait
    # the batch is 1: service S = 0.2 + 0.02 + 1.0 + 3 * 0.01 = 1.25 s. Latency S / (1 - rho) <= 2 s gives
    # rho <= 0.375 (tighter than the 0.9 utilisation); rho = 1.5 * (0.11 + 0.5 p) gives p <= 0.28.
    assert largest_share(PROFILE, 1.5, 2.0, 8, 0.01) == pytest.approx(0.28)
    assert largest_share(PROFILE, 0.0, 2.0, 8, 0.01) == 1.0
    # at 0.2 images/s: rho <= 0.375 -> p <= (1.875 - 0.11) / 0.5 > 1: no cap
    assert largest_share(PROFILE, 0.2, 2.0, 8, 0.01) == 1.0
    # at 20 images/s (batch 8 within a 0.4 s wait): capacity alone, rho = 20 (0.11 + 0.5 p) > 0.9: none
    assert largest_share(PROFILE, 20, 60.0, 8, 0.4) == 0.0
    # an SLO shorter than one teacher path: only the student
    assert largest_share(PROFILE, 0.1, 1.0, 8, 0.01) == 0.0
    # the server computes the teacher twice as slowly as the profile: t_teacher = 1.0, S = 1.25 + 1.0 = 2.25 s > the
    # SLO: only the student; at a 4 s SLO: rho <= 1 - 2.25 / 4 = 0.4375, p <= (0.4375 / 1.5 - 0.11) / 1.0
    assert largest_share(PROFILE, 1.5, 2.0, 8, 0.01, slowdown={"teacher": 2.0}) == 0.0
    assert largest_share(PROFILE, 1.5, 4.0, 8, 0.01, slowdown={"teacher": 2.0}) == pytest.approx(0.18)
    # faster than the profile counts as the profile
    assert largest_share(PROFILE, 1.5, 2.0, 8, 0.01, slowdown={"teacher": 0.5, "student": None}) == pytest.approx(0.28)


def test_the_policy_measures_the_servers_slowdown_against_the_profile(pipe):
    policy = LoadAwarePolicy(PROFILE, pipe.calibration, slo_s=4.0, max_batch=8, max_wait=0.01, window=10)
    policy.arrived(15, 1.0)
    policy.update(11.0, {"student": (1, 0.0), "oracle": (1, 0.0), "teacher": (1, 2.0)})  # 2.0 s where the profile has 1.0
    assert policy.slowdown == {"teacher": 2.0} and policy.share == pytest.approx(0.18)
    policy.update(12.0, {"teacher": (8, 4.0)})  # as fast as the profile: the average moves 30% of the way
    assert policy.slowdown["teacher"] == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)


def test_a_load_that_starts_is_seen_within_a_second_not_a_window(pipe):
    policy = LoadAwarePolicy(PROFILE, pipe.calibration, slo_s=2.0, max_batch=8, max_wait=0.01, window=10)
    policy.arrived(6, 100.0)
    assert policy.rate(100.5) == 6.0  # over one second, not ten
    assert policy.rate(102.0) == 3.0
    assert policy.rate(130.0) == 0.0


def test_under_load_a_full_batch_runs_before_a_part_one(pipe):
    engine = Engine(pipe, max_batch=4, max_wait=0.01, max_hold=1.0)
    job = engine.job(["a red circle"] * 7, default_plan(pipe, 7), 0, now=0.0, deadline_s=60)
    for im in job.images[:4]:
        engine._enqueue("student", im, 0.5)
    for im in job.images[4:]:
        engine._enqueue("teacher", im, 0.5)
    assert engine._next_batch(0.6)[0] == "student"  # both due; the teacher's 3 wait behind a full batch to fill
    assert engine._next_batch(1.6)[0] == "teacher"  # ... for max_hold at most
    engine.queues["student"].items.pop()
    assert engine._next_batch(0.6)[0] == "teacher"  # no full batch anywhere: the later stage, once due


def test_the_policy_caps_a_requests_own_cut_off(pipe):
    policy = LoadAwarePolicy(PROFILE, pipe.calibration, slo_s=2.0, max_batch=8, max_wait=0.01, window=10)
    tau50 = float(pipe.calibration.threshold(50))
    policy.update(0.0)
    assert policy.cap(tau50, 50) == (tau50, 1.0)  # light load: the request's own cut-off exactly
    policy.arrived(15, 1.0)  # 15 images in the 10 s window: 1.5 images/s
    policy.update(11.0)
    tau, share = policy.cap(tau50, 50)
    assert share == pytest.approx(0.28) and tau == pytest.approx(float(pipe.calibration.threshold(28)))
    assert policy.cap(-1.0, None)[0] == -1.0  # a lower cut-off of the request's own stays
    assert policy.changes[-1]["share"] == pytest.approx(0.28)
    policy.update(30.0)  # the window empties: back to no cap
    assert policy.share == 1.0
