"""Which student makes the best tandem at equal cost: the adaptive pipeline built on each of several
students, compared at the same average number of UNet evaluations per image.

Every student gets the same teacher, oracle, prompts and seeds. Its curve is the budget experiment's
(``experiments.budget``) for that student: the student alone, and the adaptive pipeline with each
improvement (regeneration by the teacher at some DPM-Solver++ steps, refinement at some rollback sigma)
at each percentile k of its own calibration. The teacher's runs do not depend on the student, so they are
drawn once and shared.

At each cost level C, each student's configuration (improvement, k) is the best one costing at most C
**on the choice prompts** (the world: its validation prompts); the reported numbers are those
configurations on the reported prompts (the world: its test prompts). Without choice prompts the
configuration is chosen on the reported prompts themselves, and the results say so (an optimistic
envelope). The cheapest configuration reaching the reference teacher (DPM-Solver++ 25 by default) gives
each student's acceleration factor, read off the reported curves as in the budget experiment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..routes import quality
from .experiments import _figure, _save_figure, _thresholds, _write
from .judges import Measures, format_quality, plotted_quality, quality_label
from .sweep import SamplerConfig, Sweep, compose_adaptive, provenance, summary


@dataclass(frozen=True)
class StudentsConfig:
    teacher_steps: tuple[int, ...] = (5, 10, 15, 25)  # the teacher's DPM-Solver++ curve
    regenerate_steps: tuple[int, ...] = (10, 25)     # regenerations (runs of that curve)
    refine_steps: int = 10                            # DPM-Solver++ steps of a refinement
    refine_sigmas: tuple[float, ...] = (0.5, 0.7)
    ks: tuple[int, ...] = tuple(range(10, 100, 10))   # percentiles of each student's calibration
    costs: tuple[float, ...] = (6, 8, 10, 12, 16, 20, 25, 30, 40, 50)  # UNet evaluations per image
    reference: int = 25                               # DPM-Solver++ steps of the reference teacher

    def __post_init__(self):
        if self.reference not in self.teacher_steps:
            raise ValueError(f"the reference teacher (dpm{self.reference}) must be one of teacher_steps "
                             f"{self.teacher_steps}")
        if not set(self.regenerate_steps) <= set(self.teacher_steps):
            raise ValueError("regenerate_steps must be among teacher_steps (a regeneration is a teacher run)")
        if any(not 0 < k < 100 for k in self.ks):
            raise ValueError(f"ks must lie strictly between 0 and 100, got {self.ks}")


def _teacher_identity(pipe) -> dict:
    models = pipe.fingerprint()
    return {"teacher": models["teacher"], "scorer": models["scorer"]}


def cache_name(student: str) -> str:
    """The cache directory's name for ``student`` (a shipped name or a path): the name itself when it is a plain
    name, else (a path, or the teacher's own ``teacher``) ``student-`` and a digest of it, so that every file an
    experiment writes stays under its ``--out``."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", student) and student != "teacher" and ".." not in student:
        return student
    return "student-" + hashlib.sha256(student.encode()).hexdigest()[:16]


