"""Architectures of ShapesWorld's model components: the same diffusers/transformers classes
as Stable Diffusion, at a size that trains on a CPU.

| component      | class                     | shape                               |
|----------------|---------------------------|-------------------------------------|
| vae            | AutoencoderKL             | 32x32x3 <-> 8x8x4                   |
| text encoder   | CLIPTextModel (of a CLIP) | 32 tokens -> 32x128                 |
| image features | CLIPVisionModel (same CLIP) | 32x32x3 -> 128                    |
| teacher        | UNet2DConditionModel      | 8x8x4 latents, cross-attention 128  |
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel

from .scene import CANVAS
from .tokenizer import MAX_LENGTH

LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_DIM = 128


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # two downsamplings: 32 -> 8
    layers_per_block: int = 1
    norm_num_groups: int = 8


def build_vae(cfg: VAEConfig = VAEConfig()) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=CANVAS,
    )


@dataclass
class CLIPArchConfig:
    hidden_size: int = TEXT_DIM
    intermediate_size: int = 512
    text_layers: int = 4
    vision_layers: int = 4
    heads: int = 4
    patch_size: int = 4
    projection_dim: int = 128


def build_clip(vocab_size: int, bos_id: int, eos_id: int, cfg: CLIPArchConfig = CLIPArchConfig()) -> CLIPModel:
    text = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=cfg.projection_dim,
    )
    vision = dict(
        image_size=CANVAS,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


@dataclass
class UNetConfig:
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # 8x8 -> 4x4 -> 2x2
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = TEXT_DIM


def build_unet(cfg: UNetConfig = UNetConfig()) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """The training noise schedule, saved as the pipeline's scheduler config.

    SD's scaled-linear betas with 1000 steps; "epsilon" prediction; the samplers
    (DDIM, DPM-Solver++, UniPC) are built from this config with ``from_config``.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
