"""The world's training commands: exact resume, refusal to clobber a run, loadable exports."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from tandem.world.models import CLIPArchConfig, UNetConfig, VAEConfig
from tandem.world.train import (
    CLIPTrainConfig,
    DecoderTrainConfig,
    TeacherTrainConfig,
    VAETrainConfig,
    train_clip,
    train_teacher,
    train_vae,
    train_vae_decoder,
)

TINY_UNET = UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=8,
                       norm_num_groups=8, cross_attention_dim=32)
TINY_TEACHER = TeacherTrainConfig(arch=TINY_UNET, max_steps=4, batch_size=6, warmup_steps=2,
                                  checkpoint_every=2, threads=1)


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def test_teacher_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, tiny_world):
    train_teacher(tmp_path / "straight", tiny_world / "vae", tiny_world, TINY_TEACHER)
    train_teacher(tmp_path / "split", tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    train_teacher(tmp_path / "split", tiny_world / "vae", tiny_world, TINY_TEACHER, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a["step"] == b["step"] == 4
    for key in ("unet", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for (name, p), q in zip(a["opt"]["state"].items(), b["opt"]["state"].values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]), f"optimizer state {name} differs"
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4]


def test_a_finished_or_started_run_is_never_overwritten(tmp_path, tiny_world):
    run = tmp_path / "run"
    train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, max_steps=2))
    with pytest.raises(ValueError, match="config differs"):
        train_teacher(run, tiny_world / "vae", tiny_world, dataclasses.replace(TINY_TEACHER, lr=1e-3), resume=True)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_checkpoint_and_a_world_without_parts_are_clear_errors(tmp_path, tiny_world):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train_teacher(tmp_path / "nothing", tiny_world / "vae", tiny_world, TINY_TEACHER, resume=True)
    with pytest.raises(FileNotFoundError, match="no VAE"):
        train_teacher(tmp_path / "run", tmp_path, tiny_world, TINY_TEACHER)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        train_teacher(tmp_path / "run", tiny_world / "vae", tmp_path, TINY_TEACHER)


def test_exports_load_with_the_diffusers_and_transformers_classes(tmp_path, tiny_world):
    unet_dir = train_teacher(tmp_path / "teacher", tiny_world / "vae", tiny_world,
                             dataclasses.replace(TINY_TEACHER, max_steps=1))
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    ema = _weights(tmp_path / "teacher")["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in unet.state_dict().items()), "export is not the EMA"
    assert json.loads((unet_dir / "train_config.json").read_text())["config"]["max_steps"] == 1

    vae_dir = train_vae(tmp_path / "vae", VAETrainConfig(
        arch=VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4), max_steps=2, batch_size=4,
        warmup_steps=1))
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

    clip_dir = train_clip(tmp_path / "clip", CLIPTrainConfig(
        arch=CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1, heads=2,
                            patch_size=8, projection_dim=32), max_steps=2, batch_size=4, warmup_steps=1))
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
