"""One call's settings, resolved once: a call's arguments, the pipeline's defaults (a preset's), a route
table's or a cascade table's choice at a budget, every value checked, and what follows from them (the
teacher's refinement schedule, what an image costs, the routing cut-off). :meth:`TandemPipeline.__call__
<tandem.pipeline.TandemPipeline.__call__>` and :meth:`~tandem.pipeline.TandemPipeline.edit` run the stages
from these."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..calibration import diff_fingerprints
from ..checks import count, finite_number, sampler_steps
from ..sampling import unet_evals_per_step
from .components import check_shared_latents
from .drafts import check_drafts
from .routing import Cutoff, resolve_cascade, resolve_cutoff
from .schedules import (
    RefineSchedule,
    edit_timesteps,
    refine_schedule,
    rollback_sigma_value,
    teacher_edit_timesteps,
)

MODES = ("adaptive", "student", "teacher", "refine-all")
EDIT_MODES = ("adaptive", "student", "teacher")
STRATEGIES = ("refine", "regenerate")
HANDOFFS = ("latent", "pixel")
OUTPUT_TYPES = ("np", "pil", "latent")
NO_SCORER = "scoring needs a scorer (oracle): build the pipeline with scorer=..."
TEACHER_GUIDANCE = 7.5  # the teacher's guidance when no default gives one (diffusers' Stable Diffusion default)


def guidance_value(value, name: str) -> float:
    return finite_number(value, name, low=0)


def prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompts")
    return prompts


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")


@dataclass
class Plan:
    """What one generation call runs: the student's steps and guidance, the teacher's settings and refinement
    schedule (None when it regenerates or does not run), the cut-off, what an image costs (UNet evaluations),
    and the route or cascade a budget chose."""

    mode: str
    steps: int
    guidance: float
    teacher_steps: int
    teacher_guidance: float
    teacher_scheduler: str
    strategy: str
    rollback_sigma: float
    convention: str
    handoff: str
    refine: RefineSchedule | None
    regenerates: bool
    cut: Cutoff
    do_score: bool
    student_cost: float
    improve_cost: float
    budget: float | None
    route: object = None
    cascade: object = None
    chosen: dict | None = None
    drafts: int = 1  # the student's drafts per prompt, the best-scoring one kept (:mod:`.drafts`)
    preroute: float | None = None  # P(the student fails) at which a prompt goes straight to the teacher
    preroute_steps: int | None = None  # the teacher's steps for those

    def settings(self) -> dict:
        """The summary's ``settings``: every value this call ran with."""
        out = {
            "mode": self.mode, "num_inference_steps": self.steps, "guidance_scale": self.guidance,
            "teacher_steps": self.teacher_steps, "teacher_guidance_scale": self.teacher_guidance,
            "teacher_scheduler": self.teacher_scheduler, "strategy": self.strategy,
            "rollback_sigma": self.rollback_sigma, "rollback_convention": self.convention, "handoff": self.handoff,
            "accept_threshold": self.cut.tau, "percentile": self.cut.k, "budget": self.budget,
            "routing": self.cut.routing, "route": None if self.route is None else asdict(self.route),
        }
        if self.drafts > 1:  # absent for one draft: a one-draft call's settings are what they always were
            out["drafts"] = self.drafts
        if self.preroute is not None:  # likewise without pre-routing
            out["preroute"], out["preroute_steps"] = self.preroute, self.preroute_steps
        if self.cascade is not None:
            out["cascade"] = {"steps": list(self.cascade.steps),  # a threshold None keeps no image at its level
                              "thresholds": [float(t) if np.isfinite(t) else None for t in self.cascade.thresholds],
                              "chosen": self.chosen}
        return out


