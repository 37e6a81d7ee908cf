"""Tiny scorer models for tests: a randomly initialised CLIP saved with the world's tokenizer and a
32-px preprocessor config (MEAN/STD, logit scale LOGIT_SCALE), so the real loading code runs on it."""

from __future__ import annotations

import math

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LOGIT_SCALE = 42.0


def save_tiny_clip(path, seed: int) -> tuple[CLIPModel, CLIPImageProcessorPil]:
    from tandem.world.tokenizer import MAX_LENGTH, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": MAX_LENGTH,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    model = CLIPModel(config).eval()
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_mean=list(MEAN), image_std=list(STD))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor
