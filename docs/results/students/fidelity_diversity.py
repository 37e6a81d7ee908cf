"""Fidelity and diversity of the world's few-step students (issue 15's report beside accuracy):

* the Fréchet distance, in world-CLIP image features, of each student's images of the 1000 test prompts
  (seed 0) to exact renderings of the same prompts (``tandem.eval.features.frechet_distance``);
* diversity: the mean pairwise world-CLIP distance between 4 seeds of each of the first 100 test prompts
  (``tandem.eval.features.diversity``; the DDIL paper's LPIPS-diversity, in world features).

    python docs/results/students/fidelity_diversity.py docs/results/students/fidelity_diversity.json

``--only NAME ...`` measures those students again (``teacher`` for the teacher's rows) and replaces their rows in
an existing file, which records the command under ``updates`` (a re-shipped student, measured alone)::

    python docs/results/students/fidelity_diversity.py docs/results/students/fidelity_diversity.json --only add
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# (shipped student, steps): each at its own default guidance
STUDENTS = [("cd", 1), ("cd", 2), ("cd", 4), ("pd-1", 1), ("pd-2", 2), ("pd", 4),
            ("dmd2", 1), ("dmd2", 2), ("dmd2", 4), ("add", 1), ("add", 2), ("add", 4)]
SEEDS = (0, 1, 2, 3)
DIVERSITY_PROMPTS = 100
MODELS = ["teacher", *dict.fromkeys(name for name, _ in STUDENTS)]  # the rows' order


def main(out: Path, only: list[str] | None = None) -> None:
    from tandem.eval.features import ImageFeatures, diversity, frechet_distance, renderings
    from tandem.generate import StudentSettings, TeacherSettings, generate_student, generate_teacher
    from tandem.loaders import load_student
    from tandem.models import load_teacher_pipeline, resolve_model
    from tandem.world.prompts import load_prompts

    if only is not None:  # before any model loads
        unknown = sorted(set(only) - set(MODELS))
        if unknown:
            raise SystemExit(f"--only: not measured by this script: {', '.join(unknown)}")
        if not out.is_file():
            raise SystemExit(f"--only replaces rows of an existing file; {out} is not one")
    wanted = set(only) if only is not None else set(MODELS)
    t0 = time.time()
    spec = resolve_model("world")
    prompts = load_prompts("test")
    features = ImageFeatures.world()
    reference = features(renderings(prompts, 0))

    def measure(draw) -> dict:
        images = draw(prompts, 0)
        seeds = [features(draw(prompts[:DIVERSITY_PROMPTS], s)) for s in SEEDS]
        return {"frechet_distance": frechet_distance(features(images), reference),
                "diversity": diversity(np.stack(seeds, axis=1))}

    rows = []
    teacher = load_teacher_pipeline(spec) if "teacher" in wanted else None
    for steps in (10, 25) if teacher is not None else ():
        settings = TeacherSettings(steps, "dpm", spec.teacher.guidance_scale)
        rows.append({"model": "teacher", "steps": steps, "guidance_scale": spec.teacher.guidance_scale,
                     **measure(lambda p, s, settings=settings: np.stack(generate_teacher(teacher, p, settings, s)))})
        print(rows[-1], flush=True)
    for name, steps in STUDENTS:
        if name not in wanted:
            continue
        pipe = load_student(name)
        settings = StudentSettings(steps, spec.students[name].guidance_scale)
        rows.append({"model": name, "method": pipe.student_info.method, "steps": steps,
                     "guidance_scale": settings.guidance_scale,
                     **measure(lambda p, s, pipe=pipe, settings=settings: np.stack(
                         generate_student(pipe, p, settings, s)))})
        print(rows[-1], flush=True)
    command = "python docs/results/students/fidelity_diversity.py " + str(out)
    if only is None:
        result = {"command": command, "prompts": "test", "n": len(prompts), "diversity_prompts": DIVERSITY_PROMPTS,
                  "seeds": list(SEEDS), "features": "world CLIP image tower",
                  "reference": "exact renderings of the same prompts (seed 0)",
                  "seconds": time.time() - t0, "rows": rows}
    else:
        result = json.loads(out.read_text())
        kept = [row for row in result["rows"] if row["model"] not in wanted]
        result["rows"] = sorted(kept + rows, key=_row_order)
        result.setdefault("updates", []).append({"command": f"{command} --only {' '.join(only)}",
                                                 "models": sorted(wanted), "seconds": time.time() - t0})
    out.write_text(json.dumps(result, indent=2) + "\n")


def _row_order(row: dict) -> tuple[int, int]:
    return MODELS.index(row["model"]) if row["model"] in MODELS else len(MODELS), row["steps"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSON file of rows")
    parser.add_argument("--only", nargs="+", help="measure these students again (teacher: its rows)")
    args = parser.parse_args()
    main(args.out, args.only)
