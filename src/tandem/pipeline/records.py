"""What a run records: one record per image (:data:`RECORD_FIELDS`), what each image cost (:class:`CostLedger`,
counting the rows each UNet processed for it), a run's outputs (:class:`TandemOutput`) and the models that made
it (:func:`run_record`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..presets import preset_to_json

# The record of one generated image: every mode of TandemPipeline and generate_alone, and so every
# `tandem generate` run (records.jsonl), writes these keys in this order, all built by image_record.
RECORD_FIELDS = {
    "index": "int: the prompt's position in the input",
    "prompt": "str: the prompt",
    "path": "str: what made the final image (PATHS)",
    "prompt_seed": "int | None: the seed of the image's generator, from (seed, index); None for generators passed in",
    "student_score": "float | None: the oracle's score of the student's image; None where no oracle scored it",
    "tau": "float | None: the cut-off of an adaptive run; None in the other modes",
    "unet_evals": "{'student': float, 'teacher': float, 'total': float}: UNet evaluations for this image, counted "
                  "as the batch rows each UNet processed (a classifier-free guided step counts two)",
    "vae": "{'decode': int, 'encode': int}: VAE decodes and encodes of this image",
    "oracle_calls": "int: how many times the oracle scored this image",
}


# Keys a record has only where they apply, after the above.
RECORD_EXTRA_FIELDS = {
    "controlnet_evals": "float: ControlNet evaluations for this image (a pipeline with a ControlNet)",
    "rollback_sigma": "float: the realised rollback sigma (path 'refined')",
    "teacher_steps_run": "int: the teacher steps that refined the image (path 'refined')",
    "cascade_levels": "list[int]: the steps of each student level that drew the image, in order (a cascade; "
                      "student_score is the last one's score)",
    "transitions": "list[str]: who took each transition t_k -> t_k+1 of the student's grid, 'student' or 'teacher' "
                   "(path 'mixed'; the grid is the summary's settings.student_timesteps)",
    "draft": "int: the draft the oracle kept, its best (drafts > 1; student_score is its score)",
    "draft_scores": "list[float]: the oracle's score of each draft, in order (drafts > 1)",
    "pre_routed": "bool: True where a predictor sent the prompt to the teacher before the student drew it (path "
                  "'regenerated', no student score)",
    "edit_strength": "float: the SDEdit strength (an edit)",
    "start_timestep": "int: the timestep the edit's student started from (an edit)",
}


# `tandem generate` adds these to every record (and control_image with --control-image).
RUN_RECORD_FIELDS = {
    "file": "str: the image's file name in the output directory",
    "seed": "int: the run seed (--seed)",
    "model": "str: the preset or teacher (--model)",
}


PATHS = {
    "student": "the student's image (mode 'student')",
    "teacher": "the teacher's image (mode 'teacher')",
    "accepted": "the oracle kept the student's image (mode 'adaptive')",
    "refined": "the teacher refined the student's image (mode 'adaptive', strategy 'refine'; mode 'refine-all')",
    "regenerated": "the teacher drew the image from the student's initial noise (mode 'adaptive', strategy "
                   "'regenerate')",
    "mixed": "student and teacher shared one trajectory on a DDIM grid, each taking some transitions (mode "
             "'mixed', tandem.mixed; the record's transitions say which)",
}


@dataclass
class TandemOutput:
    """``images`` in input order; ``records[i]`` says which path image i took, its oracle score, the
    threshold, and what it cost (:data:`RECORD_FIELDS`); ``summary`` aggregates the run."""

    images: list
    records: list[dict]
    summary: dict = field(default_factory=dict)
    student_images: list | None = None  # uint8 student images (before the teacher), outside teacher mode


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


UNET_ROLES = ("student", "teacher", "controlnet")


class CostLedger:
    """What each of ``n`` images cost: the rows each counted module processed for it (``modules`` by role:
    "student", "teacher", "controlnet"; one row is one evaluation for one image, so a classifier-free guided
    step counts two), its VAE decodes and encodes, and its oracle calls. Inside ``with ledger.counting():``
    the modules count their rows; a batch charges the rows its call ran to its images (:meth:`charge`)."""

    def __init__(self, n: int, modules: dict[str, torch.nn.Module]):
        unknown = sorted(set(modules) - set(UNET_ROLES))
        if unknown:
            raise ValueError(f"unknown counted roles {unknown}; expected some of {', '.join(UNET_ROLES)}")
        self.modules = dict(modules)
        self.counts: dict[str, int] = {}
        self.per_image = {key: np.zeros(n) for key in (*UNET_ROLES, "vae_decode", "vae_encode", "oracle")}

    @contextmanager
    def counting(self):
        with _count_rows(self.modules, self.counts):
            yield self

    def rows(self, role: str) -> int:
        """The rows ``role`` has processed so far: a reading to pass to :meth:`charge` after a call."""
        return self.counts.get(role, 0)

    def charge(self, role: str, idx: list[int], before: int) -> None:
        """Spread the rows ``role`` processed since the reading ``before`` evenly over the images ``idx``."""
        self.per_image[role][idx] += (self.rows(role) - before) / len(idx)

    def add(self, what: str, idx: list[int]) -> None:
        """One VAE decode ("vae_decode"), VAE encode ("vae_encode") or oracle call ("oracle") for each image ``idx``."""
        self.per_image[what][idx] += 1

    def unet_evals(self, i: int) -> dict[str, float]:
        student, teacher = float(self.per_image["student"][i]), float(self.per_image["teacher"][i])
        return {"student": student, "teacher": teacher, "total": student + teacher}


def image_record(index: int, prompt: str, path: str, prompt_seed: int | None, ledger: CostLedger,
                 student_score: float | None = None, tau: float | None = None) -> dict:
    """The record of image ``index`` (:data:`RECORD_FIELDS`, in that order), its costs from ``ledger``;
    ``controlnet_evals`` where the ledger counted a ControlNet. A NaN ``student_score`` (not scored) is None."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
    scored = student_score is not None and not np.isnan(student_score)
    record = {
        "index": index, "prompt": prompt, "path": path, "prompt_seed": prompt_seed,
        "student_score": float(student_score) if scored else None,
        "tau": tau,
        "unet_evals": ledger.unet_evals(index),
        "vae": {"decode": int(ledger.per_image["vae_decode"][index]),
                "encode": int(ledger.per_image["vae_encode"][index])},
        "oracle_calls": int(ledger.per_image["oracle"][index]),
    }
    if "controlnet" in ledger.modules:
        record["controlnet_evals"] = float(ledger.per_image["controlnet"][index])
    return record


