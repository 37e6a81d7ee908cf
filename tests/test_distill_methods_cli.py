"""Every student works everywhere a student is taken: progressive (DDIM, w-embedding) and knowledge-
distilled (DPM-Solver++, classifier-free guidance) students from the command line, on a real-tier
diffusers directory and image folder, through `generate`, adaptive generation, `calibrate`, `edit`
and as a teacher; their runs on 2 processes equal 1 process accumulating 2 micro-batches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from clitools import tandem_in_process

from tandem.students import read_student_info


@pytest.fixture(scope="module")
def real_tier(tiny_world, tmp_path_factory):
    """A plain diffusers SD directory (no tandem metadata) and a captioned image folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("real")
    sd = root / "sd"
    shutil.copytree(tiny_world, sd)
    (sd / "tandem.json").unlink()
    data = root / "photos"
    data.mkdir()
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]):
        Image.new("RGB", (40, 40), rgb).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} photo")
    return sd, data


def _cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``(exit status, stderr, stdout)`` of the command line run in-process."""
    result = tandem_in_process(capsys, monkeypatch, *[str(a) for a in args])
    return result.returncode, result.stderr, result.stdout


@pytest.fixture(scope="module")
def students(real_tier, tmp_path_factory):
    """A progressive and a knowledge-distilled student of the real-tier teacher, each from a short run."""
    from tandem.distill.knowledge import KnowledgeConfig, distill_knowledge
    from tandem.distill.progressive import ProgressiveConfig, distill_progressive
    from tandem.training.config import TrainerConfig

    sd, data = real_tier
    root = tmp_path_factory.mktemp("students")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pd = distill_progressive(str(sd), root / "pd", ProgressiveConfig(start_steps=4, guidance_steps=1, round_steps=1,
                                                                         w_embedding_dim=16),
                                 TrainerConfig(max_steps=3, batch_size=2), data=str(data))
        kd = distill_knowledge(str(sd), root / "kd", KnowledgeConfig(arch="half"), TrainerConfig(max_steps=2, batch_size=2),
                               data=str(data))
    finally:
        torch.set_num_threads(threads)
    return {"pd": pd, "kd": kd}


def test_students_say_what_they_are(students, real_tier):
    pd, kd = read_student_info(students["pd"]), read_student_info(students["kd"])
    assert (pd.method, pd.scheduler, pd.guidance, pd.steps) == ("progressive", "DPMSolverMultistepScheduler",
                                                                 "w-embedding", 1)
    assert (kd.method, kd.scheduler, kd.guidance) == ("knowledge", "DPMSolverMultistepScheduler", "classifier-free")
    assert pd.teacher["path"] == str(real_tier[0]) == kd.teacher["path"]
    rounds = students["pd"].parent / "rounds"
    assert sorted(p.name for p in rounds.iterdir()) == ["1-steps", "2-steps", "4-steps"]
    assert [read_student_info(rounds / n).steps for n in ("4-steps", "2-steps", "1-steps")] == [4, 2, 1]


@pytest.mark.parametrize("which", ["pd", "kd"])
def test_student_generates_directly_and_in_tandem(which, students, real_tier, tmp_path, capsys, monkeypatch):
    sd, _ = real_tier
    student = students[which]
    code, err, _ = _cli(capsys, monkeypatch, "generate", "a red photo", "a blue photo", "--model", sd, "--mode",
                     "student", "--student", student, "--student-steps", 2, "--guidance-scale", 3, "--out",
                     tmp_path / "direct")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "direct" / "records.jsonl").read_text().splitlines()]
    per_step = 2 if which == "kd" else 1  # classifier-free guidance calls the UNet twice per step
    assert [r["unet_evals"]["student"] for r in records] == [2.0 * per_step] * 2
    calibration = tmp_path / "cal.json"
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red photo\na green photo\na blue photo\na red circle\na blue square\n")
    code, err, _ = _cli(capsys, monkeypatch, "calibrate", "--model", sd, "--student", student, "--scorer",
                        "world-oracle", "--prompts", prompts, "--student-steps", 2, "--out", calibration)
    assert code == 0, err
    code, err, _ = _cli(capsys, monkeypatch, "edit", "--image", tmp_path / "direct" / "00000.png", "--prompt",
                        "a green photo", "--model", sd, "--student", student, "--mode", "student",
                        "--strength", 0.6, "--student-steps", 2, "--out", tmp_path / "edit")
    assert code == 0, err
    code, err, _ = _cli(capsys, monkeypatch, "generate", "a red photo", "a blue photo", "--model", sd, "--mode",
                     "adaptive", "--student", student, "--scorer", "world-oracle", "--calibration", calibration,
                     "--percentile", 50, "--student-steps", 2, "--teacher-steps", 2, "--out", tmp_path / "adaptive")
    assert code == 0, err
    assert (tmp_path / "adaptive" / "records.jsonl").exists()


def test_knowledge_student_is_a_teacher(students, real_tier, tmp_path, capsys, monkeypatch):
    """A classifier-free student (knowledge distillation) teaches a consistency student and generates as a teacher."""
    sd, data = real_tier
    code, err, _ = _cli(capsys, monkeypatch, "generate", "a red photo", "--model", students["kd"], "--mode", "teacher",
                     "--teacher-steps", 2, "--out", tmp_path / "teacher")
    assert code == 0, err
    code, err, _ = _cli(capsys, monkeypatch, "distill", "consistency", "--teacher", students["kd"], "--data", data,
                     "--max-steps", 1, "--batch-size", 2, "--out", tmp_path / "cd")
    assert code == 0, err
    cd = read_student_info(tmp_path / "cd" / "student")
    assert cd.method == "consistency" and cd.teacher["name"] == str(students["kd"])
    code, err, _ = _cli(capsys, monkeypatch, "distill", "consistency", "--teacher", students["pd"], "--data", data,
                     "--max-steps", 1, "--out", tmp_path / "cd2")
    assert code == 2 and "cannot be a teacher" in err, err


@pytest.mark.slow  # 45 s; test_distill.py checks the shared Trainer's two-process equality in the default run
@pytest.mark.parametrize("method,extra", [
    ("progressive", ["--start-steps", "4", "--guidance-steps", "1", "--round-steps", "1"]),
    ("knowledge", ["--arch", "half"]),
])
def test_two_processes_equal_one_process_with_accumulation(method, extra, tiny_world, tmp_path):
    """A real 2-process DDP run (gloo, torchrun) of each method computes the update of 1 process
    accumulating 2 micro-batches (PD crosses a round boundary: its round teacher moves with the run)."""
    import socket

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["distill", method, "--teacher", str(tiny_world), "--max-steps", "2", "--batch-size", "2",
              "--lr", "1e-3", "--threads", "1", "--seed", "3", *extra]
    env = {**os.environ, "TANDEM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "tandem.cli", *common, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    acc = subprocess.run([sys.executable, "-m", "tandem.cli", *common, "--grad-accum", "2", "--out",
                          str(tmp_path / "accum")], env=env, capture_output=True, text=True)
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "checkpoint" / "meta.json").read_text())["num_processes"] == 2
    a = load_file(tmp_path / "ddp" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "accum" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_shipped_students_by_name(tiny_world, students, tmp_path, capsys, monkeypatch):
    """A world ships students by name: `--student NAME` everywhere, `tandem world students --json` lists them."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    code, err, _ = _cli(capsys, monkeypatch, "world", "add-student", "--world", world, "--student", students["kd"],
                     "--name", "kd-half", "--steps", 3, "--guidance-scale", 2)
    assert code == 0, err
    code, err, out = _cli(capsys, monkeypatch, "world", "students", "--model", world, "--json")
    assert code == 0, err
    rows = json.loads(out)
    names = {r["name"]: r for r in rows}
    assert names["kd-half"]["method"] == "knowledge" and names["kd-half"]["steps"] == 3
    teacher_flops = None
    for r in rows:
        assert {"name", "method", "dir", "steps", "params", "flops_per_call"} <= set(r)
        if r["name"] != "kd-half":
            teacher_flops = r["flops_per_call"]
    assert teacher_flops is None or names["kd-half"]["flops_per_call"] < teacher_flops
    code, err, _ = _cli(capsys, monkeypatch, "generate", "a red circle", "--model", world, "--mode", "student",
                     "--student", "kd-half", "--out", tmp_path / "gen")
    assert code == 0, err
    config = json.loads((tmp_path / "gen" / "config.json").read_text())["student"]
    assert config["steps"] == 3 and config["guidance_scale"] == 2
    code, err, _ = _cli(capsys, monkeypatch, "generate", "a red circle", "--model", world, "--mode", "student",
                     "--student", "nope", "--out", tmp_path / "gen2")
    assert code == 2 and "no student 'nope'" in err and "kd-half" in err, err



