"""The adaptive teacher-student pipeline (Algorithm 1 of the adaptive teacher-student paper).

A few-step student draws every image; an oracle scores it; an image scoring below the cut-off
tau goes to the teacher, which either *refines* it (noise the student's latent by a rollback
sigma, then denoise with the teacher from the matching timestep) or *regenerates* it (the teacher
from the student's own initial noise). Student, teacher and oracle are ordinary diffusers
pipelines and scorers; the teacher's image-to-image twin shares its components.

Every image owns a generator seeded from ``(seed, index)``: it draws the image's initial noise,
the student's per-step noise and the refinement noise, in that order, so an image's result does
not depend on its batch or on which other images the oracle rejected.

Rollback conventions (``rollback_convention``):

* ``"paper"`` (default): Algorithm 1, x_sigma = sqrt(1 - sigma) * x + sqrt(sigma) * z. The teacher
  runs ``teacher_steps`` steps, starting at the timestep of its sampler whose alpha-bar is
  nearest to 1 - sigma (the sampler's full schedule is stretched so that its last
  ``teacher_steps`` steps start there); records give the realised sigma.
* ``"strength"``: the official code's img2img convention. ``rollback_sigma`` is diffusers'
  ``strength`` and ``teacher_steps`` the length of the full schedule, of which the last
  ``int(teacher_steps * strength)`` steps run.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .calibration import Calibration, module_digest, percentile_k_for_budget
from .generate import _to_uint8, initial_latents, prompt_generator, prompt_seed
from .models import SCHEDULERS, make_scheduler

MODES = ("adaptive", "student", "teacher", "refine-all")
STRATEGIES = ("refine", "regenerate")
CONVENTIONS = ("paper", "strength")
HANDOFFS = ("latent", "pixel")
OUTPUT_TYPES = ("np", "pil", "latent")


@dataclass
class TandemOutput:
    """``images`` in input order; ``records[i]`` says which path image i took, its oracle score, the
    threshold, and what it cost; ``summary`` aggregates the run."""

    images: list
    records: list[dict]
    summary: dict = field(default_factory=dict)
    student_images: list | None = None  # uint8 student images (before the teacher), outside teacher mode


@dataclass(frozen=True)
class RefineSchedule:
    num_inference_steps: int  # length of the teacher's full schedule
    strength: float           # diffusers img2img strength that runs ``steps`` of it
    steps: int                # teacher steps actually run
    start_timestep: int
    sigma: float              # realised rollback: 1 - alpha_bar(start_timestep)


def refine_schedule(scheduler, teacher_steps: int, rollback_sigma: float, convention: str = "paper") -> RefineSchedule:
    """Where the teacher starts refining, for ``scheduler`` (not modified) and a rollback value."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown rollback convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    if not 0 < rollback_sigma <= 1:
        raise ValueError(f"rollback sigma must be in (0, 1], got {rollback_sigma}")
    if teacher_steps < 1:
        raise ValueError(f"teacher steps must be >= 1, got {teacher_steps}")
    sched = copy.deepcopy(scheduler)
    alphas = sched.alphas_cumprod
    order = getattr(sched, "order", 1)

    def start(n: int, run: int) -> int:
        sched.set_timesteps(n)
        return int(sched.timesteps[(n - run) * order])

    if convention == "strength":
        run = min(int(teacher_steps * rollback_sigma), teacher_steps)
        if run < 1:
            raise ValueError(f"strength {rollback_sigma} of {teacher_steps} steps runs no teacher step; "
                             "raise teacher_steps or the strength")
        t = start(teacher_steps, run)
        return RefineSchedule(teacher_steps, rollback_sigma, run, t, float(1 - alphas[t]))
    # Stretch the schedule: the more steps in all, the later its last ``teacher_steps`` start.
    target = 1.0 - rollback_sigma
    lo, hi = teacher_steps, sched.config.num_train_timesteps
    if float(alphas[start(lo, teacher_steps)]) >= target:
        best = lo
    else:
        while hi - lo > 1:  # alpha_bar at the start grows with n; find the first n reaching the target
            mid = (lo + hi) // 2
            if float(alphas[start(mid, teacher_steps)]) >= target:
                hi = mid
            else:
                lo = mid
        best = min((lo, hi), key=lambda n: abs(float(alphas[start(n, teacher_steps)]) - target))
    t = start(best, teacher_steps)
    strength = min(1.0, (teacher_steps + 0.5) / best)  # int(best * strength) == teacher_steps
    return RefineSchedule(best, strength, teacher_steps, t, float(1 - alphas[t]))


