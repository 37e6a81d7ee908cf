"""`tandem world evaluate` is :func:`tandem.world.evaluate.evaluate_world`: the command writes what the
library function writes, the numbers are the exact checker's on the saved images, and a student evaluation
draws its teacher reference. Runs on the shipped world (its teacher and student, two steps, a few prompts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clitools import tandem_in_process

from tandem.world.checker import check_batch
from tandem.world.evaluate import evaluate_world, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle to the left of a red circle"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher evaluation through the library: two guidance scales, two steps."""
    root = tmp_path_factory.mktemp("world_evaluate")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    lines: list[str] = []
    evaluation = evaluate_world(root / "library", prompts=root / "prompts.txt", guidance_scales=[2.0, 4.0],
                                teacher_steps=2, batch_size=2, vae=False, log=lines.append)
    return root, evaluation, lines


def test_the_command_writes_what_the_library_writes(teacher_run, capsys, monkeypatch):
    root, evaluation, lines = teacher_run
    result = tandem_in_process(capsys, monkeypatch, "world", "evaluate", "--prompts", root / "prompts.txt",
                               "--guidance-scale", 2, "--guidance-scale", 4, "--teacher-steps", 2,
                               "--batch-size", 2, "--no-vae", "--out", root / "command")
    assert result.returncode == 0, result.stderr
    library, command = root / "library", root / "command"
    assert evaluation.path == library.resolve()
    assert (library / "results.json").read_text() == (command / "results.json").read_text()
    assert sorted(p.name for p in library.iterdir()) == sorted(p.name for p in command.iterdir())
    for name in ("teacher_g2.0.npz", "teacher_g4.0.npz"):
        assert np.array_equal(np.load(library / name)["images"], np.load(command / name)["images"])
    said = result.stderr.strip().splitlines()
    assert said == [*lines, f"best {evaluation.best} -> {command.resolve() / 'results.json'}"]


def test_the_results_are_the_exact_checkers_on_the_saved_images(teacher_run):
    root, evaluation, _ = teacher_run
    results = evaluation.results
    assert results == json.loads((root / "library" / "results.json").read_text())
    assert results["config"]["prompts_file"] == str(root / "prompts.txt") and results["config"]["n_prompts"] == 3
    for key, run in results["teacher"].items():
        images = np.load(root / "library" / f"teacher_g{key}.npz")["images"]
        assert images.shape[0] == len(PROMPTS)
        judged = summarize(check_batch(list(images), PROMPTS))
        assert run["accuracy"] == judged["accuracy"] and run["mean_score"] == judged["mean_score"]
        assert run["unet_evals_per_image"] == 2 * 2  # two steps, each guided (two UNet rows)
    assert evaluation.best == max(results["teacher"], key=lambda k: results["teacher"][k]["accuracy"])
    assert results["best_guidance_scale"] == float(evaluation.best)


def test_a_student_evaluation_draws_its_teacher_reference(teacher_run, tmp_path):
    root, teacher, _ = teacher_run
    evaluation = evaluate_world(tmp_path / "student", mode="student", prompts=PROMPTS, student_steps=[1, 2],
                                batch_size=3, vae=False, reference=root / "library" / "results.json", log=lambda line: None)
    results = evaluation.results
    assert results["config"]["prompts_file"] is None and results["config"]["student_name"] is None
    g = results["student"][evaluation.best]["settings"]["guidance_scale"]  # the preset student's default
    assert list(results["student"]) == [f"steps1_g{g}", f"steps2_g{g}"]
    assert [r["unet_evals_per_image"] for r in results["student"].values()] == [1, 2]  # one w-embedded call a step
    best_teacher = teacher.results["teacher"][teacher.best]
    assert results["reference"] == {"file": str(root / "library" / "results.json"),
                                    f"teacher, 2 steps, guidance {teacher.best}": best_teacher["accuracy"]}
    assert (tmp_path / "student" / "quality_vs_steps.png").is_file()


def test_bad_arguments_are_named_in_the_call_s_words(tmp_path):
    with pytest.raises(ValueError, match=r"mode='teacher' or mode='student', not 'adaptive'"):
        evaluate_world(tmp_path / "a", mode="adaptive")
    with pytest.raises(ValueError, match=r"^reference=\.\.\. applies to mode='student'$"):
        evaluate_world(tmp_path / "b", reference=tmp_path / "results.json")
    with pytest.raises(ValueError, match=r"^reference='.*missing\.json': cannot read a results\.json"):
        evaluate_world(tmp_path / "c", mode="student", reference=tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"^prompt 1 is outside ShapesWorld's grammar"):
        evaluate_world(tmp_path / "d", prompts=["a red circle", "a flying pig"])
    assert not any(tmp_path.iterdir())  # refused before anything was written
