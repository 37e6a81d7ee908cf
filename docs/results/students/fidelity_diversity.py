"""Fidelity and diversity of the world's few-step students (issue 15's report beside accuracy):

* the Fréchet distance, in world-CLIP image features, of each student's images of the 1000 test prompts
  (seed 0) to exact renderings of the same prompts (``tandem.eval.features.frechet_distance``);
* diversity: the mean pairwise world-CLIP distance between 4 seeds of each of the first 100 test prompts
  (``tandem.eval.features.diversity``; the DDIL paper's LPIPS-diversity, in world features).

    python docs/results/students/fidelity_diversity.py docs/results/students/fidelity_diversity.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

# (shipped student, steps): each at its own default guidance
STUDENTS = [("cd", 1), ("cd", 2), ("cd", 4), ("pd-1", 1), ("pd-2", 2), ("pd", 4),
            ("dmd2", 1), ("dmd2", 2), ("dmd2", 4), ("add", 1), ("add", 2), ("add", 4)]
SEEDS = (0, 1, 2, 3)
DIVERSITY_PROMPTS = 100


def main(out: Path) -> None:
    from tandem.eval.features import ImageFeatures, diversity, frechet_distance, renderings
    from tandem.generate import StudentSettings, TeacherSettings, generate_student, generate_teacher
    from tandem.loaders import load_student
    from tandem.models import load_teacher_pipeline, resolve_model
    from tandem.world.prompts import load_prompts

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
    teacher = load_teacher_pipeline(spec)
    for steps in (10, 25):
        settings = TeacherSettings(steps, "dpm", spec.teacher.guidance_scale)
        rows.append({"model": "teacher", "steps": steps, "guidance_scale": spec.teacher.guidance_scale,
                     **measure(lambda p, s, settings=settings: np.stack(generate_teacher(teacher, p, settings, s)))})
        print(rows[-1], flush=True)
    for name, steps in STUDENTS:
        pipe = load_student(name)
        settings = StudentSettings(steps, spec.students[name].guidance_scale)
        rows.append({"model": name, "method": pipe.student_info.method, "steps": steps,
                     "guidance_scale": settings.guidance_scale,
                     **measure(lambda p, s, pipe=pipe, settings=settings: np.stack(
                         generate_student(pipe, p, settings, s)))})
        print(rows[-1], flush=True)
    out.write_text(json.dumps({"command": "python docs/results/students/fidelity_diversity.py " + str(out),
                               "prompts": "test", "n": len(prompts), "diversity_prompts": DIVERSITY_PROMPTS,
                               "seeds": list(SEEDS), "features": "world CLIP image tower",
                               "reference": "exact renderings of the same prompts (seed 0)",
                               "seconds": time.time() - t0, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
