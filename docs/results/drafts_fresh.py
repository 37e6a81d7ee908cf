"""Drafts re-checked outside the world's lists: ``--budget B`` alone on fresh captions, through the real pipeline.

1. Captions: scenes drawn from a stream of their own (``sample_scene((FRESH_SEED, i))``), none on the validation or
   test lists, the same number of one-, two- and three-object captions (the lists follow the world's scene
   mix, which has fewer of three objects).
2. Route tables: the world's shipped one (one draft), and the ones ``tandem eval routes`` makes from a
   ``drafts_world.py`` run's validation budget results with its best-of-N calibrations (routes that may draw
   drafts), by quality and by win rate against the 25-step teacher (``--rule``).
3. On the fresh captions, seed 0: the 25-step teacher (DPM-Solver++, the preset's guidance) and
   ``pipe(captions, budget=B)`` with each table, judged by the exact checker: share satisfied (overall and by
   objects), mean UNet evaluations per image, and the side-by-side win rate against the teacher.

    python docs/results/drafts_fresh.py --drafts-run runs/drafts8 --out runs/drafts-fresh [--threads 1] \
        [--json docs/results/drafts/fresh.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tandem import TandemPipeline
from tandem.calibration import Calibration
from tandem.eval.judges import ExactJudge
from tandem.eval.metrics import win_rate
from tandem.routes import RouteTable
from tandem.world.prompts import load_prompts
from tandem.world.scene import sample_scene

FRESH_SEED = 2026
BUDGETS = (12, 25, 50)


def fresh_captions(per_count: int) -> list[str]:
    """``per_count`` captions of each object count (1, 2, 3), in the stream's order, on neither list."""
    listed = set(load_prompts("val")) | set(load_prompts("test"))
    kept: dict[int, list[str]] = {1: [], 2: [], 3: []}
    i = 0
    while min(len(v) for v in kept.values()) < per_count:
        scene = sample_scene((FRESH_SEED, i))
        i += 1
        group = kept[len(scene.objects)]
        if scene.caption not in listed and scene.caption not in group and len(group) < per_count:
            group.append(scene.caption)
    return [c for n in (1, 2, 3) for c in kept[n]]


def summary(judged: dict, costs: np.ndarray, counts: np.ndarray) -> dict:
    return {"accuracy": float(judged["satisfied"].mean()), "cost": float(costs.mean()),
            "by_objects": {str(n): float(judged["satisfied"][counts == n].mean()) for n in (1, 2, 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafts-run", type=Path, required=True, help="a drafts_world.py --out directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-count", type=int, default=167)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rules", nargs="+", default=["quality", "win-rate"], help="the drafts tables' rules")
    ap.add_argument("--no-shipped", action="store_true", help="leave out the shipped one-draft table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    captions = fresh_captions(args.per_count)
    counts = np.repeat([1, 2, 3], args.per_count)
    (args.out / "captions.txt").write_text("\n".join(captions) + "\n")
    pipe = TandemPipeline.from_pretrained("world")
    shipped = pipe.routes
    for path in sorted(args.drafts_run.glob("calibration-drafts*.json")):
        pipe.draft_calibrations[int(path.stem.removeprefix("calibration-drafts"))] = Calibration.load(path)
    val_results = json.loads((args.drafts_run / "val" / "results.json").read_text())
    tables = [] if args.no_shipped else [("one draft (shipped table)", shipped)]
    for rule in args.rules:
        table = RouteTable.from_budget(val_results, pipe, rule=rule)
        table.save(args.out / f"routes-drafts-{rule}.json", overwrite=True)
        tables.append((f"drafts, by {rule}", table))
    judge = ExactJudge()
    t0 = time.time()
    teacher = pipe(captions, mode="teacher", teacher_steps=25, teacher_scheduler="dpm", seed=0, batch_size=100)
    teacher_judged = judge(teacher.images, captions)
    rows = {"teacher25": summary(teacher_judged, np.array([r["unet_evals"]["total"] for r in teacher.records]),
                                 counts)}
    print(f"teacher: {100 * rows['teacher25']['accuracy']:.1f}% ({time.time() - t0:.0f}s)", flush=True)
    for name, table in tables:
        pipe.routes = table
        for budget_value in BUDGETS:
            t0 = time.time()
            out = pipe(captions, budget=budget_value, seed=0, batch_size=100)
            judged = judge(out.images, captions)
            row = summary(judged, np.array([r["unet_evals"]["total"] for r in out.records]), counts)
            route = out.summary["settings"]["route"]
            row.update(route={k: route[k] for k in ("strategy", "rollback_sigma", "teacher_steps", "percentile",
                                                    "drafts")} if route else None,
                       win_rate_vs_teacher25=win_rate(judged["score"], teacher_judged["score"]))
            rows[f"{name}, budget {budget_value}"] = row
            print(f"{name}, budget {budget_value}: {100 * row['accuracy']:.1f}% at {row['cost']:.1f}, three objects "
                  f"{100 * row['by_objects']['3']:.1f}%, win rate {row['win_rate_vs_teacher25']['win_rate']:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    result = {"experiment": "drafts_fresh", "threads": args.threads,
              "config": {"fresh_seed": FRESH_SEED, "per_count": args.per_count, "seed": 0, "budgets": BUDGETS,
                         "drafts_run": str(args.drafts_run), "tables": {name: t.to_json() for name, t in tables}},
              "results": rows}
    text = json.dumps(result, indent=1) + "\n"
    (args.out / "drafts_fresh.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    print(f"-> {args.out / 'drafts_fresh.json'}")


if __name__ == "__main__":
    main()
