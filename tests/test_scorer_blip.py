"""The BLIP image-text-matching scorer, checked against transformers' own processor and model.

A tiny randomly initialised ``BlipForImageTextRetrieval`` is saved with a small BERT tokenizer and a
``BlipProcessor`` to a directory and loaded through ``load_scorer`` (the real loading code runs); the
reference is ``softmax(model(**processor(images, text), use_itm_head=True).itm_score)[:, 1]`` with the
processor transformers loads from that directory (its PIL image path).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scorertools import save_tiny_clip
from transformers import (
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipModel,
    BlipProcessor,
)

from tandem.scorers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BLIPScorer, Scorer, load_scorer, to_image_tensor

PROMPTS = ["a red circle", "a small blue square", "a green triangle at the top", "two yellow stars", "a purple ring"]
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"big", "left", "right"})
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIZE = 32


def save_tiny_blip(path, seed: int) -> BlipForImageTextRetrieval:
    """A tiny BLIP ITM model, BERT tokenizer and BLIP processor (32 px, MEAN/STD) saved to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    (path / "vocab.txt").unlink()  # the tokenizer saves its own files
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 40, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id},
        vision_config={"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    image_processor = BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=list(MEAN),
                                            image_std=list(STD))
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # BERT-style initialisation (std 0.02) makes the [CLS] state, and so P(match), almost constant: draw
    # larger weights and centre the match logit so that the scores spread over (0, 1) and follow the prompt
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
        model.itm_head.weight.normal_(0, 1)
        model.itm_head.bias.zero_()
        pictures = np.random.default_rng(seed).integers(0, 256, (len(PROMPTS), SIZE, SIZE, 3), dtype=np.uint8)
        inputs = processor(images=list(pictures), text=PROMPTS, padding=True, return_tensors="pt")
        logits = model(**inputs, use_itm_head=True).itm_score
        model.itm_head.bias[1] -= (logits[:, 1] - logits[:, 0]).mean()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip") / "model"
    return path, save_tiny_blip(path, seed=0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), SIZE, SIZE, 3), dtype=np.uint8)


def reference_match(path, model, images, prompts=PROMPTS) -> torch.Tensor:
    """P(match) with the processor transformers loads from ``path`` and the model's own ITM forward."""
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=[Image.fromarray(im) for im in images], text=list(prompts), padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**inputs, use_itm_head=True).itm_score, dim=-1)[:, 1]


def test_blip_score_is_the_itm_match_probability(blip_dir, images):
    path, model = blip_dir
    scorer = load_scorer(f"blip:{path}")
    assert isinstance(scorer, Scorer) and isinstance(scorer, BLIPScorer) and scorer.name == f"blip:{path}"
    assert scorer.image_size == (SIZE, SIZE) and scorer.image_mean == MEAN and scorer.image_std == STD
    reference = reference_match(path, model, images)
    assert reference.max() - reference.min() > 0.2  # the scores are spread, not all ~0.5
    scores = scorer(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (len(PROMPTS),)
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)
    shuffled = PROMPTS[1:] + PROMPTS[:1]  # the prompt matters, and each pairs with its own image
    torch.testing.assert_close(scorer(images, shuffled), reference_match(path, model, images, shuffled),
                               atol=1e-4, rtol=1e-4)


def test_blip_other_sizes_are_resized_like_transformers(blip_dir):
    path, model = blip_dir
    scorer = load_scorer(f"blip:{path}")
    processor = AutoProcessor.from_pretrained(path)
    coarse = np.random.default_rng(1).integers(0, 256, (len(PROMPTS), 6, 5, 3), dtype=np.uint8)
    # smooth images (as photographs are), neither square nor the model's size: 60x45 -> 32x32
    pictures = [Image.fromarray(im).resize((45, 60), Image.BILINEAR) for im in coarse]
    ours = scorer.preprocess(to_image_tensor(pictures))
    theirs = processor(images=pictures, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (len(PROMPTS), 3, SIZE, SIZE)
    # PIL resizes 8-bit images in two rounded passes: allow that rounding
    error = (ours - theirs).abs().mul(torch.tensor(STD).view(1, 3, 1, 1))
    assert error.max() < 2 / 255
    arrays = np.stack([np.asarray(p) for p in pictures])
    torch.testing.assert_close(scorer(arrays, PROMPTS), reference_match(path, model, arrays), atol=1e-3, rtol=0)


def test_blip_batches_and_input_forms_agree(blip_dir, images):
    scorer = BLIPScorer.from_pretrained(str(blip_dir[0]), batch_size=2)
    reference = scorer(list(images), PROMPTS)
    one_by_one = torch.cat([scorer(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(images))])
    scorer.batch_size = 64
    forms = {"one by one": one_by_one,
             "one batch": scorer(list(images), PROMPTS),
             "PIL": scorer([Image.fromarray(im) for im in images], PROMPTS),
             "float tensor": scorer(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, PROMPTS)}
    for form, scores in forms.items():
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5, msg=form)


