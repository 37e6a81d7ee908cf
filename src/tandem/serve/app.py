"""The HTTP API of a served tandem (FastAPI): OpenAI's image endpoints with tandem's fields and records, health,
readiness and Prometheus metrics, and a playground page. The web layer checks and translates; the
:class:`~tandem.serve.engine.Engine` computes.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a setting the server
refuses (``param`` names the field), 422 for a body that does not parse, 401 without the API key, 413 for a body
over the limit, 429 with ``Retry-After`` when the queues are full, 503 for a request dropped at its deadline or
sent while the server drains, 500 with an error id (in the server's log) when a model call fails.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image as PILImage

from ..outputs import json_safe
from .engine import Engine
from .jobs import BatchFailed, DeadlineExceeded, QueueFull, ShuttingDown
from .metrics import ServeMetrics
from .requests import GenerationRequest, Limits, PlanCache, RequestError, Tandem, check_request

log = logging.getLogger("tandem.serve")

ENDPOINTS = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, whether or not it says its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is over the limit of {self.limit} bytes", "too_large")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await too_big(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class Guard:
    """Wants the API key on the image endpoints (401 without it) and counts their answers by status. A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` would hide a client's disconnect from the endpoint."""

    def __init__(self, app, api_key: str | None, metrics: ServeMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        status = {}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.api_key is not None and not _authorized(dict(scope["headers"]).get(b"authorization", b""),
                                                        self.api_key):
            await error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                 "authentication_error")(scope, receive, counted)
        else:
            await self.app(scope, receive, counted)
        self.metrics.requests.labels(endpoint, str(status.get("code", 499))).inc()


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    PILImage.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(pipe, *, engine: Engine | None = None, limits: Limits | None = None, api_key: str | None = None,
               metrics: ServeMetrics | None = None, drain_timeout: float | None = None) -> FastAPI:
    """The API serving ``pipe`` (a TandemPipeline) through ``engine`` (default: an :class:`Engine` of it). With
    ``api_key``, every endpoint but health and readiness wants ``Authorization: Bearer <key>``; ``limits``
    default to :class:`Limits`' own."""
    limits = Limits() if limits is None else limits
    metrics = metrics or ServeMetrics(torch.get_num_threads())
    engine = engine or Engine(pipe, metrics=metrics)
    plans = PlanCache(pipe)
    engine.metrics = engine.metrics or metrics
    size = pipe.resolution()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        log.info("draining: finishing the queued requests")
        await asyncio.to_thread(engine.drain, drain_timeout)

    app = FastAPI(title="tandem", summary="A few-step student and its teacher, in tandem, behind an image API",
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.pipe = engine, metrics, pipe

    @app.exception_handler(HTTPFailure)
    async def failure(request: Request, e: HTTPFailure):
        return error_response(e.status, str(e), e.kind, e.param, e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        error_id = secrets.token_hex(4)
        log.error("request failed: error id %s", error_id, exc_info=e)
        return error_response(500, f"the server failed (error id {error_id}; see the server log)", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(422, f"body: not valid JSON ({detail})", "invalid_request_error", None)
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "form")) or "body"
        return error_response(422, f"{field}: {first['msg']}", "invalid_request_error", field)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest, request: Request):
        t0 = time.monotonic()
        _refused(lambda: check_request(body, limits, body.prompt, body.n, pipe.name, size, body.model, body.size,
                                       body.response_format))
        plan = _refused(lambda: plans(body, body.n, engine.policy))
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job = _admitted(lambda: engine.submit([body.prompt] * body.n, plan, seed, limits.deadline_s))
        result = await _wait(request, engine, job)
        latency = time.monotonic() - t0
        metrics.latency.labels("generations").observe(latency)
        data = []
        for i, image in enumerate(result.images):
            item = {"b64_json": png_b64(image), "revised_prompt": body.prompt, "tandem": result.records[i]}
            if result.student_images and result.records[i]["path"] not in ("student", "accepted"):
                item["student_b64_json"] = png_b64(result.student_images[i])
            data.append(item)
        return json_safe({"created": int(time.time()), "data": data,
                          "tandem": {"request_id": job.id, "seed": seed, "mode": plan.mode, "tau": job.tau,
                                     "budget": plan.budget, "teacher_share_cap": job.share_cap, "latency_s": latency, "model": pipe.name}}, nan=True)

    @app.post("/v1/images/edits")
    async def edits(request: Request, image: UploadFile = File(...), prompt: str = Form(...),
                    strength: float | None = Form(None), n: int = Form(1), seed: int | None = Form(None),
                    mode: str = Form("adaptive"), percentile: float | None = Form(None),
                    threshold: float | None = Form(None), budget: float | None = Form(None),
                    response_format: str = Form("b64_json"), model: str | None = Form(None),
                    size: str | None = Form(None)):
        t0 = time.monotonic()
        fields = _refused(lambda: Tandem(seed=seed, mode=mode, percentile=percentile, threshold=threshold,
                                         budget=budget))
        _refused(lambda: check_request(fields, limits, prompt, n, pipe.name, size, model, size, response_format))
        if n < 1:
            raise HTTPFailure(400, "n: must be at least 1", "invalid_request_error", "n")
        if strength is not None and not (np.isfinite(strength) and 0 < strength <= 1):
            raise HTTPFailure(400, "strength: must be a number in (0, 1]", "invalid_request_error", "strength")
        picture = _read_image(await image.read())
        seed = fields.seed if fields.seed is not None else secrets.randbelow(2**31)
        cut = {"accept_threshold": threshold, "percentile": percentile, "budget": budget}

        def run():
            return pipe.edit(picture, [prompt] * n, strength=strength, mode=mode, seed=seed, **cut)

        call = _admitted(lambda: engine.submit_call(run, n, limits.deadline_s))
        output = await _wait(request, engine, call)
        latency = time.monotonic() - t0
        metrics.latency.labels("edits").observe(latency)
        data = [{"b64_json": png_b64(img), "revised_prompt": prompt, "tandem": rec}
                for img, rec in zip(output.images, output.records)]
        return json_safe({"created": int(time.time()), "data": data,
                          "tandem": {"seed": seed, "mode": mode, "latency_s": latency, "model": pipe.name,
                                     "summary": {k: v for k, v in output.summary.items()
                                                 if k in ("n", "paths", "teacher_share")}}}, nan=True)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not engine.alive:
            return error_response(503, "the engine is not running", "not_ready")
        return {"status": "ready", "model": pipe.name, "queued": engine.queued()}

    @app.get("/metrics")
    async def prometheus():
        for stage, depth in engine.queued().items():
            metrics.queue_depth.labels(stage).set(depth)
        policy = engine.policy
        if policy is not None:
            metrics.share_cap.set(policy.share)
            metrics.arrival_rate.set(policy.rate(time.monotonic()))
        tau = _default_threshold(pipe, policy)
        if tau is not None:
            metrics.threshold.set(tau)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        page = resources.files("tandem.serve").joinpath("playground.html").read_text()
        return page.replace("{{MODEL}}", pipe.name).replace("{{SIZE}}", f"{size[0]}x{size[1]}")

    guarded = Guard(app, api_key, metrics)
    return BodyLimit(guarded, limits.max_body_bytes) if limits.max_body_bytes else guarded


def _authorized(header: bytes, key: str) -> bool:
    token = header[7:] if header[:7].lower() == b"bearer " else b""
    return hmac.compare_digest(token, key.encode())  # constant time: the key is not guessed byte by byte


def _refused(fn):
    """``fn()``, a refused setting (RequestError, or a ValueError from the pipeline or pydantic) made a 400."""
    try:
        return fn()
    except RequestError as e:
        raise HTTPFailure(400, str(e), "invalid_request_error", e.field) from None
    except ValueError as e:
        errors = getattr(e, "errors", None)
        if callable(errors):  # pydantic's: the first problem, with its field
            first = errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise HTTPFailure(400, f"{field}: {first['msg']}", "invalid_request_error", field) from None
        raise HTTPFailure(400, str(e), "invalid_request_error") from None


def _admitted(submit):
    try:
        return submit()
    except QueueFull as e:
        raise HTTPFailure(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise HTTPFailure(503, str(e), "unavailable") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: the server's receive channel, its body already read, answers only then."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.5)  # a server whose receive answers at once: ask again later


async def _wait(request: Request, engine: Engine, job):
    """The job's result; its queued work is cancelled if the client disconnects first."""
    future = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:  # no polling: a poll per queued request per tick takes the interpreter from the model's thread
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not future.done():
        engine.cancel(job)
        log.info("client left: request cancelled")
        raise HTTPFailure(499, "the client closed the request", "cancelled")
    try:
        return future.result()
    except DeadlineExceeded as e:
        raise HTTPFailure(503, str(e), "timeout") from None
    except BatchFailed as e:
        raise HTTPFailure(500, str(e), "server_error") from None
    except ValueError as e:  # an edit the pipeline refused
        raise HTTPFailure(400, str(e), "invalid_request_error") from None


def _read_image(data: bytes) -> np.ndarray:
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception:  # noqa: BLE001  (PIL raises many kinds for bytes that are not an image)
        raise HTTPFailure(400, "image: the upload is not an image (PNG, JPEG, ...)", "invalid_request_error",
                          "image") from None


def _default_threshold(pipe, policy) -> float | None:
    if policy is not None and hasattr(policy, "threshold") and policy.share < 1:
        return policy.threshold()
    k = pipe.defaults.get("percentile")
    if pipe.calibration is None or k is None:
        return None
    return float(pipe.calibration.threshold(k))
