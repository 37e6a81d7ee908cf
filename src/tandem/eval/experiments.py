"""The evaluation experiments, one function (and one ``tandem eval`` command) each.

* ``budget``: quality against cost (UNet evaluations per image) for the teacher's samplers, the
  student, refine-all, DDIL's mixed sampler (the teacher taking a share of the student's transitions,
  ``tandem.pipeline.mixed``) and the adaptive pipeline over a grid of k (paper Fig. 9-10), and the
  acceleration factor: the teacher's cost over the lowest adaptive cost that reaches its quality (a
  point that sent no image to the teacher is the student alone, reported as such, not as an acceleration).
* ``winners``: where the student's image beats the teacher's (section 3.1): win rate against the
  student-teacher image distance, scene complexity, prompt length, trajectory curvature and the
  student's text influence (its cross-attention on the prompt's tokens).
* ``threshold``: how the cut-off tau settles with the number of calibration prompts (Table 2).
* ``oracle``: how often the oracle's no-reference decision agrees with the judge's full-reference
  comparison of student and teacher, over k (Fig. 7), and the adaptive pipeline's quality with a
  synthetic oracle of chosen accuracy (appendix D.4).

Each writes ``results.json`` (numbers with the exact configuration), PNG plots and ``report.md``
into its output directory, and caches per-image results in ``cache/`` so that a stopped run
resumes (``resume=True``) without drawing finished configurations again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..calibration import Calibration, diff_fingerprints
from ..checks import count, finite_number
from ..outputs import atomic_write_text
from ..pipeline.mixed import mixed_grid, mixing_obstacle
from ..routes import calibration_digest, quality
from ..world.grammar import parse_caption
from .features import diversity as feature_diversity
from .judges import ExactJudge, Measures, format_quality, plotted_quality, quality_label
from .metrics import decision_accuracy, paired_win_rate, synthetic_oracle, win_rate
from .sweep import (
    SamplerConfig,
    Sweep,
    _save_npz,
    compose_adaptive,
    compose_cascade,
    compose_prerouted,
    config_dict,
    is_main_process,
    provenance,
    summary,
)
from .winners import by_bins, edge_density, student_text_influence, teacher_with_curvature


@dataclass(frozen=True)
class BudgetConfig:
    teacher_steps: dict = field(default_factory=lambda: {"ddim": (5, 10, 20, 50), "dpm": (5, 10, 15, 25),
                                                         "unipc": (5, 10, 15, 25)})
    student_steps: tuple[int, ...] = (1, 2, 4, 8)
    refine_steps: int = 10                         # DPM-Solver++ steps of a refinement
    refine_sigmas: tuple[float, ...] = (0.5, 0.7, 0.85)
    # regenerations, by teacher scheduler (runs shared with the teacher curves where the steps agree)
    regenerate: dict = field(default_factory=lambda: {"dpm": (10, 15, 25), "ddim": (10, 20)})
    ks: tuple[int, ...] = tuple(range(0, 101, 10))
    references: tuple[str, ...] = ("ddim50", "dpm25")  # teacher runs the acceleration factor is measured against
    # DDIL's mixed sampler (tandem.pipeline.mixed) at the preset's student steps: the teacher takes each transition with
    # these probabilities p_T, and (mixed_teacher_first) the first transition only; mixed_substeps teacher DDIM
    # steps per student step (the paper's 32-step teacher for a 4-step student)
    mixed_teacher_probs: tuple[float, ...] = (0.25, 0.5, 0.75)
    mixed_teacher_first: bool = True
    mixed_substeps: int = 8
    # oracle-chosen drafts (tandem.pipeline.drafts): for each N, the student's best of N drafts alone and refined
    # at each of refine_sigmas below the best-of-N calibration's percentiles (pipe.draft_calibrations[N])
    drafts: tuple[int, ...] = ()
    # pre-routing (tandem.prerouting, with pipe.predictor): for each P, the refinement curves of the drafts the
    # predictor was fitted on again, the prompts whose predicted P(score < tau) >= P drawn by the teacher at
    # preroute_steps DPM steps
    preroute: tuple[float, ...] = ()
    preroute_steps: int = 25


@dataclass(frozen=True)
class OracleConfig:
    teacher_steps: int = 25                       # DPM-Solver++: the full-reference teacher image
    ks: tuple[int, ...] = tuple(range(0, 101, 5))
    accuracies: tuple[float, ...] = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)
    seeds: int = 20


def _student_run(pipe, prompts, out: Path, seed: int, batch_size: int, log, progress,
                 measures: Measures, images_from: str | Path | None = None) -> tuple[Sweep, int, dict]:
    """The experiment's cached sweep, the preset's student steps and the student's per-image results;
    ``images_from``: an earlier run's output directory whose images (same prompts, seed, models and judge)
    are re-scored by this pipeline's oracle instead of drawn again."""
    sweep = Sweep(pipe, prompts, seed, out / "cache", batch_size, identity={"preset": pipe.name}, progress=progress,
                  judge=measures.judge, images_from=None if images_from is None else Path(images_from) / "cache")
    student_steps = int(pipe._setting("num_inference_steps", None, 4))
    return sweep, student_steps, sweep.run(SamplerConfig("student", student_steps), log)


def _thresholds(pipe, ks, drafts: int = 1) -> dict[float, float]:
    """tau for each k from the pipeline's calibration (of the best of ``drafts`` drafts), after checking it
    matches the student and oracle."""
    calibration = pipe.calibration if drafts == 1 else pipe.draft_calibrations.get(drafts)
    if calibration is None:
        raise ValueError("the adaptive curves need a calibration of the student and oracle: pipe.calibration = "
                         "pipe.calibrate(prompts)" if drafts == 1 else
                         f"the curves of {drafts} drafts need a best-of-{drafts} calibration: "
                         f"pipe.draft_calibrations[{drafts}] = pipe.calibrate(prompts, drafts={drafts})")
    steps = int(pipe._setting("num_inference_steps", None, 4))
    calibration.check(pipe.calibration_fingerprint(steps, pipe.student_guidance(), drafts=drafts))
    return {k: calibration.threshold(k) if k > 0 else -np.inf for k in ks}


