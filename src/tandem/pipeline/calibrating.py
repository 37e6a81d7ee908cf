"""What a tandem's scores and costs depend on (fingerprints, checked before a calibration, route table or
cache is used) and the calibrations it makes: the student's scores on held-out prompts or edits
(:meth:`~Calibrating.calibrate`, :meth:`~Calibrating.calibrate_edits`) and a cascade table
(:meth:`~Calibrating.calibrate_cascade`). Part of :class:`~tandem.pipeline.TandemPipeline`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..calibration import Calibration, module_digest
from ..cascade import CascadeTable, check_levels
from ..checks import count
from ..prerouting import fit_score_predictor
from ..routes import calibration_digest
from .drafts import check_drafts
from .records import TandemOutput


class Calibrating:
    """The fingerprints and calibrations of a :class:`~tandem.pipeline.TandemPipeline` (a mixin of it)."""

    def calibration_fingerprint(self, num_inference_steps: int, guidance_scale: float,
                                task: dict | None = None, drafts: int = 1) -> dict:
        """Everything that changes the student's oracle scores: the student, its sampler, the
        scorer, a ControlNet if any, ``task`` (how an edit was made; absent for generation), and the drafts
        per prompt whose best score counts (absent for one)."""
        if self.scorer is None:
            raise ValueError("no scorer: the pipeline was built without an oracle; build it with scorer=...")
        sched = self.student.scheduler
        extra = {}
        controlnet = getattr(self.student, "controlnet", None)
        if controlnet is not None:
            extra["controlnet"] = {"path": str(getattr(controlnet.config, "_name_or_path", "")),
                                   "weights": self._weights_digest("controlnet", controlnet)}
        if task is not None:
            extra["task"] = dict(task)
        if drafts > 1:
            extra["drafts"] = int(drafts)
        return {**extra,
            "student": {
                "path": str(getattr(self.student.unet.config, "_name_or_path", "")),  # weights identify it
                "weights": self._weights_digest("student", self.student.unet),
                "pipeline": type(self.student).__name__,
                "scheduler": type(sched).__name__,
                "original_inference_steps": sched.config.get("original_inference_steps"),
            },
            "student_steps": int(num_inference_steps),
            "student_guidance_scale": float(guidance_scale),
            "resolution": list(self.resolution()),
            "scorer": self.scorer.fingerprint(),
        }

    def route_fingerprint(self, num_inference_steps: int, guidance_scale: float | None = None,
                          teacher_guidance_scale: float | None = None) -> dict:
        """What a route table's quality and cost depend on: the calibration fingerprint (student, its steps
        and guidance, oracle), the teacher's weights and guidance, and the calibration's scores."""
        if self.calibration is None:
            raise ValueError("routes need the pipeline's calibration (their percentiles refer to it)")
        return {**self.calibration_fingerprint(num_inference_steps, self.student_guidance(guidance_scale)),
                "teacher": self._weights_digest("teacher", self._teacher_any.unet),
                "teacher_guidance_scale": self.teacher_guidance(teacher_guidance_scale),
                "calibration": calibration_digest(self.calibration)}

    def fingerprint(self) -> dict:
        """The weights behind this pipeline's images and scores (student, teacher, ControlNet) and its
        scorer: an evaluation cache made with other models is refused, not mixed in."""
        out = {"student": self._weights_digest("student", self.student.unet),
               "teacher": self._weights_digest("teacher", self._teacher_any.unet),
               "scorer": self.scorer.fingerprint() if self.scorer is not None else None}
        controlnet = getattr(self.student, "controlnet", None)
        if controlnet is not None:
            out["controlnet"] = self._weights_digest("controlnet", controlnet)
        return out

    def _weights_digest(self, component: str, module) -> str:
        """``module_digest`` of a component, computed once per pipeline (hashing weight files is not free)."""
        if component not in self._digests:
            self._digests[component] = module_digest(module)
        return self._digests[component]

    def calibrate(self, prompts: Sequence[str], num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int = 0, batch_size: int = 16,
                  callback: Callable[[str, int, int], None] | None = None, config: dict | None = None,
                  control_image=None, drafts: int = 1) -> Calibration:
        """Score student samples of held-out ``prompts`` and keep them as a calibration (appendix C).
        With a ControlNet, ``control_image`` gives the held-out prompts' control images. With ``drafts`` N > 1,
        each prompt's score is the best of its N drafts' (the calibration of calls with ``drafts=N``; keep it in
        ``pipe.draft_calibrations[N]``)."""
        steps = count(self._setting("num_inference_steps", num_inference_steps, 4), "num_inference_steps")
        guidance = self.student_guidance(guidance_scale)
        drafts = check_drafts(drafts)
        out = self(prompts, mode="student", num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                   batch_size=batch_size, score=True, callback=callback, control_image=control_image, drafts=drafts)
        return self._calibration(out, steps, guidance, seed, config, drafts=drafts)

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        """The student's text encoder's view of each prompt, [n, 2D]: its pooled output beside the mean of its
        last hidden states over the tokens (what a pre-routing predictor reads; :mod:`tandem.prerouting`)."""
        tokenizer, encoder = self.student.tokenizer, self.student.text_encoder
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        with torch.no_grad():
            out = encoder(ids.input_ids.to(encoder.device), attention_mask=ids.attention_mask.to(encoder.device))
        mask = ids.attention_mask.to(out.last_hidden_state.device).unsqueeze(-1).float()
        mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        pooled = getattr(out, "pooler_output", None)
        pooled = mean if pooled is None else pooled
        return torch.cat([pooled, mean], dim=1).float().cpu().numpy().astype(np.float64)

    def fit_predictor(self, prompts: Sequence[str], drafts: int = 1, seed: int = 0, batch_size: int = 16,
                      ridge: float = 1.0, callback: Callable[[str, int, int], None] | None = None):
        """A pre-routing predictor (:class:`~tandem.prerouting.ScorePredictor`) fitted on held-out ``prompts``:
        the student's oracle scores there (the best of ``drafts``), regressed on the prompts' text features."""
        steps = count(self._setting("num_inference_steps", None, 4), "num_inference_steps")
        guidance = self.student_guidance(None)
        out = self(prompts, mode="student", seed=seed, batch_size=batch_size, score=True, callback=callback,
                   drafts=drafts)
        scores = np.array([r["student_score"] for r in out.records])
        return fit_score_predictor(self.text_features(prompts), scores,
                                   self.calibration_fingerprint(steps, guidance, None, drafts), ridge,
                                   {"seed": seed, "drafts": drafts})

    def calibrate_cascade(self, prompts: Sequence[str], levels: Sequence[int], seed: int = 0, batch_size: int = 16,
                          callback: Callable[[str, int, int], None] | None = None, config: dict | None = None):
        """A ``CascadeTable`` (``tandem.cascade``) from held-out ``prompts``: the oracle's scores of each prompt's
        image at each student level (``levels``: the earlier students' steps, then this pipeline's student) and
        at the teacher level (every image improved by this pipeline's strategy and teacher settings), with what
        each level costs in UNet evaluations per image."""
        steps = count(self._setting("num_inference_steps", None, 4), "num_inference_steps")
        guidance = self.student_guidance(None)
        levels = check_levels(levels, steps)
        scores, costs = [], []
        for n in [*levels, steps]:
            out = self(prompts, mode="student", num_inference_steps=n, seed=seed, batch_size=batch_size, score=True,
                       callback=callback)
            scores.append([r["student_score"] for r in out.records])
            costs.append(float(np.mean([r["unet_evals"]["student"] for r in out.records])))
        strategy = self._setting("strategy", None, "refine")
        teacher = {"strategy": strategy, "teacher_steps": self._setting("teacher_steps", None, 25),
                   "teacher_scheduler": self._setting("teacher_scheduler", None, "dpm"),
                   "rollback_sigma": self._setting("rollback_sigma", None, 0.5) if strategy == "refine" else None}
        out = self(prompts, mode="refine-all" if strategy == "refine" else "teacher", num_inference_steps=steps,
                   seed=seed, batch_size=batch_size, callback=callback,
                   **{k: v for k, v in teacher.items() if k != "strategy" and v is not None})
        scores.append(list(self.score(list(out.images), list(prompts))))
        costs.append(float(np.mean([r["unet_evals"]["teacher"] for r in out.records])))
        made = {"n_prompts": len(prompts), "seed": seed, **(config or {})}
        return CascadeTable([*levels, steps], np.array(scores), costs, self.calibration_fingerprint(steps, guidance),
                            teacher, made)

    def calibrate_edits(self, images, prompts: Sequence[str], strength: float | None = None,
                        num_inference_steps: int | None = None, guidance_scale: float | None = None,
                        seed: int = 0, batch_size: int = 16, callback: Callable[[str, int, int], None] | None = None,
                        config: dict | None = None, drafts: int = 1) -> Calibration:
        """Score student edits of held-out (image, prompt) pairs: the calibration of ``edit`` at ``strength``
        (of the ``edit_student`` where there is one); with ``drafts`` N > 1, of each input's best of N edits."""
        editor = self.editor()
        if editor is not self:
            return editor.calibrate_edits(images, prompts, strength, num_inference_steps, guidance_scale, seed,
                                          batch_size, callback, config, drafts)
        steps = self._edit_student_steps(num_inference_steps)
        guidance = self.student_guidance(guidance_scale)
        out = self.edit(images, prompts, strength=strength, mode="student", num_inference_steps=steps,
                        guidance_scale=guidance, seed=seed, batch_size=batch_size, score=True, callback=callback,
                        drafts=drafts)
        return self._calibration(out, steps, guidance, seed, config,
                                 {"edit_strength": out.summary["settings"]["edit_strength"]}, drafts)

    def _calibration(self, out: TandemOutput, steps: int, guidance: float, seed: int, config: dict | None,
                     task: dict | None = None, drafts: int = 1) -> Calibration:
        """The calibration of a scored student run ``out`` (its kept drafts' scores)."""
        scores = np.array([r["student_score"] for r in out.records])
        made = {"n_prompts": len(scores), "seed": seed, "seconds": out.summary["seconds"]["total"], **(config or {})}
        return Calibration(scores, self.calibration_fingerprint(steps, guidance, task, drafts), made)
