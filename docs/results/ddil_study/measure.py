"""DDIL's Table 2/3 on the world: each study run's 4-step student measured beside the others.

For every run of ``run.sh`` (baseline, + reflected, + reflected + DDIL for progressive and consistency
distillation, and for DMD2 at batch 7), and the repeats at training seed 1 of ``seed1.sh`` (``RUN-t1``):

* accuracy (the exact checker) on the 1000 test prompts (``tandem world evaluate`` results; sampling seeds
  0 and 1 where both were run, the table giving their mean), at the
  guidance scale chosen on the validation prompts for the shipped student of the same method (``cd``: 6,
  ``pd``: 4.5; DMD2 students sample without guidance): nothing is chosen on the test prompts;
* the Fréchet distance, in world-CLIP image features, of its test-prompt images (seed 0) to exact
  renderings of the same prompts, and diversity: the mean pairwise world-CLIP distance between 4 seeds of
  each of the first 100 test prompts (the DDIL paper's LPIPS-diversity, in world features);
* training stability from its ``log.jsonl``: the loss curves (``losses.png``), the last 10% of the run's
  mean loss and spread, and whether the run finished (a non-finite loss stops a run).

    python docs/results/ddil_study/measure.py runs/study runs/study/eval docs/results/ddil_study
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

# run -> (method, variant, guidance scale: the one chosen on validation for the shipped student of the method)
RUNS = {
    "pd-base": ("progressive", "baseline", 4.5),
    "pd-refl": ("progressive", "+ reflected", 4.5),
    "pd-refl-ddil": ("progressive", "+ reflected + DDIL", 4.5),
    "cd-base": ("consistency", "baseline", 6.0),
    "cd-refl": ("consistency", "+ reflected", 6.0),
    "cd-refl-ddil": ("consistency", "+ reflected + DDIL", 6.0),
    "dmd2-b7-base": ("dmd2, batch 7", "baseline", 1.0),
    "dmd2-b7-refl": ("dmd2, batch 7", "+ reflected", 1.0),
    "dmd2-b7-refl-ddil": ("dmd2, batch 7", "+ reflected + DDIL", 1.0),
}
TRAINING_SEEDS = {"": 0, "-t1": 1}  # run-name suffix -> the training seed (--seed) of the run
STEPS = 4
SEEDS = (0, 1, 2, 3)
DIVERSITY_PROMPTS = 100


def accuracy(results_json: Path, scale: float) -> float:
    """The share satisfied at ``STEPS`` steps and guidance ``scale`` in a `tandem world evaluate` results.json."""
    return json.loads(results_json.read_text())["student"][f"steps{STEPS}_g{float(scale)}"]["accuracy"]


def stability(log: Path) -> dict:
    """The run's loss curves (``loss``; in DMD2 the student's ``student/loss`` and the critic's ``critic/loss``),
    with the mean and spread of each over the last 10% of the steps, and whether every logged loss is finite."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = {"steps": max(r["step"] for r in rows), "finite": True, "losses": {}}
    for key in ("loss", "student/loss", "critic/loss"):
        steps = np.array([r["step"] for r in rows if key in r])
        if not len(steps):
            continue
        values = np.array([r[key] for r in rows if key in r], np.float64)
        tail = values[steps >= 0.9 * steps.max()]
        out["finite"] &= bool(np.isfinite(values).all())
        out["losses"][key] = {"final_mean": float(tail.mean()), "final_std": float(tail.std()),
                              "curve": [[int(a), float(b)] for a, b in zip(steps, values)]}
    return out


def mixed_runs(mx: Path) -> list[dict]:
    """The covariate-shift study's judgements (``table7.sh``: runs/study/mx/RUN-CHOICE/judge.json)."""
    rows = []
    for judge in sorted(mx.glob("*/judge.json")):
        run, _, choice = judge.parent.name.rpartition("-")
        data = json.loads(judge.read_text())
        rows.append({"run": run, "teacher": choice, "n": data["n"], "accuracy": data["accuracy"],
                     "unet_evals_mean": data["unet_evals_mean"]})
    return rows