def summarize_records(records: list[dict]) -> dict:
    """What a run's records add up to: how many images took each path, the share the teacher improved, and
    the mean UNet evaluations per image (in all, the student's and the teacher's)."""
    paths = [r["path"] for r in records]
    return {
        "n": len(records),
        "paths": {p: paths.count(p) for p in sorted(set(paths))},
        "share_improved": float(np.mean([p in ("refined", "regenerated", "teacher") for p in paths])),
        "unet_evals_mean": float(np.mean([r["unet_evals"]["total"] for r in records])),
        "unet_evals_student_mean": float(np.mean([r["unet_evals"]["student"] for r in records])),
        "unet_evals_teacher_mean": float(np.mean([r["unet_evals"]["teacher"] for r in records])),
    }


def final_images(images: list, latents: list, output_type: str) -> list:
    """A run's outputs as ``output_type`` asks: uint8 arrays ("np"), PIL images ("pil") or latents."""
    if output_type == "latent":
        return latents
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(im) for im in images]
    return images


def run_summary(records: list[dict], settings: dict, timings: dict, total: float, student_cost: float,
                improve_cost: float, refine, calibration_note: str | None = None,
                own_components: Sequence[str] = ()) -> dict:
    """A run's summary: its records added up (:func:`summarize_records`), what a student image and an improvement
    cost, the refinement schedule (or None), the settings it ran with, a calibration note (tied calibration scores
    sent another share to the teacher than asked; or None), the components the student brings of its own, and
    the seconds spent by phase."""
    model_time = timings["student"] + timings["teacher"]
    return {
        **summarize_records(records),
        "student_cost": student_cost,
        "improve_cost": improve_cost,
        "refine": None if refine is None else refine.__dict__,
        "settings": settings,
        "calibration_note": calibration_note,
        "student_own_components": list(own_components),
        "seconds": {**timings, "total": total, "other": total - model_time - timings["decode"] - timings["oracle"]},
    }


def run_record(pipe, edit: bool = False) -> dict:
    """What a run's ``config.json`` says about the models that made it (every ``tandem`` command that runs a
    TandemPipeline writes it). A pipeline composed from a preset (``from_preset``, ``from_pretrained``) names
    its parts: the preset's name, teacher, student, scorer and ControlNet, the scorer's fingerprint, the
    components the student brings of its own, and the preset's fields (``preset_fields``). A pipeline built
    in Python (or given a ControlNet its preset does not name) records what it holds instead: the digests of
    its weights and its scorer's fingerprint (``fingerprint``: :meth:`TandemPipeline.fingerprint`), with
    ``preset`` None or the preset it started from.

    Args:
        pipe: a :class:`~tandem.pipeline.TandemPipeline`.
        edit: the record of a run of edits, made by the edit student where the pipeline has one
            (:meth:`TandemPipeline.editor`).
    """
    models = pipe.editor() if edit else pipe
    preset = getattr(pipe, "preset", None)
    scorer = pipe.scorer.fingerprint() if pipe.scorer is not None else None
    own = list(models.student_own_components) or None
    own_controlnet = getattr(pipe.student, "controlnet", None) is not None and not (preset and preset.controlnet)
    if preset is None or own_controlnet:
        return {"preset": preset.name if preset is not None else None, "fingerprint": models.fingerprint(),
                "scorer_fingerprint": scorer, "student_own_components": own}
    student = preset.edit_student if edit and preset.edit_student else preset.student
    return {"preset": preset.name, "teacher": preset.teacher, "student": student, "scorer": preset.scorer,
            "scorer_fingerprint": scorer, "controlnet": preset.controlnet, "student_own_components": own,
            "preset_fields": preset_to_json(preset)}
