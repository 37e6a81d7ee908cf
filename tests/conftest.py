"""Shared fixtures: a tiny, randomly initialised world with the shipped world's layout.

The CLI and pipeline contract tests run on it (seconds); tests that need the trained
weights use the shipped world and say so.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TANDEM_PROGRESS", "0")


def build_tiny_world(path, seed: int = 0):
    from tandem.world.assemble import write_world
    from tandem.world.models import CLIPArchConfig, UNetConfig, VAEConfig, build_clip, build_unet, build_vae
    from tandem.world.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    clip = build_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                      CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1,
                                     heads=2, patch_size=8, projection_dim=32))
    vae = build_vae(VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4))
    unet = build_unet(UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=8,
                                 norm_num_groups=8, cross_attention_dim=32))
    return write_world(path, vae, clip, tokenizer, unet, guidance_scale=3.0)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world") / "world")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the machine's other jobs keep their cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_world, one_thread):
    """The tiny world's teacher pipeline (one per test module; a module may define its own ``teacher``)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world)
    pipe.set_progress_bar_config(disable=True)
    return pipe
