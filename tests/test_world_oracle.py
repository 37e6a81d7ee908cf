"""ShapesWorld's learned oracle: it learns to rank images as the exact checker does (which it never
calls), saves and loads exactly, and scores an image the same whatever its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.world.checker import check_batch
from tandem.world.oracle import (
    OracleArch,
    WorldOracle,
    WorldOracleScorer,
    corrupt,
    pairwise_agreement,
)
from tandem.world.stream import sample_batch

ARCH = OracleArch(fusion_layers=1, heads=2, ff=64, head_hidden=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tandem.world.models import CLIPArchConfig, build_clip
    from tandem.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    clip = build_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                      CLIPArchConfig(hidden_size=32, intermediate_size=64, text_layers=1, vision_layers=1,
                                     heads=2, patch_size=8, projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(path)
    return WorldOracle.from_clip(path, ARCH), tokenizer


def pairs(seed: int, n: int):
    """Renderings and corrupted renderings of the same captions, with the checker's soft scores."""
    prompts, renders = sample_batch(seed, 0, n)
    bad = corrupt(renders, np.random.default_rng(seed))
    images = np.concatenate([renders, bad])
    all_prompts = prompts + prompts
    score = np.array([r.score for r in check_batch(list(images), all_prompts)], dtype=np.float32)
    return all_prompts, images, score, np.concatenate([np.arange(n), np.arange(n)])


def agreement(scorer, seed=902, n=80) -> float:
    prompts, images, score, group = pairs(seed, n)
    pred = scorer(images, prompts).numpy()
    return pairwise_agreement(pred, score, group, np.zeros(len(group), int))[0]


def test_corruptions_lower_the_judges_score():
    _, _, score, _ = pairs(900, 60)
    assert (score[:60] == 1).all() and score[60:].mean() < 0.9


def test_save_load_round_trip_and_batch_independence(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "o")
    tokenizer.save_pretrained(tmp_path / "o" / "tokenizer")
    a = WorldOracleScorer.from_pretrained(tmp_path / "o")
    b = WorldOracleScorer.from_pretrained(tmp_path / "o")
    prompts, images, _, _ = pairs(901, 6)
    torch.testing.assert_close(a(images, prompts), b(images, prompts), atol=0, rtol=0)
    fp16 = WorldOracle(model.clip_config, ARCH)
    fp16.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    direct = WorldOracleScorer(fp16, tokenizer)(images, prompts)
    torch.testing.assert_close(a(images, prompts), direct, atol=1e-5, rtol=1e-5)
    one_by_one = torch.cat([a(images[i:i + 1], prompts[i:i + 1]) for i in range(len(prompts))])
    torch.testing.assert_close(a(images, prompts), one_by_one, atol=1e-5, rtol=1e-5)
    as_tensor = a(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, prompts)
    torch.testing.assert_close(a(list(images), prompts), as_tensor, atol=1e-6, rtol=1e-6)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["weights"].startswith("sha256:")
    with pytest.raises(ValueError, match="images and"):
        a(images, prompts[:-1])
    with pytest.raises(FileNotFoundError, match="tandem world train oracle"):
        WorldOracleScorer.from_pretrained(tmp_path / "missing")


def test_the_shipped_oracle_ranks_like_the_judge():
    """Rendering vs corrupted rendering of held-out captions: the shipped oracle orders them as the
    checker does; the same network before training (CLIP towers, random fusion and head) does not."""
    from tandem.models import world_dir

    shipped = WorldOracleScorer.from_pretrained()
    trained = agreement(shipped, n=100)
    untrained = WorldOracle.from_clip(world_dir() / "clip", shipped.model.arch)
    torch.manual_seed(0)
    baseline = agreement(WorldOracleScorer(untrained.eval(), shipped.tokenizer), n=100)
    assert trained > 0.85 and baseline < 0.75, (trained, baseline)
