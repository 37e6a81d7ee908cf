"""Scorer adapters, checked against computations done here with the transformers model itself.

A tiny randomly initialised ``CLIPModel`` is saved with a tokenizer and a preprocessor config to a
directory and loaded through ``load_scorer`` (the real loading code runs); the reference scores use
transformers' own PIL image processor and ``get_image_features``/``get_text_features``.
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scorertools import LOGIT_SCALE, MEAN, STD, save_tiny_clip

from tandem.scorers import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPScorer,
    ImageRewardScorer,
    PickScoreScorer,
    Scorer,
    load_scorer,
    to_image_tensor,
)

PROMPTS = ["a red circle", "a small blue square", "a green triangle at the top", "two yellow stars", "a purple ring"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model, processor = save_tiny_clip(path, seed=2)  # a seed whose cosines have both signs
    return path, model, processor


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 32, 32, 3), dtype=np.uint8)


def reference_cosine(clip_dir, images: np.ndarray, prompts=PROMPTS) -> torch.Tensor:
    """cos(image, text) with transformers' PIL preprocessing and the model's own feature functions."""
    from transformers import AutoTokenizer

    path, model, processor = clip_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
    return F.cosine_similarity(image_embeds, text_embeds, dim=-1)


def test_clip_score_is_100_times_the_clipped_cosine(clip_dir, images):
    path = clip_dir[0]
    scorer = load_scorer(f"clip:{path}")
    assert isinstance(scorer, Scorer) and scorer.name == f"clip:{path}"
    cos = reference_cosine(clip_dir, images)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of the clip at 0 are exercised
    scores = scorer(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)


def test_pickscore_is_logit_scale_times_the_cosine(clip_dir, images, tmp_path):
    path = clip_dir[0]
    scorer = load_scorer(f"pickscore:{path}")
    assert scorer.processor == str(path)  # the directory holds a tokenizer, so it is the processor
    cos = reference_cosine(clip_dir, images)
    torch.testing.assert_close(scorer(images, PROMPTS), LOGIT_SCALE * cos, atol=1e-4, rtol=1e-4)
    assert scorer.fingerprint()["scale"] == pytest.approx(LOGIT_SCALE)
    # PickScore_v1 ships weights only; its processor comes from elsewhere
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, tmp_path / name)
    weights_only = PickScoreScorer.from_pretrained(str(tmp_path), processor=str(path))
    torch.testing.assert_close(weights_only(images, PROMPTS), scorer(images, PROMPTS))


def test_batches_and_input_forms_agree(clip_dir, images):
    scorer = CLIPScorer.from_pretrained(str(clip_dir[0]), batch_size=2)
    reference = scorer(list(images), PROMPTS)
    one_by_one = torch.cat([scorer(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(images))])
    scorer.batch_size = 64
    forms = {"one by one": one_by_one,
             "one batch": scorer(list(images), PROMPTS),
             "PIL": scorer([Image.fromarray(im) for im in images], PROMPTS),
             "uint8 array": scorer(images, PROMPTS),
             "float tensor": scorer(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, PROMPTS)}
    for form, scores in forms.items():
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5, msg=form)


def test_other_sizes_are_resized_and_centre_cropped_like_transformers(clip_dir, images):
    path, _, processor = clip_dir
    scorer = load_scorer(f"clip:{path}")
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (2, 10, 7, 3), dtype=np.uint8)  # smooth images, as photographs are
    tall = [Image.fromarray(im).resize((56, 80), Image.BILINEAR) for im in coarse]  # 80x56 -> 45x32 -> 32x32
    ours = scorer.preprocess(to_image_tensor(tall))
    theirs = processor(images=tall, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    # PIL resizes 8-bit images in two rounded passes: allow that rounding
    error = (ours - theirs).abs().mul(torch.tensor(STD).view(1, 3, 1, 1))
    assert error.max() < 2 / 255
    wide = rng.integers(0, 256, (len(images), 32, 64, 3), dtype=np.uint8)
    wide[:, :, 16:48] = images  # already 32 high: only the centre 32x32 counts, exactly
    torch.testing.assert_close(scorer(wide, PROMPTS), scorer(images, PROMPTS))


def test_fingerprint_follows_the_weights(clip_dir, tmp_path):
    path = clip_dir[0]
    first = load_scorer(f"clip:{path}").fingerprint()
    assert first == load_scorer(f"clip:{path}").fingerprint()
    assert first["path"] == str(path.resolve()) and first["scale"] == 100.0 and first["image_mean"] == list(MEAN)
    assert set(first["weights"]) == {"model.safetensors"}
    copy = shutil.copytree(path, tmp_path / "copy")
    assert load_scorer(f"clip:{copy}").fingerprint()["weights"] == first["weights"]
    save_tiny_clip(tmp_path / "other", seed=3)
    assert load_scorer(f"clip:{tmp_path / 'other'}").fingerprint()["weights"] != first["weights"]


def test_a_hub_id_is_fingerprinted_by_its_cached_commit(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from tandem.scorers import source_fingerprint

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--clip"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert source_fingerprint("org/clip") == {"source": "org/clip", "revision": commit}
    assert source_fingerprint("org/uncached") == {"source": "org/uncached", "revision": None}


def test_malformed_input_is_named(clip_dir, images):
    scorer = load_scorer(f"clip:{clip_dir[0]}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255
    cases = [((images, PROMPTS[:2]), ValueError, "5 images and 2 prompts"),
             (([images[0].astype(np.float32)], PROMPTS[:1]), ValueError, "uint8"),
             (([images[0], images[0, :16]], PROMPTS[:2]), ValueError, "differ in size"),
             ((x * 255, PROMPTS), ValueError, r"\[0, 1\]"),
             ((x * float("nan"), PROMPTS), ValueError, r"\[0, 1\]"),
             ((torch.from_numpy(images).permute(0, 3, 1, 2), PROMPTS), ValueError, "float image tensor"),
             ((x[:, :2], PROMPTS), ValueError, r"\[B, 3, H, W\]"),
             (([], []), ValueError, "no images"),
             ((images[:1], PROMPTS[0]), TypeError, "single string"),
             ((Image.fromarray(images[0]), PROMPTS[:1]), TypeError, "one PIL image"),
             ((images[:2], ["a red circle", None]), TypeError, "prompts must be strings")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            scorer(*args)


def test_bad_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown scorer kind 'aesthetic'.*world-oracle, clip, pickscore, imagereward"):
        load_scorer("aesthetic:foo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer(f"clip:{tmp_path / 'no' / 'such' / 'dir'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer("pickscore:./missing")
    with pytest.raises(ValueError, match="needs a model"):
        load_scorer("clip")


def test_imagereward_names_its_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import ImageReward -> ModuleNotFoundError
    with pytest.raises(ImportError, match="pip install image-reward"):
        load_scorer("imagereward")


def test_imagereward_that_fails_to_import_says_why(monkeypatch, tmp_path):
    (tmp_path / "ImageReward").mkdir()
    (tmp_path / "ImageReward" / "__init__.py").write_text(
        "from transformers.modeling_utils import find_pruneable_heads_and_indices\n")  # as image-reward 1.5 does
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ImageReward", raising=False)
    with pytest.raises(ImportError, match="fails to import: cannot import name 'find_pruneable_heads_and_indices'"):
        load_scorer("imagereward")


class StandInTokenizer:
    """Token ids from word lengths, padded like BERT's tokenizer; records its keyword arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, **kwargs):
        from transformers import BatchEncoding

        self.calls.append(kwargs)
        n = kwargs["max_length"]
        ids = [[len(w) for w in p.split()][:n] for p in prompts]
        return BatchEncoding({"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                              "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])})


