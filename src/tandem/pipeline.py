"""The adaptive teacher-student pipeline (Algorithm 1 of the adaptive teacher-student paper).

A few-step student draws every image; an oracle scores it; an image scoring below the cut-off
tau goes to the teacher, which either *refines* it (noise the student's latent by a rollback
sigma, then denoise with the teacher from the matching timestep) or *regenerates* it (the teacher
from the student's own initial noise). Student, teacher and oracle are ordinary diffusers
pipelines and scorers; the teacher's image-to-image twin shares its components.

Every image owns a generator seeded from ``(seed, index)``: it draws the image's initial noise,
the student's per-step noise and the refinement noise, in that order, so an image's noise does
not depend on its batch or on which other images the oracle rejected. Its pixels depend on the
batch only through the float rounding of batched kernels, which follows the batch's *shape*, not
the other images in it: at another ``batch_size`` a pixel may differ by one grey level (measured on
CPU, teacher, student and refinement, 24 prompts at batch 1, 7 and 16, 1 and 2 threads: at most 1/255,
latents within 4e-4); a score that close to tau could take the other path.

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
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .calibration import (
    RECALIBRATE,
    RECALIBRATE_EDITS,
    Calibration,
    CalibrationTieWarning,
    module_digest,
    percentile_k_for_budget,
)
from .checks import check_finite, count, finite_number, sampler_step_limit, sampler_steps, threshold_value
from .denoiser import NoiseSchedule
from .generate import (
    StudentSettings,
    TeacherSettings,
    _to_uint8,
    generate_student,
    generate_teacher,
    initial_latents,
    prompt_generator,
    prompt_seed,
    unet_evals_per_step,
)
from .models import SCHEDULERS, make_scheduler
from .students import check_student_guidance, student_info_of

MODES = ("adaptive", "student", "teacher", "refine-all", "mixed")
STRATEGIES = ("refine", "regenerate")
# how an adaptive call picks the images to improve: every image scoring below tau (from accept_threshold,
# percentile or budget), or exactly the lowest-scoring images that ``budget`` pays for ("budget-exact")
ROUTINGS = ("threshold", "budget-exact")
CONVENTIONS = ("paper", "strength")
HANDOFFS = ("latent", "pixel")
OUTPUT_TYPES = ("np", "pil", "latent")
# Messages for API calls that the command line makes too: each names the argument and its option.
NOT_ADAPTIVE = ("accept_threshold/percentile/budget (--threshold/--percentile/--budget) apply to mode='adaptive' "
                "(--mode adaptive), not {mode!r}")
NO_SCORER = "scoring needs a scorer (oracle): build the pipeline with scorer=... (command line: --scorer)"
OPTIONS = {"accept_threshold": "--threshold", "percentile": "--percentile", "budget": "--budget"}
TEACHER_GUIDANCE = 7.5  # the teacher's guidance when no default gives one (diffusers' Stable Diffusion default)

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
class Phases:
    """What :meth:`TandemPipeline._phases` leaves: each image's final latents and image, the student's
    images (None where the student did not draw), the oracle's scores (NaN where it did not score), the
    images the teacher improved, and the seconds spent (by phase, and in all)."""

    latents: list
    images: list
    student_images: list
    scores: np.ndarray
    improved: list[int]
    timings: dict
    seconds: float
    levels: list[list[int]] = field(default_factory=list)  # the images each student level drew (a cascade's)


@dataclass
class TandemOutput:
    """``images`` in input order; ``records[i]`` says which path image i took, its oracle score, the
    threshold, and what it cost (:data:`RECORD_FIELDS`); ``summary`` aggregates the run."""

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
    rollback_sigma = _rollback_sigma(rollback_sigma)
    teacher_steps = sampler_steps(teacher_steps, scheduler, "teacher_steps", "the teacher")
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
    lo, hi = teacher_steps, sampler_step_limit(sched)  # longer schedules repeat timesteps
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


def _rollback_sigma(value) -> float:
    return finite_number(value, "rollback sigma (rollback_sigma)", low=0, low_open=True, high=1)


def _spelled(names: list[str]) -> str:
    """Call arguments with their command-line spellings: "percentile (--percentile), budget (--budget)"."""
    return ", ".join(f"{name} ({OPTIONS[name]})" for name in names)


def _guidance(value, name: str) -> float:
    return finite_number(value, name, low=0)


def _strength(value) -> float:
    return finite_number(value, "strength", low=0, low_open=True, high=1)


def budget_exact_count(n: int, budget, student_cost: float, improve_cost: float, accept_threshold=None,
                       percentile=None) -> int:
    """How many of ``n`` images a budget of ``budget`` UNet evaluations per image pays the teacher for,
    when each costs ``student_cost`` and an improved one ``improve_cost`` more: the largest m with
    ``n * student_cost + m * improve_cost <= n * budget`` (so the batch's mean cost never exceeds it)."""
    if budget is None or accept_threshold is not None or percentile is not None:
        raise ValueError("routing='budget-exact' (--budget-exact) takes budget (--budget) and neither "
                         "accept_threshold nor percentile")
    percentile_k_for_budget(budget, student_cost, improve_cost)  # the budget's own checks, named
    return min(n, int(np.floor(n * (budget - student_cost) / improve_cost + 1e-9)))


def lowest_scores(scores: np.ndarray, m: int) -> list[int]:
    """The indices of the ``m`` lowest ``scores`` (the earlier image first among equal scores), in index order."""
    order = np.lexsort((np.arange(len(scores)), scores))
    return sorted(int(i) for i in order[:m])


@dataclass(frozen=True)
class Cutoff:
    """How a call picks the images the teacher improves (:meth:`TandemPipeline._cutoff`): in adaptive mode
    those scoring below ``tau`` (given, or the calibration's percentile ``k``; ``note`` where tied scores send
    another share), or under budget-exact routing exactly the ``exact`` lowest-scoring."""

    routing: str
    tau: float | None = None
    k: float | None = None
    note: str | None = None
    exact: int | None = None

    def improved(self, scores: np.ndarray) -> list[int]:
        if self.exact is not None:
            return lowest_scores(scores, self.exact)
        return [i for i, score in enumerate(scores) if score < self.tau]


def edit_timesteps(scheduler, steps: int, strength: float) -> list[int]:
    """The student's img2img timesteps at ``strength`` (diffusers' convention; ``scheduler`` is not modified):
    an LCM scheduler picks ``steps`` of its skipping schedule truncated at ``strength``, any other runs the
    last ``int(steps * strength)`` steps of its ``steps``-step schedule."""
    sched = copy.deepcopy(scheduler)
    if "strength" in inspect.signature(sched.set_timesteps).parameters:
        try:
            sched.set_timesteps(steps, strength=strength)
        except ValueError:  # diffusers' LCM: the grid truncated at ``strength`` holds fewer than ``steps``
            grid = sched.config.get("original_inference_steps")
            fit = f" (at most {int(grid * strength)})" if grid else ""
            raise ValueError(f"{steps} student steps do not fit in the student's schedule at strength {strength:g}"
                             f"{fit}; lower the steps or raise the strength") from None
        ts = [int(t) for t in sched.timesteps]
    else:
        sched.set_timesteps(steps)
        run = min(int(steps * strength), steps)
        order = getattr(sched, "order", 1)
        ts = [int(t) for t in sched.timesteps[(steps - run) * order:]]
    if not ts:
        raise ValueError(f"strength {strength} of {steps} student steps runs no step; raise the steps or the strength")
    return ts


def teacher_edit_timesteps(scheduler, start: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from ``start`` (included) towards 0, for a teacher scheduler
    that accepts custom timesteps (DPM-Solver++; not DDIM or UniPC in diffusers)."""
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"editing needs a teacher scheduler that takes custom timesteps (dpm); "
                         f"{type(scheduler).__name__} does not")
    if steps > start:
        raise ValueError(f"{steps} teacher steps do not fit below timestep {start}; lower the steps "
                         "or raise the strength")
    ts = np.round(np.linspace(start, 0, steps + 1)[:-1]).astype(int)
    return [int(t) for t in ts]


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


def generate_alone(pipe, prompts: Sequence[str], settings: TeacherSettings | StudentSettings, seed: int,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> TandemOutput:
    """The teacher or a student alone, without an oracle: :func:`tandem.generate.generate_teacher` or
    :func:`tandem.generate.generate_student` draws the images (the same pixels), and each image gets the
    record ``TandemPipeline(mode="teacher" | "student")`` gives it (:func:`image_record`), its costs counted
    by the same :class:`CostLedger`.

    Args:
        pipe: the teacher's pipeline (``settings`` a ``TeacherSettings``) or a student's
            (``tandem.models.load_student_pipeline``; ``settings`` a ``StudentSettings``).
        prompts: B prompts; prompt i is seeded from ``(seed, i)``.
        on_batch: called with the number of images finished after each batch.
    Returns:
        B uint8 images [H, W, 3], their records (path "teacher" or "student") and their summary.
    """
    if isinstance(settings, TeacherSettings):
        role, draw = "teacher", generate_teacher
    elif isinstance(settings, StudentSettings):
        role, draw = "student", generate_student
    else:
        raise ValueError(f"settings must be TeacherSettings or StudentSettings, got {type(settings).__name__}")  # noqa: TRY004
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    ledger = CostLedger(len(prompts), {role: pipe.unet})
    finished, rows = 0, 0

    def batch_done(done: int) -> None:  # each batch: its UNet rows and one VAE decode per image
        nonlocal finished, rows
        idx = list(range(finished, done))
        ledger.charge(role, idx, rows)
        ledger.add("vae_decode", idx)
        finished, rows = done, ledger.rows(role)
        if on_batch is not None:
            on_batch(done)

    t_start = time.perf_counter()
    with ledger.counting():
        images = draw(pipe, prompts, settings, seed, batch_size, on_batch=batch_done)
    total = time.perf_counter() - t_start
    records = [image_record(i, p, role, prompt_seed(seed, i), ledger) for i, p in enumerate(prompts)]
    summary = {**summarize_records(records), "settings": {"mode": role, **settings.__dict__},
               "seconds": {"total": total}}
    return TandemOutput(images, records, summary, None if role == "teacher" else list(images))


def images_to_unit_tensor(images, size: tuple[int, int], what: str = "image") -> torch.Tensor:
    """PIL images, uint8 [H, W, 3] arrays (or one [B, H, W, 3] array) or a float [B, 3, H, W] tensor in
    [0, 1] -> float [B, 3, H, W] in [0, 1] at ``size`` (height, width); other sizes are resized (bicubic)."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{what} tensor must be [B, 3, H, W], got {list(images.shape)}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{what} tensor values must lie in [0, 1]")
        if tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return x
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, Image.Image | np.ndarray):
        images = [images]
    arrays = []
    for im in images:
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"{what} arrays must be uint8 [H, W, 3], got {im.dtype} {list(im.shape)}")
            im = Image.fromarray(im)
        elif not isinstance(im, Image.Image):
            raise ValueError(f"{what}: expected PIL images, uint8 arrays or a tensor, got {type(im).__name__}")  # noqa: TRY004
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _final(images: list, latents: list, output_type: str) -> list:
    """A run's outputs as ``output_type`` asks: uint8 arrays ("np"), PIL images ("pil") or latents."""
    if output_type == "latent":
        return latents
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(im) for im in images]
    return images


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _unet_config(pipe):
    unet = getattr(pipe, "unet", None)
    return None if unet is None else unet.config


