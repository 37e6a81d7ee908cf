"""Consistency distillation and the shared Trainer, checked against diffusers' own schedulers
and pipelines (independent implementations of the same formulas) on a tiny random world."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from tandem.distill.consistency import ConsistencyConfig, ConsistencyDistillation, make_student_unet
from tandem.distill.data import WorldSource
from tandem.generate import StudentSettings, generate_student
from tandem.loaders import load_student
from tandem.sampling import boundary_scalings, consistency_timesteps, guidance_embedding
from tandem.students import StudentInfo, save_student
from tandem.training.config import TrainerConfig
from tandem.training.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tiny_world):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def random_student(tiny_world, tmp_path_factory, teacher):
    """A student with a *random* (non-zero) w-embedding, so that guidance visibly matters."""
    torch.manual_seed(1)
    unet = make_student_unet(teacher.unet, 16)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    from diffusers import LCMScheduler

    return save_student(unet, tmp_path_factory.mktemp("student") / "student",
                        LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=50),
                        StudentInfo(method="consistency", scheduler="LCMScheduler", guidance_scale=3.0,
                                    details={"num_ddim_timesteps": 50}))


def test_student_starts_as_the_teacher(teacher):
    student = make_student_unet(teacher.unet, 32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    w = guidance_embedding(torch.tensor([0.0, 6.5]), 32)
    with torch.no_grad():
        a = teacher.unet(x, torch.tensor([10, 700]), cond).sample
        b = student(x, torch.tensor([10, 700]), cond, timestep_cond=w).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_embedding_matches_the_lcm_pipeline(teacher):
    w = torch.tensor([0.0, 1.5, 7.0])
    for dim in (16, 17, 256):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_match_lcm_scheduler(steps):
    ref = LCMScheduler(original_inference_steps=50)
    ref.set_timesteps(steps)
    assert consistency_timesteps(steps, 50) == ref.timesteps.tolist()


def test_consistency_target_matches_diffusers_schedulers(teacher):
    """The training target, recomputed with diffusers' DDIMScheduler (teacher step) and LCMScheduler
    (consistency function) from the same random draws."""
    cfg = ConsistencyConfig(w_min=1.0, w_max=8.0, w_embedding_dim=16, loss="l2")
    method = ConsistencyDistillation(teacher, cfg)
    target_net = make_student_unet(teacher.unet, 16)
    torch.nn.init.normal_(target_net.time_embedding.cond_proj.weight, std=0.1)
    student = make_student_unet(teacher.unet, 16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)

    class Ctx:
        device = torch.device("cpu")
        generator = torch.Generator().manual_seed(123)

        def model(self, name):
            return student

        def ema(self, name, ema_name):
            return target_net

    batch = WorldSource(0).batch(0, 3)
    loss = method.step(batch, "student", Ctx())["loss"]

    # the same draws, in the documented order: latent sample, grid index, w, noise
    g = torch.Generator().manual_seed(123)
    dist = teacher.vae.encode(batch["pixels"]).latent_dist
    latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * teacher.vae.config.scaling_factor
    n = torch.randint(0, 50, (3,), generator=g)
    w = 1.0 + 7.0 * torch.rand((3,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    ids = teacher.tokenizer(batch["captions"], padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    uids = teacher.tokenizer([""] * 3, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        cond, uncond = teacher.text_encoder(ids)[0], teacher.text_encoder(uids)[0]
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=16)
    base = dict(teacher.scheduler.config)
    preds, targets = [], []
    for i in range(3):
        t = int(20 * (n[i] + 1) - 1)
        ddim = DDIMScheduler.from_config(base, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0)
        ddim.set_timesteps(50)
        x_t = ddim.add_noise(latents[i:i + 1], noise[i:i + 1], torch.tensor([t]))
        with torch.no_grad():
            e_c = teacher.unet(x_t, t, cond[i:i + 1]).sample
            e_u = teacher.unet(x_t, t, uncond[i:i + 1]).sample
            x_prev = ddim.step(e_u + w[i] * (e_c - e_u), t, x_t).prev_sample
            t_prev = max(t - 20, 0)
            lcm = LCMScheduler.from_config(base)
            lcm.set_timesteps(timesteps=[t_prev])
            e_tgt = target_net(x_prev, t_prev, cond[i:i + 1], timestep_cond=w_emb[i:i + 1]).sample
            targets.append(lcm.step(e_tgt, t_prev, x_prev).denoised)
            lcm = LCMScheduler.from_config(base)
            lcm.set_timesteps(timesteps=[t])
            e_s = student(x_t, t, cond[i:i + 1], timestep_cond=w_emb[i:i + 1]).sample
            preds.append(lcm.step(e_s, t, x_t).denoised)
    expected = (torch.cat(preds) - torch.cat(targets)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)


def test_boundary_condition():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-6 and abs(float(c_out[1]) - 1) < 1e-6


@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_matches_diffusers_lcm_pipeline(tiny_world, random_student, steps):
    pipe = load_student(random_student, teacher_source=str(tiny_world))
    prompts = ["a red circle", "two blue squares at the top"]
    ours = generate_student(pipe, prompts, StudentSettings(steps=steps, guidance_scale=5.0), seed=7, batch_size=2)
    from tandem.generate import prompt_generator

    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
               generator=[prompt_generator(7, i) for i in range(2)]).images
    ref = (np.asarray(ref) * 255).round().clip(0, 255).astype(np.uint8)
    diff = np.abs(np.stack(ours).astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()
    # guidance reaches the student through its w-embedding
    other = generate_student(pipe, prompts, StudentSettings(steps=steps, guidance_scale=1.0), seed=7)
    assert any(not np.array_equal(a, b) for a, b in zip(ours, other))


def test_student_images_do_not_depend_on_batching(tiny_world, random_student):
    pipe = load_student(random_student, teacher_source=str(tiny_world))
    prompts = ["a red circle", "a green triangle", "a small blue square"]
    whole = generate_student(pipe, prompts, StudentSettings(steps=2), seed=3, batch_size=3)
    single = generate_student(pipe, prompts[1:2], StudentSettings(steps=2), seed=3, batch_size=1)
    ones = generate_student(pipe, prompts, StudentSettings(steps=2), seed=3, batch_size=1)
    # Batched and single CPU kernels sum in other orders (~1e-6): at most one 8-bit level, on few pixels.
    diff = np.abs(np.stack(whole).astype(int) - np.stack(ones).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert not np.array_equal(single[0], whole[1])  # index 0 vs 1: another seed
    det = generate_student(pipe, prompts, StudentSettings(steps=2, noise="deterministic"), seed=3)
    assert not np.array_equal(det[0], whole[0])


def _train(teacher, out, max_steps, resume=False, grad_accum=1, batch_size=4, threads=None):
    method = ConsistencyDistillation(teacher, ConsistencyConfig(w_embedding_dim=16, lr=1e-3))
    cfg = TrainerConfig(max_steps=max_steps, seed=5, batch_size=batch_size, grad_accum=grad_accum,
                        checkpoint_every=2, log_every=1, threads=threads)
    trainer = Trainer(method, WorldSource(5), cfg, out, resume=resume, cpu=True)
    trainer.train()
    return trainer


def test_resume_is_bitwise_identical(teacher, tmp_path):
    full = _train(teacher, tmp_path / "full", 4)
    _train(teacher, tmp_path / "part", 2)
    resumed = _train(teacher, tmp_path / "part", 4, resume=True)
    for a, b in ((full.export("student"), resumed.export("student")),
                 (full.export("student", "target"), resumed.export("student", "target"))):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
    before = full.export("student").state_dict()["time_embedding.cond_proj.weight"]
    assert before.abs().sum() > 0  # it trained (the w-projection starts at zero)
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_trainer_refuses_to_overwrite_and_checks_resume_config(teacher, tmp_path):
    _train(teacher, tmp_path / "run", 1)
    with pytest.raises(FileExistsError, match="already holds"):
        _train(teacher, tmp_path / "run", 2)
    with pytest.raises(ValueError, match="configuration differs"):
        _train(teacher, tmp_path / "run", 2, resume=True, batch_size=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _train(teacher, tmp_path / "fresh", 2, resume=True)


def test_a_resume_may_change_the_steps_and_the_threads(teacher, tmp_path):
    """How long a run trains and on how many threads are not its configuration: a resume may change both
    (and the saved config then records the new ones); anything else is refused (above)."""
    threads = torch.get_num_threads()
    try:
        _train(teacher, tmp_path / "run", 2, threads=1)
        _train(teacher, tmp_path / "run", 4, resume=True, threads=2)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["trainer"]
    assert (saved["max_steps"], saved["threads"]) == (4, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_accumulation(tiny_world, tmp_path):
    """A real 2-process DDP run (gloo, torchrun) computes the same update as 1 process accumulating
    2 micro-batches: both read batches 2s and 2s+1 at step s, with the same random draws."""
    common = ["distill", "consistency", "--teacher", str(tiny_world), "--max-steps", "2", "--batch-size", "3",
              "--lr", "1e-3", "--threads", "1", "--seed", "2"]
    env = {**os.environ, "TANDEM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "tandem.cli", *common,
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    acc = subprocess.run([sys.executable, "-m", "tandem.cli", *common, "--grad-accum", "2",
                          "--out", str(tmp_path / "accum")], env=env, capture_output=True, text=True)
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "checkpoint" / "meta.json").read_text())["num_processes"] == 2
    assert (tmp_path / "ddp" / "checkpoint" / "rng-1.pt").exists()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ddp" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "accum" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    init = make_student_unet(StableDiffusionPipeline.from_pretrained(tiny_world).unet, 256).state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


class _TwoNetMethod:
    """A data-free toy method with two networks at different update ratios (like a generator and its critic)."""

    name = "toy"
    uses_data = False

    def __init__(self):
        torch.manual_seed(0)
        self.gen, self.critic = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.calls: list[tuple[int, str, object]] = []
        self.gen_before: list[torch.Tensor] = []  # generator weights before each of its updates

    def trainables(self):
        from tandem.training.config import Trainable

        return [Trainable("gen", self.gen, lr=0.1, every=2, emas={"slow": 0.5}),
                Trainable("critic", self.critic, lr=0.1, grad_clip=None)]

    def frozen(self):
        return {}

    def step(self, batch, update, ctx):
        self.calls.append((ctx.step, update, batch))
        z = torch.randn(4, 2, generator=ctx.generator)
        if update == "gen":
            self.gen_before.append(ctx.unwrapped("gen").weight.detach().clone())
            return {"loss": -ctx.model("critic")(ctx.model("gen")(z)).mean()}
        return {"loss": ctx.model("critic")(ctx.model("gen")(z).detach()).pow(2).mean()}


def test_trainer_update_ratios_emas_and_data_free_methods(tmp_path):
    method = _TwoNetMethod()
    trainer = Trainer(method, None, TrainerConfig(max_steps=4, checkpoint_every=10, log_every=1), tmp_path / "toy",
                      cpu=True)
    trainer.train()
    assert [(s, u) for s, u, _ in method.calls] == [
        (0, "gen"), (0, "critic"), (1, "critic"), (2, "gen"), (2, "critic"), (3, "critic")]
    assert all(b is None for _, _, b in method.calls)  # a data-free method never gets a batch
    # the EMA (decay 0.5) after two generator updates: 0.25 w0 + 0.25 w1 + 0.5 w2, with w2 the final weights
    w0, w1 = method.gen_before
    w2 = trainer.export("gen").weight
    assert not torch.equal(w1, w0) and not torch.equal(w2, w1)
    torch.testing.assert_close(trainer.export("gen", "slow").weight, 0.25 * w0 + 0.25 * w1 + 0.5 * w2)
    log = [json.loads(x) for x in (tmp_path / "toy" / "log.jsonl").read_text().splitlines()]
    assert "gen/loss" in log[0] and "critic/loss" in log[0] and "gen/loss" not in log[1]


# ---------------------------------------------------------------------------------------------
# Command line: student mode of `tandem generate` and `tandem distill consistency`


def _cli(capsys, monkeypatch, *args):
    from tandem.cli import main

    monkeypatch.setattr(sys, "argv", ["tandem", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_generate_student_mode_writes_the_output_contract(tiny_world, random_student, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "a green square", "--model", tiny_world,
                     "--mode", "student", "--student", random_student, "--student-steps", 2, "--out", out)
    assert code == 0, err
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert all(r["path"] == "student" and r["unet_evals"] == {"student": 2.0, "teacher": 0.0, "total": 2.0}
               for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["student"]["steps"] == 2 and config["student"]["path"] == str(random_student)
    pipe = load_student(random_student, teacher_source=str(tiny_world))
    expected = generate_student(pipe, ["a red circle", "a green square"], StudentSettings(steps=2, guidance_scale=3.0),
                                seed=0)
    from PIL import Image

    for i, e in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), e)


@pytest.mark.parametrize("case", ["no preset", "not a student", "steps 0", "bad noise", "guidance below 1"])
def test_generate_student_bad_input(case, tiny_world, random_student, tmp_path, capsys, monkeypatch):
    args, needle = {
        "no preset": ([], "ships no student"),
        "not a student": (["--student", tmp_path], "lacks unet/, scheduler/"),
        "steps 0": (["--student", random_student, "--student-steps", 0], "--student-steps must be >= 1"),
        "bad noise": (["--student", random_student, "--student-noise", "wild"], "unknown student noise 'wild'"),
        "guidance below 1": (["--student", random_student, "--guidance-scale", 0.5], "guidance scale must be >= 1"),
    }[case]
    out = tmp_path / "out"
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "--model", tiny_world, "--mode", "student",
                     *args, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["w range", "loss", "resume nothing", "unknown teacher", "world data, real teacher",
                                  "steps 0", "mixed precision"])
def test_distill_consistency_bad_input(case, tiny_world, tmp_path, capsys, monkeypatch):
    args, needle = {
        "w range": (["--w-range", 5, 2], "w_min <= w_max"),
        "loss": (["--loss", "l1"], "loss must be one of"),
        "resume nothing": (["--resume"], "no checkpoint"),
        "unknown teacher": (["--teacher", "no-such-model"], "unknown model 'no-such-model'"),
        "world data, real teacher": (["--teacher", "org/sd-model"], "--data world"),
        "steps 0": (["--max-steps", 0], "--max-steps must be >= 1"),
        "mixed precision": (["--mixed-precision", "fp8"], "mixed_precision must be one of"),
    }[case]
    teacher = [] if "--teacher" in args else ["--teacher", tiny_world]
    code, err = _cli(capsys, monkeypatch, "distill", "consistency", *teacher, *args, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_real_tier_teacher_distils_on_a_local_image_folder(tiny_world, tmp_path, capsys, monkeypatch):
    """A plain diffusers SD repository (no tandem metadata) as teacher, trained on an image folder with
    caption files; then its student generates through the same command."""
    import shutil

    from PIL import Image

    sd = tmp_path / "sd"
    shutil.copytree(tiny_world, sd)
    (sd / "tandem.json").unlink()
    data = tmp_path / "photos"
    data.mkdir()
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]):
        Image.new("RGB", (48, 40), rgb).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} photo")
    run = tmp_path / "run"
    code, err = _cli(capsys, monkeypatch, "distill", "consistency", "--teacher", sd, "--data", data, "--max-steps", 2,
                     "--batch-size", 2, "--out", run)
    assert code == 0, err
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["data"]["source"] == "imagefolder" and cfg["data"]["examples"] == 3
    assert cfg["teacher"]["path"] == str(sd)
    code, err = _cli(capsys, monkeypatch, "generate", "a red photo", "--model", sd, "--mode", "student",
                     "--student", run / "student", "--student-steps", 2, "--out", tmp_path / "gen")
    assert code == 0, err
    assert (tmp_path / "gen" / "00000.png").exists()


def test_world_add_student_makes_it_the_preset(tiny_world, random_student, tmp_path, capsys, monkeypatch):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    code, err = _cli(capsys, monkeypatch, "world", "add-student", "--world", world, "--student", random_student,
                     "--steps", 3, "--guidance-scale", 2.5)
    assert code == 0, err
    assert json.loads((world / "tandem.json").read_text())["student"] == {"path": "student", "steps": 3,
                                                                         "guidance_scale": 2.5}
    code, err = _cli(capsys, monkeypatch, "generate", "a red circle", "--model", world, "--mode", "student",
                     "--out", tmp_path / "gen")
    assert code == 0, err
    config = json.loads((tmp_path / "gen" / "config.json").read_text())["student"]
    assert config["steps"] == 3 and config["guidance_scale"] == 2.5
    assert config["path"] == str(world / "student")
    code, err = _cli(capsys, monkeypatch, "world", "add-student", "--world", world, "--student", random_student,
                     "--steps", 3, "--guidance-scale", 2.5)
    assert code == 2 and "--overwrite" in err