def seed_means(rows: list[dict]) -> list[str]:
    """Per method and variant, the accuracy (mean over sampling seeds) of each training seed, their mean and the
    change from the method's baseline at each training seed (the paired difference the study asks about)."""
    done = [r for r in rows if r["finished"]]
    acc = {(r["method"], r["variant"], r["training_seed"]): 100 * np.mean(
        [a for a in (r["accuracy_test"], r.get("accuracy_test_seed1")) if a is not None]) for r in done}
    lines = ["| method | variant | accuracy by training seed | mean | change from baseline by training seed |",
             "|---|---|---|---|---|"]
    for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in done):
        seeds = sorted(t for (m, v, t) in acc if (m, v) == (method, variant))
        values = [acc[method, variant, t] for t in seeds]
        change = [acc[method, variant, t] - acc[method, "baseline", t] for t in seeds
                  if (method, "baseline", t) in acc]
        lines.append(f"| {method} | {variant} | " + " / ".join(f"{v:.1f}%" for v in values) +
                     f" | {np.mean(values):.1f}% | " + " / ".join(f"{c:+.1f}" for c in change) + " |")
    return lines


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), dpi=120, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for r in (r for r in rows if r["method"] == method):
            key = next(iter(r["stability"]["losses"]))
            curve = np.array(r["stability"]["losses"][key]["curve"])
            window = max(1, len(curve) // 40)
            smooth = np.convolve(curve[:, 1], np.ones(window) / window, mode="valid")
            seed = r.get("training_seed", 0)
            ax.plot(curve[window - 1:, 0], smooth, label=f"{r['variant']} (seed {seed})", linewidth=1,
                    linestyle="-" if seed == 0 else "--")
        ax.set_title(f"{method}: {next(iter(r['stability']['losses']))}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(runs: Path, evals: Path, out: Path) -> None:
    from tandem.eval.features import ImageFeatures, diversity, frechet_distance, renderings
    from tandem.generate import StudentSettings, generate_student
    from tandem.loaders import load_student
    from tandem.world.prompts import load_prompts

    t0 = time.time()
    prompts = load_prompts("test")
    features = ImageFeatures.world()
    reference = features(renderings(prompts, 0))
    rows = []
    for run, (method, variant, scale), seed in [(base + suffix, spec, seed) for base, spec in RUNS.items()
                                                for suffix, seed in TRAINING_SEEDS.items()]:
        if seed and not (runs / run).is_dir():  # not repeated at this training seed
            continue
        if not (runs / run / "student").is_dir():  # not run, or stopped (a non-finite loss stops a run)
            print(f"{run}: no student", flush=True)
            if (runs / run / "log.jsonl").exists():
                rows.append({"run": run, "method": method, "variant": variant, "training_seed": seed, "finished": False,
                             "stability": stability(runs / run / "log.jsonl")})
            continue
        if not (evals / f"{run}-test" / "results.json").exists():
            print(f"{run}: not evaluated yet", flush=True)
            continue
        # the images' Fréchet distance and diversity, kept between calls (the runs end one by one)
        cached = evals / "measure" / f"{run}.json"
        if cached.exists():
            measured = json.loads(cached.read_text())
        else:
            pipe = load_student(runs / run / "student")
            settings = StudentSettings(STEPS, scale)
            draw = lambda p, s, pipe=pipe, settings=settings: np.stack(generate_student(pipe, p, settings, s))
            seeds = [features(draw(prompts[:DIVERSITY_PROMPTS], s)) for s in SEEDS]
            measured = {"student": pipe.student_info.method,
                        "frechet_distance": frechet_distance(features(draw(prompts, 0)), reference),
                        "diversity": diversity(np.stack(seeds, axis=1))}
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(measured) + "\n")
        seed1 = evals / f"{run}-test-s1" / "results.json"
        rows.append({"run": run, "method": method, "variant": variant, "training_seed": seed, "finished": True,
                     "guidance_scale": scale,
                     "accuracy_test": accuracy(evals / f"{run}-test" / "results.json", scale),
                     "accuracy_test_seed1": accuracy(seed1, scale) if seed1.exists() else None, **measured,
                     "stability": stability(runs / run / "log.jsonl"),
                     "train_config": json.loads((runs / run / "train_config.json").read_text())})
        print({k: v for k, v in rows[-1].items() if k not in ("stability", "train_config")}, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(rows, out / "losses.png")
    (out / "results.json").write_text(json.dumps({
        "command": f"python docs/results/ddil_study/measure.py {runs} {evals} {out}",
        "steps": STEPS, "prompts": "test (1000)",
        "diversity_prompts": DIVERSITY_PROMPTS, "seeds": list(SEEDS), "features": "world CLIP image tower",
        "reference": "exact renderings of the test prompts (seed 0)", "seconds": time.time() - t0,
        "rows": rows, "mixed": mixed_runs(runs / "mx")}, indent=1) + "\n")
    lines = ["| method | variant | training seed | guidance | test accuracy | Fréchet distance | diversity | "
             "final loss (mean ± sd) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["finished"]:
            lines.append(f"| {r['method']} | {r['variant']} | {r['training_seed']} | - | stopped at step "
                         f"{r['stability']['steps']} "
                         f"| - | - | {'non-finite' if not r['stability']['finite'] else '-'} |")
            continue
        s = r["stability"]
        key = next(iter(s["losses"]))
        loss = f"{s['losses'][key]['final_mean']:.4g} ± {s['losses'][key]['final_std']:.2g}"
        seeds = [a for a in (r["accuracy_test"], r.get("accuracy_test_seed1")) if a is not None]
        lines.append(f"| {r['method']} | {r['variant']} | {r['training_seed']} | {r['guidance_scale']:g} | "
                     f"{100 * np.mean(seeds):.1f}% | "
                     f"{r['frechet_distance']:.4f} | {r['diversity']:.4f} | "
                     f"{loss}{'' if s['finite'] else ' (non-finite)'} |")
    lines += ["", *seed_means(rows)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