class StandInImageReward(torch.nn.Module):
    """The attributes of ``ImageReward.ImageReward`` the adapter uses, with a made-up ``score_gard``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.blip = types.SimpleNamespace(tokenizer=StandInTokenizer())
        self.mean, self.std = 0.16717362830052426, 1.0333394966054072
        self.batches = []

    def score_gard(self, prompt_ids, prompt_attention_mask, image):
        self.batches.append(tuple(image.shape))
        return (self.weight * image.mean((1, 2, 3)) + (prompt_ids * prompt_attention_mask).sum(1) / 100)[:, None]


def test_imagereward_adapter_plumbing_with_a_stand_in_package(monkeypatch, tmp_path):
    """What is exercised: finding ImageReward.pt and med_config.json in a directory and handing them to
    ``ImageReward.load``; the tokenizer arguments of the package's ``score`` (padding to 35 tokens);
    the images the adapter hands to ``score_gard`` (224 px, normalised with CLIP's statistics, as the
    package's torchvision transform makes them), batching, and the fingerprint's weight digests.
    What is not: the package itself, its BLIP model, and whether ``score_gard`` equals the package's
    ``score`` (read from image-reward 1.5's source; it does not import under transformers 5)."""
    loads = []

    def load(name, device="cpu", download_root=None, med_config=None):
        loads.append((name, device, med_config))
        return StandInImageReward()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    (tmp_path / "ImageReward.pt").write_bytes(b"weights")
    (tmp_path / "med_config.json").write_text("{}")
    scorer = ImageRewardScorer.from_pretrained(str(tmp_path), batch_size=2)
    assert loads == [(str(tmp_path / "ImageReward.pt"), "cpu", str(tmp_path / "med_config.json"))]

    x = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    scores = scorer(x, PROMPTS)
    assert scorer.model.batches == [(2, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]
    assert scorer.model.blip.tokenizer.calls[0] == {"padding": "max_length", "truncation": True,
                                                        "max_length": 35, "return_tensors": "pt"}
    pixels = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    words = torch.tensor([sum(len(w) for w in p.split()) for p in PROMPTS], dtype=torch.float32)
    torch.testing.assert_close(scores, pixels.mean((1, 2, 3)) + words / 100)

    before = scorer.fingerprint()
    assert set(before["weights"]) == {"ImageReward.pt", "med_config.json"}
    (tmp_path / "ImageReward.pt").write_bytes(b"other weights")
    assert scorer.fingerprint()["weights"]["ImageReward.pt"] != before["weights"]["ImageReward.pt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ImageReward.pt"):
        ImageRewardScorer.from_pretrained(str(tmp_path / "empty"))

