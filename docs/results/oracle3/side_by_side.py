"""The world's oracles side by side on the very same images: Oracle II as shipped now, Oracle II as first
shipped (commit 6bff3ba) and the first oracle (oracle-clip).

The adaptive points are composed from one `tandem eval budget` run's cached images (the 500 test prompts,
seed 0, the preset's student `pd` and teacher; ``runs/oracle3/eval_budget``, whose images are those of
``runs/oracle2/eval_budget``, re-scored with `--images-from`): each oracle scores the student's images and
takes tau from its own calibration on the 500 validation prompts; the images it rejects take the
teacher's (regeneration) or the refined (refine-all) images of the same seeds. Two readings:

* *chosen on validation*: each oracle's operating point (improvement and k) is the cheapest adaptive point
  of its own budget run on 300 validation prompts that reaches the validation quality of the reference
  teacher (DPM-Solver++ 25, DDIM 50); it is then reported on the test prompts;
* *envelope on test*: the cheapest adaptive point over the k grid read on the test prompts themselves
  (what `tandem eval budget` reports as the acceleration factor; optimistic).

    python docs/results/oracle3/side_by_side.py runs/oracle3/eval_budget docs/results/oracle3/side_by_side.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REFERENCES = ("dpm25", "ddim50")
REGENERATE = {"dpm": (10, 15, 25), "ddim": (10, 20)}  # BudgetConfig's regenerations and refinements
REFINE_SIGMAS = (0.5, 0.7, 0.85)
KS = tuple(range(0, 101, 10))
ORACLE_FILES = ("config.json", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
# name: (the oracle as of a commit, or None for the shipped one; its calibration's commit; its validation run)
ORACLES = {"oracle_ii": (None, None, "runs/oracle3/budget-val"),
           "oracle_ii_first_release": ("6bff3ba", "6bff3ba", "runs/oracle2/budget-val"),
           "first_oracle": (None, "7fe7fcf", "runs/eval/budget-val-pd")}
WORLD = "src/tandem/assets/world"
CASCADE_VAL_RUN = "runs/oracle3/budget-val-cascade"  # the validation budget run with the cascade's curve


def load(cache: Path, name: str) -> dict:
    with np.load(cache / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def git_bytes(commit: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, check=True).stdout


def families() -> list[tuple[str, str, bool]]:
    out = [(f"adaptive regenerate {s}{n}", f"{s}{n}", False) for s, steps in REGENERATE.items() for n in steps]
    return out + [(f"adaptive refine sigma {g:g}", f"refine_dpm10_sigma{g}", True) for g in REFINE_SIGMAS]


def cheapest_reaching(points: list[dict], target: float) -> dict | None:
    from tandem.eval.experiments import is_adaptive

    reaching = [p for p in points if is_adaptive(p) and p["accuracy"] >= target]
    return min(reaching, key=lambda p: p["unet_evals_mean"]) if reaching else None


def main(budget_dir: Path, out: Path) -> None:
    from tandem.calibration import Calibration
    from tandem.eval.experiments import accelerations
    from tandem.eval.sweep import compose_adaptive, summary
    from tandem.models import world_dir
    from tandem.world.oracle import WorldOracleScorer
    from tandem.world.prompts import load_prompts

    cache = budget_dir / "cache"
    results = json.loads((budget_dir / "results.json").read_text())
    prompts = load_prompts("test")[: results["n_prompts"]]
    student = load(cache, "student4")
    refs = {name: summary(load(cache, name)) for name in REFERENCES}
    report = {"command": f"python docs/results/oracle3/side_by_side.py {budget_dir} {out}",
              "test_prompts": len(prompts), "references": refs, "oracles": {}}
    scratch = Path(tempfile.mkdtemp())
    for name, (weights_commit, calibration_commit, val_run) in ORACLES.items():
        if name == "first_oracle":
            path = world_dir() / "oracle-clip"
        elif weights_commit is None:
            path = world_dir() / "oracle"
        else:  # an earlier release, read from git
            path = scratch / name
            for file in ORACLE_FILES:
                (path / file).parent.mkdir(parents=True, exist_ok=True)
                (path / file).write_bytes(git_bytes(weights_commit, f"{WORLD}/oracle/{file}"))
        if calibration_commit is None:
            calibration = Calibration.load(world_dir() / "calibration.json")
        else:
            made = json.loads(git_bytes(calibration_commit, f"{WORLD}/calibration.json"))
            calibration = Calibration(np.array(made["scores"]), made["fingerprint"])
        scores = WorldOracleScorer.from_pretrained(path)(student["images"], prompts).numpy()
        if name == "oracle_ii":  # the cached run was scored by the shipped oracle: the same scores
            assert np.allclose(scores, student["oracle"], atol=1e-5), np.abs(scores - student["oracle"]).max()
        s = {**student, "oracle": scores}
        points = []
        for family, run, includes_student in families():
            improved = load(cache, run)
            for k in KS:
                composed = compose_adaptive(s, improved, calibration.threshold(k), includes_student)
                points.append({"family": family, "label": f"{family} k={k}", "k": k,
                               "share_improved": float(composed["rejected"].mean()), **summary(composed)})
        val = json.loads((Path(val_run) / "results.json").read_text())
        val_refs = {p["label"]: p for p in val["points"] if p["label"] in REFERENCES}
        chosen = {}
        for ref in REFERENCES:
            pick = cheapest_reaching(val["points"], val_refs[ref]["accuracy"])
            test = next((p for p in points if pick and p["label"] == pick["label"]), None)
            chosen[ref] = {"validation": pick and {k: pick[k] for k in ("label", "accuracy", "unet_evals_mean")},
                           "validation_reference_accuracy": val_refs[ref]["accuracy"],
                           "test": test, "test_reference": refs[ref],
                           "test_factor_if_reached": (refs[ref]["unet_evals_mean"] / test["unet_evals_mean"]
                                                      if test and test["accuracy"] >= refs[ref]["accuracy"] else None)}
        teachers = [{"family": "teacher", "label": ref, **refs[ref]} for ref in REFERENCES]
        envelope = accelerations(points + teachers, refs)
        report["oracles"][name] = {
            "oracle": str(path) if weights_commit is None else f"{weights_commit}:{WORLD}/oracle",
            "calibration": "shipped" if calibration_commit is None else f"{calibration_commit}:{WORLD}/calibration.json",
            "validation_run": val_run, "chosen_on_validation": chosen,
            "envelope_on_test": {ref: {"factor": a["factor"], "point": a["adaptive"] and a["adaptive"]["label"],
                                       "best_adaptive_accuracy": a["best_adaptive_quality"]}
                                 for ref, a in envelope.items()},
            "points": points}
    # the shipped oracle's cascade: its budget point chosen on validation (the cheapest cascade point of the
    # validation run that reaches the reference's validation quality), and the envelope on test
    cascade = [p for p in results["points"] if p["family"] == "adaptive cascade"]
    val = json.loads((Path(CASCADE_VAL_RUN) / "results.json").read_text())
    val_cascade = [p for p in val["points"] if p["family"] == "adaptive cascade"]
    val_refs = {p["label"]: p for p in val["points"] if p["label"] in REFERENCES}
    brief = lambda p, ref: p and {"label": p["label"], "accuracy": p["accuracy"], "unet_evals_mean": p["unet_evals_mean"],
                                  "factor": refs[ref]["unet_evals_mean"] / p["unet_evals_mean"]}
    report["cascade_oracle_ii"] = {}
    for ref in REFERENCES:
        pick = cheapest_reaching(val_cascade, val_refs[ref]["accuracy"])
        test = next((p for p in cascade if pick and p["label"] == pick["label"]), None)
        report["cascade_oracle_ii"][ref] = {
            "validation_run": CASCADE_VAL_RUN, "validation": pick and brief(pick, ref),
            "test": test and brief(test, ref),
            "test_reaches_reference": bool(test and test["accuracy"] >= refs[ref]["accuracy"]),
            "envelope_on_test": brief(cheapest_reaching(cascade, refs[ref]["accuracy"]), ref)}
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in report["oracles"].items():
        for ref, c in r["chosen_on_validation"].items():
            t = c["test"]
            print(f"{name} vs {ref} ({100 * refs[ref]['accuracy']:.1f}% at {refs[ref]['unet_evals_mean']:.0f}): "
                  f"chosen on val {c['validation'] and c['validation']['label']} -> test "
                  + (f"{100 * t['accuracy']:.1f}% at {t['unet_evals_mean']:.1f}" if t else "none")
                  + f"; envelope factor {r['envelope_on_test'][ref]['factor']}")
    print("cascade:", report["cascade_oracle_ii"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