def _clip_score(scorer, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    return scorer(list(images), prompts).double().numpy()


def budget(pipe, prompts: list[str], out: str | Path, seed: int = 0, cfg: BudgetConfig = BudgetConfig(),
           batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
           progress: Callable[[str, int, int], None] | None = None, measures: Measures | None = None,
           cascade=None, images_from: str | Path | None = None) -> dict:
    """Quality vs cost curves and acceleration factors (see the module docstring); with the CLIP score
    and the Fréchet distance to the reference images (in ShapesWorld: exact renderings of the same
    prompts, in the world CLIP's features) where ``measures`` has them. ``cascade``: a ``CascadeTable``
    (made on held-out prompts) whose front points become the family "adaptive cascade". ``images_from``:
    an earlier budget run of these prompts whose images are re-scored by this oracle (comparing oracles)."""
    measures = measures or Measures.for_world()
    out = Path(out)
    sweep, student_steps, _ = _student_run(pipe, prompts, out, seed, batch_size, log, progress, measures,
                                           images_from)
    taus = _thresholds(pipe, cfg.ks)
    draft_taus = {n: _thresholds(pipe, cfg.ks, n) for n in cfg.drafts}  # every calibration checked before a run
    fitted_drafts, predicted = _preroute_predictions(pipe, prompts, cfg, student_steps)
    points: list[dict] = []
    features, clip_scorer = measures.features, measures.clip_scorer
    rendered = measures.reference(prompts, seed) if measures.reference is not None else None
    reference = features(rendered) if rendered is not None else None
    inception = measures.fid_features
    fid_reference = inception(measures.fid_reference(prompts, seed)) if inception is not None else None

    def add(family: str, label: str, per_image: dict, **extra) -> None:
        point = {"family": family, "label": label, **summary(per_image, reference, fid_reference), **extra}
        # side by side against each reference teacher run already drawn (the judge's per-image score, ties split)
        sides = {ref: paired_win_rate(per_image["score"], runs[ref]["score"]) for ref in cfg.references
                 if ref in runs and ref != label}
        if sides:
            point["win_rate"] = sides
        points.append(point)

    class Runs(dict):
        """Sweep results with the features and CLIP score of their images (when cached and measured)."""

        def __setitem__(self, name: str, data: dict) -> None:
            if "images" in data and features is not None:
                data = {**data, "features": features(data["images"])}
            if "images" in data and inception is not None:
                data = {**data, "fid_features": inception(data["images"])}
            if "images" in data and clip_scorer is not None:
                data = {**data, "clip_score": _clip_score(clip_scorer, data["images"], prompts)}
            super().__setitem__(name, data)

    runs = Runs()
    for scheduler, steps_list in cfg.teacher_steps.items():
        for steps in steps_list:
            c = SamplerConfig("teacher", steps, scheduler)
            runs[c.name] = sweep.run(c, log)
            add(f"teacher {scheduler}", c.name, runs[c.name], config=config_dict(c))
    for steps in sorted(set(cfg.student_steps) | {student_steps}):
        c = SamplerConfig("student", steps)
        runs[c.name] = sweep.run(c, log)
        add("student", c.name, runs[c.name], config=config_dict(c))
    student = runs[f"student{student_steps}"]
    for c in _mixed_configs(cfg, student_steps, pipe, log):
        runs[c.name] = sweep.run(c, log)
        add("mixed", c.name, runs[c.name], config=config_dict(c),
            teacher_share=float(runs[c.name]["teacher_share"].mean()))
    bases = [(f"adaptive regenerate {scheduler}{n}", SamplerConfig("teacher", n, scheduler), False)
             for scheduler, steps_list in cfg.regenerate.items() for n in steps_list]
    for sigma in cfg.refine_sigmas:
        c = SamplerConfig("refine-all", cfg.refine_steps, "dpm", sigma)
        runs[c.name] = sweep.run(c, log)
        add("refine-all", c.name, runs[c.name], config=config_dict(c))
        bases.append((f"adaptive refine sigma {sigma:g}", c, True))
    for family, c, includes_student in bases:
        if c.name not in runs:
            runs[c.name] = sweep.run(c, log)
        improved = runs[c.name]
        for k, tau in taus.items():
            composed = compose_adaptive(student, improved, tau, includes_student)
            add(family, f"{family} k={k}", composed, k=k, tau=float(tau), improved=c.name,
                share_improved=float(composed["rejected"].mean()))
    for n, taus_n in draft_taus.items():  # the best of n drafts: alone, and refined below tau
        c = SamplerConfig("student", student_steps, drafts=n)
        runs[c.name] = sweep.run(c, log)
        add("student drafts", c.name, runs[c.name], config=config_dict(c), drafts=n)
        for sigma in cfg.refine_sigmas:
            r = SamplerConfig("refine-all", cfg.refine_steps, "dpm", sigma, drafts=n)
            runs[r.name] = sweep.run(r, log)
            add("refine-all drafts", r.name, runs[r.name], config=config_dict(r), drafts=n)
            family = f"adaptive refine sigma {sigma:g} drafts {n}"
            for k, tau in taus_n.items():
                composed = compose_adaptive(runs[c.name], runs[r.name], tau, True)
                add(family, f"{family} k={k}", composed, k=k, tau=float(tau), improved=r.name,
                    share_improved=float(composed["rejected"].mean()), drafts=n)
    if predicted is not None:  # each refinement curve again, the predicted failures drawn by the teacher
        ahead_run = SamplerConfig("teacher", cfg.preroute_steps, "dpm")
        if ahead_run.name not in runs:
            runs[ahead_run.name] = sweep.run(ahead_run, log)
        for n, taus_n in [(n, t) for n, t in [(1, taus), *draft_taus.items()] if n == fitted_drafts]:
            student_n = student if n == 1 else runs[SamplerConfig("student", student_steps, drafts=n).name]
            for sigma in cfg.refine_sigmas:
                r = SamplerConfig("refine-all", cfg.refine_steps, "dpm", sigma, drafts=n)
                for limit in cfg.preroute:
                    family = f"adaptive refine sigma {sigma:g}{f' drafts {n}' if n > 1 else ''} preroute {limit:g}"
                    for k, tau in taus_n.items():
                        ahead = predicted(tau) >= limit
                        composed = compose_prerouted(compose_adaptive(student_n, runs[r.name], tau, True),
                                                     runs[ahead_run.name], ahead)
                        add(family, f"{family} k={k}", composed, k=k, tau=float(tau), improved=r.name,
                            share_improved=float(composed["rejected"].mean()), drafts=n, preroute=limit,
                            share_prerouted=float(ahead.mean()), prerouted=ahead_run.name)

    if cascade is not None:
        cascade.check(pipe.calibration_fingerprint(student_steps, pipe.student_guidance(None)))
        levels = []
        for n in cascade.levels:
            c = SamplerConfig("student", n)
            if c.name not in runs:
                runs[c.name] = sweep.run(c, log)
            levels.append(runs[c.name])
        t = cascade.teacher
        refine = t["strategy"] == "refine"
        c = (SamplerConfig("refine-all", t["teacher_steps"], t["teacher_scheduler"], t["rollback_sigma"]) if refine
             else SamplerConfig("teacher", t["teacher_steps"], t["teacher_scheduler"]))
        if c.name not in runs:
            runs[c.name] = sweep.run(c, log)
        label = " -> ".join(f"student{n}" for n in cascade.levels) + f" -> {c.name}"
        front = cascade.front()
        for point in front[:: max(1, len(front) // 15)] + front[-1:]:
            composed = compose_cascade(levels, runs[c.name], point["thresholds"], refine)
            add("adaptive cascade", f"cascade {point['cost']:.1f}", composed, cascade=label,
                thresholds=point["thresholds"], expected_quality=point["quality"], improved=c.name,
                share_improved=float(composed["rejected"].mean()),
                level_shares=[float(np.mean(composed["level"] == j)) for j in range(len(levels) + 1)])
    acceleration = accelerations(points, {ref: summary(runs[ref]) for ref in cfg.references if ref in runs})
    config = asdict(cfg)
    if not cfg.drafts:  # results without drafts read as they did before drafts
        del config["drafts"]
    if not cfg.preroute:  # likewise without pre-routing
        del config["preroute"], config["preroute_steps"]
    results = {"experiment": "budget", "n_prompts": len(prompts), "seed": seed, "preset": pipe.name,
               "student_steps": student_steps, "config": config, "made_by": made_by or {}, **provenance(pipe),
               "judge": measures.judge.describe(), "measures": measures.describe(),
               "seconds": {name: float(r["seconds"]) for name, r in runs.items()},
               "points": points, "acceleration": acceleration}
    if rendered is not None and clip_scorer is not None and measures.world:  # the renderings' own CLIP score
        results["renderings"] = {"clip_score": float(_clip_score(clip_scorer, rendered, prompts).mean())}
    if cfg.drafts:  # the best-of-N calibrations the drafts' tau came from
        results["draft_calibrations"] = {str(n): calibration_digest(pipe.draft_calibrations[n]) for n in cfg.drafts}
    if cfg.preroute:  # the predictor the pre-routing curves asked
        results["predictor"] = pipe.predictor.fingerprint()
    _write(out, results, plot_budget(results, out / "budget.png"), budget_report(results))
    return results


def _preroute_predictions(pipe, prompts: list[str], cfg: BudgetConfig, student_steps: int):
    """For the pre-routing curves: the drafts N whose curves the predictor serves (the N of the scores it was fitted
    on: one draft, or one of ``cfg.drafts``), and ``p(tau)``, each prompt's predicted probability of scoring
    below tau, from ``pipe.predictor``; (None, None) without ``cfg.preroute``."""
    if not cfg.preroute:
        return None, None
    if pipe.predictor is None:
        raise ValueError("the pre-routing curves need a predictor: pipe.predictor = pipe.fit_predictor(prompts) (on "
                         "held-out prompts), or tandem.prerouting.ScorePredictor.load(path)")
    for limit in cfg.preroute:
        finite_number(limit, "preroute", low=0, low_open=True, high=1)
    count(cfg.preroute_steps, "preroute_steps")
    guidance, made_for = pipe.student_guidance(None), pipe.predictor.fingerprint()["made_for"]
    fits = [n for n in (1, *cfg.drafts) if not diff_fingerprints(
        made_for, pipe.calibration_fingerprint(student_steps, guidance, None, n), made="predictor has")]
    if not fits:
        diffs = diff_fingerprints(made_for, pipe.calibration_fingerprint(student_steps, guidance), made="predictor has")
        raise ValueError("the predictor was fitted on other scores than this run's student (one draft or "
                         f"{', '.join(map(str, cfg.drafts)) or 'no other'} drafts): " + "; ".join(diffs))
    features = pipe.text_features(prompts)
    return fits[0], lambda tau: pipe.predictor.p_below(prompts, features, tau)


def _mixed_configs(cfg: BudgetConfig, student_steps: int, pipe, log: Callable[[str], None]) -> list[SamplerConfig]:
    """The mixed sampler's points of the budget curves (:class:`BudgetConfig`); none, said in ``log``, where the
    pipeline's student and teacher cannot share a trajectory."""
    obstacle = mixing_obstacle(pipe)
    if obstacle is not None:
        if cfg.mixed_teacher_probs or cfg.mixed_teacher_first:
            log(f"no mixed-sampler points: {obstacle}")
        return []
    teacher_steps = cfg.mixed_substeps * student_steps
    configs = [SamplerConfig("mixed", student_steps, teacher_steps=teacher_steps, teacher_prob=p)
               for p in cfg.mixed_teacher_probs]
    if cfg.mixed_teacher_first:
        first = mixed_grid(student_steps, teacher_steps).student_timesteps[0]
        configs.append(SamplerConfig("mixed", student_steps, teacher_steps=teacher_steps, teacher_at=(first,)))
    return configs


def is_adaptive(point: dict) -> bool:
    """Whether a point of the budget curves is the adaptive pipeline at work: an adaptive family's point
    with 0 < k < 100 that sent some image to the teacher (``share_improved`` > 0). A point that sent none
    (ties at tau, or a tau below every score) is the student alone at the student's cost."""
    return _adaptive_family(point) and _inner_k(point) and point.get("share_improved", 1.0) > 0


def _adaptive_family(point: dict) -> bool:
    return point["family"].startswith("adaptive")


def student_alone(point: dict) -> bool:
    """An adaptive family's point (0 < k < 100) that sent no image to the teacher: the student alone."""
    return _adaptive_family(point) and _inner_k(point) and point.get("share_improved", 1.0) == 0


def _inner_k(point: dict) -> bool:
    """0 < k < 100 for a percentile point; a cascade's point (no k) chose its thresholds on held-out prompts."""
    return "k" not in point or 0 < point["k"] < 100


def accelerations(points: list[dict], references: dict[str, dict]) -> dict[str, dict]:
    """For each teacher reference run (name -> its ``summary``): the cheapest adaptive point (:func:`is_adaptive`)
    at least as good, and the acceleration ``factor`` = the teacher's cost / that point's cost (None where no
    adaptive point reaches it); for context the cheapest teacher sampler reaching it, and ``student_alone``:
    the cheapest point that sent no image to the teacher yet reaches it (the student alone, not an
    acceleration of the adaptive pipeline), or None."""
    adaptive = [p for p in points if is_adaptive(p)]
    alone = [p for p in points if student_alone(p)]
    teachers = [p for p in points if p["family"].startswith("teacher")]
    out = {}
    for ref, target in references.items():
        reaching = [p for p in adaptive if quality(p) >= quality(target)]
        best = min(reaching, key=lambda p: p["unet_evals_mean"]) if reaching else None
        alone_reaching = [p for p in alone if quality(p) >= quality(target)]
        cheaper_teacher = min((p for p in teachers if quality(p) >= quality(target)),
                              key=lambda p: p["unet_evals_mean"])
        out[ref] = {
            "teacher": target,
            "adaptive": best,
            "factor": target["unet_evals_mean"] / best["unet_evals_mean"] if best else None,
            "best_adaptive_quality": max((quality(p) for p in adaptive), default=None),
            "student_alone": min(alone_reaching, key=lambda p: p["unet_evals_mean"]) if alone_reaching else None,
            # for context: the cheapest teacher sampler reaching the same quality
            "cheapest_teacher": cheaper_teacher,
            "teacher_factor": target["unet_evals_mean"] / cheaper_teacher["unet_evals_mean"],
        }
    return out


def oracle(pipe, prompts: list[str], out: str | Path, seed: int = 0, cfg: OracleConfig = OracleConfig(),
           batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
           progress: Callable[[str, int, int], None] | None = None, measures: Measures | None = None,
           images_from: str | Path | None = None) -> dict:
    """Oracle accuracy, no reference vs full reference (Fig. 7), and synthetic oracles (D.4); ``images_from``
    as for ``budget``."""
    measures = measures or Measures(ExactJudge())
    out = Path(out)
    sweep, student_steps, student = _student_run(pipe, prompts, out, seed, batch_size, log, progress, measures,
                                                 images_from)
    teacher = sweep.run(SamplerConfig("teacher", cfg.teacher_steps, "dpm"), log)
    taus = _thresholds(pipe, cfg.ks)
    decisions = decision_accuracy(student["oracle"], teacher["oracle"], student["score"], teacher["score"], taus)
    synthetic = [synthetic_oracle(student["score"], teacher["score"], a, cfg.seeds, student.get("satisfied"),
                                  teacher.get("satisfied")) for a in cfg.accuracies]
    results = {"experiment": "oracle", "n_prompts": len(prompts), "seed": seed, "preset": pipe.name,
               "student_steps": student_steps, "config": asdict(cfg), "made_by": made_by or {}, **provenance(pipe),
               "judge": measures.judge.describe(),
               "student": summary(student), "teacher": summary(teacher),
               "student_vs_teacher": win_rate(student["score"], teacher["score"]),
               "decisions": decisions, "synthetic_oracle": synthetic}
    _write(out, results, plot_oracle(results, out / "oracle.png"), oracle_report(results))
    return results


@dataclass(frozen=True)
class WinnersConfig:
    teacher_steps: int = 25   # DPM-Solver++, at the preset's teacher guidance
    bins: int = 5             # quantile bins of each continuous factor


def winners(pipe, prompts: list[str], out: str | Path, seed: int = 0, cfg: WinnersConfig = WinnersConfig(),
            batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
            progress: Callable[[str, int, int], None] | None = None, measures: Measures | None = None) -> dict:
    """Where students win (see ``tandem.eval.winners``); the student-teacher distance needs ``measures``
    with features, the objects in the caption ShapesWorld's captions."""
    from scipy.stats import spearmanr

    measures = measures or Measures.for_world()
    if measures.features is None:
        raise ValueError("the winners experiment needs a feature network for the student-teacher distance "
                         "(measures.features: e.g. a CLIP or DINOv2)")
    out = Path(out)
    _, student_steps, student = _student_run(pipe, prompts, out, seed, batch_size, log, progress, measures)
    guidance = pipe.teacher_guidance()
    cache = out / "cache" / f"teacher_dpm{cfg.teacher_steps}_curvature.npz"
    if cache.exists():
        with np.load(cache) as data:
            teacher_images, curvature = data["images"], data["curvature"]
    else:
        teacher_images, curvature = teacher_with_curvature(
            pipe, prompts, seed, cfg.teacher_steps, guidance, batch_size,
            progress=(lambda d, t: progress(f"dpm{cfg.teacher_steps} with curvature", d, t)) if progress else None)
        _save_npz(cache, {"images": teacher_images, "curvature": curvature})
    cache = out / "cache" / f"student{student_steps}_text_influence.npz"
    if cache.exists():
        with np.load(cache) as data:
            influence = data["influence"]
    else:
        influence = student_text_influence(
            pipe, prompts, seed, student_steps, batch_size,
            progress=(lambda d, t: progress("student cross-attention", d, t)) if progress else None)
        _save_npz(cache, {"influence": influence})
    teacher = measures.judge(teacher_images, prompts)["score"]
    s = student["score"]
    features = measures.features(np.concatenate([student["images"], teacher_images]))
    distance = 1 - (features[: len(prompts)] * features[len(prompts):]).sum(1)
    tokens = np.array([len(pipe.student.tokenizer(p).input_ids) - 2 for p in prompts])
    edges = edge_density(teacher_images)
    factors = {"distance": distance, "curvature": curvature, "edge_density": edges, "text_influence": influence}
    results = {
        "experiment": "winners", "n_prompts": len(prompts), "seed": seed, "preset": pipe.name,
        "student_steps": student_steps, "teacher": f"dpm{cfg.teacher_steps}, guidance {guidance:g}",
        "config": asdict(cfg), "made_by": made_by or {}, **provenance(pipe),
        "judge": measures.judge.describe(), "measures": measures.describe(),
        "student_vs_teacher": win_rate(s, teacher),
        "by_distance": by_bins(distance, s, teacher, cfg.bins, {"curvature": curvature}),
        "by_edge_density": by_bins(edges, s, teacher, cfg.bins, {"curvature": curvature}),
        "by_prompt_tokens": by_bins(tokens, s, teacher, cfg.bins, factors),
        "by_curvature": by_bins(curvature, s, teacher, cfg.bins, {"distance": distance, "edge_density": edges}),
        "by_text_influence": by_bins(influence, s, teacher, cfg.bins, {"distance": distance}),
        "spearman": {"distance_vs_curvature": float(spearmanr(distance, curvature).statistic),
                     "curvature_vs_edge_density": float(spearmanr(curvature, edges).statistic),
                     "distance_vs_text_influence": float(spearmanr(distance, influence).statistic)},
    }
    if measures.world:
        objects = np.array([len(parse_caption(p).objects) for p in prompts])
        results["by_objects"] = by_bins(objects, s, teacher, None, factors)
        results["spearman"]["distance_vs_objects"] = float(spearmanr(distance, objects).statistic)
    _write(out, results, plot_winners(results, out / "winners.png"), winners_report(results))
    return results


@dataclass(frozen=True)
class ThresholdConfig:
    sizes: tuple[int, ...] = (25, 50, 100, 250, 500)
    ks: tuple[int, ...] = (30, 50, 70)
    resamples: int = 200


def threshold(pipe, prompts: list[str], out: str | Path, seed: int = 0, cfg: ThresholdConfig = ThresholdConfig(),
              batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
              progress: Callable[[str, int, int], None] | None = None, measures: Measures | None = None) -> dict:
    """tau of each k from calibrations of n prompts drawn from ``prompts`` (without replacement), its
    spread over resamples and the share of all the prompts' student images it sends to the teacher;
    and the measured time to calibrate n prompts."""
    import time

    out = Path(out)
    sizes = [n for n in cfg.sizes if n < len(prompts)]
    if not sizes:
        raise ValueError(f"threshold convergence needs more prompts than its smallest size {min(cfg.sizes)}")
    _, student_steps, student = _student_run(pipe, prompts, out, seed, batch_size, log, progress,
                                             measures or Measures(ExactJudge()))
    pool = Calibration(student["oracle"], fingerprint={})
    seconds = {}
    for n in sizes:
        t0 = time.perf_counter()
        pipe.calibrate(prompts[:n], seed=seed, batch_size=batch_size)
        seconds[n] = time.perf_counter() - t0
    rows = [{**row, "calibration_seconds": seconds[row["n"]]}
            for row in pool.convergence(sizes, cfg.ks, cfg.resamples, seed, replace=False)]
    full = {k: pool.threshold(k) for k in cfg.ks}
    results = {"experiment": "threshold", "n_prompts": len(prompts), "seed": seed, "preset": pipe.name,
               "student_steps": student_steps, "config": asdict(cfg), "made_by": made_by or {}, **provenance(pipe),
               "tau_all_prompts": full, "rows": rows}
    _write(out, results, plot_threshold(results, out / "threshold.png"), threshold_report(results))
    return results


@dataclass(frozen=True)
class DiversityConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3)        # run seeds: image i of seed s draws from (s, i)
    teacher_steps: tuple[int, ...] = (10, 25)    # DPM-Solver++
    refine_sigma: float = 0.7                    # adaptive refinement (10 DPM steps) ...
    refine_steps: int = 10
    k: int = 50                                  # ... and regeneration (DPM-25) at this percentile


def diversity(pipe, prompts: list[str], out: str | Path, seed: int = 0, cfg: DiversityConfig = DiversityConfig(),
              batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
              progress: Callable[[str, int, int], None] | None = None, measures: Measures | None = None) -> dict:
    """Diversity (the DDIL paper's LPIPS-diversity, in the features of ``measures``; ShapesWorld: the
    world CLIP's): the mean pairwise feature distance between the images of one prompt over
    ``cfg.seeds``, for the student, the teacher and the adaptive pipeline, beside their quality.
    ``seed`` offsets every run seed."""
    measures = measures or Measures.for_world()
    if measures.features is None:
        raise ValueError("the diversity experiment needs a feature network (measures.features: e.g. a CLIP or DINOv2)")
    out = Path(out)
    features = measures.features
    student_steps = int(pipe._setting("num_inference_steps", None, 4))
    tau = _thresholds(pipe, (cfg.k,))[cfg.k]
    configs = {"student": SamplerConfig("student", student_steps),
               **{f"dpm{n}": SamplerConfig("teacher", n, "dpm") for n in cfg.teacher_steps},
               "refine-all": SamplerConfig("refine-all", cfg.refine_steps, "dpm", cfg.refine_sigma)}
    per_seed: dict[str, list[dict]] = {}
    for s in cfg.seeds:
        sweep = Sweep(pipe, prompts, seed + s, out / "cache" / f"seed{seed + s}", batch_size,
                      identity={"preset": pipe.name}, progress=progress, judge=measures.judge)
        runs = {}
        for name, c in configs.items():
            data = sweep.run(c, log)
            runs[name] = {**data, "features": features(data["images"])}
        regen = f"dpm{max(cfg.teacher_steps)}"
        runs[f"adaptive refine k={cfg.k}"] = compose_adaptive(runs["student"], runs["refine-all"], tau, True)
        runs[f"adaptive regenerate {regen} k={cfg.k}"] = compose_adaptive(runs["student"], runs[regen], tau, False)
        for name, data in runs.items():
            per_seed.setdefault(name, []).append(data)
    rows = []
    for name, runs in per_seed.items():
        stacked = np.stack([r["features"] for r in runs], axis=1)  # [prompts, seeds, D]
        row = {"run": name, "diversity": feature_diversity(stacked)}
        if "satisfied" in runs[0]:
            row["accuracy"] = float(np.mean([r["satisfied"].mean() for r in runs]))
        rows.append({**row, "mean_score": float(np.mean([r["score"].mean() for r in runs])),
                     "unet_evals_mean": float(np.mean([r["evals"].mean() for r in runs]))})
    results = {"experiment": "diversity", "n_prompts": len(prompts), "seed": seed, "preset": pipe.name,
               "student_steps": student_steps, "config": asdict(cfg), "made_by": made_by or {}, **provenance(pipe),
               "judge": measures.judge.describe(), "measures": measures.describe(), "tau": tau,
               "rows": rows}
    _write(out, results, plot_diversity(results, out / "diversity.png"), diversity_report(results))
    return results


def _write(out: Path, results: dict, plot: Path, report: str) -> None:
    if not is_main_process():
        return

    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=float) + "\n")
    atomic_write_text(out / "report.md", report + f"\n![{plot.stem}]({plot.name})\n")


