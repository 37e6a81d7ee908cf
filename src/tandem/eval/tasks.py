"""Editing and controllable generation in tandem (sections 4.2-4.3, appendix D.6), measured in
ShapesWorld with the exact checker.

* ``edit``: SDEdit on the world's edit list, over strengths: the student, the teacher at each of
  its step counts, and the adaptive pipeline (regeneration of the same noised input) over k, with
  tau from the student's edits of the validation edits. Quality is the exact checker on the edited
  caption; reference preservation is the world CLIP image-feature cosine similarity between input
  and output (the DINOv2 similarity of the paper's Table 1 and Fig. 13).
* ``control``: ControlNet generation on test captions, each with the control image of an exact
  scene for it: the student, the teacher, refine-all and the adaptive pipeline (refinement and
  regeneration) over k, with tau from the validation captions under their control images. Control
  fidelity is the IoU of the image's object pixels with the control layout.

Adaptive results are composed per image from cached student and teacher runs, as in ``budget``
(an image's result does not depend on which others the oracle rejected; tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..calibration import Calibration
from ..world.conditional import scenes_for_captions
from ..world.control import control_fidelity, control_image
from ..world.edits import load_edits
from ..world.prompts import load_prompts
from .experiments import _figure, _number, _save_figure, _write, is_adaptive
from .features import ImageFeatures
from .metrics import win_rate
from .sweep import SamplerConfig, Sweep, compose_adaptive, config_dict, provenance, summary


@dataclass(frozen=True)
class EditConfig:
    strengths: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    main_strength: float = 0.6                    # the paper's Table 1
    teacher_steps: tuple[int, ...] = (10,)        # DPM-Solver++ steps run from the noised input, every strength
    main_teacher_steps: tuple[int, ...] = (10, 25)  # ... and at the main strength
    main_student_steps: tuple[int, ...] = (4,)    # other student steps tried at the main strength (same x_t)
    ks: tuple[int, ...] = tuple(range(0, 101, 10))
    k_curve: int = 50                             # the adaptive point of the strength curves
    calibration_edits: str = "val"                # the held-out edits tau comes from


@dataclass(frozen=True)
class ControlConfig:
    teacher_steps: tuple[int, ...] = (10, 25)     # DPM-Solver++ (paper D.6: the teacher's own sampler)
    refine_steps: int = 10
    refine_sigmas: tuple[float, ...] = (0.5, 0.7)
    ks: tuple[int, ...] = tuple(range(0, 101, 10))


def _taus(scores: np.ndarray, ks) -> dict[int, float]:
    """tau of each k from held-out student scores (k = 0: nothing goes to the teacher)."""
    held_out = Calibration(scores, fingerprint={})
    return {k: held_out.threshold(k) if k > 0 else -np.inf for k in ks}


def _adaptive_points(points: list[dict], family: str, student: dict, improved: dict, taus: dict, improved_name: str,
                     includes_student: bool, extra: dict | None = None) -> dict[int, dict]:
    composed_by_k = {}
    for k, tau in taus.items():
        composed = compose_adaptive(student, improved, tau, includes_student)
        composed_by_k[k] = composed
        points.append({"family": family, "label": f"{family} k={k}", **_summary(composed), "k": k, "tau": tau,
                       "improved": improved_name, "share_improved": float(composed["rejected"].mean()),
                       **(extra or {})})
    return composed_by_k


def _summary(per_image: dict) -> dict:
    out = summary(per_image)
    for key in ("preservation", "fidelity"):
        if key in per_image:
            out[key] = float(np.mean(per_image[key]))
    return out


def _acceptance(points: list[dict], student: dict, teachers: dict[str, dict]) -> dict:
    """For each teacher: the cheapest adaptive point (0 < k < 100, some image sent to the teacher) at least
    as accurate, if any; and whether the adaptive pipeline beats the student there."""
    adaptive = [p for p in points if is_adaptive(p)]  # a point that sent no image to the teacher is the student
    out = {}
    for name, t in teachers.items():
        reaching = [p for p in adaptive if p["accuracy"] >= t["accuracy"] and p["unet_evals_mean"] < t["unet_evals_mean"]]
        best = min(reaching, key=lambda p: p["unet_evals_mean"]) if reaching else None
        out[name] = {"teacher": t, "adaptive": best, "student": student,
                     "met": best is not None and best["accuracy"] > student["accuracy"],
                     "best_adaptive_accuracy": max((p["accuracy"] for p in adaptive), default=None)}
    return out


def _acceptance_lines(acceptance: dict) -> list[str]:
    """The report's bullets for ``_acceptance``'s result."""
    lines = []
    for name, a in acceptance.items():
        t = a["teacher"]
        if a["adaptive"]:
            p = a["adaptive"]
            lines.append(f"- vs teacher {name} ({100 * t['accuracy']:.1f}% at {t['unet_evals_mean']:.0f} evals): "
                         f"{p['label']} reaches {100 * p['accuracy']:.1f}% at {p['unet_evals_mean']:.1f} evals "
                         f"(student alone {100 * a['student']['accuracy']:.1f}%; the cheapest such point "
                         "over k, chosen on these prompts).")
        else:
            best = a["best_adaptive_accuracy"]
            lines.append(f"- vs teacher {name} ({100 * t['accuracy']:.1f}%): not reached below its cost (best "
                         f"adaptive with 0 < k < 100: {'none' if best is None else f'{100 * best:.1f}%'}).")
    return lines


# -- editing ---------------------------------------------------------------------------------------


def edit(pipe, cases: list, out: str | Path, seed: int = 0, cfg: EditConfig = EditConfig(), batch_size: int = 100,
         log: Callable[[str], None] = print, made_by: dict | None = None,
         progress: Callable[[str, int, int], None] | None = None, calibration_cases: list | None = None) -> dict:
    """SDEdit in tandem over strengths (see the module docstring); ``cases`` are ``EditCase``s."""
    out = Path(out)
    pipe = pipe.editor()  # the pipeline with its edit student, if it has one (caches name that student)
    if cfg.main_strength not in cfg.strengths:
        raise ValueError(f"main strength {cfg.main_strength} is not among the strengths {cfg.strengths}")
    held_out = calibration_cases if calibration_cases is not None else load_edits(cfg.calibration_edits)
    features = ImageFeatures.world()
    inputs = np.stack([c.image() for c in cases])
    input_features = features(inputs)
    prompts = [c.prompt for c in cases]
    student_steps = pipe._edit_student_steps(None)
    points: list[dict] = []
    curves: dict[str, list[dict]] = {}
    main: dict = {}
    acceptance: dict = {}
    for strength in cfg.strengths:
        def call(idx, ps, inputs=inputs, strength=strength, **kwargs):
            return pipe.edit(inputs[idx], ps, strength=strength, **kwargs)

        sweep = Sweep(pipe, prompts, seed, out / "cache" / f"strength{strength:g}", batch_size,
                      identity={"preset": pipe.name, "task": "edit", "strength": strength,
                                "inputs": [[c.split, c.index] for c in cases]}, progress=progress, call=call)
        held = np.stack([c.image() for c in held_out])
        val_sweep = Sweep(pipe, [c.prompt for c in held_out], seed, out / "cache" / f"val_strength{strength:g}",
                          batch_size, identity={"preset": pipe.name, "task": "edit", "strength": strength,
                                                "inputs": [[c.split, c.index] for c in held_out]}, progress=progress,
                          call=lambda idx, ps, held=held, strength=strength, **kw: pipe.edit(
                              held[idx], ps, strength=strength, **kw))
        extra = cfg.main_student_steps if strength == cfg.main_strength else ()
        students_steps = [student_steps] + [n for n in extra if n != student_steps]
        val_taus = {n: _taus(val_sweep.run(SamplerConfig("student", n), log)["oracle"], cfg.ks)
                    for n in students_steps}

        def run(config: SamplerConfig, sweep: Sweep = sweep) -> dict:
            data = sweep.run(config, log)
            return {**data, "preservation": np.einsum("nd,nd->n", features(data["images"]), input_features)}

        students = {n: run(SamplerConfig("student", n)) for n in students_steps}
        student = students[student_steps]
        rows = {"student": {**_summary(student), "strength": strength}}
        for n, data in students.items():
            points.append({"family": "student", "label": f"student{n}", "strength": strength, **_summary(data)})
        teachers = {}
        for steps in cfg.main_teacher_steps if strength == cfg.main_strength else cfg.teacher_steps:
            c = SamplerConfig("teacher", steps, "dpm")
            teacher = run(c)  # the same noised input x_t for every student step count (its first timestep)
            teachers[c.name] = _summary(teacher)
            points.append({"family": "teacher", "label": c.name, "strength": strength, **teachers[c.name],
                           "config": config_dict(c)})
            rows[c.name] = {**teachers[c.name], "strength": strength}
            for n, data in students.items():
                family = f"adaptive regenerate {c.name}" + ("" if n == student_steps else f" (student{n})")
                adaptive = _adaptive_points(points, family, data, teacher, val_taus[n], c.name, False,
                                            {"strength": strength, "student_steps": n})
                if n == student_steps:
                    rows[f"adaptive {c.name} k={cfg.k_curve}"] = {**_summary(adaptive[cfg.k_curve]),
                                                                  "strength": strength}
                if strength == cfg.main_strength:
                    main[family] = {"win_rate_adaptive_vs_teacher": win_rate(adaptive[cfg.k_curve]["score"],
                                                                              teacher["score"], seed=seed)}
        for name, row in rows.items():
            curves.setdefault(name, []).append(row)
        if strength == cfg.main_strength:
            here = [p for p in points if p.get("strength") == strength]
            best_student = max((_summary(d) for d in students.values()), key=lambda r: r["accuracy"])
            acceptance = _acceptance(here, best_student, teachers)
    results = {"experiment": "edit", "n_edits": len(cases), "seed": seed, "preset": pipe.name,
               "student_steps": student_steps, "config": asdict(cfg), "made_by": made_by or {}, **provenance(pipe),
               "calibration_edits": len(held_out), "points": points, "curves": curves,
               "acceptance": acceptance, "win_rates": main}
    cost_plot = plot_edit_cost(results, out / "edit_quality_vs_cost.png")
    plot_edit_strengths(results, out / "edit_preservation_vs_quality.png")
    _write(out, results, cost_plot, edit_report(results))
    return results


def _plot_cost(points: list[dict], title: str, ylabel: str, path: Path, size=(6.5, 4.2)) -> Path:
    """Accuracy against UNet evaluations: a curve per adaptive family over k, a labelled marker per baseline."""
    fig, ax = _figure(size=size)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    for family in sorted({p["family"] for p in points}):
        fam = sorted((p for p in points if p["family"] == family), key=lambda p: p["unet_evals_mean"])
        adaptive = family.startswith("adaptive")
        ax.plot([p["unet_evals_mean"] for p in fam], [100 * p["accuracy"] for p in fam], "-o" if adaptive else "s",
                ms=4, label=family if adaptive else None)
        if not adaptive:
            for p in fam:
                ax.annotate(p["label"], (p["unet_evals_mean"], 100 * p["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -8))
    ax.set_xlabel("UNet evaluations per image")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def plot_edit_cost(results: dict, path: Path) -> Path:
    s = results["config"]["main_strength"]
    return _plot_cost([p for p in results["points"] if p.get("strength") == s],
                      f"SDEdit at strength {s:g}: exact-checker accuracy vs cost", "edited captions satisfied (%)",
                      path)


def plot_edit_strengths(results: dict, path: Path) -> Path:
    fig, ax = _figure()
    ax.set_title("SDEdit over strengths: reference preservation vs editing quality", fontsize=10)
    ax.grid(alpha=0.3)
    for name, rows in results["curves"].items():
        ax.plot([r["preservation"] for r in rows], [100 * r["accuracy"] for r in rows], "-o", ms=4, label=name)
        for r in rows:
            ax.annotate(f"{r['strength']:g}", (r["preservation"], 100 * r["accuracy"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("reference preservation (world CLIP cosine, input vs edit)")
    ax.set_ylabel("edited captions satisfied (%)")
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


def edit_report(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# Editing (SDEdit) in tandem — {results['n_edits']} edits, seed {results['seed']}", "",
             f"tau from the student's edits of {results['calibration_edits']} held-out edits; adaptive = regeneration "
             "of the same noised input by the teacher.", "",
             "| strength | run | satisfied | soft score | preservation | UNet evals |", "|---|---|---|---|---|---|"]
    for name, rows in results["curves"].items():
        for r in rows:
            lines.append(f"| {r['strength']:g} | {name} | {100 * r['accuracy']:.1f}% | {r['mean_score']:.3f} | "
                         f"{r['preservation']:.3f} | {r['unet_evals_mean']:.1f} |")
    lines += ["", f"## Acceptance at strength {cfg['main_strength']:g}", ""]
    lines += _acceptance_lines(results["acceptance"])
    for name, w in results["win_rates"].items():
        r = w["win_rate_adaptive_vs_teacher"]
        lines.append(f"- soft-score win rate of {name} (k={cfg['k_curve']}) over its teacher alone: "
                     f"{r['win_rate']:.3f} (95% CI {r['ci'][0]:.3f}-{r['ci'][1]:.3f})")
    main = [p for p in results["points"] if p.get("strength") == cfg["main_strength"]
            and (not p["family"].startswith("adaptive") or p["k"] in (30, 50, 70))]
    lines += ["", f"### Every run at strength {cfg['main_strength']:g}", "",
              "| run | satisfied | soft score | preservation | UNet evals |", "|---|---|---|---|---|"]
    for p in main:
        lines.append(f"| {p['label']} | {100 * p['accuracy']:.1f}% | {p['mean_score']:.3f} | "
                     f"{p['preservation']:.3f} | {p['unet_evals_mean']:.1f} |")
    lines += ["", "![preservation vs quality](edit_preservation_vs_quality.png)"]
    return "\n".join(lines) + "\n"


# -- control -----------------------------------------------------------------------------------------


def control(pipe, prompts: list[str], kind: str, out: str | Path, seed: int = 0, cfg: ControlConfig = ControlConfig(),
            batch_size: int = 100, log: Callable[[str], None] = print, made_by: dict | None = None,
            progress: Callable[[str, int, int], None] | None = None, calibration_prompts: list[str] | None = None
            ) -> dict:
    """ControlNet generation in tandem (see the module docstring); ``pipe`` carries the ``kind`` ControlNet."""
    out = Path(out)
    held_out = calibration_prompts if calibration_prompts is not None else load_prompts("val")

    def sweep_for(ps: list[str], name: str) -> tuple[Sweep, np.ndarray]:
        controls = np.stack([control_image(sc, kind) for sc in scenes_for_captions(ps, seed)])
        return Sweep(pipe, ps, seed, out / "cache" / name, batch_size,
                     identity={"preset": pipe.name, "control": kind, "controls": "scenes_for_captions(prompts, seed)"},
                     progress=progress,
                     call=lambda idx, p, controls=controls, **kw: pipe(p, control_image=list(controls[idx]), **kw)
                     ), controls

    student_steps = int(pipe._setting("num_inference_steps", None, 4))
    val_sweep, _ = sweep_for(held_out, "val")
    taus = _taus(val_sweep.run(SamplerConfig("student", student_steps), log)["oracle"], cfg.ks)
    sweep, controls = sweep_for(prompts, "test")

    def run(config: SamplerConfig) -> dict:
        data = sweep.run(config, log)
        fidelity = np.array([control_fidelity(im, c, kind) for im, c in zip(data["images"], controls)])
        return {**data, "fidelity": fidelity}

    points: list[dict] = []
    student = run(SamplerConfig("student", student_steps))
    points.append({"family": "student", "label": f"student{student_steps}", **_summary(student)})
    teachers = {}
    for steps in cfg.teacher_steps:
        c = SamplerConfig("teacher", steps, "dpm")
        teacher = run(c)
        teachers[c.name] = _summary(teacher)
        points.append({"family": "teacher", "label": c.name, **teachers[c.name], "config": config_dict(c)})
        _adaptive_points(points, f"adaptive regenerate {c.name}", student, teacher, taus, c.name, False)
    for sigma in cfg.refine_sigmas:
        c = SamplerConfig("refine-all", cfg.refine_steps, "dpm", sigma)
        refined = run(c)
        points.append({"family": "refine-all", "label": c.name, **_summary(refined), "config": config_dict(c)})
        _adaptive_points(points, f"adaptive refine sigma {sigma:g}", student, refined, taus, c.name, True)
    results = {"experiment": "control", "control": kind, "n_prompts": len(prompts), "seed": seed,
               "preset": pipe.name, "student_steps": student_steps, "config": asdict(cfg), "made_by": made_by or {},
               **provenance(pipe),
               "calibration_prompts": len(held_out), "points": points,
               "acceptance": _acceptance(points, _summary(student), teachers)}
    plot = plot_control(results, out / "control_quality_vs_cost.png")
    _write(out, results, plot, control_report(results))
    return results


def plot_control(results: dict, path: Path) -> Path:
    return _plot_cost(results["points"], f"{results['control']}-conditioned generation: accuracy vs cost",
                      "captions satisfied (%)", path, size=(8, 4.2))


def control_report(results: dict) -> str:
    lines = [f"# {results['control']}-conditioned generation in tandem — {results['n_prompts']} prompts, "
             f"seed {results['seed']}", "",
             f"Control images: exact {results['control']} of a scene drawn for each caption; tau from "
             f"{results['calibration_prompts']} validation captions under their own control images.", "",
             "| run | satisfied | soft score | control IoU | UNet evals |", "|---|---|---|---|---|"]
    for p in results["points"]:
        if p["family"].startswith("adaptive") and p["k"] not in (30, 50, 70):
            continue
        lines.append(f"| {p['label']} | {100 * p['accuracy']:.1f}% | {p['mean_score']:.3f} | "
                     f"{_number(p.get('fidelity'), 3)} | {p['unet_evals_mean']:.1f} |")
    lines += ["", "## Acceptance", ""]
    lines += _acceptance_lines(results["acceptance"])
    return "\n".join(lines) + "\n"


__all__ = ["ControlConfig", "EditConfig", "control", "edit"]