def _own_components(student, teacher) -> tuple[str, ...]:
    """What ``student`` brings of its own (``vae``, ``text_encoder``) rather than sharing ``teacher``'s."""
    return tuple(name for name in ("vae", "text_encoder")
                 if getattr(student, name, None) is not None and getattr(student, name) is not getattr(
                     teacher, name, None))


def _check_pair(student, teacher) -> None:
    """Refuse a student that cannot work beside ``teacher`` with the components it shares: a UNet for other
    latents or another resolution on the teacher's VAE, or for other text embeddings on the teacher's text
    encoder (what would otherwise surface as a convolution or matmul shape error mid-run)."""
    s, t = _unet_config(student), _unet_config(teacher)
    if s is None or t is None:
        return
    vae = getattr(student, "vae", None)
    if vae is not None and vae is getattr(teacher, "vae", None):
        if s.in_channels != t.in_channels:
            raise ValueError(f"student UNet takes {s.in_channels}-channel latents, the teacher's takes "
                             f"{t.in_channels} (in_channels): they do not share a latent space (the student uses "
                             "the teacher's VAE)")
        if s.sample_size != t.sample_size:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            raise ValueError(f"student UNet is made for {_size(s.sample_size, factor)} images, the teacher's for "
                             f"{_size(t.sample_size, factor)} (sample_size {s.sample_size} vs {t.sample_size}): "
                             "they do not share a resolution (the student uses the teacher's VAE)")
    encoder = getattr(student, "text_encoder", None)
    if encoder is not None and encoder is getattr(teacher, "text_encoder", None) \
            and s.cross_attention_dim != t.cross_attention_dim:
        raise ValueError(f"student UNet attends to {s.cross_attention_dim}-wide text embeddings, the teacher's to "
                         f"{t.cross_attention_dim} (cross_attention_dim): they do not share a text encoder (the "
                         "student uses the teacher's)")


def _size(sample_size, factor: int) -> str:
    """A UNet's ``sample_size`` (an int or [height, width] in latents) as image pixels: "512x512 px"."""
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return f"{h * factor}x{w * factor} px"


