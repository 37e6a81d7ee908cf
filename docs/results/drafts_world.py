"""Oracle-chosen drafts on ShapesWorld: budget curves with the best of N student drafts beside today's one-draft
curves and the 25-step teacher, every choice made on validation prompts and reported on test prompts.

1. Best-of-N calibrations (N = 2, 4) on the world's 500 validation prompts, seed 0, as the shipped one-draft
   calibration was made (``tandem calibrate --drafts N``).
2. ``tandem eval budget``'s experiment (tandem.eval.experiments.budget) with a lean configuration (the teacher at
   10 and 25 DPM steps, the preset's 4-step student, refinement at three rollbacks, regeneration with the 25-step
   teacher, k in steps of 10, drafts 2 and 4) on the first 300 validation prompts and on the first 500 test
   prompts, seed 0.
3. At each budget B, on the validation prompts, the configuration a budget alone would take under the route
   tables' rule (the cheapest within one standard error of the best affordable, monotone in B); the same
   configurations (and today's one-draft choice) reported on the test prompts: share satisfied, cost, win rate
   against the 25-step teacher (the exact checker's per-image score, ties split), and the share satisfied on
   captions of three objects.

    python docs/results/drafts_world.py --out runs/drafts [--threads 2] [--json docs/results/drafts/results.json]

``--drafts 2 4 8 --n-val 500`` is the second run (eight drafts, choices on all 500 validation prompts).
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
from tandem.eval.experiments import BudgetConfig, budget
from tandem.eval.judges import Measures
from tandem.eval.metrics import win_rate
from tandem.eval.sweep import compose_adaptive
from tandem.routes import RouteTable, share_se
from tandem.world.grammar import parse_caption
from tandem.world.prompts import load_prompts

BUDGETS = (8, 12, 16, 20, 25, 50)


def budget_config(drafts: tuple[int, ...]) -> BudgetConfig:
    return BudgetConfig(teacher_steps={"dpm": (10, 25)}, student_steps=(4,), refine_sigmas=(0.5, 0.7, 0.85),
                        refine_steps=10, regenerate={"dpm": (25,)}, ks=tuple(range(0, 101, 10)),
                        references=("dpm25",), mixed_teacher_probs=(), mixed_teacher_first=False, drafts=drafts)


def calibrations(pipe, out: Path, drafts: tuple[int, ...]) -> None:
    for n in drafts:
        path = out / f"calibration-drafts{n}.json"
        if not path.exists():
            t0 = time.time()
            calibration = pipe.calibrate(load_prompts("val"), seed=0, batch_size=100, drafts=n,
                                         config={"command": f"tandem calibrate --drafts {n}"})
            calibration.save(path)
            print(f"best-of-{n} calibration in {time.time() - t0:.0f}s -> {path}", flush=True)
        pipe.draft_calibrations[n] = Calibration.load(path)


def per_image(results: dict, out: Path, label: str) -> dict:
    """A budget point's per-image arrays, composed again from the run's cached sweep results."""
    point = next(p for p in results["points"] if p["label"] == label)
    load = lambda name: dict(np.load(out / "cache" / f"{name}.npz"))
    if "k" not in point:  # a run of its own: the student (drafts or not) or the teacher
        return load(point["config"]["name"])
    student = load("student4" if point.get("drafts", 1) == 1 else f"student4_drafts{point['drafts']}")
    improved = load(point["improved"])
    refine = point["improved"].startswith("refine")
    return compose_adaptive(student, improved, point["tau"], refine)


def candidates(results: dict) -> list[dict]:
    """Every configuration a budget may take: the student (N drafts) alone and the adaptive points."""
    return [p for p in results["points"] if p["family"] in ("student", "student drafts")
            and (p["label"] == "student4" or p["label"].startswith("student4_drafts"))
            or p["family"].startswith("adaptive")]


def choose(points: list[dict], budget_value: float, n: int, drafts: bool) -> dict:
    """The route tables' rule on validation: of the points within the budget, the cheapest whose share is within
    one standard error of the best one's; a larger budget never takes a worse one (monotone)."""
    current = None
    pool = [p for p in points if drafts or p.get("drafts", 1) == 1]
    for cost in sorted({p["unet_evals_mean"] for p in pool if p["unet_evals_mean"] <= budget_value + 1e-9}):
        affordable = [p for p in pool if p["unet_evals_mean"] <= cost + 1e-9]
        best = max(affordable, key=lambda p: (p["accuracy"], -p["unet_evals_mean"]))
        near = [p for p in affordable if p["accuracy"] >= best["accuracy"] - share_se(best["accuracy"], n) - 1e-12]
        pick = min(near, key=lambda p: (p["unet_evals_mean"], -p["accuracy"]))
        if current is None or pick["accuracy"] > current["accuracy"]:
            current = pick
    return current


def route_label(route) -> str:
    """The budget point a route table's route came from."""
    if route.strategy is None:
        return "student4" if route.drafts == 1 else f"student4_drafts{route.drafts}"
    if route.strategy == "refine":
        drafts = f" drafts {route.drafts}" if route.drafts > 1 else ""
        return f"adaptive refine sigma {route.rollback_sigma:g}{drafts} k={route.percentile:g}"
    return f"adaptive regenerate {route.teacher_scheduler}{route.teacher_steps} k={route.percentile:g}"