def test_blip_fingerprint_follows_the_weights(blip_dir, tmp_path):
    path = blip_dir[0]
    first = load_scorer(f"blip:{path}").fingerprint()
    assert first == load_scorer(f"blip:{path}").fingerprint()
    assert first["kind"] == "blip" and first["path"] == str(path.resolve())
    assert set(first["weights"]) == {"model.safetensors"}
    assert first["image_size"] == [SIZE, SIZE] and first["image_mean"] == list(MEAN) and first["resample"] == "bicubic"
    assert "tokenizer.json" in first["processor"]["files"] or "vocab.txt" in first["processor"]["files"]
    copy = shutil.copytree(path, tmp_path / "copy")
    assert load_scorer(f"blip:{copy}").fingerprint()["weights"] == first["weights"]
    save_tiny_blip(tmp_path / "other", seed=1)
    assert load_scorer(f"blip:{tmp_path / 'other'}").fingerprint()["weights"] != first["weights"]


def test_blip_reads_either_processor_config_and_defaults_to_clip_statistics(blip_dir, images, tmp_path):
    path, model = blip_dir
    # the hub's BLIP repositories ship a preprocessor_config.json
    legacy = shutil.copytree(path, tmp_path / "legacy")
    (legacy / "processor_config.json").unlink()
    mean, std = (0.3, 0.5, 0.6), (0.3, 0.2, 0.25)
    BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=list(mean),
                          image_std=list(std)).save_pretrained(legacy)
    assert (legacy / "preprocessor_config.json").is_file()
    scorer = load_scorer(f"blip:{legacy}")
    assert scorer.image_mean == mean and scorer.image_std == std
    torch.testing.assert_close(scorer(images, PROMPTS), reference_match(legacy, model, images), atol=1e-4, rtol=1e-4)
    # no image processor config at all: the model's size and CLIP's statistics, as BlipImageProcessor's defaults
    (legacy / "preprocessor_config.json").unlink()
    bare = load_scorer(f"blip:{legacy}")
    assert bare.image_size == (SIZE, SIZE) and bare.image_mean == OPENAI_CLIP_MEAN and bare.image_std == OPENAI_CLIP_STD


def test_blip_bad_specs_and_directories_are_named(blip_dir, tmp_path):
    path = blip_dir[0]
    with pytest.raises(ValueError, match="unknown scorer kind 'blip2'.*imagereward, blip"):
        load_scorer(f"blip2:{path}")
    with pytest.raises(FileNotFoundError, match="blip scorer: .* does not exist"):
        load_scorer(f"blip:{tmp_path / 'no' / 'such' / 'dir'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer("blip:not a hub id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load blip scorer"):
        load_scorer(f"blip:{tmp_path / 'empty'}")
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, weights_only / name)
    with pytest.raises(ValueError, match="holds no tokenizer vocabulary"):
        BLIPScorer.from_pretrained(str(weights_only))
    assert BLIPScorer.from_pretrained(str(weights_only), processor=str(path)).image_mean == MEAN
    save_tiny_clip(tmp_path / "clip", seed=0)
    with pytest.raises(ValueError, match="holds a clip model, not a BLIP image-text matching model"):
        load_scorer(f"blip:{tmp_path / 'clip'}")
    # a BLIP without the ITM head and its text encoder (here the contrastive BlipModel) is refused, not completed
    # with random weights
    BlipModel(BlipConfig.from_pretrained(path)).save_pretrained(tmp_path / "contrastive")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(path / name, tmp_path / "contrastive" / name)
    with pytest.raises(ValueError, match="not a BLIP image-text matching model: it has no weights for .*itm_head"):
        load_scorer(f"blip:{tmp_path / 'contrastive'}")

    def edited(name: str, **changes):
        target = shutil.copytree(path, tmp_path / name)
        config = json.loads((target / "processor_config.json").read_text())
        config["image_processor"].update(changes)
        (target / "processor_config.json").write_text(json.dumps(config))
        return target

    with pytest.raises(ValueError, match="resizes images to 48x48 but the model .* expects 32x32"):
        load_scorer(f"blip:{edited('bigger', size={'height': 48, 'width': 48})}")
    with pytest.raises(ValueError, match="sets do_normalize"):
        load_scorer(f"blip:{edited('unnormalised', do_normalize=False)}")
    with pytest.raises(ValueError, match="sets resample 0"):
        load_scorer(f"blip:{edited('nearest', resample=0)}")
