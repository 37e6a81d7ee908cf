"""What a client may ask of the server: the request bodies (OpenAI's image API, plus tandem's own fields), the
server's limits, and the generation plan a request resolves to (the pipeline's own :func:`plan_generation`, so
a served request is checked and resolved exactly as ``pipe(prompts, ...)`` would be)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipeline.settings import plan_generation

SERVED_MODES = ("adaptive", "student", "teacher")


@dataclass(frozen=True)
class Limits:
    """What one request may ask: prompt length in characters, images per request, student and teacher steps,
    request body bytes, and how long a request may wait before it is dropped (seconds)."""

    max_prompt_chars: int = 1000
    max_n: int = 8
    max_steps: int = 50
    max_teacher_steps: int = 200
    max_drafts: int = 8
    max_body_bytes: int = 8 * 2**20
    deadline_s: float = 120.0


class RequestError(ValueError):
    """A request the server refuses: ``field`` names what is wrong (400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Tandem(BaseModel):
    """tandem's own fields, shared by generation and edits."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int | None = Field(None, ge=0, lt=2**63, description="image i's noise is seeded from (seed, i); "
                             "default: a seed the server draws and reports")
    mode: Literal["adaptive", "student", "teacher"] = Field("adaptive", description="Algorithm 1, or one model alone")
    percentile: float | None = Field(None, ge=0, le=100, description="tau is this percentile of the calibration")
    threshold: float | None = Field(None, description="tau itself")
    budget: float | None = Field(None, gt=0, description="mean UNet evaluations per image the cut-off aims at")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="the student's guidance")
    num_inference_steps: int | None = Field(None, ge=1, description="the student's steps")
    teacher_steps: int | None = Field(None, ge=1, description="the teacher's steps")
    drafts: int | None = Field(None, ge=1, description="the student's drafts per image, the oracle's best kept (tau "
                               "then needs the server's best-of-N calibration)")


class GenerationRequest(Tandem):
    """``POST /v1/images/generations``: OpenAI's fields (``model``, ``size``, ``quality``, ``style`` and
    ``user`` are accepted; a model or size other than the served one is refused) and tandem's."""

    prompt: str = Field(min_length=1, description="what to draw")
    n: int = Field(1, ge=1, description="images for this prompt, seeds (seed, 0) .. (seed, n-1)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None


def check_request(body: Tandem, limits: Limits, prompt: str, n: int, served: str, size: tuple[int, int],
                  model: str | None = None, requested_size: str | None = None,
                  response_format: str = "b64_json") -> None:
    """The checks that depend on the server: limits, the served model and size, one cut-off."""
    if not prompt.strip():
        raise RequestError("prompt", "is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"is {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    if n > limits.max_n:
        raise RequestError("n", f"is {n}; this server draws at most {limits.max_n} images per request")
    if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
        raise RequestError("num_inference_steps", f"is {body.num_inference_steps}; the limit is {limits.max_steps}")
    if body.drafts is not None and body.drafts > limits.max_drafts:
        raise RequestError("drafts", f"is {body.drafts}; the limit is {limits.max_drafts}")
    if body.teacher_steps is not None and body.teacher_steps > limits.max_teacher_steps:
        raise RequestError("teacher_steps", f"is {body.teacher_steps}; the limit is {limits.max_teacher_steps}")
    if response_format != "b64_json":
        raise RequestError("response_format", "this server returns images inline only: use 'b64_json'")
    if model is not None and model not in (served, "tandem"):
        raise RequestError("model", f"this server serves {served!r}, not {model!r}")
    if requested_size is not None and requested_size != f"{size[0]}x{size[1]}":
        raise RequestError("size", f"this server draws {size[0]}x{size[1]} images, not {requested_size!r}")
    cutoffs = [k for k in ("percentile", "threshold", "budget") if getattr(body, k) is not None]
    if len(cutoffs) > 1:
        raise RequestError(cutoffs[1], f"give at most one of percentile, threshold and budget; got {', '.join(cutoffs)}")
    if cutoffs and body.mode != "adaptive":
        raise RequestError(cutoffs[0], f"applies to mode 'adaptive', not {body.mode!r}")
    if body.threshold is not None and not math.isfinite(body.threshold):
        raise RequestError("threshold", "must be a finite number")


# the request's field names -> the pipeline's argument names, for a message the pipeline raises
_ARGUMENTS = {"threshold": "accept_threshold"}


def plan_request(pipe, body: Tandem, n: int):
    """The pipeline's plan of a request (:func:`tandem.pipeline.settings.plan_generation`); a setting the
    pipeline refuses is a :class:`RequestError` naming the request's field."""
    try:
        plan = plan_generation(
            pipe, n, None, mode=body.mode, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, teacher_steps=body.teacher_steps, teacher_guidance_scale=None,
            teacher_scheduler=None, strategy=None, rollback_sigma=None, rollback_convention=None, handoff="latent",
            accept_threshold=body.threshold, percentile=body.percentile, budget=body.budget, routing=None,
            score=None, cascade=None, drafts=body.drafts)
    except ValueError as e:
        message = str(e)
        field = next((f for f in (*Tandem.model_fields, *_ARGUMENTS) if _ARGUMENTS.get(f, f) in message), "request")
        raise RequestError(field, message) from None
    return plan


class PlanCache:
    """The plans of a pipeline's requests by the settings they depend on. Resolving a plan builds the teacher's
    rollback schedule (a scheduler copied and stepped: milliseconds of the interpreter that the model's thread
    needs under load); requests mostly repeat a few settings. Plans are shared, never changed.

    Called with a ``policy``, a request whose budget took a route of the route table may take a cheaper route of
    the same table instead, the policy's choice for the load (:meth:`tandem.serve.controller.LoadAwarePolicy.choose`):
    of the routes that budget may take (:meth:`tandem.routes.RouteTable.choices`), dearest first. Each is the plan
    of the request at that route's budget, so a request is resolved as ``pipe(prompts, budget=...)`` would be."""

    def __init__(self, pipe, size: int = 1024):
        self.pipe, self.size, self.plans, self._choices = pipe, size, {}, None

    def __call__(self, body: Tandem, n: int, policy=None):
        plan = self.plan(body, n)
        if plan.route is None or policy is None:
            return plan
        if self._choices is None or self._choices[0] is not self.pipe.routes:  # the table's choices, once
            self._choices = (self.pipe.routes, self.pipe.routes.choices())
        cheaper = [c["from_cost"] for c in self._choices[1]
                   if c["from_cost"] <= body.budget + 1e-9 and c["route"] != plan.route]
        plans = [plan, *(self.plan(body.model_copy(update={"budget": cost}), n) for cost in reversed(cheaper))]
        return policy.choose(plans)[0]

    def plan(self, body: Tandem, n: int):
        key = (n, body.mode, body.num_inference_steps, body.guidance_scale, body.teacher_steps, body.threshold,
               body.percentile, body.budget, body.drafts)
        plan = self.plans.get(key)
        if plan is None:
            plan = plan_request(self.pipe, body, n)
            if len(self.plans) >= self.size:
                self.plans.pop(next(iter(self.plans)))  # the oldest
            self.plans[key] = plan
        return plan


def default_plan(pipe, n: int = 1):
    """The plan of a request that sets nothing: the pipeline's defaults, adaptive."""
    return plan_request(pipe, Tandem(), n)