def curves(pipes: dict, prompts: list[str], cache: Path, seed: int, cfg: StudentsConfig, batch_size: int,
           log: Callable[[str], None], progress=None, judge=None) -> tuple[list[dict], dict[str, list[dict]]]:
    """``(teacher points, {student: its points})`` on ``prompts``: each point a ``summary`` with its
    ``config`` (``"student"``, ``"regenerate dpmN k=K"`` or ``"refine sigma S k=K"``)."""
    first = next(iter(pipes.values()))
    teacher_sweep = Sweep(first, prompts, seed, cache / "teacher", batch_size, progress=progress, judge=judge,
                          identity={"runs": "teacher", "models": _teacher_identity(first)})
    teacher_runs = {n: teacher_sweep.run(SamplerConfig("teacher", n, "dpm"), log) for n in cfg.teacher_steps}
    teacher_points = [{"config": f"teacher dpm{n}", **summary(r)} for n, r in teacher_runs.items()]
    students = {}
    for name, pipe in pipes.items():
        sweep = Sweep(pipe, prompts, seed, cache / cache_name(name), batch_size, progress=progress, judge=judge,
                      identity={"student": name})
        steps = int(pipe._setting("num_inference_steps", None, 4))
        alone = sweep.run(SamplerConfig("student", steps), log)
        taus = _thresholds(pipe, cfg.ks)
        points = [{"config": "student", "k": 0, "share_improved": 0.0, **summary(alone)}]
        improvements = [(f"regenerate dpm{n}", teacher_runs[n], False) for n in cfg.regenerate_steps]
        for sigma in cfg.refine_sigmas:
            refined = sweep.run(SamplerConfig("refine-all", cfg.refine_steps, "dpm", sigma), log)
            improvements.append((f"refine sigma {sigma:g}", refined, True))
        for label, improved, includes_student in improvements:
            for k, tau in taus.items():
                composed = compose_adaptive(alone, improved, tau, includes_student)
                points.append({"config": f"{label} k={k}", "k": k, "tau": float(tau),
                               "share_improved": float(composed["rejected"].mean()), **summary(composed)})
        students[name] = points
    return teacher_points, students


def best_within(points: list[dict], cost: float) -> dict | None:
    """The best point costing at most ``cost`` UNet evaluations per image (the cheaper one on a tie)."""
    affordable = [p for p in points if p["unet_evals_mean"] <= cost + 1e-9]
    return max(affordable, key=lambda p: (quality(p), -p["unet_evals_mean"])) if affordable else None


def compare(reported: dict[str, list[dict]], chosen_on: dict[str, list[dict]], costs, reference: dict) -> dict:
    """For each cost level, each student's configuration chosen on ``chosen_on`` and its numbers in
    ``reported``, and the best of them (all that tie); for each student, the cheapest reported point reaching
    ``reference``."""
    levels = []
    for cost in costs:
        row = {}
        for name, points in reported.items():
            choice = best_within(chosen_on[name], cost)
            if choice is None:
                continue
            point = next(p for p in points if p["config"] == choice["config"])
            row[name] = {"config": choice["config"], "choice_quality": quality(choice), **point}
        if row:
            top = max(quality(p) for p in row.values())
            levels.append({"cost": cost, "students": row, "best": [n for n, p in row.items() if quality(p) == top]})
    reaching = {}
    for name, points in reported.items():
        adaptive = [p for p in points if p["share_improved"] > 0 and quality(p) >= quality(reference)]
        best = min(adaptive, key=lambda p: p["unet_evals_mean"], default=None)
        reaching[name] = {"point": best, "factor": reference["unet_evals_mean"] / best["unet_evals_mean"]
                          if best else None}
    return {"levels": levels, "reaching_reference": reaching}


def students(pipes: dict, prompts: list[str], out: str | Path, seed: int = 0, cfg: StudentsConfig = StudentsConfig(),
             choice_prompts: list[str] | None = None, batch_size: int = 100, log: Callable[[str], None] = print,
             made_by: dict | None = None, progress=None, measures: Measures | None = None) -> dict:
    """Run the comparison (module docstring) for ``pipes`` (name -> a calibrated ``TandemPipeline``; one
    teacher and one oracle for all) and write ``results.json``, ``students.png`` and ``report.md`` to ``out``."""
    if not pipes:
        raise ValueError("no students to compare")
    teachers = {name: _teacher_identity(pipe) for name, pipe in pipes.items()}
    if len({repr(v) for v in teachers.values()}) > 1:
        raise ValueError("the students must share one teacher and one oracle: " + "; ".join(
            f"{name}: {v}" for name, v in teachers.items()))
    measures = measures or Measures.for_world()
    out = Path(out)
    run = lambda prompt_list, cache: curves(pipes, prompt_list, out / cache, seed, cfg, batch_size, log, progress,
                                            measures.judge)
    teacher_points, reported = run(prompts, "cache")
    chosen_on = run(choice_prompts, "cache-choice")[1] if choice_prompts is not None else reported
    reference = next(p for p in teacher_points if p["config"] == f"teacher dpm{cfg.reference}")
    first = next(iter(pipes.values()))
    results = {"experiment": "students", "n_prompts": len(prompts), "seed": seed,
               "chosen_on": "choice prompts" if choice_prompts is not None else "the reported prompts (optimistic)",
               "n_choice_prompts": len(choice_prompts) if choice_prompts is not None else None,
               "config": asdict(cfg), "made_by": made_by or {}, **provenance(first),
               "students": {name: {"models": pipe.fingerprint(), "defaults": dict(pipe.defaults)}
                            for name, pipe in pipes.items()},
               "judge": measures.judge.describe(), "teacher": teacher_points, "points": reported,
               **compare(reported, chosen_on, cfg.costs, reference), "reference": reference}
    _write(out, results, plot_students(results, out / "students.png"), students_report(results))
    return results


