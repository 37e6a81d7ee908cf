"""The adaptive teacher-student pipeline (Algorithm 1 of the adaptive teacher-student paper).

A few-step student draws every image; an oracle scores it; an image scoring below the cut-off tau goes to the
teacher, which either *refines* it (noise the student's latent by a rollback sigma, then denoise with the teacher
from the matching timestep) or *regenerates* it (the teacher from the student's own initial noise). Student,
teacher and oracle are ordinary diffusers pipelines and scorers; the teacher's image-to-image twin shares its
components. A call resolves its settings once (:mod:`.settings`), runs the stages (:mod:`.stages`) and builds its
records (:mod:`.records`); the noise and rollback conventions are those of :mod:`.stages` and :mod:`.schedules`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..calibration import Calibration
from ..checks import count, finite_number
from ..generate import initial_latents, prompt_seed
from ..models import SCHEDULERS, make_scheduler
from ..students import check_student_guidance, student_info_of
from .calibrating import Calibrating
from .components import accepts, check_pair, images_to_unit_tensor, own_components
from .drafts import draft_generators, draft_record, expand, fold_ledger, prompts_view
from .editing import Editing
from .loading import build_from_preset, preset_of, save_pipeline
from .mixed import generate_mixed
from .records import CostLedger, TandemOutput, final_images, image_record, run_summary
from .settings import (
    MODES,
    TEACHER_GUIDANCE,
    Plan,
    check_output_type,
    guidance_value,
    plan_generation,
    prompt_list,
)
from .stages import (
    generation_stages,
    prerouted_draw,
    run_stages,
    score_images,
)


class TandemPipeline(Calibrating, Editing):
    """A student, a teacher and an oracle working in tandem.

    Args:
        student: a diffusers text-to-image pipeline for the few-step student (e.g. LCM).
        teacher: a diffusers text-to-image pipeline (or an image-to-image one, which can only refine,
            such as the SDXL refiner).
        scorer: ``scorer(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``, higher is better
            (``tandem.scorers``); needed for the adaptive mode.
        calibration: the student's score percentiles (``tandem.calibration``), needed for
            ``percentile=`` and ``budget=``.
        defaults: default call arguments (a preset's settings), overridden by each call.
        edit_student: a student that edits (``edit``, ``calibrate_edits``) instead of ``student``, at the
            ``edit_guidance_scale`` setting (a student can be best at generation and another at editing).
    """

    def __init__(self, student, teacher, scorer=None, calibration: Calibration | None = None,
                 defaults: dict | None = None, name: str = "custom", edit_student=None):
        from diffusers import AutoPipelineForImage2Image

        self.student, self.scorer, self.calibration, self.name = student, scorer, calibration, name
        self.defaults = dict(defaults or {})
        if accepts(teacher, "strength"):
            self.teacher, self.teacher_img2img = None, teacher
        else:
            self.teacher, self.teacher_img2img = teacher, AutoPipelineForImage2Image.from_pipe(teacher)
        check_pair(student, self._teacher_any)
        # what the student brings of its own rather than sharing the teacher's (its draws use them)
        self.student_own_components = own_components(student, self._teacher_any)
        self.edit_student = edit_student
        if edit_student is not None:
            check_pair(edit_student, self._teacher_any)
        for pipe in (student, teacher, self.teacher_img2img, edit_student):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        self._teacher_scheduler_config = dict(self.teacher_img2img.scheduler.config)
        self._digests: dict[str, str] = {}  # weights digests by component, computed once
        self._editor_digests: dict[str, str] = {}  # the same for the edit student's view
        self.edit_calibrations: dict[float, Calibration] = {}  # SDEdit strength -> the editing student's scores
        self.draft_calibrations: dict[int, Calibration] = {}  # drafts N > 1 -> the student's best-of-N scores
        self.predictor = None  # tandem.prerouting: P(the student's score < tau) from the caption, for preroute=
        self.routes = None  # a tandem.routes.RouteTable: what a budget alone picks (generation)

    @property
    def _teacher_any(self):
        return self.teacher if self.teacher is not None else self.teacher_img2img

    def _setting(self, name: str, value, fallback=None):
        if value is not None:
            return value
        return self.defaults.get(name, fallback)

    def teacher_guidance(self, teacher_guidance_scale: float | None = None) -> float:
        """The teacher's guidance: given, else the defaults' ``teacher_guidance_scale``, else 7.5."""
        return guidance_value(self._setting("teacher_guidance_scale", teacher_guidance_scale, TEACHER_GUIDANCE),
                         "teacher_guidance_scale")

    def student_guidance(self, guidance_scale: float | None = None) -> float:
        """The student's guidance: given, else the defaults' ``guidance_scale``, else the teacher's default
        guidance (as on the command line, so one student draws the same images by default in both). A
        student that samples without guidance (``student.json``'s guidance "none": ADD, DMD2) takes none."""
        info = student_info_of(self.student)
        if info is not None and info.guidance == "none":
            value = guidance_value(self._setting("guidance_scale", guidance_scale, info.guidance_scale), "guidance_scale")
            check_student_guidance(self.student, value)
            return value
        if guidance_scale is None and self.defaults.get("guidance_scale") is None:
            return self.teacher_guidance()
        return guidance_value(self._setting("guidance_scale", guidance_scale), "guidance_scale")

    def resolution(self) -> tuple[int, int]:
        size = self.student.unet.config.sample_size
        factor = self.student.vae_scale_factor
        return (size * factor, size * factor)

    def _teacher_scheduler(self, name: str):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown teacher scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
        return make_scheduler(name, self._teacher_scheduler_config)

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        mode: str = "adaptive",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        teacher_steps: int | None = None,
        teacher_guidance_scale: float | None = None,
        teacher_scheduler: str | None = None,
        strategy: str | None = None,
        rollback_sigma: float | None = None,
        rollback_convention: str | None = None,
        handoff: str = "latent",
        accept_threshold: float | None = None,
        percentile: float | None = None,
        budget: float | None = None,
        routing: str | None = None,
        seed: int = 0,
        generator: Sequence[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "np",
        score: bool | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | None = None,
        cascade=None,
        drafts: int | None = None,
        preroute: float | None = None,
        preroute_steps: int | None = None,
    ) -> TandemOutput:
        """Generate one image per prompt.

        Args:
            mode: "adaptive" (Algorithm 1), or a baseline through the same code: "student" (student
                only), "teacher" (teacher only, from the same initial noise), "refine-all" (every
                student image refined, no oracle). Mixed rollouts have their own entry point, :meth:`mixed`.
            num_inference_steps: the student's steps.
            guidance_scale: the student's guidance.
            teacher_steps: steps the teacher runs to refine (``rollback_convention="paper"``) or to
                regenerate; under the "strength" convention, the length of the full schedule.
            strategy: "refine" or "regenerate" (rejected images only).
            rollback_sigma: the rollback value sigma in (0, 1] (the img2img strength under "strength").
            handoff: "latent" (noise the student's latent directly) or "pixel" (decode, then encode with
                the teacher's VAE: for a teacher with another latent space).
            accept_threshold: tau itself (adaptive mode; exactly one of accept_threshold, percentile and
                budget, or the defaults' percentile).
            percentile: the percentile k of the calibration (tau = k-th percentile).
            budget: a target average of UNet evaluations per image, from which k is chosen (paper appendix C).
            routing: "threshold" (the default: every image scoring below tau goes to the teacher) or
                "budget-exact" (with ``budget`` alone: exactly the lowest-scoring images that the budget pays
                for, so that this call's mean cost never exceeds it; no calibration needed).
            seed: image i uses a generator seeded from ``(seed, i)``; or pass ``generator``, one per prompt
                (with drafts, one per draft: :func:`~tandem.pipeline.drafts.draft_generators`).
            output_type: "np" (uint8 [H, W, 3]), "pil", or "latent".
            score: also score the student images outside adaptive mode (calibration does).
            callback: ``callback(phase, done, total)`` after each batch, for progress bars.
            cascade: student levels before this student (adaptive mode; ``tandem.cascade``): a ``Cascade``
                (their steps and thresholds; tau as usual for the last gate), or a ``CascadeTable`` with
                ``budget`` alone, whose thresholds and teacher settings best fit the budget.
            control_image: with a ControlNet pipeline (``with_controlnet``), the control images: one
                per prompt or one for all (PIL, uint8 [H, W, 3] arrays, or a float [B, 3, H, W] tensor in
                [0, 1]); the same control conditions the student, the teacher and the refinement.
            controlnet_conditioning_scale: the ControlNet residuals' weight [1.0].
            drafts: the student's drafts per prompt [1]: with N > 1 it draws N (draft 0 is the image of one
                draft), the oracle keeps the best, and the teacher improves it if even the best scores below tau,
                a percentile of the best-of-N calibration (``pipe.draft_calibrations[N]``; :mod:`.drafts`).
                Adaptive, student and refine-all modes; each record says which draft it kept.
            preroute: adaptive mode with ``pipe.predictor`` (:mod:`tandem.prerouting`): a prompt whose predicted
                probability of scoring below tau is at least this goes straight to the teacher, which draws it from
                its noise in ``preroute_steps`` steps [25]; the student draws none of its drafts
                (records: ``pre_routed``).
        """
        prompts = prompt_list(prompt)
        n = len(prompts)
        if mode == "mixed":
            raise ValueError("mixed rollouts have their own entry point: pipe.mixed(prompts, teacher_prob=... or "
                             "teacher_at=...)")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        check_output_type(output_type)
        batch_size, seed = count(batch_size, "batch_size"), count(seed, "seed", minimum=0)
        plan = plan_generation(
            self, n, None if generator is None else len(generator), mode=mode, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale,
            teacher_scheduler=teacher_scheduler, strategy=strategy, rollback_sigma=rollback_sigma,
            rollback_convention=rollback_convention, handoff=handoff, accept_threshold=accept_threshold,
            percentile=percentile, budget=budget, routing=routing, score=score, cascade=cascade, drafts=drafts,
            preroute=preroute, preroute_steps=preroute_steps)
        controls = self._controls(control_image, n)
        c_scale = finite_number(self._setting("controlnet_conditioning_scale", controlnet_conditioning_scale, 1.0),
                                "controlnet_conditioning_scale")
        many = plan.drafts  # the student's draws per prompt: the stages run over n * many draft slots
        # draft 0 of prompt i draws from (seed, i), as with one draft
        gens = list(generator) if generator is not None else draft_generators(seed, n, many)
        slots = expand(prompts, many)
        slot_controls = None if controls is None else controls.repeat_interleave(many, 0)
        noise = initial_latents(self.student if mode != "teacher" else self._teacher_any, seed,
                                list(range(len(slots))), gens)
        ledger = CostLedger(len(slots), self._counted_modules())
        levels, route, improve = generation_stages(self, plan, slots, noise, gens, slot_controls, c_scale, ledger)
        skip = set() if plan.preroute is None else {i for i, p in enumerate(self.predictor.p_below(
            prompts, self.text_features(prompts), plan.cut.tau)) if p >= plan.preroute}
        run = run_stages(self.student, self._teacher_any, self.scorer, slots, batch_size, ledger,
                         None if mode == "teacher" else levels[-1][0], route, improve, plan.do_score, callback,
                         levels[:-1], drafts=many, skip=skip, regenerate=prerouted_draw(
                             self, plan, slots, noise, gens, slot_controls, c_scale) if skip else None)
        slot_scores = run.scores
        if many > 1:
            run, ledger = prompts_view(run, many), fold_ledger(ledger, many)
        level_steps = [*([] if plan.cascade is None else
                         [s for s, t in zip(plan.cascade.steps, plan.cascade.thresholds) if np.isfinite(t)]), plan.steps]
        improved, level_members = set(run.improved), [set(members) for members in run.levels]
        records = []
        for i in range(n):
            taken = ("student" if mode == "student" else "regenerated" if i in skip else plan_path(plan)
                     if i in improved else "accepted")
            rec = image_record(i, prompts[i], taken, prompt_seed(seed, i) if generator is None else None, ledger,
                               run.scores[i], plan.cut.tau)
            if taken == "refined":
                rec["rollback_sigma"], rec["teacher_steps_run"] = plan.refine.sigma, plan.refine.steps
            if plan.cascade is not None:
                rec["cascade_levels"] = [s for s, members in zip(level_steps, level_members) if i in members]
            if plan.preroute is not None:
                rec["pre_routed"] = i in skip
            records.append(draft_record(rec, run.kept[i], many, slot_scores) if many > 1 else rec)
        settings = plan.settings()
        if controls is not None:
            settings["controlnet_conditioning_scale"] = c_scale
        summary = run_summary(records, settings, run.timings, run.seconds, plan.student_cost, plan.improve_cost,
                              plan.refine, plan.cut.note, self.student_own_components)
        return TandemOutput(final_images(run.images, run.latents, output_type), records, summary,
                            None if mode == "teacher" else run.student_images)

    @torch.no_grad()
    def mixed(self, prompt: str | Sequence[str], *, teacher_prob: float | None = None,
              teacher_at: Sequence[int] | None = None, num_inference_steps: int | None = None,
              guidance_scale: float | None = None, teacher_steps: int | None = None,
              teacher_guidance_scale: float | None = None, seed: int = 0,
              generator: Sequence[torch.Generator] | None = None, batch_size: int = 16, output_type: str = "np",
              callback: Callable[[str, int, int], None] | None = None) -> TandemOutput:
        """Teacher and student in one trajectory (DDIL's covariate-shift study, :mod:`tandem.pipeline.mixed`): on
        a shared DDIM grid the teacher takes each student transition with probability ``teacher_prob`` (p_T, drawn
        per image from its generator), or at the student timesteps ``teacher_at``; exactly one. ``teacher_steps``
        is the teacher's grid, a multiple of the student's steps [8 per student step], and the teacher guides at
        ``teacher_guidance_scale``. No oracle or ControlNet takes part. Other arguments as for ``__call__``."""
        check_output_type(output_type)
        return generate_mixed(self, prompt_list(prompt), teacher_prob=teacher_prob, teacher_at=teacher_at,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale, seed=seed,
                              generator=generator, batch_size=batch_size, output_type=output_type, callback=callback)

    # -- pieces --------------------------------------------------------------------------------

    def score(self, images: list[np.ndarray], prompts: list[str], idx: list[int] | None = None) -> np.ndarray:
        """The oracle's scores of uint8 images [H, W, 3] for their prompts (:func:`~.stages.score_images`)."""
        return score_images(self.scorer, images, prompts, idx)

    def _counted_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"student": self.student.unet, "teacher": self._teacher_any.unet}
        controlnet = getattr(self.student, "controlnet", None)
        if controlnet is not None:
            modules["controlnet"] = controlnet
        return modules

    def _controls(self, control_image, n: int) -> torch.Tensor | None:
        """Control images as a float [n, 3, H, W] tensor in [0, 1] at the pipeline's resolution."""
        has_controlnet = getattr(self.student, "controlnet", None) is not None
        if control_image is None:
            if has_controlnet:
                raise ValueError("this pipeline has a ControlNet: pass control_image, one per "
                                 "prompt or one for all")
            return None
        if not has_controlnet:
            raise ValueError("control_image needs a ControlNet: build the pipeline with "
                             "TandemPipeline.with_controlnet(...)")
        return self._per_prompt(control_image, n, "control image")

    def _per_prompt(self, images, n: int, what: str) -> torch.Tensor:
        """``images`` (one per prompt, or one for all) as a float [n, 3, H, W] tensor in [0, 1] at the
        pipeline's resolution."""
        x = images_to_unit_tensor(images, self.resolution(), what)
        if len(x) == 1 and n > 1:
            x = x.expand(n, -1, -1, -1)
        if len(x) != n:
            raise ValueError(f"got {len(x)} {what}s for {n} prompts (one per prompt, or one for all)")
        return x

    def with_controlnet(self, controlnet, calibration: Calibration | None = None, defaults: dict | None = None,
                        name: str | None = None) -> TandemPipeline:
        """The same student, teacher and oracle with one ControlNet plugged into both (section 4.3: a
        ControlNet trained for the teacher works on its distilled student). The components are shared,
        not copied. ``calibration`` must be made with this ControlNet (fingerprints include it)."""
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        def controlled(pipe):
            xl = getattr(pipe, "text_encoder_2", None) is not None
            cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
            return cls.from_pipe(pipe, controlnet=controlnet)

        if self.teacher is None:
            raise ValueError("ControlNet generation needs a text-to-image teacher")
        return TandemPipeline(controlled(self.student), controlled(self.teacher), self.scorer, calibration,
                              defaults={**self.defaults, **(defaults or {})}, name=name or f"{self.name}+controlnet")

    @classmethod
    def from_preset(cls, name: str = "world", device: str = "cpu", dtype: torch.dtype = torch.float32,
                    scorer=None, calibration: Calibration | str | None = None, routes=None) -> TandemPipeline:
        """A pipeline from a preset (``tandem.presets``: ``world`` or a real-tier preset, or a ``Preset``);
        ``scorer``, ``calibration`` and ``routes`` override the preset's."""
        return build_from_preset(cls, name, device=device, dtype=dtype, scorer=scorer, calibration=calibration,
                                 routes=routes)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "world", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> TandemPipeline:
        """A composed tandem with its calibrations and route table: a preset's name (``world``, ``sd15-lcm``,
        ...), a directory written by :meth:`save_pretrained`, or a preset file (``tandem preset save``)."""
        return build_from_preset(cls, preset_of(source), device=device, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save this tandem (composed from a preset or ``from_pretrained``) to a new or empty ``directory``: its
        models by name, its defaults, calibrations and route table as files; ``from_pretrained(directory)``
        composes it again."""
        return save_pipeline(self, directory)


def plan_path(plan: Plan) -> str:
    """The path an improved image of a generation call takes."""
    return {"teacher": "teacher", "refine-all": "refined"}.get(plan.mode, "refined" if plan.strategy == "refine"
                                                               else "regenerated")


def load_preset(name="world", device: str = "cpu", dtype: torch.dtype = torch.float32, scorer=None,
                calibration: Calibration | str | os.PathLike | None = None, routes=None) -> TandemPipeline:
    """:meth:`TandemPipeline.from_preset`: a pipeline from a preset's name or a ``Preset``."""
    return TandemPipeline.from_preset(name, device=device, dtype=dtype, scorer=scorer, calibration=calibration,
                                      routes=routes)