# -- plots and reports ------------------------------------------------------------------------------


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.5, 4.2), dpi: int = 120):
    """``(fig, axes)`` of a headless matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=size, dpi=dpi)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if is_main_process():
        fig.savefig(path)
    plt.close(fig)
    return path


def plot_budget(results: dict, path: Path) -> Path:
    import matplotlib

    points, acceleration = results["points"], results["acceleration"]
    y = lambda p: plotted_quality(quality(p), results)
    fig, ax = _figure(size=(9, 4.2))
    ax.set_title("quality vs cost", fontsize=10)
    ax.grid(alpha=0.3)
    families = sorted({p["family"] for p in points}, key=lambda f: (f.startswith("adaptive"), f))
    colours = matplotlib.colormaps["tab20" if len(families) > 10 else "tab10"]  # one colour per family
    for i, family in enumerate(families):
        pts = sorted((p for p in points if p["family"] == family), key=lambda p: p["unet_evals_mean"])
        style = "-o" if not family.startswith("adaptive") else "--."
        if family == "refine-all":
            style = "D"
        ax.plot([p["unet_evals_mean"] for p in pts], [y(p) for p in pts], style, label=family, markersize=4,
                color=colours(i % colours.N))
    for i, (ref, a) in enumerate(acceleration.items()):
        ax.axhline(y(a["teacher"]), color="black", linewidth=0.6, linestyle=":")
        label = f"{ref}" + (f": {a['factor']:.1f}x cheaper adaptive" if a["factor"]
                            else ": reached by the student alone" if a.get("student_alone") else ": not reached")
        ax.annotate(label, (0.01, y(a["teacher"])), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, -10 - 9 * i), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (mean; CFG doubling counted)")
    ax.set_ylabel(quality_label(results))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, path)


def budget_report(results: dict) -> str:
    q = lambda p: format_quality(quality(p), results)
    label = quality_label(results).removesuffix(" (%)")
    lines = [f"# Budget curves ({results['preset']}, {results['n_prompts']} prompts, seed {results['seed']})", "",
             (f"Quality: {label}. An adaptive point is one with 0 < k < 100 that sent some image to the teacher; "
             "one that sent none is the student alone (its cost, its images) and is no acceleration."), "",
             ("| acceleration vs | teacher quality | its cost | cheapest adaptive point reaching it | cost | "
              "factor | cheapest teacher sampler reaching it (factor) |"),
             "|---|---|---|---|---|---|---|"]
    for ref, a in results["acceleration"].items():
        best, t = a["adaptive"], a["cheapest_teacher"]
        # results made before real-tier judges name the best adaptive point's accuracy
        top = a.get("best_adaptive_quality", a.get("best_adaptive_accuracy"))
        if best:
            reached = f"{best['label']} ({q(best)}) | {best['unet_evals_mean']:.1f} | {a['factor']:.2f}x |"
        else:
            best_text = f"best {format_quality(top, results)}" if top is not None else "no adaptive point"
            reached = f"not reached ({best_text}) | - | - |"
        lines.append(f"| {ref} | {q(a['teacher'])} | {a['teacher']['unet_evals_mean']:.1f} | {reached}"
                     f" {t['label']} ({a['teacher_factor']:.2f}x) |")
    for ref, a in results["acceleration"].items():
        alone = a.get("student_alone")
        if alone is not None:
            lines += ["", (f"- vs {ref}: {alone['label']} reaches it at {alone['unet_evals_mean']:.1f} UNet evaluations "
                      "per image, but sent no image to the teacher: that is the student alone, not the adaptive "
                      "pipeline.")]
    score = "soft score | " if "accuracy" in results["points"][0] else ""
    fid = any("fid" in p for p in results["points"])
    lines += ["", f"| run | UNet evals / image | {label} | {score}CLIP score | Fréchet distance to the reference |"
              + (" Inception FID |" if fid else ""),
              "|---|---|---|---|---|" + ("---|" if score else "") + ("---|" if fid else "")]
    for p in results["points"]:
        if not p["family"].startswith("adaptive") or p.get("k") in (30, 50, 70, 100):
            label = p["label"] + (" (student alone: no image sent to the teacher)" if student_alone(p) else "")
            lines.append(f"| {label} | {p['unet_evals_mean']:.1f} | {q(p)} | "
                         + (f"{p['mean_score']:.4f} | " if score else "")
                         + f"{_number(p.get('clip_score'), 2)} | {_number(p.get('frechet_distance'), 4)} |"
                         + (f" {_number(p.get('fid'), 2)} |" if fid else ""))
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_oracle(results: dict, path: Path) -> Path:
    fig, (left, right) = _figure(1, 2, (10, 3.8))
    d = results["decisions"]
    left.plot([r["k"] for r in d["no_reference"]], [100 * r["accuracy"] for r in d["no_reference"]], "-o",
              markersize=3, label="no reference: student score >= tau(k)")
    left.axhline(100 * d["full_reference"], color="black", linestyle="--", linewidth=1,
                 label="full reference: student vs teacher score")
    if "no_reference_ceiling" in d:
        left.axhline(100 * d["no_reference_ceiling"]["accuracy"], color="tab:green", linestyle=":", linewidth=1,
                     label="no-reference ceiling: the judge's own student score")
    left.set_xlabel("percentile k")
    left.set_ylabel("agreement with the judge (%)")
    left.set_title("is the student's image the better one? (Fig. 7)", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    syn = results["synthetic_oracle"]
    y = lambda s: plotted_quality(quality(s), results)
    right.plot([100 * s["oracle_accuracy"] for s in syn], [y(s) for s in syn], "-o", markersize=3,
               label="adaptive (regenerate) with a synthetic oracle")
    right.axhline(y(results["teacher"]), color="tab:blue", linestyle="--", linewidth=1, label="teacher alone")
    right.axhline(y(results["student"]), color="tab:gray", linestyle=":", linewidth=1, label="student alone")
    right.set_xlabel("oracle accuracy (%)")
    right.set_ylabel(quality_label(results))
    right.set_title("what a better oracle would give (D.4)", fontsize=9)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return _save_figure(fig, path)


def oracle_report(results: dict) -> str:
    d, w = results["decisions"], results["student_vs_teacher"]
    best = max(d["no_reference"], key=lambda r: r["accuracy"])
    lines = [f"# Oracle accuracy ({results['preset']}, {results['n_prompts']} prompts, seed {results['seed']})", "",
             (f"- Student vs teacher under the judge: the student's image is better on {100 * w['win']:.1f}% of "
             f"prompts, worse on {100 * w['loss']:.1f}%, tied on {100 * w['tie']:.1f}% (win rate, ties split, "
             f"{w['win_rate']:.3f}, 95% CI {w['ci'][0]:.3f}-{w['ci'][1]:.3f})."),
             (f"- Full-reference decision (oracle compares both images): {100 * d['full_reference']:.1f}% agreement "
             f"with the judge on {d['pairs']} prompts where it prefers one."),
             (f"- No-reference decision (student score vs tau): best {100 * best['accuracy']:.1f}% at k = "
             f"{best['k']:g}."),
             *([f"- No-reference ceiling (the judge's own score of the student image against its best cut-off, "
                f"what a perfect no-reference oracle reaches): {100 * d['no_reference_ceiling']['accuracy']:.1f}%."]
               if "no_reference_ceiling" in d else []), "",
             "| synthetic oracle accuracy | captions satisfied | judge score | sent to the teacher |",
             "|---|---|---|---|"]
    for s in results["synthetic_oracle"]:
        satisfied = f"{100 * s['accuracy']:.1f}%" if "accuracy" in s else "-"
        lines.append(f"| {100 * s['oracle_accuracy']:.0f}% | {satisfied} | {s['mean_score']:.4f} | "
                     f"{100 * s['teacher_share']:.0f}% |")
    return "\n".join(lines) + "\n"


def plot_winners(results: dict, path: Path) -> Path:
    space = results.get("measures", {}).get("features", "world clip")
    panels = [("by_distance", f"student-teacher distance (1 - cos, {space})"),
              ("by_objects", "objects in the caption"), ("by_edge_density", "edge density of the teacher image"),
              ("by_prompt_tokens", "prompt length (tokens)"), ("by_curvature", "teacher trajectory curvature"),
              ("by_text_influence", "student text influence (cross-attention)")]
    panels = [(key, label) for key, label in panels if key in results]
    fig, axes = _figure(2, 4, (15, 6.5), 110)
    for ax in axes.flat[len(panels):-2]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, panels):
        rows = results[key]
        x = [(r["low"] + r["high"]) / 2 for r in rows]
        y = [100 * r["win_rate"] for r in rows]
        err = [[100 * (r["win_rate"] - r["ci"][0]) for r in rows], [100 * (r["ci"][1] - r["win_rate"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt="-o", markersize=4, capsize=3)
        ax.axhline(50, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("student win rate vs teacher (%)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, key, label, figure in ((axes.flat[-2], "by_curvature", "teacher trajectory curvature", "Fig. 6a"),
                                   (axes.flat[-1], "by_text_influence", "student text influence", "Fig. 5b")):
        if key not in results:  # results made before text influence was measured
            ax.set_visible(False)
            continue
        rows = results[key]
        ax.plot([(r["low"] + r["high"]) / 2 for r in rows], [r["mean_distance"] for r in rows], "-o", markersize=4)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("mean student-teacher distance", fontsize=8)
        ax.set_title(f"student-teacher distance vs {label.split(' ', 1)[1]} (paper {figure})", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"where the student beats its teacher ({results['n_prompts']} prompts; 95% bootstrap CIs)",
                 fontsize=10)
    return _save_figure(fig, path)


def winners_report(results: dict) -> str:
    w = results["student_vs_teacher"]
    lines = [f"# Where students win ({results['preset']}, {results['n_prompts']} prompts, seed {results['seed']})", "",
             (f"Student {results['student_steps']} steps vs teacher {results['teacher']}: the student's image is "
             f"better on {100 * w['win']:.1f}% of prompts, tied on {100 * w['tie']:.1f}% (win rate {w['win_rate']:.3f},"
             f" 95% CI {w['ci'][0]:.3f}-{w['ci'][1]:.3f})."), "",
             "Spearman correlations: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                                  for k, v in results["spearman"].items()) + "."]
    for key, label in (("by_distance", "distance"), ("by_objects", "objects"), ("by_edge_density", "edge density"),
                       ("by_prompt_tokens", "tokens"), ("by_curvature", "curvature"),
                       ("by_text_influence", "text influence")):
        if key not in results:
            continue
        lines += ["", f"| {label} | n | student win rate (95% CI) |", "|---|---|---|"]
        for r in results[key]:
            span = f"{r['low']:g}" if r["low"] == r["high"] else f"{r['low']:.3g}-{r['high']:.3g}"
            lines.append(f"| {span} | {r['n']} | {r['win_rate']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) |")
    return "\n".join(lines) + "\n"


def plot_threshold(results: dict, path: Path) -> Path:
    fig, ax = _figure()
    ax.set_title("tau vs number of calibration prompts (Table 2)", fontsize=10)
    ax.grid(alpha=0.3)
    for k in results["config"]["ks"]:
        rows = [r for r in results["rows"] if r["k"] == k]
        ax.errorbar([r["n"] for r in rows], [r["tau_mean"] for r in rows], yerr=[r["tau_std"] for r in rows],
                    fmt="-o", markersize=4, capsize=3, label=f"k = {k}")
        ax.axhline(results["tau_all_prompts"][k], color="black", linewidth=0.5, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("calibration prompts n")
    ax.set_ylabel("tau (mean +- std over resamples)")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def threshold_report(results: dict) -> str:
    lines = [f"# Threshold convergence ({results['preset']}, {results['n_prompts']} prompts, seed {results['seed']})",
             "", "| n | k | tau (mean +- std) | share sent to the teacher (mean +- std, %) | calibration time (s) |",
             "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['n']} | {r['k']} | {r['tau_mean']:.4f} +- {r['tau_std']:.4f} | "
                     f"{r['share_below_mean']:.1f} +- {r['share_below_std']:.1f} | "
                     f"{r['calibration_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_diversity(results: dict, path: Path) -> Path:
    fig, ax = _figure()
    ax.set_title("diversity vs quality over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    space = results.get("measures", {}).get("features", "world clip")
    for r in results["rows"]:
        y = plotted_quality(quality(r), results)
        ax.plot(r["diversity"], y, "o")
        ax.annotate(f"{r['run']} ({r['unet_evals_mean']:.0f})", (r["diversity"], y), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    ax.set_xlabel(f"diversity: mean pairwise distance ({space}) between seeds of a prompt")
    ax.set_ylabel(quality_label(results))
    return _save_figure(fig, path)


def diversity_report(results: dict) -> str:
    space = results.get("measures", {}).get("features", "world clip")
    lines = [(f"# Diversity ({results['preset']}, {results['n_prompts']} prompts x "
             f"{len(results['config']['seeds'])} seeds)"), "",
             (f"Diversity is the mean pairwise cosine distance, in {space} image features, between the images "
             "of one prompt drawn with different seeds (the DDIL paper's LPIPS-diversity); (UNet evaluations "
             "per image in brackets in the plot)."), "",
             f"| run | diversity | {quality_label(results).removesuffix(' (%)')} | UNet evals |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['run']} | {r['diversity']:.4f} | {format_quality(quality(r), results)} | "
                     f"{r['unet_evals_mean']:.1f} |")
    return "\n".join(lines) + "\n"
