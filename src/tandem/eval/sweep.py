"""Per-image results of sampler configurations on a fixed prompt list, cached so that a stopped
experiment resumes where it stopped.

Every configuration draws prompt i from the same per-prompt generator ``(seed, i)``: a teacher
run is exactly what the adaptive pipeline's *regeneration* gives image i, and a refine-all run
exactly what its *refinement* gives (an image's result does not depend on which other images the
oracle rejected). So the adaptive pipeline's result for any percentile k is composed from the
student run and one teacher or refine-all run without drawing again (``compose_adaptive``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cascade import cascade_costs, final_levels, threshold_array
from ..checks import first_difference, read_json_file
from ..outputs import atomic_path, atomic_write_text
from ..pipeline.drafts import draft_generators
from .features import frechet_distance
from .judges import ExactJudge, Judge


@dataclass(frozen=True)
class SamplerConfig:
    """One way of drawing an image per prompt through ``TandemPipeline``."""

    mode: str                    # "teacher", "student", "refine-all" or "mixed"
    steps: int                   # teacher steps (teacher, refine-all) or student steps (student, mixed)
    scheduler: str = "dpm"       # the teacher's sampler
    rollback_sigma: float | None = None  # refine-all
    # mixed (tandem.pipeline.mixed): the teacher's DDIM grid, and p_T or the student timesteps where the teacher steps in
    teacher_steps: int | None = None
    teacher_prob: float | None = None
    teacher_at: tuple[int, ...] | None = None
    drafts: int = 1              # student, refine-all: the student's drafts per prompt, the oracle's best kept

    def __post_init__(self):
        if self.mode not in ("teacher", "student", "refine-all", "mixed"):
            raise ValueError(f"unknown sampler mode {self.mode!r}; expected teacher, student, refine-all or mixed")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if (self.mode == "refine-all") != (self.rollback_sigma is not None):
            raise ValueError("a rollback sigma goes with mode 'refine-all' and only with it")
        mixed = (self.teacher_steps, self.teacher_prob, self.teacher_at)
        one_choice = (self.teacher_prob is None) != (self.teacher_at is None)
        if self.mode == "mixed" and (self.teacher_steps is None or not one_choice):
            raise ValueError("mode 'mixed' needs teacher_steps and exactly one of teacher_prob or teacher_at")
        if self.mode != "mixed" and any(v is not None for v in mixed):
            raise ValueError("teacher_steps, teacher_prob and teacher_at go with mode 'mixed' and only with it")
        if self.drafts != 1 and (self.drafts < 1 or self.mode not in ("student", "refine-all")):
            raise ValueError(f"drafts go with mode 'student' or 'refine-all' and are >= 1, got {self.drafts}")

    @property
    def name(self) -> str:
        return self._name + (f"_drafts{self.drafts}" if self.drafts > 1 else "")

    @property
    def _name(self) -> str:
        if self.mode == "student":
            return f"student{self.steps}"
        if self.mode == "mixed":
            who = (f"p{self.teacher_prob:g}" if self.teacher_prob is not None
                   else "at" + "-".join(map(str, self.teacher_at)))
            return f"mixed{self.steps}_ddim{self.teacher_steps}_{who}"
        if self.mode == "teacher":
            return f"{self.scheduler}{self.steps}"
        return f"refine_{self.scheduler}{self.steps}_sigma{self.rollback_sigma:g}"

    def call_kwargs(self) -> dict:
        if self.drafts > 1:
            return {**self._call_kwargs(), "drafts": self.drafts}
        return self._call_kwargs()

    def _call_kwargs(self) -> dict:
        if self.mode == "student":
            return {"mode": "student", "num_inference_steps": self.steps, "score": True}
        if self.mode == "mixed":
            return {"mode": "mixed", "num_inference_steps": self.steps, "teacher_steps": self.teacher_steps,
                    "teacher_prob": self.teacher_prob, "teacher_at": self.teacher_at}
        kwargs = {"mode": self.mode, "teacher_steps": self.steps, "teacher_scheduler": self.scheduler}
        if self.mode == "refine-all":
            kwargs["rollback_sigma"] = self.rollback_sigma
        return kwargs


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def run_config(pipe, prompts: list[str], *, mode: str, **kwargs):
    """One sampler configuration's call: ``pipe.mixed`` for mixed rollouts, else ``pipe(mode=...)``."""
    return pipe.mixed(prompts, **kwargs) if mode == "mixed" else pipe(prompts, mode=mode, **kwargs)


