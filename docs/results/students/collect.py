"""Collect the student evaluations of run.sh into one table (README, "How good the shipped students
are"): results.json of `tandem world evaluate` in, students.json and a Markdown table out.

    python docs/results/students/collect.py runs/eval docs/results/students
    python docs/results/students/collect.py docs/results/students/evaluations docs/results/students

(a run is ``EVAL_DIR/NAME/results.json`` as `tandem world evaluate` wrote it, or its copy ``EVAL_DIR/NAME.json``)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (row label, method, results directory under runs/eval, settings key)
ROWS = [
    ("teacher, DPM-Solver++", "-", "teacher25-test", "5.0", 25),
    ("teacher, DPM-Solver++", "-", "teacher10-test", "5.0", 10),
    ("cd", "consistency", None, "steps8_g6.0", 8),
    ("cd", "consistency", None, "steps4_g6.0", 4),
    ("cd", "consistency", None, "steps2_g6.0", 2),
    ("cd", "consistency", None, "steps1_g6.0", 1),
    ("pd", "progressive", "pd4-test", "steps4_g4.5", 4),
    ("pd-2", "progressive", "pd2-test", "steps2_g6.0", 2),
    ("pd-1", "progressive", "pd1-test", "steps1_g4.5", 1),
    ("pd, 8-step round (not shipped)", "progressive", "pd8-test", "steps8_g3.0", 8),
    ("kd-half", "knowledge", "kd-half-test", "steps25_g{g}", 25),
    ("kd-half", "knowledge", "kd-half-test", "steps10_g{g}", 10),
    ("dsm-half (from scratch, Eq. 3)", "knowledge, alpha 1", "dsm-half-test", "steps25_g{g}", 25),
    ("dsm-half (from scratch, Eq. 3)", "knowledge, alpha 1", "dsm-half-test", "steps10_g{g}", 10),
    ("kd-quarter", "knowledge", "kd-quarter-test", "steps25_g{g}", 25),
    ("kd-quarter", "knowledge", "kd-quarter-test", "steps10_g{g}", 10),
    ("dmd2", "dmd2", "dmd2-test", "steps4_g1.0", 4),
    ("dmd2", "dmd2", "dmd2-test", "steps2_g1.0", 2),
    ("dmd2", "dmd2", "dmd2-test", "steps1_g1.0", 1),
    ("add", "adversarial", "add-ema-750-test", "steps4_g1.0", 4),
    ("add", "adversarial", "add-ema-750-test", "steps2_g1.0", 2),
    ("add", "adversarial", "add-ema-750-test", "steps1_g1.0", 1),
]
CD_RESULTS = Path("src/tandem/assets/world/student/eval_test.json")  # the shipped consistency student's


def main(eval_dir: Path, out_dir: Path) -> None:
    rows = []
    for label, method, folder, key, steps in ROWS:
        path = CD_RESULTS if folder is None else eval_dir / folder / "results.json"
        if folder is not None and not path.exists():
            path = eval_dir / f"{folder}.json"
        if not path.exists():
            print(f"skip {label} {steps}: no {path}", file=sys.stderr)
            continue
        results = json.loads(path.read_text())
        mode = results["config"]["mode"]
        runs = results[mode]
        if "{g}" in key:
            key = next(k for k in runs if k.startswith(key.split("_g")[0] + "_g"))
        run = runs[key]
        unet = results.get("unet")
        evals = run.get("unet_evals_per_image")
        rows.append({
            "student": label, "method": method, "steps": steps,
            "guidance_scale": run["settings"]["guidance_scale"], "unet_evals_per_image": evals,
            "params": unet["params"] if unet else None,
            "flops_per_call": unet["flops_per_call"] if unet else None,
            "flops_per_image": run.get("unet_flops_per_image"),
            "accuracy": run["accuracy"], "one_object": run["by_objects"]["1"]["accuracy"],
            "n": run["n"], "results": str(path),
        })
    for r in rows:  # the consistency student's evaluation predates the cost fields: measure its UNet here
        if r["flops_per_call"] is None:
            from diffusers import UNet2DConditionModel

            from tandem.students import unet_cost

            cost = unet_cost(UNet2DConditionModel.from_pretrained(CD_RESULTS.parent / "unet").float(), 32)
            r.update(cost, flops_per_image=cost["flops_per_call"] * r["unet_evals_per_image"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "students.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [("| student | method | steps | guidance | UNet calls / image | params | UNet GFLOPs / image | "
              "captions satisfied | 1 object |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params, gflops = f"{r['params'] / 1e6:.2f}M", f"{r['flops_per_image'] / 1e9:.2f}"
        lines.append(f"| {r['student']} | {r['method']} | {r['steps']} | {r['guidance_scale']:g} | "
                     f"{r['unet_evals_per_image']} | {params} | {gflops} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['one_object']:.1f}% |")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from tandem.plots import plot_quality_vs_flops

    series: dict[str, list] = {}
    for r in rows:
        family = r["student"].split(",")[0].split(" ")[0].removesuffix("-1").removesuffix("-2")
        family = {"teacher": "teacher (DPM-Solver++)", "cd": "cd (consistency)", "pd": "pd (progressive)",
                  "kd-half": "kd-half (knowledge)", "dsm-half": "dsm-half (same UNet, no teacher)",
                  "kd-quarter": "kd-quarter (knowledge)", "dmd2": "dmd2 (distribution matching)",
                  "add": "add (adversarial)"}.get(family, family)
        series.setdefault(family, []).append((r["flops_per_image"], r["accuracy"], str(r["steps"])))
    plot_quality_vs_flops(series, out_dir / "quality_vs_flops.png",
                          title="ShapesWorld students: test captions satisfied vs. compute")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
