"""The student a run trained, without its EMA: for the ablation of an EMA export.

A run started with ``--ema D`` exports the EMA of its student; its last checkpoint also holds the student's own
weights. This writes a copy of the exported student whose UNet carries those weights instead (``student.json``
says ``"weights": "student"``), after checking that the checkpoint is from the step the export was taken at::

    python docs/results/students/raw_student.py runs/add-ema runs/add-ema-raw
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

from tandem.outputs import atomic_write_text
from tandem.students import STUDENT_FILE, read_student_info
from tandem.training.checkpoints import find_checkpoint, load_checkpoint_file, read_checkpoint_meta


def raw_student(run: Path, out: Path, network: str = "student") -> Path:
    student = run / "student"
    info = read_student_info(student)
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run} holds no checkpoint")
    step, exported = read_checkpoint_meta(ckpt)["step"], info.details.get("optimisation_steps")
    if info.details.get("weights") != "ema":
        raise SystemExit(f"{student} holds the student's own weights already (weights: {info.details.get('weights')})")
    if step != exported:
        raise SystemExit(f"{ckpt} is at step {step}, the export at step {exported}: not the same student")
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new directory")
    state = load_checkpoint_file(ckpt / "state.pt")["models"][network]
    shutil.copytree(student, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    unet.load_state_dict(state, strict=True)
    unet.save_pretrained(out / "unet")
    info = dataclasses.replace(info, details={**info.details, "weights": "student"})
    atomic_write_text(out / STUDENT_FILE, json.dumps(info.to_json(), indent=2, default=str) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory (its student/ and checkpoint/)")
    parser.add_argument("out", type=Path, help="a new directory for the student without EMA")
    args = parser.parse_args()
    print(raw_student(args.run, args.out))


if __name__ == "__main__":
    main()
