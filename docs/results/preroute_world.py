"""Pre-routing on ShapesWorld, a first measurement: the score predictor fitted on 200 validation prompts, the
probability p at which a prompt goes straight to the teacher chosen on 300 other validation prompts, and the
choice reported on the first 500 test prompts, against the same tandem without pre-routing.

The tandem is the drafts study's operating point (docs/results/drafts.md): two drafts, refinement at sigma 0.85
with 10 DPM-Solver++ steps below the 30th percentile of the best-of-2 calibration; a pre-routed prompt is drawn by
the 25-step teacher from its own noise (50 UNet evaluations). Every run is a real pipeline call, judged by the
exact checker.

    python docs/results/preroute_world.py --calibration docs/results/drafts/calibration-drafts2.json \
        --out runs/preroute [--threads 2] [--json docs/results/drafts/preroute.json]
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
from tandem.world.checker import check_batch
from tandem.world.grammar import parse_caption
from tandem.world.prompts import load_prompts

SETTINGS = {"drafts": 2, "percentile": 30, "strategy": "refine", "rollback_sigma": 0.85, "teacher_steps": 10,
            "teacher_scheduler": "dpm"}
PS = (None, 0.95, 0.9, 0.8, 0.7)


def run(pipe, prompts: list[str], p: float | None) -> dict:
    t0 = time.time()
    extra = {} if p is None else {"preroute": p, "preroute_steps": 25}
    out = pipe(prompts, seed=0, batch_size=100, **SETTINGS, **extra)
    ok = np.array([c.satisfied for c in check_batch(out.images, prompts)])
    three = np.array([len(parse_caption(q).objects) == 3 for q in prompts])
    pre = np.array([r.get("pre_routed", False) for r in out.records])
    return {"preroute": p, "accuracy": float(ok.mean()), "cost": out.summary["unet_evals_mean"],
            "pre_routed": float(pre.mean()), "three_objects": float(ok[three].mean()), "n_three": int(three.sum()),
            "pre_routed_accuracy": float(ok[pre].mean()) if pre.any() else None, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", type=Path, required=True, help="the best-of-2 calibration")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = TandemPipeline.from_pretrained("world")
    pipe.draft_calibrations[2] = Calibration.load(args.calibration)
    val = load_prompts("val")
    pipe.predictor = pipe.fit_predictor(val[300:], drafts=2, seed=1, batch_size=100)
    pipe.predictor.save(args.out / "predictor.json", overwrite=True)
    print(f"predictor: sigma {pipe.predictor.sigma:.4f} on {pipe.predictor.config['n']} prompts", flush=True)
    chosen_on = [run(pipe, val[:300], p) for p in PS]
    for r in chosen_on:
        print("val", r, flush=True)
    plain = chosen_on[0]
    # the choice: the best accuracy among the p whose cost stays within 25 UNet evaluations per image (none if no
    # p beats the tandem without pre-routing)
    best = max((r for r in chosen_on if r["cost"] <= 25), key=lambda r: (r["accuracy"], -r["cost"]))
    test = load_prompts("test")[:500]
    reported = [run(pipe, test, None)] + ([run(pipe, test, best["preroute"])] if best["preroute"] is not None else [])
    for r in reported:
        print("test", r, flush=True)
    result = {"experiment": "preroute_world", "settings": SETTINGS, "threads": args.threads,
              "predictor": {"fitted_on": "validation prompts 300-499", "sigma": pipe.predictor.sigma,
                            "n": pipe.predictor.config["n"]},
              "validation": chosen_on, "chosen": best["preroute"], "test": reported, "baseline_val": plain}
    text = json.dumps(result, indent=1) + "\n"
    (args.out / "preroute_world.json").write_text(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