def _check_shared_latents(student, teacher, what: str, fix: str) -> None:
    """Refuse giving the teacher latents of the student's space (``what`` does: the student's latents, its
    initial noise, an edit's noised input) when the teacher's are another: other channels, or another
    VAE scaling; ``fix`` says what to do instead."""
    s, t = _unet_config(student), _unet_config(teacher)
    if s is not None and t is not None and s.in_channels != t.in_channels:
        raise ValueError(f"{what}, but the student UNet takes {s.in_channels}-channel latents and the teacher's "
                         f"{t.in_channels} (in_channels): they do not share a latent space; {fix}")
    s_vae, t_vae = getattr(student, "vae", None), getattr(teacher, "vae", None)
    if s_vae is None or t_vae is None or s_vae is t_vae:
        return
    s_scale, t_scale = s_vae.config.get("scaling_factor"), t_vae.config.get("scaling_factor")
    if s_scale != t_scale:
        raise ValueError(f"{what}, but the student's VAE scales latents by {s_scale:g} and the teacher's by "
                         f"{t_scale:g}: they do not share a latent space; {fix}")


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
        edit_student: a student that edits (``edit``, ``calibrate_edits``) instead of ``student``, at the
            ``edit_guidance_scale`` setting (a student can be best at generation and another at editing).
    """

    def __init__(self, student, teacher, scorer=None, calibration: Calibration | None = None,
                 defaults: dict | None = None, name: str = "custom", edit_student=None):
        from diffusers import AutoPipelineForImage2Image

        self.student, self.scorer, self.calibration, self.name = student, scorer, calibration, name
        self.defaults = dict(defaults or {})
        if _accepts(teacher, "strength"):
            self.teacher, self.teacher_img2img = None, teacher
        else:
            self.teacher, self.teacher_img2img = teacher, AutoPipelineForImage2Image.from_pipe(teacher)
        _check_pair(student, self._teacher_any)
        # what the student brings of its own rather than sharing the teacher's (its draws use them)
        self.student_own_components = _own_components(student, self._teacher_any)
        self.edit_student = edit_student
        if edit_student is not None:
            _check_pair(edit_student, self._teacher_any)
        for pipe in (student, teacher, self.teacher_img2img, edit_student):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        self._teacher_scheduler_config = dict(self.teacher_img2img.scheduler.config)
        self._digests: dict[str, str] = {}  # weights digests by component, computed once
        self._editor_digests: dict[str, str] = {}  # the same for the edit student's view
        self.edit_calibrations: dict[float, Calibration] = {}  # SDEdit strength -> the editing student's scores
        self.routes = None  # a tandem.routes.RouteTable: what a budget alone picks (generation)

    def editor(self) -> TandemPipeline:
        """The pipeline that edits: this one, or (with an ``edit_student``) a view of it with the edit
        student as its student and ``edit_guidance_scale`` as its guidance."""
        if self.edit_student is None:
            return self
        view = copy.copy(self)
        view.student, view.edit_student, view._digests = self.edit_student, None, self._editor_digests
        view.student_own_components = _own_components(self.edit_student, self._teacher_any)
        view.defaults = dict(self.defaults)
        if "edit_guidance_scale" in self.defaults:
            view.defaults["guidance_scale"] = self.defaults["edit_guidance_scale"]
        return view

    # -- settings ----------------------------------------------------------------------------

    @property
    def _teacher_any(self):
        return self.teacher if self.teacher is not None else self.teacher_img2img

    def _setting(self, name: str, value, fallback=None):
        if value is not None:
            return value
        return self.defaults.get(name, fallback)

    def teacher_guidance(self, teacher_guidance_scale: float | None = None) -> float:
        """The teacher's guidance: given, else the defaults' ``teacher_guidance_scale``, else 7.5."""
        return _guidance(self._setting("teacher_guidance_scale", teacher_guidance_scale, TEACHER_GUIDANCE),
                         "teacher_guidance_scale")

    def student_guidance(self, guidance_scale: float | None = None) -> float:
        """The student's guidance: given, else the defaults' ``guidance_scale``, else the teacher's default
        guidance (as on the command line, so one student draws the same images by default in both). A
        student that samples without guidance (``student.json``'s guidance "none": ADD, DMD2) takes none."""
        info = student_info_of(self.student)
        if info is not None and info.guidance == "none":
            value = _guidance(self._setting("guidance_scale", guidance_scale, info.guidance_scale), "guidance_scale")
            check_student_guidance(self.student, value)
            return value
        if guidance_scale is None and self.defaults.get("guidance_scale") is None:
            return self.teacher_guidance()
        return _guidance(self._setting("guidance_scale", guidance_scale), "guidance_scale")

    def resolution(self) -> tuple[int, int]:
        size = self.student.unet.config.sample_size
        factor = self.student.vae_scale_factor
        return (size * factor, size * factor)

    def calibration_fingerprint(self, num_inference_steps: int, guidance_scale: float,
                                task: dict | None = None) -> dict:
        """Everything that changes the student's oracle scores: the student, its sampler, the
        scorer, a ControlNet if any, and ``task`` (how an edit was made; absent for generation)."""
        if self.scorer is None:
            raise ValueError("no scorer: the pipeline was built without an oracle; build it with scorer=... "
                             "(command line: --scorer)")
        sched = self.student.scheduler
        extra = {}
        controlnet = getattr(self.student, "controlnet", None)
        if controlnet is not None:
            extra["controlnet"] = {"path": str(getattr(controlnet.config, "_name_or_path", "")),
                                   "weights": self._weights_digest("controlnet", controlnet)}
        if task is not None:
            extra["task"] = dict(task)
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
        from .routes import calibration_digest

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
        routing: str | None = None,
        seed: int = 0,
        generator: Sequence[torch.Generator] | None = None,
        batch_size: int = 16,
        output_type: str = "np",
        score: bool | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | None = None,
        teacher_prob: float | None = None,
        teacher_at: Sequence[int] | None = None,
        cascade=None,
    ) -> TandemOutput:
        """Generate one image per prompt.

        Args:
            mode: "adaptive" (Algorithm 1), or a baseline through the same code: "student" (student
                only), "teacher" (teacher only, from the same initial noise), "refine-all" (every
                student image refined, no oracle); or "mixed" (teacher and student in one trajectory:
                ``teacher_prob`` / ``teacher_at`` below).
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
            routing: "threshold" (the default: every image scoring below tau goes to the teacher) or
                "budget-exact" (with ``budget`` alone: exactly the lowest-scoring images that the budget pays
                for, so that this call's mean cost never exceeds it; no calibration needed).
            seed: image i uses a generator seeded from ``(seed, i)``; or pass ``generator``, one per prompt.
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
            teacher_prob / teacher_at: mode "mixed" (DDIL's covariate-shift study, :mod:`tandem.mixed`): one
                trajectory on a shared DDIM grid whose student transitions the teacher takes with probability
                p_T (drawn per image from its generator), or at the student timesteps ``teacher_at``; exactly
                one. There ``teacher_steps`` is the teacher's grid, a multiple of the student's steps [8 per
                student step], and the teacher guides at ``teacher_guidance_scale``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
        if mode == "mixed":
            self._refuse_in_mixed(handoff, teacher_scheduler=teacher_scheduler, strategy=strategy,
                                  rollback_sigma=rollback_sigma, rollback_convention=rollback_convention, score=score,
                                  control_image=control_image,
                                  controlnet_conditioning_scale=controlnet_conditioning_scale,
                                  accept_threshold=accept_threshold, percentile=percentile, budget=budget,
                                  routing=routing, cascade=cascade)
            from .mixed import generate_mixed

            return generate_mixed(self, prompts, teacher_prob=teacher_prob, teacher_at=teacher_at,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  teacher_steps=teacher_steps, teacher_guidance_scale=teacher_guidance_scale, seed=seed,
                                  generator=generator, batch_size=batch_size, output_type=output_type,
                                  callback=callback)
        if teacher_prob is not None or teacher_at is not None:
            raise ValueError(f"teacher_prob/teacher_at (--teacher-prob/--teacher-at) apply to mode='mixed' (--mode "
                             f"mixed), not {mode!r}")
        if handoff not in HANDOFFS:
            raise ValueError(f"unknown handoff {handoff!r}; expected one of {', '.join(HANDOFFS)}")
        batch_size = count(batch_size, "batch_size")
        seed = count(seed, "seed", minimum=0)
        steps = count(self._setting("num_inference_steps", num_inference_steps, 4), "num_inference_steps")
        guidance = self.student_guidance(guidance_scale)
        route = None
        if (mode == "adaptive" and budget is not None and self.routes is not None and routing in (None, "threshold")
                and cascade is None
                and all(v is None for v in (strategy, teacher_steps, teacher_scheduler, rollback_sigma,
                                            rollback_convention, accept_threshold, percentile))):
            # a budget alone: the route table's best settings at that cost (explicit settings opt out)
            self.routes.check(self.route_fingerprint(steps, guidance, teacher_guidance_scale))
            route = self.routes.choose(budget)
            if route is not None and route.strategy is None:  # the student alone is the best at this budget
                accept_threshold = float("-inf")
            elif route is not None:
                strategy, teacher_scheduler = route.strategy, route.teacher_scheduler
                teacher_steps, rollback_sigma, percentile = route.teacher_steps, route.rollback_sigma, route.percentile
        cascade, chosen = self._cascade(cascade, mode, steps, guidance, budget, routing,
                                        dict(accept_threshold=accept_threshold, percentile=percentile,
                                             strategy=strategy, teacher_steps=teacher_steps,
                                             teacher_scheduler=teacher_scheduler, rollback_sigma=rollback_sigma,
                                             rollback_convention=rollback_convention))
        if chosen is not None:  # a cascade table's point at this budget: its last gate's tau and teacher settings
            accept_threshold, budget = chosen.pop("tau"), None
            strategy, teacher_steps = chosen["teacher"].get("strategy"), chosen["teacher"].get("teacher_steps")
            teacher_scheduler = chosen["teacher"].get("teacher_scheduler")
            rollback_sigma = chosen["teacher"].get("rollback_sigma")
        t_steps = count(self._setting("teacher_steps", teacher_steps, 25), "teacher_steps")
        t_guidance = self.teacher_guidance(teacher_guidance_scale)
        t_sched = self._setting("teacher_scheduler", teacher_scheduler, "dpm")
        strategy = self._setting("strategy", strategy, "refine")
        sigma = _rollback_sigma(self._setting("rollback_sigma", rollback_sigma, 0.5))
        convention = self._setting("rollback_convention", rollback_convention, "paper")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if (mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")) and self.teacher is None:
            raise ValueError("this teacher is an image-to-image pipeline: it can only refine")
        if generator is not None and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts (one per prompt)")
        if mode != "teacher":
            sampler_steps(steps, self.student.scheduler, "num_inference_steps", "the student")

        improves = mode == "refine-all" or (mode == "adaptive")
        regenerates = mode == "teacher" or (mode == "adaptive" and strategy == "regenerate")
        if mode == "adaptive" and regenerates:
            _check_shared_latents(self.student, self._teacher_any,
                                  "regeneration starts the teacher from the student's initial noise",
                                  "refine with handoff='pixel' instead (--strategy refine --handoff pixel)")
        elif improves and handoff == "latent":
            _check_shared_latents(self.student, self._teacher_any,
                                  "a latent hand-off gives the teacher the student's latents",
                                  "hand off in pixels: handoff='pixel' (--handoff pixel)")
        refine = None
        if improves and (mode == "refine-all" or strategy == "refine"):
            refine = refine_schedule(self._teacher_scheduler(t_sched), t_steps, sigma, convention)
        elif regenerates:
            sampler_steps(t_steps, self._teacher_scheduler(t_sched), "teacher_steps", "the teacher")
        student_cost = steps * unet_evals_per_step(self.student, guidance)
        teacher_step_cost = unet_evals_per_step(self._teacher_any, t_guidance)
        improve_cost = (refine.steps if refine is not None else t_steps) * teacher_step_cost

        cut = self._cutoff(mode, routing, len(prompts), accept_threshold, percentile, None if route else budget,
                           steps, guidance, student_cost, improve_cost)
        tau, k, note, routing = cut.tau, cut.k, cut.note, cut.routing
        do_score = mode == "adaptive" or bool(score)
        if do_score and self.scorer is None:
            raise ValueError(NO_SCORER)

        n = len(prompts)
        controls = self._controls(control_image, n)
        c_scale = finite_number(self._setting("controlnet_conditioning_scale", controlnet_conditioning_scale, 1.0),
                                "controlnet_conditioning_scale")
        gens = list(generator) if generator is not None else [prompt_generator(seed, i) for i in range(n)]
        pipe0 = self.student if mode != "teacher" else self._teacher_any
        noise = initial_latents(pipe0, seed, list(range(n)), gens)
        ledger = CostLedger(n, self._counted_modules())

        def draw_at(level_steps: int) -> Callable[[list[int]], torch.Tensor]:
            def draw(idx: list[int]) -> torch.Tensor:  # the student, from each image's initial noise
                return self.student([prompts[i] for i in idx], num_inference_steps=level_steps,
                                    guidance_scale=guidance, latents=noise[idx], generator=[gens[i] for i in idx],
                                    output_type="latent", **self._control_kwargs(self.student, controls, idx,
                                                                                 c_scale)).images
            return draw

        def gate_at(threshold: float) -> Callable[[np.ndarray], list[int]]:  # below the level's threshold: on
            return lambda level_scores: [int(j) for j in np.flatnonzero(~(level_scores >= threshold))]

        draw = draw_at(steps)
        # a cascade's levels before this student; one whose threshold keeps no image is not drawn
        drawn_levels = [] if cascade is None else [(n, t) for n, t in zip(cascade.steps, cascade.thresholds)
                                                   if np.isfinite(t)]
        levels = [(draw_at(n), gate_at(t)) for n, t in drawn_levels]
        level_steps = [n for n, _ in drawn_levels] + [steps]  # the steps of each level run.levels lists

        def to_teacher(scores: np.ndarray) -> list[int]:  # of the last level's images (positions), those improved
            if mode in ("teacher", "refine-all"):
                return list(range(len(scores)))
            return cut.improved(scores) if mode == "adaptive" else []

        def improve(idx: list[int], latents: list) -> torch.Tensor:  # regenerate from the noise, or refine
            ps, gs = [prompts[i] for i in idx], [gens[i] for i in idx]
            if regenerates:
                self.teacher.scheduler = self._teacher_scheduler(t_sched)
                return self.teacher(ps, num_inference_steps=t_steps, guidance_scale=t_guidance, latents=noise[idx],
                                    generator=gs, output_type="latent",
                                    **self._control_kwargs(self.teacher, controls, idx, c_scale)).images
            self.teacher_img2img.scheduler = self._teacher_scheduler(t_sched)
            start_image = torch.cat([latents[i] for i in idx])
            if handoff == "pixel":
                start_image = self._pixels(self.student, start_image, idx)
                ledger.add("vae_encode", idx)
            return self.teacher_img2img(ps, image=start_image, strength=refine.strength,
                                        num_inference_steps=refine.num_inference_steps, guidance_scale=t_guidance,
                                        generator=gs, output_type="latent",
                                        **self._control_kwargs(self.teacher_img2img, controls, idx, c_scale)).images

        run = self._phases(prompts, batch_size, ledger, None if mode == "teacher" else draw, to_teacher, improve,
                           do_score, callback, levels)
        latents, images, scores, todo = run.latents, run.images, run.scores, run.improved
        path = {"teacher": "teacher", "refine-all": "refined"}.get(mode, "refined" if strategy == "refine"
                                                                  else "regenerated")

        todo_set = set(todo)
        level_sets = [set(members) for members in run.levels]
        records = []
        for i in range(n):
            if mode == "student":
                taken = "student"
            elif i in todo_set:
                taken = path
            else:
                taken = "accepted"
            rec = image_record(i, prompts[i], taken, prompt_seed(seed, i) if generator is None else None, ledger,
                               scores[i], tau)
            if taken == "refined":
                rec["rollback_sigma"] = refine.sigma
                rec["teacher_steps_run"] = refine.steps
            if cascade is not None:
                rec["cascade_levels"] = [n for n, members in zip(level_steps, level_sets) if i in members]
            records.append(rec)
        settings = {
            "mode": mode, "num_inference_steps": steps, "guidance_scale": guidance, "teacher_steps": t_steps,
            "teacher_guidance_scale": t_guidance, "teacher_scheduler": t_sched, "strategy": strategy,
            "rollback_sigma": sigma, "rollback_convention": convention, "handoff": handoff,
            "accept_threshold": tau, "percentile": k, "budget": budget, "routing": routing,
            "route": None if route is None else asdict(route),
        }
        if cascade is not None:
            settings["cascade"] = {"steps": list(cascade.steps),  # a threshold None keeps no image at its level
                                   "thresholds": [float(t) if np.isfinite(t) else None for t in cascade.thresholds],
                                   "chosen": chosen}
        if controls is not None:
            settings["controlnet_conditioning_scale"] = c_scale
        summary = self._summary(records, settings, run.timings, run.seconds, student_cost, improve_cost, refine, note)
        return TandemOutput(_final(images, latents, output_type), records, summary,
                            None if mode == "teacher" else run.student_images)

    def _cascade(self, cascade, mode: str, steps: int, guidance: float, budget, routing,
                 given: dict) -> tuple[object, dict | None]:
        """The cascade of a call: None, a ``Cascade`` as given, or a ``CascadeTable``'s best point at ``budget``
        (then also returned: its last tau and teacher settings, for a call that set none of them)."""
        from .cascade import Cascade, CascadeTable, check_levels

        if cascade is None:
            return None, None
        if mode != "adaptive":
            raise ValueError(f"a cascade applies to mode='adaptive', not {mode!r}")
        if isinstance(cascade, Cascade):
            if budget is not None:
                raise ValueError("a budget needs a cascade table (tandem.cascade.CascadeTable: `tandem calibrate "
                                 "--cascade`), which knows what each level costs; a Cascade takes thresholds")
            check_levels(cascade.steps, steps, "cascade steps")
            return cascade, None
        if not isinstance(cascade, CascadeTable):
            raise TypeError(f"cascade must be a Cascade or a CascadeTable, got {type(cascade).__name__}")
        set_ = [name for name, value in given.items() if value is not None]
        if budget is None or set_ or routing not in (None, "threshold"):
            raise ValueError("a cascade table takes a budget alone (it chooses the thresholds and the teacher's "
                             "settings)" + (f"; this call also set {', '.join(set_)}" if set_ else ""))
        cascade.check(self.calibration_fingerprint(steps, guidance))
        if cascade.levels[-1] != steps:
            raise ValueError(f"this cascade table ends at the {cascade.levels[-1]}-step student; this call's "
                             f"student runs {steps} steps")
        point = cascade.choose(budget)
        plan, tau = cascade.cascade(point)  # tau +inf: every image that reaches this student goes to the teacher
        return plan, {**point, "tau": tau, "teacher": cascade.teacher, "budget": budget}

    def _phases(self, prompts: list[str], batch_size: int, ledger: CostLedger,
                draw: Callable[[list[int]], torch.Tensor] | None, route: Callable[[np.ndarray], list[int]],
                improve: Callable[[list[int], list], torch.Tensor], do_score: bool,
                callback: Callable[[str, int, int], None] | None,
                cascade: Sequence[tuple[Callable[[list[int]], torch.Tensor], Callable[[np.ndarray], list[int]]]] = (),
                ) -> Phases:
        """Algorithm 1, shared by generation and editing, in batches of ``batch_size``:

        1. the student phase: ``draw(idx)`` gives the student's latents of images ``idx`` (``draw`` None:
           the teacher alone), decoded, and scored by the oracle where ``do_score``; with a ``cascade`` of
           (draw, gate) levels, the first level's draw runs for every image and its gate passes the images
           the *next* level draws again (their scores replaced by the new ones), ``draw`` being the last level;
        2. routing: ``route(scores)``, given the scores of the images the last level drew (all of them without a
           cascade), picks the positions among them of the images the teacher improves: an image an earlier level
           kept is final;
        3. the teacher phase: ``improve(idx, latents)`` gives the teacher's latents of those images (from
           each image's noise or student latent), decoded in place of the student's.

        Every model call's UNet rows go to ``ledger`` (by role, per image), with the VAE decodes and the oracle
        calls; ``callback(phase, done, total)`` follows each batch."""
        n = len(prompts)
        latents: list[torch.Tensor | None] = [None] * n
        images: list[np.ndarray | None] = [None] * n
        student_images: list[np.ndarray | None] = [None] * n
        scores = np.full(n, np.nan)
        timings = dict.fromkeys(("student", "decode", "oracle", "teacher"), 0.0)
        levels: list[list[int]] = []
        t_start = time.perf_counter()

        def student_level(level_draw: Callable[[list[int]], torch.Tensor], members: list[int]) -> None:
            for start in range(0, len(members), batch_size):
                idx = members[start:start + batch_size]
                t0 = time.perf_counter()
                before = {role: ledger.rows(role) for role in ("student", "controlnet")}
                out = level_draw(idx)
                for role, rows in before.items():
                    ledger.charge(role, idx, rows)
                check_finite(out, "the student's latents", idx)
                t1 = time.perf_counter()
                decoded = self._decode(self.student, out, idx)
                ledger.add("vae_decode", idx)
                t2 = time.perf_counter()
                for j, i in enumerate(idx):
                    latents[i], images[i], student_images[i] = out[j:j + 1], decoded[j], decoded[j]
                if do_score:
                    scores[idx] = self._score([images[i] for i in idx], [prompts[i] for i in idx], idx)
                    ledger.add("oracle", idx)
                timings["student"] += t1 - t0
                timings["decode"] += t2 - t1
                timings["oracle"] += time.perf_counter() - t2
                if callback:
                    callback("student", min(start + batch_size, len(members)), len(members))

        with ledger.counting():
            members = list(range(n))  # the images the current level draws; after the loop, those the last one drew
            if draw is not None:
                for level_draw, gate in [*cascade, (draw, None)]:
                    student_level(level_draw, members)
                    levels.append(members)
                    if gate is not None:  # gate(the level's scores) -> positions, in members, of those drawn again
                        members = sorted(members[j] for j in gate(scores[members]))
            # an image a cascade level kept is final: only the last level's images are routed (positions in members)
            improved = [members[j] for j in route(scores[members])]
            for start in range(0, len(improved), batch_size):
                idx = improved[start:start + batch_size]
                t0 = time.perf_counter()
                before = {role: ledger.rows(role) for role in ("teacher", "student", "controlnet")}
                out = improve(idx, latents)
                ledger.charge("teacher", idx, before["teacher"])
                ledger.charge("controlnet", idx, before["controlnet"])
                if ledger.rows("student") != before["student"] and self.student.unet is not self._teacher_any.unet:
                    raise RuntimeError("the teacher call ran the student UNet")
                check_finite(out, "the teacher's latents", idx)
                t1 = time.perf_counter()
                decoded = self._decode(self._teacher_any, out, idx)
                ledger.add("vae_decode", idx)
                for j, i in enumerate(idx):
                    latents[i], images[i] = out[j:j + 1], decoded[j]
                timings["teacher"] += t1 - t0
                timings["decode"] += time.perf_counter() - t1
                if callback:
                    callback("teacher", min(start + batch_size, len(improved)), len(improved))
        return Phases(latents, images, student_images, scores, improved, timings, time.perf_counter() - t_start,
                      levels)

    @staticmethod
    def _refuse_in_mixed(handoff: str, **given) -> None:
        """Refuse, for mode "mixed", the arguments of the other modes that a call gave."""
        if [name for name in OPTIONS if given.pop(name) is not None]:
            raise ValueError(NOT_ADAPTIVE.format(mode="mixed"))
        unused = [name for name, value in given.items() if value is not None]
        if handoff != "latent":
            unused.append("handoff")
        if unused:
            raise ValueError(f"{', '.join(unused)} do not apply to mode='mixed' (the teacher takes whole transitions "
                             "by DDIM; no oracle or ControlNet takes part)")

    def calibrate(self, prompts: Sequence[str], num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int = 0, batch_size: int = 16,
                  callback: Callable[[str, int, int], None] | None = None, config: dict | None = None,
                  control_image=None) -> Calibration:
        """Score student samples of held-out ``prompts`` and keep them as a calibration (appendix C).
        With a ControlNet, ``control_image`` gives the held-out prompts' control images."""
        steps = count(self._setting("num_inference_steps", num_inference_steps, 4), "num_inference_steps")
        guidance = self.student_guidance(guidance_scale)
        out = self(prompts, mode="student", num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                   batch_size=batch_size, score=True, callback=callback, control_image=control_image)
        return self._calibration(out, steps, guidance, seed, config)

    def calibrate_cascade(self, prompts: Sequence[str], levels: Sequence[int], seed: int = 0, batch_size: int = 16,
                          callback: Callable[[str, int, int], None] | None = None, config: dict | None = None):
        """A ``CascadeTable`` (``tandem.cascade``) from held-out ``prompts``: the oracle's scores of each prompt's
        image at each student level (``levels``: the earlier students' steps, then this pipeline's student) and
        at the teacher level (every image improved by this pipeline's strategy and teacher settings), with what
        each level costs in UNet evaluations per image."""
        from .cascade import CascadeTable, check_levels

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
        scores.append(list(self._score(list(out.images), list(prompts))))
        costs.append(float(np.mean([r["unet_evals"]["teacher"] for r in out.records])))
        made = {"n_prompts": len(prompts), "seed": seed, **(config or {})}
        return CascadeTable([*levels, steps], np.array(scores), costs, self.calibration_fingerprint(steps, guidance),
                            teacher, made)

    # -- editing (SDEdit, section 4.2) -------------------------------------------------------------

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
            accept_threshold / percentile / budget: as for generation; percentile and budget need an
                *edit* calibration (``calibrate_edits``) for the same strength, passed as ``calibration``.
            routing: as for generation ("budget-exact" needs no calibration).
            Other arguments as for ``__call__``. With an ``edit_student``, it is the student here.
        """
        editor = self.editor()
        if editor is not self:
            return editor.edit(image, prompt, strength=strength, mode=mode, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, teacher_steps=teacher_steps,
                               teacher_guidance_scale=teacher_guidance_scale, teacher_scheduler=teacher_scheduler,
                               accept_threshold=accept_threshold, percentile=percentile, budget=budget,
                               routing=routing, calibration=calibration, seed=seed, generator=generator,
                               batch_size=batch_size,
                               output_type=output_type, score=score, callback=callback)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts")
        if mode not in ("adaptive", "student", "teacher"):
            raise ValueError(f"unknown edit mode {mode!r}; expected adaptive, student or teacher")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
        batch_size = count(batch_size, "batch_size")
        seed = count(seed, "seed", minimum=0)
        if self.teacher is None:
            raise ValueError("this teacher is an image-to-image pipeline: editing needs a text-to-image teacher")
        if getattr(self.student, "controlnet", None) is not None:
            raise ValueError("editing with a ControlNet is not supported; edit with the pipeline without it")
        strength = _strength(self._setting("edit_strength", strength, 0.6))
        steps = self._edit_student_steps(num_inference_steps)
        guidance = self.student_guidance(guidance_scale)
        t_steps = count(self._setting("edit_teacher_steps", teacher_steps, self.defaults.get("teacher_steps", 25)),
                        "teacher_steps")
        t_guidance = self.teacher_guidance(teacher_guidance_scale)
        t_sched = self._setting("teacher_scheduler", teacher_scheduler, "dpm")
        n = len(prompts)
        pixels = self._per_prompt(image, n, "input image")
        if generator is not None and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} prompts (one per prompt)")

        sampler_steps(steps, self.student.scheduler, "num_inference_steps", "the student")
        student_ts = edit_timesteps(self.student.scheduler, steps, strength)
        base = self._teacher_scheduler(t_sched)
        teacher_ts = teacher_edit_timesteps(base, student_ts[0], t_steps)
        student_cost = len(student_ts) * unet_evals_per_step(self.student, guidance)
        improve_cost = len(teacher_ts) * unet_evals_per_step(self.teacher, t_guidance)
        cut = self._cutoff(mode, routing, n, accept_threshold, percentile, budget, steps, guidance, student_cost,
                           improve_cost, calibration=calibration, task={"edit_strength": strength})
        tau, k, note, routing = cut.tau, cut.k, cut.note, cut.routing
        do_score = mode == "adaptive" or bool(score)
        if do_score and self.scorer is None:
            raise ValueError(NO_SCORER)

        gens = list(generator) if generator is not None else [prompt_generator(seed, i) for i in range(n)]
        chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        if mode != "student":
            _check_shared_latents(self.student, self.teacher, "an edit gives the teacher the input noised in the "
                                  "student's latent space", "edit with mode='student' (--mode student)")
        # x_t: the input's VAE mean noised with each image's own eps, on each model's schedule (they differ
        # for a student trained to zero terminal SNR, such as ADD's; else both get the same tensor)
        vae = self.student.vae
        schedule = NoiseSchedule(self.student.scheduler.alphas_cumprod)
        same = torch.equal(self.student.scheduler.alphas_cumprod, base.alphas_cumprod)
        teacher_schedule = schedule if same else NoiseSchedule(base.alphas_cumprod)
        noised, teacher_noised = [], []
        for idx in chunks:
            z = vae.encode((pixels[idx] * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
            check_finite(z, "the VAE's encoded inputs", idx)
            z = z * vae.config.scaling_factor
            eps = torch.cat([torch.randn(z[:1].shape, generator=gens[i], device=gens[i].device, dtype=z.dtype)
                             for i in idx]).to(z.device)
            noised.append(schedule.add_noise(z, eps, student_ts[0]))
            teacher_noised.append(noised[-1] if same else teacher_schedule.add_noise(z, eps, student_ts[0]))
        noised, teacher_noised = torch.cat(noised), torch.cat(teacher_noised)

        ledger = CostLedger(n, self._counted_modules())
        ledger.add("vae_encode", list(range(n)))  # each input, once

        def draw(idx: list[int]) -> torch.Tensor:  # the student, from the noised inputs on its img2img schedule
            return self.student([prompts[i] for i in idx], timesteps=student_ts, guidance_scale=guidance,
                                latents=noised[idx], generator=[gens[i] for i in idx], output_type="latent").images

        def to_teacher(scores: np.ndarray) -> list[int]:  # the images the teacher improves
            if mode == "teacher":
                return list(range(n))
            return cut.improved(scores) if mode == "adaptive" else []

        def improve(idx: list[int], _latents) -> torch.Tensor:  # the teacher edits the same noised input
            self.teacher.scheduler = copy.deepcopy(base)
            return self.teacher([prompts[i] for i in idx], timesteps=teacher_ts, guidance_scale=t_guidance,
                                latents=teacher_noised[idx], generator=[gens[i] for i in idx],
                                output_type="latent").images

        original = self.student.scheduler
        self.student.scheduler = copy.deepcopy(original)
        try:
            run = self._phases(prompts, batch_size, ledger, None if mode == "teacher" else draw, to_teacher, improve,
                               do_score, callback)
        finally:
            self.student.scheduler = original
        improved = set(run.improved)
        path = "teacher" if mode == "teacher" else "regenerated"
        records = []
        for i in range(n):
            taken = "student" if mode == "student" else (path if i in improved else "accepted")
            records.append({**image_record(i, prompts[i], taken, prompt_seed(seed, i) if generator is None else None,
                                           ledger, run.scores[i], tau),
                            "edit_strength": strength, "start_timestep": int(student_ts[0])})
        settings = {
            "task": "edit", "mode": mode, "edit_strength": strength, "num_inference_steps": steps,
            "guidance_scale": guidance, "student_timesteps": [int(t) for t in student_ts],
            "teacher_steps": t_steps, "teacher_timesteps": [int(t) for t in teacher_ts],
            "teacher_guidance_scale": t_guidance, "teacher_scheduler": t_sched, "strategy": "regenerate",
            "accept_threshold": tau, "percentile": k, "budget": budget, "routing": routing,
        }
        summary = self._summary(records, settings, run.timings, run.seconds, student_cost, improve_cost, None, note)
        return TandemOutput(_final(run.images, run.latents, output_type), records, summary,
                            None if mode == "teacher" else run.student_images)

    def calibrate_edits(self, images, prompts: Sequence[str], strength: float | None = None,
                        num_inference_steps: int | None = None, guidance_scale: float | None = None,
                        seed: int = 0, batch_size: int = 16, callback: Callable[[str, int, int], None] | None = None,
                        config: dict | None = None) -> Calibration:
        """Score student edits of held-out (image, prompt) pairs: the calibration of ``edit`` at ``strength``
        (of the ``edit_student`` where there is one)."""
        editor = self.editor()
        if editor is not self:
            return editor.calibrate_edits(images, prompts, strength, num_inference_steps, guidance_scale, seed,
                                          batch_size, callback, config)
        steps = self._edit_student_steps(num_inference_steps)
        guidance = self.student_guidance(guidance_scale)
        out = self.edit(images, prompts, strength=strength, mode="student", num_inference_steps=steps,
                        guidance_scale=guidance, seed=seed, batch_size=batch_size, score=True, callback=callback)
        return self._calibration(out, steps, guidance, seed, config,
                                 {"edit_strength": out.summary["settings"]["edit_strength"]})

    def _calibration(self, out: TandemOutput, steps: int, guidance: float, seed: int, config: dict | None,
                     task: dict | None = None) -> Calibration:
        """The calibration of a scored student run ``out``."""
        scores = np.array([r["student_score"] for r in out.records])
        made = {"n_prompts": len(scores), "seed": seed, "seconds": out.summary["seconds"]["total"], **(config or {})}
        return Calibration(scores, self.calibration_fingerprint(steps, guidance, task), made)

    def _edit_student_steps(self, num_inference_steps: int | None) -> int:
        """The student's edit steps: given, else the preset's ``edit_num_inference_steps`` (an edit starts
        part-way, so a preset may give the student more steps there), else its generation steps."""
        fallback = self.defaults.get("num_inference_steps", 4)
        return count(self._setting("edit_num_inference_steps", num_inference_steps, fallback), "num_inference_steps")

    # -- pieces --------------------------------------------------------------------------------

    def _routing(self, routing: str | None, mode: str) -> str:
        """The call's routing (:data:`ROUTINGS`), checked: a routing other than the default is adaptive only."""
        given = routing is not None
        routing = self._setting("routing", routing, "threshold")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {', '.join(ROUTINGS)}")
        if given and routing != "threshold" and mode != "adaptive":
            raise ValueError(f"routing={routing!r} (--budget-exact) applies to mode='adaptive', not {mode!r}")
        return routing

    def _cutoff(self, mode: str, routing: str | None, n: int, accept_threshold, percentile, budget, steps: int,
                guidance: float, student_cost: float, improve_cost: float, calibration: Calibration | None = None,
                task: dict | None = None) -> Cutoff:
        """The :class:`Cutoff` of a call of ``n`` images (generation, or an edit's ``task``): its routing checked,
        and in adaptive mode tau (:meth:`_threshold`) or the budget-exact count; the adaptive arguments given in
        another mode are refused."""
        routing = self._routing(routing, mode)
        if mode != "adaptive":
            if any(v is not None for v in (accept_threshold, percentile, budget)):
                raise ValueError(NOT_ADAPTIVE.format(mode=mode))
            return Cutoff(routing)
        if routing == "budget-exact":
            return Cutoff(routing, exact=budget_exact_count(n, budget, student_cost, improve_cost, accept_threshold,
                                                            percentile))
        return Cutoff(routing, *self._threshold(accept_threshold, percentile, budget, steps, guidance, student_cost,
                                                improve_cost, calibration=calibration, task=task))

    def _threshold(self, accept_threshold, percentile, budget, steps, guidance, student_cost, improve_cost,
                   calibration: Calibration | None = None, task: dict | None = None):
        """(tau, k, note): the cut-off of an adaptive call, the percentile it came from (None for a given
        tau), and a sentence when tied calibration scores send another share than k to the teacher."""
        given = [name for name, v in (("accept_threshold", accept_threshold), ("percentile", percentile),
                                      ("budget", budget)) if v is not None]
        if not given and self.defaults.get("percentile") is not None:
            percentile, given = self.defaults["percentile"], ["percentile"]
        if len(given) != 1:
            raise ValueError("adaptive mode needs exactly one of accept_threshold (tau; --threshold), percentile "
                             f"(k; --percentile) or budget (--budget); got {_spelled(given) if given else 'none'}")
        if accept_threshold is not None:
            return threshold_value(accept_threshold, "accept_threshold"), None, None
        if percentile is not None:
            percentile = finite_number(percentile, "percentile", low=0, high=100)
        if budget is not None:
            budget = finite_number(budget, "budget", low=0, low_open=True)
        if calibration is None:
            calibration = self.calibration if task is None else self.edit_calibrations.get(task["edit_strength"])
        if calibration is None:
            if task:
                strength = task["edit_strength"]
                make = (f"an edit calibration for strength {strength:g}: make one with pipe.edit_calibrations"
                        f"[{strength:g}] = pipe.calibrate_edits(images, prompts, strength={strength:g}) "
                        "(command line: tandem calibrate --edits)")
            else:
                make = ("a calibration: make one with pipe.calibration = pipe.calibrate(prompts) (command line: "
                        "tandem calibrate, then --calibration FILE)")
            raise ValueError(f"{_spelled(given)} needs {make}, or pass accept_threshold (--threshold)")
        calibration.check(self.calibration_fingerprint(steps, guidance, task),
                          RECALIBRATE_EDITS if task else RECALIBRATE)
        k = percentile if percentile is not None else percentile_k_for_budget(budget, student_cost, improve_cost)
        note = calibration.tie_note(k)
        if note is not None:
            note = (f"percentile {k:g}: {note}" if budget is None else
                    f"budget {budget:g} asks for percentile {k:.1f}: {note}; the run spends less than the budget")
            warnings.warn(note, CalibrationTieWarning, stacklevel=4)
        return calibration.threshold(k), float(k), note

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
                raise ValueError("this pipeline has a ControlNet: pass control_image (--control-image), one per "
                                 "prompt or one for all")
            return None
        if not has_controlnet:
            raise ValueError("control_image needs a ControlNet: build the pipeline with "
                             "TandemPipeline.with_controlnet(...) (command line: --controlnet)")
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

    @staticmethod
    def _control_kwargs(pipe, controls: torch.Tensor | None, idx: list[int], scale: float) -> dict:
        if controls is None:
            return {}
        key = "control_image" if _accepts(pipe, "control_image") else "image"  # img2img vs text2img ControlNet
        return {key: controls[idx], "controlnet_conditioning_scale": scale}

    def _score(self, images: list[np.ndarray], prompts: list[str], idx: list[int] | None = None) -> np.ndarray:
        """The oracle's scores of uint8 images (prompt indices ``idx``, default 0 .. B-1), refusing NaN/inf
        (a NaN score is never below tau: the image would pass unseen)."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        s = torch.as_tensor(self.scorer(x, prompts), dtype=torch.float32).cpu()
        if s.shape != (len(images),):
            raise ValueError(f"the scorer returned shape {list(s.shape)} for {len(images)} images; expected "
                             f"[{len(images)}] (one score per image)")
        check_finite(s, "the oracle's scores", idx)
        return s.numpy()

    @staticmethod
    def _decode(pipe, latents: torch.Tensor, idx: list[int] | None = None) -> list[np.ndarray]:
        """uint8 images [H, W, 3] of latents (prompt indices ``idx``), refusing NaN/inf."""
        return _to_uint8(TandemPipeline._pixels(pipe, latents, idx).permute(0, 2, 3, 1).float().cpu().numpy())

    @staticmethod
    def _pixels(pipe, latents: torch.Tensor, idx: list[int] | None = None) -> torch.Tensor:
        x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        check_finite(x, "the VAE's decoded images", idx)
        return (x / 2 + 0.5).clamp(0, 1)

    def _summary(self, records, settings, timings, total, student_cost, improve_cost, refine,
                 calibration_note: str | None = None) -> dict:
        model_time = timings["student"] + timings["teacher"]
        return {
            **summarize_records(records),
            "student_cost": student_cost,
            "improve_cost": improve_cost,
            "refine": None if refine is None else refine.__dict__,
            "settings": settings,
            # tied calibration scores: the share sent to the teacher is not the k asked for (or None)
            "calibration_note": calibration_note,
            "student_own_components": list(self.student_own_components),
            "seconds": {**timings, "total": total, "other": total - model_time - timings["decode"] - timings["oracle"]},
        }

    # -- construction ----------------------------------------------------------------------------

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
                    scorer=None, calibration: Calibration | str | None = None) -> TandemPipeline:
        """A pipeline from a preset (``tandem.presets``): ``world`` or a real-tier preset."""
        from .presets import load_preset

        return load_preset(name, device=device, dtype=dtype, scorer=scorer, calibration=calibration)
