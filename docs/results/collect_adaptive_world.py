"""Collect the runs of adaptive_world.sh: each run's config (settings, summary) and judgement, and a plot."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs, out_json, out_png = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
results = {}
for run in sorted(p for p in runs.iterdir() if (p / "judge.json").exists()):
    config = json.loads((run / "config.json").read_text())
    judge = json.loads((run / "judge.json").read_text())
    judge["run"] = run.name
    if "against" in judge:
        judge["against"]["run"] = Path(judge["against"]["run"]).name
    results[run.name] = {"config": config, "judge": judge}
out_json.write_text(json.dumps(results, indent=1) + "\n")

fig, ax = plt.subplots(figsize=(6, 4))
for name, r in results.items():
    cost, acc = r["judge"]["unet_evals_mean"], 100 * r["judge"]["accuracy"]
    mode = r["config"]["mode"]
    style = {"teacher": ("s", "tab:blue"), "student": ("o", "tab:gray")}.get(mode, ("*", "tab:red"))
    ax.scatter(cost, acc, marker=style[0], color=style[1], s=80 if style[0] == "*" else 40, zorder=3)
    right = cost > 40  # labels of the costliest points go to their left
    up = "regen" in name and not right or mode == "teacher" and right
    ax.annotate(name.replace("_", " "), (cost, acc), textcoords="offset points", fontsize=7,
                xytext=(-5 if right else 5, 5 if up else -11), ha="right" if right else "left")
ax.set_xlabel("UNet evaluations per image (mean, CFG doubling counted)")
ax.set_ylabel("captions satisfied (%), exact checker")
ax.set_title("ShapesWorld, 1000 test prompts: adaptive (stars), teacher, student", fontsize=10)
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out_png, dpi=120)
print(f"{len(results)} runs -> {out_json}, {out_png}")
