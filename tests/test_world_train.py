"""The world's training commands on the one Trainer: exact resume of every component, refusal to
clobber a run or resume a foreign one, loadable exports."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from tandem.training.checkpoints import load_checkpoint_file
from tandem.world.control import ControlNetTrainConfig, ControlNetTraining, train_controlnet
from tandem.world.models import CLIPArchConfig, UNetConfig, VAEConfig
from tandem.world.train import (
    CLIPTrainConfig,
    CLIPTraining,
    DecoderTrainConfig,
    DecoderTraining,
    TeacherTrainConfig,
    VAETrainConfig,
    VAETraining,
    train_clip,
    train_teacher,
    train_vae,
    train_vae_decoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=8,
                       norm_num_groups=8, cross_attention_dim=32)
TINY_TEACHER = TeacherTrainConfig(arch=TINY_UNET, max_steps=4, batch_size=6, warmup_steps=2,
                                  checkpoint_every=2, threads=1)
TINY_VAE = VAETrainConfig(arch=VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4), max_steps=3, batch_size=4,
                          warmup_steps=1, checkpoint_every=2)
TINY_CLIP = CLIPTrainConfig(arch=CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1,
                                                heads=2, patch_size=8, projection_dim=32),
                            max_steps=3, batch_size=4, warmup_steps=1, checkpoint_every=2)


def _state(run_dir: Path) -> dict:
    """The run's checkpoint (the Trainer's ``checkpoint/state.pt``)."""
    return load_checkpoint_file(run_dir / "checkpoint" / "state.pt")


def _checkpoint_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"]


def _assert_same(a, b, where: str = "state") -> None:
    """Two checkpoint entries hold the same bits (tensors, numbers, nested dicts and lists)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _logged_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "step" in r]


def test_teacher_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, tiny_world):
    train_teacher(tmp_path / "straight", tiny_world / "vae", tiny_world, TINY_TEACHER)
    train_teacher(tmp_path / "split", tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    assert _checkpoint_step(tmp_path / "split") == 2
    train_teacher(tmp_path / "split", tiny_world / "vae", tiny_world, TINY_TEACHER, resume=True)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert _checkpoint_step(tmp_path / "straight") == _checkpoint_step(tmp_path / "split") == 4
    assert set(a) == {"models", "optimizers", "schedulers", "emas"} and set(a["emas"]["unet"]) == {"ema"}
    assert not torch.equal(a["models"]["unet"]["conv_out.weight"], a["emas"]["unet"]["ema"]["conv_out.weight"])
    _assert_same(a, b)  # weights, EMA, optimizer moments, LR schedule
    assert _logged_steps(tmp_path / "split") == [2, 4]
    assert json.loads((tmp_path / "split" / "done.json").read_text()) == {"steps": 4, "weights": "ema"}


def _vae(out: Path, world: Path, max_steps: int, resume: bool) -> Path:
    return train_vae(out, dataclasses.replace(TINY_VAE, max_steps=max_steps), resume)


def _decoder(out: Path, world: Path, max_steps: int, resume: bool) -> Path:
    cfg = DecoderTrainConfig(max_steps=max_steps, batch_size=4, warmup_steps=1, checkpoint_every=2, threads=1)
    return train_vae_decoder(out, world / "vae", cfg, resume)


def _clip(out: Path, world: Path, max_steps: int, resume: bool) -> Path:
    return train_clip(out, dataclasses.replace(TINY_CLIP, max_steps=max_steps), resume) / "clip"


def _controlnet(out: Path, world: Path, max_steps: int, resume: bool) -> Path:
    cfg = ControlNetTrainConfig(control="edges", max_steps=max_steps, batch_size=3, warmup_steps=1,
                                checkpoint_every=2, threads=1, world=str(world))
    return train_controlnet(out, cfg, resume)


class _Stop(Exception):
    """The interruption of a run (a kill, as far as the run directory can tell)."""


@pytest.mark.parametrize("train, method", [(_vae, VAETraining), (_decoder, DecoderTraining),
                                           (_clip, CLIPTraining), (_controlnet, ControlNetTraining)],
                         ids=["vae", "decoder", "clip", "controlnet"])
def test_every_component_resumes_bitwise(train, method, tmp_path, tiny_world, monkeypatch):
    """Interrupted after its checkpoint at step 2 and resumed, a 3-step run ends where an uninterrupted one
    does: same checkpoint (weights, optimizer, cosine LR schedule, EMAs, the VAE's posterior noise) and export."""
    exported = train(tmp_path / "straight", tiny_world, 3, False)
    step = method.step

    def stop_at_step_2(self, batch, update, ctx):
        if ctx.step == 2:
            raise _Stop
        return step(self, batch, update, ctx)

    with monkeypatch.context() as patch:
        patch.setattr(method, "step", stop_at_step_2)
        with pytest.raises(_Stop):
            train(tmp_path / "split", tiny_world, 3, False)
    assert _checkpoint_step(tmp_path / "split") == 2 and not (tmp_path / "split" / "done.json").exists()
    train(tmp_path / "split", tiny_world, 3, True)
    _assert_same(_state(tmp_path / "straight"), _state(tmp_path / "split"))
    assert _logged_steps(tmp_path / "split") == [3]
    weights = sorted((tmp_path / "straight").rglob("*.safetensors"))
    assert weights
    for a in weights:
        b = tmp_path / "split" / a.relative_to(tmp_path / "straight")
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs after resume"
    config = json.loads((exported / "train_config.json").read_text())
    assert config["config"]["max_steps"] == 3 and config["steps"] == 3


def test_the_controlnet_export_is_its_ema_in_float16(tmp_path, tiny_world):
    target = _controlnet(tmp_path / "cn", tiny_world, 2, False)
    saved = load_file(target / "diffusion_pytorch_model.safetensors")
    ema = _state(tmp_path / "cn")["emas"]["controlnet"]["ema"]
    assert saved.keys() == ema.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, ema[name].half()), name
    assert ControlNetModel.from_pretrained(target).config.conditioning_embedding_out_channels == [16, 32, 64]
    assert json.loads((target / "control.json").read_text()) == {"control": "edges"}