def plan_generation(pipe, n: int, generators: int | None, *, mode: str, num_inference_steps, guidance_scale, teacher_steps,
                    teacher_guidance_scale, teacher_scheduler, strategy, rollback_sigma, rollback_convention, handoff,
                    accept_threshold, percentile, budget, routing, score, cascade, drafts=None, preroute=None,
                    preroute_steps=None) -> Plan:
    """The :class:`Plan` of a generation call of ``n`` prompts (and ``generators`` generators, if given) to
    ``pipe`` with these arguments (``None``: the pipeline's default), every argument checked. With ``drafts``
    N > 1 the student draws N drafts per prompt and the oracle keeps the best (:mod:`.drafts`): a prompt's
    student cost is N drafts', and tau is a percentile of a best-of-N calibration."""
    if handoff not in HANDOFFS:
        raise ValueError(f"unknown handoff {handoff!r}; expected one of {', '.join(HANDOFFS)}")
    steps = count(pipe._setting("num_inference_steps", num_inference_steps, 4), "num_inference_steps")
    guidance = pipe.student_guidance(guidance_scale)
    route = None
    if (mode == "adaptive" and budget is not None and pipe.routes is not None and routing in (None, "threshold")
            and cascade is None
            and all(v is None for v in (strategy, teacher_steps, teacher_scheduler, rollback_sigma,
                                        rollback_convention, accept_threshold, percentile, drafts))):
        # a budget alone: the route table's best settings at that cost (explicit settings opt out)
        pipe.routes.check(pipe.route_fingerprint(steps, guidance, teacher_guidance_scale))
        route = pipe.routes.choose(budget)
        if route is not None:
            drafts = route.drafts
        if route is not None and route.strategy is None:  # the student alone (best of its drafts) at this budget
            accept_threshold = float("-inf")
        elif route is not None:
            strategy, teacher_scheduler = route.strategy, route.teacher_scheduler
            teacher_steps, rollback_sigma, percentile = route.teacher_steps, route.rollback_sigma, route.percentile
            if route.drafts > 1:  # the table carries the best-of-N calibration's cut-off at k
                accept_threshold, percentile = route.tau, None
    drafts = check_drafts(pipe._setting("drafts", drafts, 1))
    if drafts > 1:
        if mode == "teacher":
            raise ValueError("drafts are the student's (the oracle keeps the best of them): they apply to "
                             "mode='adaptive', 'student' or 'refine-all', not 'teacher'")
        if cascade is not None:
            raise ValueError("drafts > 1 and a cascade do not combine; use one or the other")
    cascade, chosen = resolve_cascade(pipe, cascade, mode, steps, guidance, budget, routing,
                                      {"accept_threshold": accept_threshold, "percentile": percentile,
                                           "strategy": strategy, "teacher_steps": teacher_steps,
                                           "teacher_scheduler": teacher_scheduler, "rollback_sigma": rollback_sigma,
                                           "rollback_convention": rollback_convention})
    if chosen is not None:  # a cascade table's point at this budget: its last gate's tau and teacher settings
        accept_threshold, budget = chosen.pop("tau"), None
        strategy, teacher_steps = chosen["teacher"].get("strategy"), chosen["teacher"].get("teacher_steps")
        teacher_scheduler = chosen["teacher"].get("teacher_scheduler")
        rollback_sigma = chosen["teacher"].get("rollback_sigma")
    t_steps = count(pipe._setting("teacher_steps", teacher_steps, 25), "teacher_steps")
    t_guidance = pipe.teacher_guidance(teacher_guidance_scale)
    t_sched = pipe._setting("teacher_scheduler", teacher_scheduler, "dpm")
    strategy = pipe._setting("strategy", strategy, "refine")
    sigma = rollback_sigma_value(pipe._setting("rollback_sigma", rollback_sigma, 0.5))
    convention = pipe._setting("rollback_convention", rollback_convention, "paper")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if (mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")) and pipe.teacher is None:
        raise ValueError("this teacher is an image-to-image pipeline: it can only refine")
    if generators is not None and generators != n * drafts:
        raise ValueError(f"got {generators} generators for {n} prompts (one per prompt)" if drafts == 1 else
                         f"got {generators} generators for {n} prompts of {drafts} drafts (one per draft, "
                         f"{n * drafts}, prompt-major)")
    if mode != "teacher":
        sampler_steps(steps, pipe.student.scheduler, "num_inference_steps", "the student")
    improves = mode == "refine-all" or (mode == "adaptive")
    regenerates = mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")
    if mode == "adaptive" and regenerates:
        check_shared_latents(pipe.student, pipe._teacher_any,
                             "regeneration starts the teacher from the student's initial noise",
                             "refine with strategy='refine' and handoff='pixel' instead")
    elif improves and handoff == "latent":
        check_shared_latents(pipe.student, pipe._teacher_any,
                             "a latent hand-off gives the teacher the student's latents",
                             "hand off in pixels: handoff='pixel'")
    refine = None
    if improves and (mode == "refine-all" or strategy == "refine"):
        refine = refine_schedule(pipe._teacher_scheduler(t_sched), t_steps, sigma, convention)
    elif regenerates:
        sampler_steps(t_steps, pipe._teacher_scheduler(t_sched), "teacher_steps", "the teacher")
    student_cost = drafts * steps * unet_evals_per_step(pipe.student, guidance)
    teacher_step_cost = unet_evals_per_step(pipe._teacher_any, t_guidance)
    improve_cost = (refine.steps if refine is not None else t_steps) * teacher_step_cost
    cut = resolve_cutoff(pipe, mode, routing, n, accept_threshold, percentile, None if route else budget,
                         steps, guidance, student_cost, improve_cost, drafts=drafts,
                         calibration=pipe.draft_calibrations.get(drafts) if drafts > 1 else None)
    do_score = mode == "adaptive" or bool(score) or drafts > 1
    if do_score and pipe.scorer is None:
        raise ValueError(NO_SCORER)
    preroute, preroute_steps = check_preroute(pipe, mode, cut, steps, guidance, drafts, t_sched, preroute,
                                              preroute_steps)
    return Plan(mode, steps, guidance, t_steps, t_guidance, t_sched, strategy, sigma, convention, handoff, refine,
                regenerates, cut, do_score, student_cost, improve_cost, budget, route, cascade, chosen, drafts,
                preroute, preroute_steps)


def check_preroute(pipe, mode: str, cut: Cutoff, steps: int, guidance: float, drafts: int, t_sched: str, preroute,
                   preroute_steps) -> tuple[float | None, int | None]:
    """A call's pre-routing (:mod:`tandem.prerouting`): the probability of failing at which a prompt skips the
    student, and the teacher's steps for such a prompt [25]; both checked, and the predictor against the scores
    it must predict (this student, its steps and guidance, the oracle, the drafts)."""
    preroute = pipe._setting("preroute", preroute)
    if preroute is None:
        if preroute_steps is not None:
            raise ValueError("preroute_steps goes with preroute")
        return None, None
    preroute = finite_number(preroute, "preroute", low=0, low_open=True, high=1)
    if mode != "adaptive" or cut.tau is None:
        raise ValueError("preroute applies to mode='adaptive' with a cut-off tau (accept_threshold, percentile or "
                         "budget), not budget-exact routing or another mode")
    if pipe.predictor is None:
        raise ValueError("preroute needs a predictor: pipe.predictor = pipe.fit_predictor(prompts) (on held-out "
                         "prompts), or tandem.prerouting.ScorePredictor.load(path)")
    if pipe.teacher is None:
        raise ValueError("preroute: this teacher is an image-to-image pipeline; a pre-routed prompt needs a "
                         "text-to-image teacher")
    check_shared_latents(pipe.student, pipe._teacher_any, "a pre-routed prompt's teacher draws from its noise",
                         "do without preroute")
    diffs = diff_fingerprints(pipe.predictor.fingerprint()["made_for"],
                              pipe.calibration_fingerprint(steps, guidance, None, drafts), made="predictor has")
    if diffs:
        raise ValueError("the predictor was fitted on other scores; fit one for these settings "
                         "(pipe.fit_predictor(prompts)): " + "; ".join(diffs))
    t_steps = count(pipe._setting("preroute_steps", preroute_steps, 25), "preroute_steps")
    sampler_steps(t_steps, pipe._teacher_scheduler(t_sched), "preroute_steps", "the teacher")
    return preroute, t_steps


@dataclass
class EditPlan:
    """What one edit call runs: the strength, the student's and the teacher's timesteps and guidance, the
    teacher's base scheduler, the costs and the cut-off."""

    mode: str
    strength: float
    steps: int
    guidance: float
    student_timesteps: list[int]
    teacher_steps: int
    teacher_timesteps: list[int]
    teacher_guidance: float
    teacher_scheduler: str
    base: object  # the teacher's scheduler, set to nothing yet
    cut: Cutoff
    do_score: bool
    student_cost: float
    improve_cost: float
    budget: float | None
    drafts: int = 1  # the student's edits per input from different noise, the best-scoring kept

    def settings(self) -> dict:
        return {
            **({"drafts": self.drafts} if self.drafts > 1 else {}),
            "task": "edit", "mode": self.mode, "edit_strength": self.strength, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance, "student_timesteps": [int(t) for t in self.student_timesteps],
            "teacher_steps": self.teacher_steps, "teacher_timesteps": [int(t) for t in self.teacher_timesteps],
            "teacher_guidance_scale": self.teacher_guidance, "teacher_scheduler": self.teacher_scheduler,
            "strategy": "regenerate", "accept_threshold": self.cut.tau, "percentile": self.cut.k,
            "budget": self.budget, "routing": self.cut.routing,
        }


def plan_edit(pipe, *, mode: str, strength, num_inference_steps, guidance_scale, teacher_steps,
              teacher_guidance_scale, teacher_scheduler, budget, drafts=None) -> EditPlan:
    """The :class:`EditPlan` of an edit call to ``pipe`` (the editor), its settings checked; the inputs are
    checked next, then :func:`finish_edit_plan` gives the timesteps, costs and cut-off."""
    if pipe.teacher is None:
        raise ValueError("this teacher is an image-to-image pipeline: editing needs a text-to-image teacher")
    if getattr(pipe.student, "controlnet", None) is not None:
        raise ValueError("editing with a ControlNet is not supported; edit with the pipeline without it")
    strength = finite_number(pipe._setting("edit_strength", strength, 0.6), "strength", low=0, low_open=True, high=1)
    steps = pipe._edit_student_steps(num_inference_steps)
    guidance = pipe.student_guidance(guidance_scale)
    t_steps = count(pipe._setting("edit_teacher_steps", teacher_steps, pipe.defaults.get("teacher_steps", 25)),
                    "teacher_steps")
    t_guidance = pipe.teacher_guidance(teacher_guidance_scale)
    t_sched = pipe._setting("teacher_scheduler", teacher_scheduler, "dpm")
    drafts = check_drafts(1 if drafts is None else drafts)
    if drafts > 1 and mode == "teacher":
        raise ValueError("drafts are the student's (the oracle keeps the best of them): they apply to "
                         "mode='adaptive' or 'student', not 'teacher'")
    return EditPlan(mode, strength, steps, guidance, [], t_steps, [], t_guidance, t_sched, None, Cutoff("threshold"),
                    False, 0.0, 0.0, budget, drafts)


def finish_edit_plan(pipe, plan: EditPlan, n: int, accept_threshold, percentile, routing, calibration,
                     score) -> EditPlan:
    """The timesteps, costs and cut-off of an edit plan of ``n`` inputs."""
    sampler_steps(plan.steps, pipe.student.scheduler, "num_inference_steps", "the student")
    plan.student_timesteps = edit_timesteps(pipe.student.scheduler, plan.steps, plan.strength)
    plan.base = pipe._teacher_scheduler(plan.teacher_scheduler)
    plan.teacher_timesteps = teacher_edit_timesteps(plan.base, plan.student_timesteps[0], plan.teacher_steps)
    plan.student_cost = plan.drafts * len(plan.student_timesteps) * unet_evals_per_step(pipe.student, plan.guidance)
    plan.improve_cost = len(plan.teacher_timesteps) * unet_evals_per_step(pipe.teacher, plan.teacher_guidance)
    plan.cut = resolve_cutoff(pipe, plan.mode, routing, n, accept_threshold, percentile, plan.budget, plan.steps,
                              plan.guidance, plan.student_cost, plan.improve_cost, calibration=calibration,
                              task={"edit_strength": plan.strength}, drafts=plan.drafts)
    plan.do_score = plan.mode == "adaptive" or bool(score) or plan.drafts > 1
    if plan.do_score and pipe.scorer is None:
        raise ValueError(NO_SCORER)
    return plan


