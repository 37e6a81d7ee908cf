"""Editing in tandem (SDEdit, section 4.2 of the adaptive teacher-student paper): the student edits each
noised input; where the oracle scores the edit below tau, the teacher edits the same noised input instead. Part
of :class:`~tandem.pipeline.TandemPipeline` (a mixin of it)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..calibration import Calibration
from ..checks import count
from ..generate import prompt_seed
from .components import check_shared_latents, own_components
from .drafts import draft_generators, draft_record, expand, fold_ledger, prompts_view
from .records import CostLedger, TandemOutput, final_images, image_record, run_summary
from .settings import EDIT_MODES, check_output_type, finish_edit_plan, plan_edit, prompt_list
from .stages import noised_inputs, run_stages, student_draw, teacher_regenerate


class Editing:
    """The editing methods of a :class:`~tandem.pipeline.TandemPipeline`."""

    def editor(self):
        """The pipeline that edits: this one, or (with an ``edit_student``) a view of it with the edit
        student as its student and ``edit_guidance_scale`` as its guidance."""
        if self.edit_student is None:
            return self
        view = copy.copy(self)
        view.student, view.edit_student, view._digests = self.edit_student, None, self._editor_digests
        view.student_own_components = own_components(self.edit_student, self._teacher_any)
        view.defaults = dict(self.defaults)
        if "edit_guidance_scale" in self.defaults:
            view.defaults["guidance_scale"] = self.defaults["edit_guidance_scale"]
        return view

    @torch.no_grad()
    def edit(
        self,
        image,
        prompt: str | Sequence[str],
        *,
        strength: float | None = None,
        mode: str = "adaptive",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        teacher_steps: int | None = None,
        teacher_guidance_scale: float | None = None,
        teacher_scheduler: str | None = None,
        accept_threshold: float | None = None,
        percentile: float | None = None,
        budget: float | None = None,
        routing: str | None = None,
        calibration: Calibration | None = None,
        seed: int = 0,
        generator: Sequence[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "np",
        score: bool | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        drafts: int | None = None,
    ) -> TandemOutput:
        """Adaptive text-guided editing (SDEdit): noise each input image to ``strength``, denoise it
        with its new prompt by the student, score the edit, and let the teacher edit the *same*
        noised input instead where the score is below tau (regeneration: the paper found that
        refinement's extra noising loses the reference).

        The noised input is x_t = sqrt(a_t) z + sqrt(1 - a_t) eps, with z the VAE mean of the input,
        eps drawn from the image's generator, and t the first timestep of the student's img2img
        schedule at ``strength`` (diffusers' convention: about ``strength * 1000``). The student runs
        that schedule from x_t; the teacher runs ``teacher_steps`` steps evenly spaced from t to 0.

        Args:
            image: the inputs, one per prompt or one for all (PIL, uint8 [H, W, 3] arrays, or a float
                [B, 3, H, W] tensor in [0, 1]); other sizes are resized to the pipeline's resolution.
            prompt: the edited prompts.
            mode: "adaptive", or the baselines "student" and "teacher" (every image edited by one model).
            num_inference_steps: the student's steps [the preset's ``edit_num_inference_steps``, else its
                generation steps].
            teacher_steps: teacher steps actually run from t (not the length of a longer schedule).
            accept_threshold: tau itself, as for generation.
            percentile: as for generation, of an *edit* calibration (``calibrate_edits``) for the same strength.
            budget: as for generation, with an edit calibration.
            routing: as for generation ("budget-exact" needs no calibration).
            calibration: the edit calibration [the pipeline's for this strength].
            drafts: the student's edits of each input [1]: with N > 1 it edits each input N times from different
                noise (draft 0 is the one-draft edit; :mod:`.drafts`), the oracle keeps the best, and the teacher
                edits that draft's noised input if even the best scores below tau, a percentile of a best-of-N edit
                calibration (``calibrate_edits(..., drafts=N)``, given as ``calibration``).

        The other arguments are those of ``__call__``. With an ``edit_student``, it is the student here.
        """
        editor = self.editor()
        if editor is not self:
            return editor.edit(image, prompt, strength=strength, mode=mode, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, teacher_steps=teacher_steps,
                               teacher_guidance_scale=teacher_guidance_scale, teacher_scheduler=teacher_scheduler,
                               accept_threshold=accept_threshold, percentile=percentile, budget=budget,
                               routing=routing, calibration=calibration, seed=seed, generator=generator,
                               batch_size=batch_size, output_type=output_type, score=score, callback=callback,
                               drafts=drafts)
        prompts = prompt_list(prompt)
        if mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {mode!r}; expected adaptive, student or teacher")
        check_output_type(output_type)
        batch_size, seed = count(batch_size, "batch_size"), count(seed, "seed", minimum=0)
        plan = plan_edit(self, mode=mode, strength=strength, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, teacher_steps=teacher_steps,
                         teacher_guidance_scale=teacher_guidance_scale, teacher_scheduler=teacher_scheduler,
                         budget=budget, drafts=drafts)
        n, many = len(prompts), plan.drafts
        inputs = self._per_prompt(image, n, "input image")
        if generator is not None and len(generator) != n * many:
            raise ValueError(f"got {len(generator)} generators for {n} prompts (one per prompt)" if many == 1 else
                             f"got {len(generator)} generators for {n} prompts of {many} drafts (one per draft, "
                             f"{n * many}, prompt-major)")
        plan = finish_edit_plan(self, plan, n, accept_threshold, percentile, routing, calibration, score)
        gens = list(generator) if generator is not None else draft_generators(seed, n, many)
        final_prompts, prompts = prompts, expand(prompts, many)  # the stages run over n * many draft slots
        inputs = inputs.repeat_interleave(many, 0)
        if mode != "student":
            check_shared_latents(self.student, self.teacher, "an edit gives the teacher the input noised in the "
                                 "student's latent space", "edit with mode='student'")
        noised, teacher_noised = noised_inputs(self.student, plan.base, inputs, gens, plan.student_timesteps[0],
                                               batch_size)
        ledger = CostLedger(n * many, self._counted_modules())
        ledger.add("vae_encode", list(range(n * many)))  # each input, once per draft

        def draw(idx: list[int]) -> torch.Tensor:  # the student, from the noised inputs on its img2img schedule
            return student_draw(self.student, [prompts[i] for i in idx], noised[idx], [gens[i] for i in idx],
                                plan.guidance, timesteps=plan.student_timesteps)

        def route(scores: np.ndarray) -> list[int]:  # the images (kept drafts) the teacher improves
            if mode == "teacher":
                return list(range(n))
            return plan.cut.improved(scores) if mode == "adaptive" else []

        def improve(idx: list[int], _latents) -> torch.Tensor:  # the teacher edits the same noised input
            return teacher_regenerate(self.teacher, copy.deepcopy(plan.base), [prompts[i] for i in idx],
                                      teacher_noised[idx], [gens[i] for i in idx], plan.teacher_guidance,
                                      timesteps=plan.teacher_timesteps)

        original = self.student.scheduler
        self.student.scheduler = copy.deepcopy(original)
        try:
            run = run_stages(self.student, self._teacher_any, self.scorer, prompts, batch_size, ledger,
                             None if mode == "teacher" else draw, route, improve, plan.do_score, callback,
                             drafts=many)
        finally:
            self.student.scheduler = original
        slot_scores = run.scores
        if many > 1:
            run, ledger = prompts_view(run, many), fold_ledger(ledger, many)
        path, improved = "teacher" if mode == "teacher" else "regenerated", set(run.improved)
        records = []
        for i in range(n):
            rec = {**image_record(i, final_prompts[i], "student" if mode == "student" else
                                  path if i in improved else "accepted",
                                  prompt_seed(seed, i) if generator is None else None, ledger, run.scores[i],
                                  plan.cut.tau),
                   "edit_strength": plan.strength, "start_timestep": int(plan.student_timesteps[0])}
            records.append(draft_record(rec, run.kept[i], many, slot_scores) if many > 1 else rec)
        summary = run_summary(records, plan.settings(), run.timings, run.seconds, plan.student_cost,
                              plan.improve_cost, None, plan.cut.note, self.student_own_components)
        return TandemOutput(final_images(run.images, run.latents, output_type), records, summary,
                            None if mode == "teacher" else run.student_images)

    def _edit_student_steps(self, num_inference_steps: int | None) -> int:
        """The student's edit steps: given, else the preset's ``edit_num_inference_steps`` (an edit starts
        part-way, so a preset may give the student more steps there), else its generation steps."""
        fallback = self.defaults.get("num_inference_steps", 4)
        return count(self._setting("edit_num_inference_steps", num_inference_steps, fallback), "num_inference_steps")
