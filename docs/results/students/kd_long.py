"""Knowledge distillation against denoising from scratch at the teacher's training budget (Dockhorn et al.'s
Fig. 3 view): the validation accuracy of the half-width student's snapshots, KD (Eq. 5) and DSM (Eq. 3, the same
network on the data alone), against training steps, from the evaluations in ``evaluations/``
(``kd-half-long-STEP-val.json``, ``dsm-half-long-STEP-val.json``; 25 steps, each run's guidance), with the
25-step teacher's validation accuracy for reference.

    python docs/results/students/kd_long.py [--teacher-val 0.562] [--out docs/results/students/kd_long]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
PATTERN = re.compile(r"(kd|dsm)-half-long-(\d+)-val\.json")


def curves(evaluations: Path) -> dict[str, list[dict]]:
    """Each run's snapshots: step, guidance, share satisfied, by objects."""
    out: dict[str, list[dict]] = {"kd": [], "dsm": []}
    for path in sorted(evaluations.glob("*-half-long-*-val.json")):
        m = PATTERN.fullmatch(path.name)
        if m is None:
            continue
        data = json.loads(path.read_text())
        (setting, result), = data["student"].items()
        out[m[1]].append({"step": int(m[2]), "setting": setting, "accuracy": result["accuracy"],
                          "by_objects": {k: v["accuracy"] for k, v in result["by_objects"].items()},
                          "file": path.name})
    for run in out.values():
        run.sort(key=lambda r: r["step"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evaluations", type=Path, default=HERE / "evaluations")
    ap.add_argument("--teacher-val", type=float, default=None, help="the 25-step teacher's validation accuracy")
    ap.add_argument("--out", type=Path, default=HERE / "kd_long")
    args = ap.parse_args()
    data = curves(args.evaluations)
    kd = {r["step"]: r["accuracy"] for r in data["kd"]}
    both = [{"step": r["step"], "kd": kd[r["step"]], "dsm": r["accuracy"]} for r in data["dsm"] if r["step"] in kd]
    result = {"curves": data, "teacher25_val": args.teacher_val, "side_by_side": both,
              "kd_above_dsm_at": [b["step"] for b in both if b["kd"] > b["dsm"]]}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("kd", "KD (Eq. 5), guidance 4"), ("dsm", "DSM from scratch (Eq. 3), guidance 5")):
        runs = data[name]
        if runs:
            ax.plot([r["step"] for r in runs], [100 * r["accuracy"] for r in runs], "o-", label=label)
    if args.teacher_val is not None:
        ax.axhline(100 * args.teacher_val, color="grey", ls="--", label="teacher, 25 steps")
    ax.set_xlabel("training steps (batch 64)")
    ax.set_ylabel("validation captions satisfied (%), 25 steps")
    ax.set_title("half-width student (1.53M parameters)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps(both))


if __name__ == "__main__":
    main()