def plot_students(results: dict, path: Path) -> Path:
    y = lambda p: plotted_quality(quality(p), results)
    fig, ax = _figure(size=(8, 4.4))
    ax.set_title("the adaptive pipeline on each student: quality vs cost", fontsize=10)
    ax.grid(alpha=0.3)
    teacher = sorted(results["teacher"], key=lambda p: p["unet_evals_mean"])
    ax.plot([p["unet_evals_mean"] for p in teacher], [y(p) for p in teacher], "-ok", markersize=4,
            label="teacher DPM-Solver++")
    for i, (name, points) in enumerate(results["points"].items()):
        colour = f"C{i % 10}"
        chosen = [level["students"][name] for level in results["levels"] if name in level["students"]]
        ax.plot([p["unet_evals_mean"] for p in points], [y(p) for p in points], ".", color=colour, alpha=0.25,
                markersize=3)
        ax.plot([p["unet_evals_mean"] for p in chosen], [y(p) for p in chosen], "-o", color=colour, markersize=4,
                label=f"{name} (chosen at each cost)")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (mean; CFG doubling counted)")
    ax.set_ylabel(quality_label(results))
    ax.legend(fontsize=7, loc="lower right")
    return _save_figure(fig, path)


def students_report(results: dict) -> str:
    q = lambda p: format_quality(quality(p), results)
    names = list(results["points"])
    lines = [f"# Which student makes the best tandem ({results['n_prompts']} prompts, seed {results['seed']})", "",
             (f"Each student's configuration at a cost level is the best one costing at most that many UNet "
              f"evaluations per image, chosen on {results['chosen_on']}; the numbers are those configurations "
              "on the reported prompts (their cost there can differ slightly)."), "",
             "| cost ≤ | " + " | ".join(names) + " | best |", "|---|" + "---|" * (len(names) + 1)]
    for level in results["levels"]:
        cells = []
        for name in names:
            p = level["students"].get(name)
            cells.append(f"{q(p)} @ {p['unet_evals_mean']:.1f} ({p['config']})" if p else "-")
        lines.append(f"| {level['cost']:g} | " + " | ".join(cells) + f" | {' = '.join(level['best'])} |")
    ref = results["reference"]
    lines += ["", f"The teacher ({ref['config']}): {q(ref)} at {ref['unet_evals_mean']:.1f} UNet evaluations "
              "per image.",
              "", "| student | alone | cheapest adaptive point reaching the teacher | cost | factor |",
              "|---|---|---|---|---|"]
    for name in names:
        alone = next(p for p in results["points"][name] if p["config"] == "student")
        r = results["reaching_reference"][name]
        reached = (f"{r['point']['config']} ({q(r['point'])}) | {r['point']['unet_evals_mean']:.1f} | "
                   f"{r['factor']:.2f}x" if r["point"] else "not reached | - | -")
        lines.append(f"| {name} | {q(alone)} @ {alone['unet_evals_mean']:.1f} | {reached} |")
    return "\n".join(lines) + "\n"