class Sweep:
    """Runs configurations of one pipeline on one prompt list and seed; caches each in ``cache_dir``.

    A cached configuration is reused only if it was made for the same prompts, seed and pipeline
    settings (``identity``); anything else is an error rather than a silent mix.
    """

    def __init__(self, pipe, prompts: list[str], seed: int, cache_dir: str | Path, batch_size: int = 100,
                 identity: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
                 call: Callable | None = None, judge: Judge | None = None, images_from: str | Path | None = None):
        """``call(indices, prompts, **kwargs)`` replaces ``pipe(prompts, **kwargs)`` for the prompts of those
        indices, e.g. to pass their control images or to edit their inputs (``pipe.edit``); whatever it
        binds belongs in ``identity``. ``judge`` scores each image (default: ShapesWorld's exact checker).
        ``images_from``: another sweep's cache, made with the same prompts, seed, models and judge but perhaps
        another oracle; a configuration cached there is taken from it and re-scored by this pipeline's oracle
        (no configuration a sweep runs involves the oracle, so its images are this sweep's own)."""
        self.pipe, self.prompts, self.seed, self.batch_size = pipe, list(prompts), seed, batch_size
        self.judge = judge or ExactJudge()
        self.call = call or (lambda _indices, prompts, **kwargs: run_config(pipe, prompts, **kwargs))
        self.progress = progress  # progress(task, done, total) after each batch
        self.dir = Path(cache_dir)
        identity = {"prompts": prompts_digest(self.prompts), "n": len(self.prompts), "seed": seed,
                    "models": pipe.fingerprint(), "judge": self.judge.describe(), **(identity or {})}
        self.identity = json.loads(json.dumps(identity))  # as it reads back from identity.json
        # every check before anything is written: a refused run leaves --out as it was
        self.images_from = None if images_from is None else Path(images_from)
        if self.images_from is not None:
            source = self.images_from / "identity.json"
            if not source.is_file():
                raise ValueError(f"{self.images_from} holds no cached sweep (no identity.json)")
            made = read_json_file(source, "cached sweep identity")
            if _without_oracle(made) != _without_oracle(self.identity):
                raise ValueError(f"{self.images_from} caches images of other prompts, seed, models or judge "
                                 f"({first_difference(_without_oracle(made), _without_oracle(self.identity))}); "
                                 "only the oracle may differ")
        marker = self.dir / "identity.json"
        if marker.exists():
            made = read_json_file(marker, "cached sweep identity")
            if made != self.identity:
                raise ValueError(f"{self.dir} caches results of other prompts or settings "
                                 f"({first_difference(made, self.identity)}); choose another out=...")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps(self.identity, indent=1) + "\n")

    def run(self, config: SamplerConfig, log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
        """Per-image arrays: ``images`` (uint8 [N, H, W, 3]), ``score`` and (exact judge) ``satisfied``,
        ``oracle`` (the oracle's score of the final image), ``evals`` (UNet evaluations); plus
        ``seconds`` of the run (summed over chunks and processes).

        The prompts are drawn in chunks of ``batch_size``, each saved as it finishes, so a stopped run
        resumes at the first unfinished chunk. Under ``accelerate launch`` (several processes) chunk c
        goes to process c mod P; the main process merges the chunks. Image i always draws from the
        generator of ``(seed, i)``, so neither chunking nor sharding changes a result."""
        path = self.dir / f"{config.name}.npz"
        rank, world, barrier = _processes()
        if not path.exists() and self.images_from is not None and (self.images_from / path.name).exists():
            if rank == 0:
                self._rescore(self.images_from / path.name, path, log)
            barrier()
        if path.exists():
            return _load_npz(path)
        n = len(self.prompts)
        starts = list(range(0, n, self.batch_size))
        for c, start in enumerate(starts):
            part = self._part(config, start)
            if c % world == rank and not part.exists():
                self._run_chunk(config, list(range(start, min(start + self.batch_size, n))), part)
        barrier()
        if rank == 0:
            parts = []
            for start in starts:
                parts.append(_load_npz(self._part(config, start)))
            data = {key: np.concatenate([c[key] for c in parts]) for key in parts[0] if key != "seconds"}
            data["seconds"] = np.array(sum(float(c["seconds"]) for c in parts))
            _save_npz(path, data)
            for start in starts:
                self._part(config, start).unlink()
            if log:
                quality = (f"{100 * data['satisfied'].mean():.1f}% satisfied" if "satisfied" in data
                           else f"mean score {data['score'].mean():.4f}")
                log(f"{config.name}: {quality}, {data['evals'].mean():.1f} UNet evals/image, "
                    f"{float(data['seconds']):.0f}s")
        barrier()
        return _load_npz(path)

    def _rescore(self, source: Path, path: Path, log: Callable[[str], None] | None) -> None:
        """``source``'s results with the oracle column scored again by this pipeline's oracle."""
        data = _load_npz(source)
        data["oracle"] = np.concatenate([
            self._oracle(list(data["images"][s:s + self.batch_size]), self.prompts[s:s + self.batch_size])
            for s in range(0, len(self.prompts), self.batch_size)])
        _save_npz(path, data)
        if log:
            log(f"{path.stem}: the images of {source}, re-scored by this oracle")

    def _oracle(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """The pipeline's oracle scores of final images (NaN without an oracle); the scorer batches internally."""
        if self.pipe.scorer is None:
            return np.full(len(prompts), np.nan)
        return self.pipe.score(images, prompts).astype(np.float64)

    def _part(self, config: SamplerConfig, start: int) -> Path:
        return self.dir / f"{config.name}.part{start:06d}.npz"

    def _run_chunk(self, config: SamplerConfig, idx: list[int], part: Path) -> None:
        t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in idx]
        callback = None
        if self.progress is not None:
            def callback(phase: str, done: int, total: int) -> None:
                self.progress(f"{config.name} ({phase})", idx[0] + done, len(self.prompts))
        # image i draws from (seed, i) whatever its chunk; each of its drafts from (seed, i, draft)
        out = self.call(idx, prompts, generator=draft_generators(self.seed, idx, config.drafts),
                        batch_size=self.batch_size, callback=callback, **config.call_kwargs())
        judged = self.judge(out.images, prompts)
        if config.mode == "student":
            oracle = np.array([r["student_score"] for r in out.records], np.float64)
        else:
            oracle = self._oracle(out.images, prompts)
        extra = {}
        if config.mode == "mixed":  # the share of its transitions the teacher took, per image
            extra["teacher_share"] = np.array([np.mean([w == "teacher" for w in r["transitions"]])
                                               for r in out.records])
        _save_npz(part, {"images": np.stack(out.images), **judged, **extra,
                         "oracle": oracle,
                         "evals": np.array([r["unet_evals"]["total"] for r in out.records], np.float64),
                         "seconds": np.array(time.perf_counter() - t0)})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """A cached result (arrays only: ``allow_pickle`` stays off); a damaged file is a ValueError naming it and
    what to do."""
    import zipfile

    try:
        with np.load(path) as data:
            return dict(data)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"cached result {path} is damaged ({e}); delete it and run the experiment again to draw "
                         "it anew (its other cached results are reused)") from None


