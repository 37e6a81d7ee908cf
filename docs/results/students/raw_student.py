"""The student a run trained, without its EMA: for the ablation of an EMA export.

A run started with ``--ema D`` exports the EMA of its student; its last checkpoint also holds the student's own
weights. This writes a copy of the exported student whose UNet carries those weights instead (``student.json``
says ``"weights": "student"``), after checking that the checkpoint is from the step the export was taken at::

    python docs/results/students/raw_student.py runs/add-ema runs/add-ema-raw
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

from tandem.training.checkpoints import load_checkpoint_file


def raw_student(run: Path, out: Path, network: str = "student") -> Path:
    student = run / "student"
    info = json.loads((student / "student.json").read_text())
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    exported = info["details"].get("optimisation_steps")
    if info["details"].get("weights") != "ema":
        raise SystemExit(f"{student} holds the student's own weights already (weights: {info['details'].get('weights')})")
    if meta["step"] != exported:
        raise SystemExit(f"{run}/checkpoint is at step {meta['step']}, the export at step {exported}: not the same student")
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new directory")
    state = load_checkpoint_file(run / "checkpoint" / "state.pt")["models"][network]
    shutil.copytree(student, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    unet.load_state_dict(state, strict=True)
    unet.save_pretrained(out / "unet")
    info["details"]["weights"] = "student"
    (out / "student.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory (its student/ and checkpoint/)")
    parser.add_argument("out", type=Path, help="a new directory for the student without EMA")
    args = parser.parse_args()
    print(raw_student(args.run, args.out))


if __name__ == "__main__":
    main()
