"""A world directory is a Stable Diffusion repository, and tandem's teacher generation is
exactly the diffusers pipeline call a reader would write by hand for the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextModel, CLIPTokenizer

from tandem.generate import TeacherSettings, generate_teacher, prompt_seed
from tandem.models import resolve_model
from tandem.world.scene import COLORS, POSITIONS, SHAPES, SIZES
from tandem.world.tokenizer import grammar_words

PROMPTS = ["a red circle", "a small blue square at the top left",
           "an orange triangle to the left of a large green circle"]
STEPS = 3  # DPM-Solver++ 2M takes a second-order step only from step 2 on


pytestmark = pytest.mark.usefixtures("one_thread")


def load(world) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(world)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_world_loads_as_a_stable_diffusion_pipeline(tiny_world):
    pipe = load(tiny_world)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def by_hand(pipe, prompts: list[str], scheduler, guidance_scale: float, seed: int) -> list[np.ndarray]:
    """The diffusers call: prompt i starts from randn of a generator seeded with prompt_seed(seed, i)."""
    pipe.scheduler = scheduler
    generators = [torch.Generator().manual_seed(prompt_seed(seed, i)) for i in range(len(prompts))]
    latents = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance_scale, latents=latents,
                      output_type="np").images
    return [np.asarray(image) for image in pipe.numpy_to_pil(images)]


@pytest.mark.parametrize("scheduler, guidance_scale", [("dpm", 3.0), ("ddim", 3.0), ("unipc", 1.0)])
def test_generate_teacher_equals_the_diffusers_call(tiny_world, scheduler, guidance_scale):
    reference = load(tiny_world)
    config = reference.scheduler.config
    diffusers_scheduler = {
        "dpm": DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
        "ddim": DDIMScheduler.from_config(config),
        "unipc": UniPCMultistepScheduler.from_config(config),
    }[scheduler]
    expected = by_hand(reference, PROMPTS, diffusers_scheduler, guidance_scale, seed=7)

    images = generate_teacher(load(tiny_world), PROMPTS, TeacherSettings(STEPS, scheduler, guidance_scale),
                              seed=7, batch_size=len(PROMPTS))
    assert len(images) == len(PROMPTS)
    for got, want in zip(images, expected):
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, want)


def test_generate_teacher_follows_its_seed(tiny_world):
    """Equal seeds give the same images (on a freshly loaded pipeline); another seed gives other images for
    every prompt."""
    settings = TeacherSettings(2, "dpm", 3.0)
    first = generate_teacher(load(tiny_world), PROMPTS[:2], settings, seed=3, batch_size=2)
    again = generate_teacher(load(tiny_world), PROMPTS[:2], settings, seed=3, batch_size=2)
    other = generate_teacher(load(tiny_world), PROMPTS[:2], settings, seed=4, batch_size=2)
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a.astype(int) - c.astype(int)).mean() > 1, "seeds 3 and 4 drew the same image"


def test_prompt_seed_differs_across_indices_and_seeds():
    seeds = {(seed, index): prompt_seed(seed, index) for seed in range(4) for index in range(256)}
    assert len(set(seeds.values())) == len(seeds)  # no (seed, index) pair shares a generator
    assert all(0 <= s < 2**63 for s in seeds.values())  # a valid torch.Generator seed
    assert all(prompt_seed(seed, index) == s for (seed, index), s in seeds.items())  # a pure function


def test_world_tokenizer_has_one_token_per_grammar_word(tiny_world):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_world / "tokenizer")
    for word in grammar_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.decode(ids).strip() == word
    # A word the grammar lacks still encodes, in pieces.
    assert len(tokenizer("hexagon", add_special_tokens=False).input_ids) > 1


def test_the_longest_caption_fits_the_text_encoder(tiny_world):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_world / "tokenizer")
    text_encoder_config = json.loads((tiny_world / "text_encoder" / "config.json").read_text())
    attributes = (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("position", POSITIONS))
    longest = {name: max(words, key=lambda w: (len(w.split()), len(w))) for name, words in attributes}
    phrase = f"a {longest['size']} {longest['color']} {longest['shape']} {longest['position']}"
    caption = f"{phrase}, {phrase} and {phrase}"  # 3 objects, every attribute stated
    ids = tokenizer(caption, truncation=False).input_ids
    assert len(ids) == 3 * 8 + 2 + 2  # 8 words per object, ',' and 'and', BOS and EOS
    assert len(ids) <= tokenizer.model_max_length <= text_encoder_config["max_position_embeddings"]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption


def test_resolve_model_reads_a_world_directory(tiny_world):
    spec = resolve_model(str(tiny_world))
    assert spec.is_world and spec.path == str(tiny_world)
    assert (spec.teacher.steps, spec.teacher.scheduler, spec.teacher.guidance_scale) == (25, "dpm", 3.0)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="model_index.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    assert not resolve_model(str(tmp_path)).is_world  # a plain diffusers repository: no grammar