def unet_evals_per_step(pipe, guidance_scale: float) -> int:
    """UNet rows per image and step: 2 with classifier-free guidance (a doubled batch), 1 for a
    guidance-embedded (LCM) UNet or guidance <= 1."""
    embedded = getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None
    return 1 if embedded or guidance_scale <= 1 else 2


@contextmanager
def _count_rows(modules: dict[str, torch.nn.Module], counts: dict[str, int]):
    """Count the batch rows each module processes (one row = one model evaluation for one image)."""
    handles = []
    for role, module in modules.items():
        def hook(_module, args, kwargs, role=role):
            sample = args[0] if args else kwargs.get("sample")
            counts[role] = counts.get(role, 0) + int(sample.shape[0])
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


class TandemPipeline:
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
    """

    def __init__(self, student, teacher, scorer=None, calibration: Calibration | None = None,
                 defaults: dict | None = None, name: str = "custom"):
        from diffusers import AutoPipelineForImage2Image

        self.student, self.scorer, self.calibration, self.name = student, scorer, calibration, name
        self.defaults = dict(defaults or {})
        if _accepts(teacher, "strength"):
            self.teacher, self.teacher_img2img = None, teacher
        else:
            self.teacher, self.teacher_img2img = teacher, AutoPipelineForImage2Image.from_pipe(teacher)
        for pipe in (student, teacher, self.teacher_img2img):
            pipe.set_progress_bar_config(disable=True)
        self._teacher_scheduler_config = dict(self.teacher_img2img.scheduler.config)
        self._student_digest: str | None = None

    # -- settings ----------------------------------------------------------------------------

    @property
    def _teacher_any(self):
        return self.teacher if self.teacher is not None else self.teacher_img2img

    def _setting(self, name: str, value, fallback=None):
        if value is not None:
            return value
        return self.defaults.get(name, fallback)

    def resolution(self) -> tuple[int, int]:
        size = self.student.unet.config.sample_size
        factor = self.student.vae_scale_factor
        return (size * factor, size * factor)

    def calibration_fingerprint(self, num_inference_steps: int, guidance_scale: float) -> dict:
        """Everything that changes the student's oracle scores."""
        if self.scorer is None:
            raise ValueError("no scorer: the pipeline was built without an oracle")
        if self._student_digest is None:
            self._student_digest = module_digest(self.student.unet)
        sched = self.student.scheduler
        return {
            "student": {
                "path": str(getattr(self.student.unet.config, "_name_or_path", "")),  # weights identify it
                "weights": self._student_digest,
                "pipeline": type(self.student).__name__,
                "scheduler": type(sched).__name__,
                "original_inference_steps": sched.config.get("original_inference_steps"),
            },
            "student_steps": int(num_inference_steps),
            "student_guidance_scale": float(guidance_scale),
            "resolution": list(self.resolution()),
            "scorer": self.scorer.fingerprint(),
        }

    def _teacher_scheduler(self, name: str):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown teacher scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
        return make_scheduler(name, self._teacher_scheduler_config)

    # -- the call ----------------------------------------------------------------------------

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
        seed: int = 0,
        generator: Sequence[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "np",
        score: bool | None = None,
        callback: Callable[[str, int, int], None] | None = None,
    ) -> TandemOutput:
        """Generate one image per prompt.

        Args:
            mode: "adaptive" (Algorithm 1), or a baseline through the same code: "student" (student
                only), "teacher" (teacher only, from the same initial noise), "refine-all" (every
                student image refined, no oracle).
            num_inference_steps, guidance_scale: the student's steps and guidance.
            teacher_steps: steps the teacher runs to refine (``rollback_convention="paper"``) or to
                regenerate; under the "strength" convention, the length of the full schedule.
            strategy: "refine" or "regenerate" (rejected images only).
            rollback_sigma: the rollback value sigma in (0, 1] (the img2img strength under "strength").
            handoff: "latent" (noise the student's latent directly) or "pixel" (decode, then encode with
                the teacher's VAE: for a teacher with another latent space).
            accept_threshold / percentile / budget: exactly one, in adaptive mode: tau itself; the
                percentile k of the calibration (tau = k-th percentile); or a target average of UNet
                evaluations per image, from which k is chosen (paper appendix C).
            seed: image i uses a generator seeded from ``(seed, i)``; or pass ``generator``, one per prompt.
            output_type: "np" (uint8 [H, W, 3]), "pil", or "latent".
            score: also score the student images outside adaptive mode (calibration does).
            callback: ``callback(phase, done, total)`` after each batch, for progress bars.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
        if handoff not in HANDOFFS:
            raise ValueError(f"unknown handoff {handoff!r}; expected one of {', '.join(HANDOFFS)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        steps = int(self._setting("num_inference_steps", num_inference_steps, 4))
        guidance = float(self._setting("guidance_scale", guidance_scale, 1.0))
        t_steps = int(self._setting("teacher_steps", teacher_steps, 25))
        t_guidance = float(self._setting("teacher_guidance_scale", teacher_guidance_scale, 7.5))
        t_sched = self._setting("teacher_scheduler", teacher_scheduler, "dpm")
        strategy = self._setting("strategy", strategy, "refine")
        sigma = float(self._setting("rollback_sigma", rollback_sigma, 0.5))
        convention = self._setting("rollback_convention", rollback_convention, "paper")
        if steps < 1 or t_steps < 1:
            raise ValueError(f"steps must be >= 1 (student {steps}, teacher {t_steps})")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if (mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")) and self.teacher is None:
            raise ValueError("this teacher is an image-to-image pipeline: it can only refine")
        if generator is not None and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts (one per prompt)")

        improves = mode == "refine-all" or (mode == "adaptive")
        refine = None
        if improves and (mode == "refine-all" or strategy == "refine"):
            refine = refine_schedule(self._teacher_scheduler(t_sched), t_steps, sigma, convention)
        student_cost = steps * unet_evals_per_step(self.student, guidance)
        teacher_step_cost = unet_evals_per_step(self._teacher_any, t_guidance)
        improve_cost = (refine.steps if refine is not None else t_steps) * teacher_step_cost

        tau, k = None, None
        if mode == "adaptive":
            tau, k = self._threshold(accept_threshold, percentile, budget, steps, guidance, student_cost, improve_cost)
        elif any(v is not None for v in (accept_threshold, percentile, budget)):
            raise ValueError(f"accept_threshold/percentile/budget apply to mode='adaptive', not {mode!r}")
        do_score = mode == "adaptive" or bool(score)
        if do_score and self.scorer is None:
            raise ValueError("scoring needs a scorer (oracle); build the pipeline with scorer=...")

        n = len(prompts)
        gens = list(generator) if generator is not None else [prompt_generator(seed, i) for i in range(n)]
        pipe0 = self.student if mode != "teacher" else self._teacher_any
        noise = initial_latents(pipe0, seed, list(range(n)), gens)
        counts: dict[str, int] = {}
        per_image = {key: np.zeros(n) for key in ("student", "teacher", "vae_decode", "vae_encode", "oracle")}
        timings = dict.fromkeys(("student", "decode", "oracle", "teacher"), 0.0)
        chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]

        def charge(role: str, idx: list[int], before: int) -> None:
            per_image[role][idx] += (counts.get(role, 0) - before) / len(idx)

        latents: list[torch.Tensor | None] = [None] * n
        images: list[np.ndarray | None] = [None] * n
        student_images: list[np.ndarray | None] = [None] * n
        scores = np.full(n, np.nan)
        t_start = time.perf_counter()
        modules = {"student": self.student.unet, "teacher": self._teacher_any.unet}
        with _count_rows(modules, counts):
            if mode != "teacher":
                for done, idx in enumerate(chunks):
                    t0 = time.perf_counter()
                    before = counts.get("student", 0)
                    out = self.student([prompts[i] for i in idx], num_inference_steps=steps,
                                       guidance_scale=guidance, latents=noise[idx], generator=[gens[i] for i in idx],
                                       output_type="latent").images
                    charge("student", idx, before)
                    t1 = time.perf_counter()
                    decoded = self._decode(self.student, out)
                    per_image["vae_decode"][idx] += 1
                    t2 = time.perf_counter()
                    for j, i in enumerate(idx):
                        latents[i], images[i], student_images[i] = out[j:j + 1], decoded[j], decoded[j]
                    if do_score:
                        scores[idx] = self._score([images[i] for i in idx], [prompts[i] for i in idx])
                        per_image["oracle"][idx] += 1
                    timings["student"] += t1 - t0
                    timings["decode"] += t2 - t1
                    timings["oracle"] += time.perf_counter() - t2
                    if callback:
                        callback("student", min((done + 1) * batch_size, n), n)

            if mode == "teacher":
                todo, path = list(range(n)), "teacher"
            elif mode == "refine-all":
                todo, path = list(range(n)), "refined"
            elif mode == "adaptive":
                todo = [i for i in range(n) if scores[i] < tau]
                path = "refined" if strategy == "refine" else "regenerated"
            else:
                todo, path = [], None
            regenerate = mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")
            if todo:
                base = self._teacher_scheduler(t_sched)
                for done, start in enumerate(range(0, len(todo), batch_size)):
                    idx = todo[start:start + batch_size]
                    t0 = time.perf_counter()
                    before_t, before_s = counts.get("teacher", 0), counts.get("student", 0)
                    ps, gs = [prompts[i] for i in idx], [gens[i] for i in idx]
                    if regenerate:
                        self.teacher.scheduler = copy.deepcopy(base)
                        out = self.teacher(ps, num_inference_steps=t_steps, guidance_scale=t_guidance,
                                           latents=noise[idx], generator=gs, output_type="latent").images
                    else:
                        self.teacher_img2img.scheduler = copy.deepcopy(base)
                        start_image = torch.cat([latents[i] for i in idx])
                        if handoff == "pixel":
                            start_image = self._pixels(self.student, start_image)
                            per_image["vae_encode"][idx] += 1
                        out = self.teacher_img2img(
                            ps, image=start_image, strength=refine.strength,
                            num_inference_steps=refine.num_inference_steps, guidance_scale=t_guidance,
                            generator=gs, output_type="latent").images
                    charge("teacher", idx, before_t)
                    if counts.get("student", 0) != before_s and self.student.unet is not self._teacher_any.unet:
                        raise RuntimeError("the teacher call ran the student UNet")
                    t1 = time.perf_counter()
                    decoded = self._decode(self._teacher_any, out)
                    per_image["vae_decode"][idx] += 1
                    for j, i in enumerate(idx):
                        latents[i], images[i] = out[j:j + 1], decoded[j]
                    timings["teacher"] += t1 - t0
                    timings["decode"] += time.perf_counter() - t1
                    if callback:
                        callback("teacher", min(start + batch_size, len(todo)), len(todo))
        total = time.perf_counter() - t_start

        todo_set = set(todo)
        records = []
        for i in range(n):
            if mode == "student":
                taken = "student"
            elif i in todo_set:
                taken = path
            else:
                taken = "accepted"
            rec = {
                "index": i, "prompt": prompts[i], "path": taken,
                "prompt_seed": prompt_seed(seed, i) if generator is None else None,
                "student_score": None if np.isnan(scores[i]) else float(scores[i]),
                "tau": tau,
                "unet_evals": {"student": float(per_image["student"][i]), "teacher": float(per_image["teacher"][i]),
                               "total": float(per_image["student"][i] + per_image["teacher"][i])},
                "vae": {"decode": int(per_image["vae_decode"][i]), "encode": int(per_image["vae_encode"][i])},
                "oracle_calls": int(per_image["oracle"][i]),
            }
            if taken == "refined":
                rec["rollback_sigma"] = refine.sigma
                rec["teacher_steps_run"] = refine.steps
            records.append(rec)
        settings = {
            "mode": mode, "num_inference_steps": steps, "guidance_scale": guidance, "teacher_steps": t_steps,
            "teacher_guidance_scale": t_guidance, "teacher_scheduler": t_sched, "strategy": strategy,
            "rollback_sigma": sigma, "rollback_convention": convention, "handoff": handoff,
            "accept_threshold": tau, "percentile": k, "budget": budget,
        }
        summary = self._summary(records, settings, timings, total, student_cost, improve_cost, refine)
        if output_type == "latent":
            final = latents
        elif output_type == "pil":
            from PIL import Image
            final = [Image.fromarray(im) for im in images]
        else:
            final = images
        return TandemOutput(final, records, summary, None if mode == "teacher" else student_images)

    def calibrate(self, prompts: Sequence[str], num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int = 0, batch_size: int = 16,
                  callback: Callable[[str, int, int], None] | None = None, config: dict | None = None) -> Calibration:
        """Score student samples of held-out ``prompts`` and keep them as a calibration (appendix C)."""
        steps = int(self._setting("num_inference_steps", num_inference_steps, 4))
        guidance = float(self._setting("guidance_scale", guidance_scale, 1.0))
        out = self(prompts, mode="student", num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                   batch_size=batch_size, score=True, callback=callback)
        scores = np.array([r["student_score"] for r in out.records])
        made = {"n_prompts": len(prompts), "seed": seed, "seconds": out.summary["seconds"]["total"], **(config or {})}
        return Calibration(scores, self.calibration_fingerprint(steps, guidance), made)

    # -- pieces --------------------------------------------------------------------------------

    def _threshold(self, accept_threshold, percentile, budget, steps, guidance, student_cost, improve_cost):
        given = [name for name, v in (("accept_threshold", accept_threshold), ("percentile", percentile),
                                      ("budget", budget)) if v is not None]
        if not given and self.defaults.get("percentile") is not None:
            percentile, given = self.defaults["percentile"], ["percentile"]
        if len(given) != 1:
            raise ValueError("adaptive mode needs exactly one of accept_threshold (tau), percentile (k) or budget; "
                             f"got {', '.join(given) if given else 'none'}")
        if accept_threshold is not None:
            return float(accept_threshold), None
        if self.calibration is None:
            raise ValueError(f"{given[0]}= needs a calibration (tandem calibrate); or pass accept_threshold")
        self.calibration.check(self.calibration_fingerprint(steps, guidance))
        k = percentile if percentile is not None else percentile_k_for_budget(budget, student_cost, improve_cost)
        return self.calibration.threshold(k), float(k)

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        s = self.scorer(x, prompts)
        return torch.as_tensor(s, dtype=torch.float32).cpu().numpy()

    @staticmethod
    def _decode(pipe, latents: torch.Tensor) -> list[np.ndarray]:
        x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return _to_uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())

    @staticmethod
    def _pixels(pipe, latents: torch.Tensor) -> torch.Tensor:
        x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1)

    def _summary(self, records, settings, timings, total, student_cost, improve_cost, refine) -> dict:
        n = len(records)
        paths = [r["path"] for r in records]
        evals = np.array([r["unet_evals"]["total"] for r in records])
        model_time = timings["student"] + timings["teacher"]
        return {
            "n": n,
            "paths": {p: paths.count(p) for p in sorted(set(paths))},
            "share_improved": float(np.mean([p in ("refined", "regenerated", "teacher") for p in paths])),
            "unet_evals_mean": float(evals.mean()),
            "unet_evals_student_mean": float(np.mean([r["unet_evals"]["student"] for r in records])),
            "unet_evals_teacher_mean": float(np.mean([r["unet_evals"]["teacher"] for r in records])),
            "student_cost": student_cost,
            "improve_cost": improve_cost,
            "refine": None if refine is None else refine.__dict__,
            "settings": settings,
            "seconds": {**timings, "total": total, "other": total - model_time - timings["decode"] - timings["oracle"]},
        }

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "world", device: str = "cpu", dtype: torch.dtype = torch.float32,
                    scorer=None, calibration: Calibration | str | None = None) -> TandemPipeline:
        """A pipeline from a preset (``tandem.presets``): ``world`` or a real-tier preset."""
        from .presets import load_preset

        return load_preset(name, device=device, dtype=dtype, scorer=scorer, calibration=calibration)
