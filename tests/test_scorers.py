"""Scorer adapters load tiny randomly initialised models of the real architectures from a local
directory (the real loading code runs) and score as the transformers model computes by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tandem.scorers import CLIPScorer, ImageRewardScorer, load_scorer, to_image_tensor

PROMPTS = ["a red circle", "a small blue square", "a green triangle at the top"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def save_tiny_clip(path, seed: int):
    from tandem.world.models import CLIPArchConfig, build_clip
    from tandem.world.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    clip = build_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                      CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1,
                                     heads=2, patch_size=8, projection_dim=16))
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return clip.eval(), tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model, tokenizer = save_tiny_clip(path, 0)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def by_hand(model, tokenizer, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        text = model.text_model(**tokenizer(PROMPTS, padding=True, return_tensors="pt"))
        txt = model.text_projection(text.pooler_output)
    return F.cosine_similarity(img, txt, dim=-1)


def test_clip_score_is_the_clipped_scaled_cosine(clip_dir, images):
    path, model, tokenizer = clip_dir
    scorer = load_scorer(f"clip:{path}")
    cos = by_hand(model, tokenizer, images)
    torch.testing.assert_close(scorer(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)


def test_pickscore_is_logit_scale_times_cosine(clip_dir, images):
    path, model, tokenizer = clip_dir
    scorer = load_scorer(f"pickscore:{path}")
    cos = by_hand(model, tokenizer, images)
    torch.testing.assert_close(scorer(images, PROMPTS), model.logit_scale.exp().item() * cos, atol=1e-4, rtol=1e-4)


def test_input_forms_and_batches_agree(clip_dir, images):
    scorer = CLIPScorer.from_pretrained(str(clip_dir[0]), batch_size=2)
    as_arrays = scorer(list(images), PROMPTS)
    as_pil = scorer([Image.fromarray(im) for im in images], PROMPTS)
    as_tensor = scorer(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, PROMPTS)
    one_by_one = torch.cat([scorer(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    for other in (as_pil, as_tensor, one_by_one):
        torch.testing.assert_close(as_arrays, other, atol=1e-5, rtol=1e-5)


def test_bigger_images_are_resized_to_the_model(clip_dir, images):
    scorer = load_scorer(f"clip:{clip_dir[0]}")
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64x64, nearest-neighbour
    assert scorer(big, PROMPTS).shape == (3,)
    assert scorer.preprocess(to_image_tensor(big)).shape[-2:] == (32, 32)


def test_fingerprint_follows_the_weights(tmp_path, clip_dir):
    path = clip_dir[0]
    assert load_scorer(f"clip:{path}").fingerprint() == load_scorer(f"clip:{path}").fingerprint()
    other = tmp_path / "other"
    save_tiny_clip(other, 1)
    assert load_scorer(f"clip:{other}").fingerprint()["weights"] != load_scorer(f"clip:{path}").fingerprint()["weights"]


def test_bad_input_is_named(clip_dir, images):
    scorer = load_scorer(f"clip:{clip_dir[0]}")
    with pytest.raises(ValueError, match="3 images and 2 prompts"):
        scorer(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="uint8"):
        scorer([images[0].astype(np.float32)], PROMPTS[:1])
    with pytest.raises(ValueError, match="unknown scorer"):
        load_scorer("aesthetic:foo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer("clip:/no/such/dir")
    with pytest.raises(ValueError, match="needs a model"):
        load_scorer("clip")


def test_imagereward_names_its_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_imagereward(name, *args, **kwargs):
        if name == "ImageReward":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imagereward)
    with pytest.raises(ImportError, match="pip install image-reward"):
        ImageRewardScorer.from_pretrained()