def _without_oracle(identity: dict) -> dict:
    """A sweep's identity less its oracle's fingerprint (what its cached images do not depend on)."""
    return {**identity, "models": {k: v for k, v in identity.get("models", {}).items() if k != "scorer"}}


def _save_npz(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically, through a fresh temporary file (nothing beside ``path`` is followed)."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: np.savez adds no ".npz" suffix
        np.savez(f, **data)


def is_main_process() -> bool:
    """False in every process but the first under ``accelerate launch`` (they skip writing reports)."""
    return _processes()[0] == 0


def _processes() -> tuple[int, int, Callable[[], None]]:
    """(rank, number of processes, barrier) under ``accelerate launch``; (0, 1, no-op) otherwise."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true")
    return state.process_index, state.num_processes, state.wait_for_everyone


def compose_adaptive(student: dict[str, np.ndarray], improved: dict[str, np.ndarray], tau: float,
                     improved_includes_student: bool) -> dict[str, np.ndarray]:
    """The adaptive pipeline's per-image results at cut-off ``tau``: images whose student oracle score
    is below tau take the improved (teacher or refined) result, the others stay the student's.

    ``improved_includes_student``: the improved run's ``evals`` already count the student's steps
    (refine-all); a teacher run's do not (regeneration adds the student's cost)."""
    rejected = student["oracle"] < tau
    extra = 0 if improved_includes_student else student["evals"]
    composed = {"rejected": rejected, "evals": np.where(rejected, improved["evals"] + extra, student["evals"])}
    for key in ("satisfied", "score", "features", "fid_features", "clip_score", "preservation", "fidelity"):
        if key in student and key in improved:
            mask = rejected.reshape(-1, *([1] * (np.ndim(student[key]) - 1)))
            composed[key] = np.where(mask, improved[key], student[key])
    return composed


def compose_prerouted(composed: dict[str, np.ndarray], teacher: dict[str, np.ndarray],
                      ahead: np.ndarray) -> dict[str, np.ndarray]:
    """``composed`` (an adaptive point's per-image results) with the prompts ``ahead`` (a boolean mask) sent
    straight to the teacher: their results are the ``teacher`` run's (drawn from the prompt's own noise, as a
    pre-routed prompt is) and their cost its alone (the student drew nothing for them)."""
    out = {**composed, "rejected": composed["rejected"] | ahead, "evals": np.where(ahead, teacher["evals"],
                                                                                  composed["evals"])}
    for key in ("satisfied", "score", "features", "fid_features", "clip_score", "preservation", "fidelity"):
        if key in composed and key in teacher:
            mask = ahead.reshape(-1, *([1] * (np.ndim(composed[key]) - 1)))
            out[key] = np.where(mask, teacher[key], composed[key])
    return out


def compose_cascade(levels: list[dict[str, np.ndarray]], improved: dict[str, np.ndarray], thresholds,
                    improved_includes_student: bool) -> dict[str, np.ndarray]:
    """A cascade's per-image results (``tandem.cascade``): every image drawn by ``levels[0]``; one scoring at
    least its level's threshold stays, the others go on to the next level's image (each level's run is drawn
    from the same noise, so its cost adds up; a level whose threshold keeps no image is skipped); below the
    last level's threshold, the improved result.
    ``improved_includes_student``: the improved run's ``evals`` count the last level's student (refine-all)."""
    n = len(levels[0]["evals"])
    thresholds = threshold_array(thresholds)[None]
    chosen = final_levels(np.stack([run["oracle"] for run in levels]), thresholds)
    improve = improved["evals"] - (levels[-1]["evals"] if improved_includes_student else 0)
    evals = cascade_costs(chosen, np.stack([run["evals"] for run in levels]), improve, thresholds)[0]
    chosen = chosen[0]
    composed = {"rejected": chosen == len(levels), "evals": evals, "level": chosen}
    runs = [*levels, improved]
    for key in ("satisfied", "score", "features", "fid_features", "clip_score", "preservation", "fidelity"):
        if all(key in r for r in runs):
            composed[key] = np.stack([r[key] for r in runs])[chosen, np.arange(n)]
    return composed


def summary(per_image: dict[str, np.ndarray], reference_features: np.ndarray | None = None,
            fid_reference: np.ndarray | None = None) -> dict:
    """Accuracy (an exact judge's share satisfied), mean judge score and cost; the CLIP score, the
    Fréchet distance to ``reference_features`` (e.g. renderings of the same prompts) and the Inception
    FID to ``fid_reference`` where the per-image values are there."""
    out = {"accuracy": float(np.mean(per_image["satisfied"]))} if "satisfied" in per_image else {}
    out.update(mean_score=float(np.mean(per_image["score"])), unet_evals_mean=float(np.mean(per_image["evals"])))
    if "clip_score" in per_image:
        out["clip_score"] = float(np.mean(per_image["clip_score"]))

    if "features" in per_image and reference_features is not None:
        out["frechet_distance"] = frechet_distance(per_image["features"], reference_features)
    if "fid_features" in per_image and fid_reference is not None:
        out["fid"] = frechet_distance(per_image["fid_features"], fid_reference)
    return out


def provenance(pipe) -> dict:
    """What an experiment's results were made with, beyond its config: the digests of the pipeline's
    weights and its preset defaults (e.g. the teacher's guidance scale)."""
    return {"models": pipe.fingerprint(), "pipeline_defaults": dict(pipe.defaults)}


def config_dict(config: SamplerConfig) -> dict:
    fields = asdict(config)
    if fields["drafts"] == 1:  # a one-draft configuration reads as it did before drafts
        del fields["drafts"]
    return {"name": config.name, **fields}