def test_world_evaluate_reports_flops_and_plot_cost_draws_them(tiny_world, students, tmp_path, capsys, monkeypatch):
    """`world evaluate` records UNet FLOPs per image (steps x calls per step x FLOPs per call, CFG counted
    twice); `world plot-cost` draws accuracy against them, one line per results file."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na small blue square\n")
    common = ["--model", tiny_world, "--prompts", prompts, "--no-vae", "--batch-size", 2]
    code, err, _ = _cli(capsys, monkeypatch, "world", "evaluate", "--mode", "teacher", "--teacher-steps", 3,
                        "--guidance-scale", 2, *common, "--out", tmp_path / "teacher")
    assert code == 0, err
    code, err, _ = _cli(capsys, monkeypatch, "world", "evaluate", "--mode", "student", "--student", students["kd"],
                        "--student-steps", 2, "--guidance-scale", 2, *common, "--out", tmp_path / "kd")
    assert code == 0, err
    teacher = json.loads((tmp_path / "teacher" / "results.json").read_text())
    kd = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert kd["config"]["student_method"] == "knowledge"
    t_run, s_run = teacher["teacher"]["2.0"], kd["student"]["steps2_g2.0"]
    assert t_run["unet_flops_per_image"] == 3 * 2 * teacher["unet"]["flops_per_call"]
    assert s_run["unet_evals_per_image"] == 4 and s_run["unet_flops_per_image"] == 4 * kd["unet"]["flops_per_call"]
    assert kd["unet"]["flops_per_call"] < teacher["unet"]["flops_per_call"] / 2
    figure = tmp_path / "cost.png"
    code, err, _ = _cli(capsys, monkeypatch, "world", "plot-cost", tmp_path / "teacher" / "results.json",
                        tmp_path / "kd" / "results.json", "--out", figure)
    assert code == 0, err
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, err, _ = _cli(capsys, monkeypatch, "world", "plot-cost", prompts, "--out", tmp_path / "bad.png")
    assert code == 2 and "not a results.json" in err, err


def test_the_world_ships_its_students_measured(tmp_path, capsys, monkeypatch):
    """The shipped world lists every student it ships with its method, cost and measured test accuracy;
    each loads by name (a progressive and a knowledge-distilled one generate here)."""
    code, err, out = _cli(capsys, monkeypatch, "world", "students", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"cd", "pd", "pd-2", "pd-1", "kd-half"} <= set(rows)
    for r in rows.values():
        assert r["method"].partition("+")[0] in ("consistency", "progressive", "knowledge", "adversarial", "dmd2")
        assert 0 < r["accuracy"] < 1 and "tandem world evaluate" in r["measured_by"], r
        info = read_student_info(r["dir"])
        assert info.teacher["name"] in ("world", "runs/world2") and info.steps == r["steps"]
    assert rows["pd"]["preset"] and not rows["cd"]["preset"] and rows["kd-half"]["flops_per_call"] < rows["pd"]["flops_per_call"] / 2
    assert [rows[n]["steps"] for n in ("pd", "pd-2", "pd-1")] == [4, 2, 1]
    for name in ("pd-1", "kd-half"):
        code, err, _ = _cli(capsys, monkeypatch, "generate", "a red circle", "--mode", "student", "--student", name,
                            "--student-steps", 2, "--out", tmp_path / name)
        assert code == 0, err
        assert (tmp_path / name / "00000.png").exists()