def test_a_finished_or_started_run_is_never_overwritten(tmp_path, tiny_world):
    run = tmp_path / "run"
    train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    with pytest.raises(ValueError, match=r"configuration differs .*\(config\.warmup_steps: saved 2, requested 3\)"):
        train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, warmup_steps=3),
                      resume=True)
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before


def test_a_foreign_checkpoint_is_refused(tmp_path, tiny_world):
    """A run directory whose config is a teacher's but whose checkpoint is a CLIP run's: resuming names the
    checkpoint file and what it lacks, and leaves the directory as it was."""
    run = tmp_path / "teacher"
    train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=1))
    _clip(tmp_path / "clip", tiny_world, 1, False)
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(tmp_path / "clip" / "checkpoint", run / "checkpoint")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"checkpoint/state\.pt holds no 'models/unet'; it is not this run's"):
        train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2),
                      resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_without_a_checkpoint_and_a_world_without_parts_are_clear_errors(tmp_path, tiny_world):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train_teacher(tmp_path / "nothing", tiny_world / "vae", tiny_world, TINY_TEACHER, resume=True)
    with pytest.raises(FileNotFoundError, match="no VAE"):
        train_teacher(tmp_path / "run", tmp_path, tiny_world, TINY_TEACHER)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        train_teacher(tmp_path / "run", tiny_world / "vae", tmp_path, TINY_TEACHER)


def test_exports_load_with_the_diffusers_and_transformers_classes(tmp_path, tiny_world):
    unet_dir = train_teacher(tmp_path / "teacher", tiny_world / "vae", tiny_world,
                             dataclasses.replace(TINY_TEACHER, max_steps=1))
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    ema = _state(tmp_path / "teacher")["emas"]["unet"]["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in unet.state_dict().items()), "export is not the EMA"
    assert json.loads((unet_dir / "train_config.json").read_text())["config"]["max_steps"] == 1

    vae_dir = train_vae(tmp_path / "vae", dataclasses.replace(TINY_VAE, max_steps=2))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.scaling_factor > 0
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)

    ft_dir = train_vae_decoder(tmp_path / "decoder", vae_dir, DecoderTrainConfig(max_steps=2, batch_size=4,
                                                                                warmup_steps=1))
    ft = AutoencoderKL.from_pretrained(ft_dir)
    before, after = vae.state_dict(), ft.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("encoder.", "quant_conv.")):
            assert same, f"decoder fine-tuning changed {name}: the latent space must stay fixed"
    assert not all(torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    assert ft.config.scaling_factor == vae.config.scaling_factor

    clip_dir = train_clip(tmp_path / "clip", dataclasses.replace(TINY_CLIP, max_steps=2))
    clip = CLIPModel.from_pretrained(clip_dir / "clip")
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    ids = tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(text_encoder(ids)[0], clip.text_model(ids)[0])


def test_warm_start_begins_from_the_given_unet(tmp_path, tiny_world):
    first = train_teacher(tmp_path / "first", tiny_world / "vae", tiny_world,
                          dataclasses.replace(TINY_TEACHER, max_steps=2))
    warm_cfg = dataclasses.replace(TINY_TEACHER, max_steps=1, lr=0.0, warmup_steps=1, init_from=str(first))
    second = train_teacher(tmp_path / "second", tiny_world / "vae", tiny_world, warm_cfg)
    a = UNet2DConditionModel.from_pretrained(first).state_dict()
    b = UNet2DConditionModel.from_pretrained(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "with lr 0 the warm-started teacher must equal its start"
    recorded = json.loads((second / "train_config.json").read_text())["init_from_weights"]
    assert recorded == "sha256:" + hashlib.sha256((first / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="config differs"):
        other = dataclasses.replace(TINY_UNET, block_out_channels=(16, 16), norm_num_groups=4)
        train_teacher(tmp_path / "third", tiny_world / "vae", tiny_world,
                      dataclasses.replace(warm_cfg, arch=other))


def test_a_multi_process_launch_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The world's methods call their networks directly (not through DDP): under torchrun the processes' copies
    would drift apart, so a multi-process launch is refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one CPU process"):
        train_vae(tmp_path / "run", TINY_VAE)
    assert not (tmp_path / "run").exists()