def objects(prompt: str) -> int:
    return len(parse_caption(prompt).objects)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--drafts", type=int, nargs="+", default=[2, 4], help="the drafts curves beside one draft")
    args = ap.parse_args()
    drafts_levels = tuple(sorted(set(args.drafts)))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = TandemPipeline.from_pretrained("world")
    calibrations(pipe, args.out, drafts_levels)
    val_prompts, test_prompts = load_prompts("val")[:args.n_val], load_prompts("test")[:args.n_test]
    runs = {}
    for name, prompts in (("val", val_prompts), ("test", test_prompts)):
        t0 = time.time()
        runs[name] = budget(pipe, prompts, args.out / name, seed=0, cfg=budget_config(drafts_levels), batch_size=100,
                            log=lambda m: print(m, flush=True), measures=Measures.for_world(),
                            made_by={"command": "docs/results/drafts_world.py", "prompts": name, "n": len(prompts),
                                     "threads": args.threads})
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    val, test = runs["val"], runs["test"]
    by_label = {p["label"]: p for p in test["points"]}
    teacher = per_image(test, args.out / "test", "dpm25")
    three = np.array([objects(p) == 3 for p in test_prompts])
    rows = []

    def on_test(label: str) -> dict:
        """A validation choice reported on the test prompts."""
        reported, images = by_label[label], per_image(test, args.out / "test", label)
        return {"accuracy": reported["accuracy"], "cost": reported["unet_evals_mean"],
                "accuracy_se": share_se(reported["accuracy"], len(test_prompts)),
                "three_objects": float(images["satisfied"][three].mean()),
                "win_rate_vs_teacher25": win_rate(images["score"], teacher["score"])}

    for budget_value in BUDGETS:
        for drafts in (False, True):
            chosen = choose(candidates(val), budget_value, len(val_prompts), drafts)
            reported = by_label[chosen["label"]]
            rows.append({"budget": budget_value, "drafts_allowed": drafts, "rule": "route tables", "label": chosen["label"],
                         "val": {"accuracy": chosen["accuracy"], "cost": chosen["unet_evals_mean"]},
                         "test": on_test(chosen["label"])})
            print(f"B {budget_value:>2} {'drafts' if drafts else 'one draft'}: {chosen['label']}: val "
                  f"{100 * chosen['accuracy']:.1f}% at {chosen['unet_evals_mean']:.1f}; test "
                  f"{100 * reported['accuracy']:.1f}% at {reported['unet_evals_mean']:.1f}, three objects "
                  f"{100 * rows[-1]['test']['three_objects']:.1f}%, win rate "
                  f"{rows[-1]['test']['win_rate_vs_teacher25']['win_rate']:.3f}", flush=True)
    # the route tables' rule on the win rate against the 25-step teacher: the table `tandem eval routes --rule
    # win-rate` makes from the validation run, drafts allowed
    table = RouteTable.from_budget(val, pipe, rule="win-rate", win_rate_vs="dpm25")
    val_by_label = {p["label"]: p for p in val["points"]}
    for budget_value in BUDGETS:
        chosen = val_by_label[route_label(table.choose(budget_value))]
        rate = chosen["win_rate"]["dpm25"]["rate"]
        reported = by_label[chosen["label"]]
        rows.append({"budget": budget_value, "drafts_allowed": True, "rule": "win rate", "label": chosen["label"],
                     "val": {"accuracy": chosen["accuracy"], "cost": chosen["unet_evals_mean"],
                             "win_rate_vs_teacher25": rate},
                     "test": on_test(chosen["label"])})
        print(f"B {budget_value:>2} win-rate rule: {chosen['label']}: val win rate {rate:.3f}, "
              f"{100 * chosen['accuracy']:.1f}% at {chosen['unet_evals_mean']:.1f}; test {100 * reported['accuracy']:.1f}% "
              f"at {reported['unet_evals_mean']:.1f}, win rate {rows[-1]['test']['win_rate_vs_teacher25']['win_rate']:.3f}",
              flush=True)
    summary = {"experiment": "drafts_world", "threads": args.threads, "config": {
                   "drafts": drafts_levels, "budgets": BUDGETS, "n_val": len(val_prompts), "n_test": len(test_prompts),
                   "seed": 0, "calibrations": "500 validation prompts, seed 0"},
               "teacher25_test": {"accuracy": by_label["dpm25"]["accuracy"], "cost": by_label["dpm25"]["unet_evals_mean"],
                                  "three_objects": float(teacher["satisfied"][three].mean()),
                                  "three_object_prompts": int(three.sum())},
               "choices": rows,
               "curves": {name: [{k: p.get(k) for k in ("family", "label", "k", "drafts", "accuracy",
                                                        "unet_evals_mean", "share_improved")}
                                 for p in candidates(r) + [q for q in r["points"] if q["family"].startswith("teacher")]]
                          for name, r in runs.items()}}
    text = json.dumps(summary, indent=1) + "\n"
    (args.out / "drafts_world.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(f"-> {args.out / 'drafts_world.json'}")


if __name__ == "__main__":
    main()
