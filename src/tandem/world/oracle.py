"""ShapesWorld's oracle: a learned, no-reference quality estimator of (image, caption) -- the
world's ImageReward.

Like ImageReward (Xu et al. 2023: BLIP's image-grounded text encoder + an MLP), the caption's
tokens self-attend and cross-attend to the image's patch tokens in a small fusion stack; their
masked mean goes through an MLP to one number, higher is better. Both towers start from the
world's CLIP (``<world>/clip``) and are fine-tuned with the fusion layers.

Training images are drawn by tandem's own models for captions of the world's training stream
(``TRAIN_STREAM_SEED``), each prompt in every sample kind of a ``SampleRecipe`` (student at 1, 2
and 4 steps, teacher DPM-Solver++ at 5 and 25 steps, teacher refinements of the 4-step
student, the exact rendering and a corrupted rendering) from the same per-prompt noise, and
labelled with the exact checker's soft score. The loss is regression to that score plus
ImageReward's pairwise ranking loss over images of one prompt. At inference the oracle never
calls the checker: the checker stays the independent judge, as humans are for ImageReward.

    tandem world train oracle --out runs/oracle   # data (cached in the run), training, held-out eval
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import file_digest
from ..checks import MAX_DEPTH, MAX_WIDTH, load_pretrained, load_safetensors, read_json_file
from ..generate import (
    StudentSettings,
    TeacherSettings,
    decode_latents,
    derive_seed,
    generate_student,
    generate_teacher,
    initial_latents,
    prompt_generator,
    sample_student,
)
from ..hub import quiet_hub_libraries
from ..loaders import load_student
from ..models import make_scheduler, resolve_model, world_dir
from ..outputs import atomic_path, atomic_write_text
from ..sampling import student_kind
from ..scorers import register_scorer, to_image_tensor
from ..training.checks import config_dict, require_number, require_training_fields
from ..training.config import Trainable
from . import oracle_net
from .oracle_net import load_oracle_state, read_oracle_config
from .prompts import load_prompts
from .stream import sample_batch

# Stream seeds no other world run uses (vae 1, clip 2, teacher 3, decoder 4; prompt lists 1 and 2
# are separate scene families): the oracle's training prompts, and its held-out evaluation prompts.
TRAIN_STREAM_SEED = 101
EVAL_STREAM_SEED = 102
REFINE_NOISE_KEY = 1  # refinement noise of prompt i: prompt_generator(derive_seed(seed, REFINE_NOISE_KEY), i)
WEIGHTS = "model.safetensors"
MODEL = "tandem.world.oracle.WorldOracle"  # config.json's "model": which class a saved oracle is


@dataclass(frozen=True)
class OracleArch:
    fusion_layers: int = 2  # text self-attention + cross-attention to image patches (BLIP's text encoder)
    heads: int = 4
    ff: int = 512
    head_hidden: int = 128

    def __post_init__(self):
        for name, most in (("fusion_layers", MAX_DEPTH), ("heads", MAX_WIDTH), ("ff", 4 * MAX_WIDTH),
                           ("head_hidden", MAX_WIDTH)):
            require_number(getattr(self, name), f"oracle arch {name}", integer=True, at_least=1, at_most=most)


class WorldOracle(nn.Module):
    """``score = MLP(mean_tokens(Fusion(text_tokens, image_patches)))``.

    Args of ``forward``:
        images (Tensor[B, 3, 32, 32]): in [0, 1].
        input_ids, attention_mask (Tensor[B, L]): the world tokenizer's ids, padded to its ``model_max_length``.
    Returns:
        Tensor[B]: scores, higher is better.
    """

    def __init__(self, clip_config: dict, arch: OracleArch = OracleArch()):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        self.clip_config, self.arch = clip_config, arch
        clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        self.vision, self.text = clip.vision_model, clip.text_model
        d, dv = clip.config.text_config.hidden_size, clip.config.vision_config.hidden_size
        self.image_proj = nn.Sequential(nn.LayerNorm(dv), nn.Linear(dv, d))
        layer = nn.TransformerDecoderLayer(d, arch.heads, arch.ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(layer, arch.fusion_layers, norm=nn.LayerNorm(d))
        self.head = nn.Sequential(nn.Linear(d, arch.head_hidden), nn.GELU(), nn.Linear(arch.head_hidden, 1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [T, L, D] of the text tower."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def vision_prefix(self, images: torch.Tensor, layers: int = 0) -> torch.Tensor:
        """Vision states [B, 1 + patches, Dv] after the embeddings and the first ``layers`` layers
        (training caches those it keeps frozen). The world CLIP sees pixels in [-1, 1]."""
        states = self.vision.pre_layrnorm(self.vision.embeddings(images * 2 - 1))
        return self._vision_layers(states, 0, layers)

    def image_tokens(self, prefix: torch.Tensor, layers: int = 0) -> torch.Tensor:
        """The tokens [B, 1 + patches, D] the caption cross-attends to, from ``vision_prefix(images, layers)``."""
        return self.image_proj(self._vision_layers(prefix, layers, len(self.vision.encoder.layers)))

    def _vision_layers(self, states: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for layer in self.vision.encoder.layers[first:last]:
            states = layer(states, None)
            states = states[0] if isinstance(states, tuple) else states
        return states

    def score(self, image_tokens: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] from image tokens [B, P, D] and the captions' text states [B, L, D] and mask [B, L]."""
        mask = attention_mask.bool()
        fused = self.fusion(text_states, image_tokens, tgt_key_padding_mask=~mask)
        pooled = (fused * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled).squeeze(-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.image_tokens(self.vision_prefix(images)), self.encode_text(input_ids, attention_mask),
                          attention_mask)

    @classmethod
    def from_clip(cls, clip_dir: str | Path, arch: OracleArch = OracleArch()) -> WorldOracle:
        """Towers from a transformers ``CLIPModel`` directory; fusion and head freshly initialised."""
        from transformers import CLIPModel

        quiet_hub_libraries()
        clip = load_pretrained(CLIPModel.from_pretrained, clip_dir, "CLIP")
        model = cls(clip.config.to_dict(), arch)
        model.vision.load_state_dict(clip.vision_model.state_dict())
        model.text.load_state_dict(clip.text_model.state_dict())
        return model

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """``config.json`` (architecture) and ``model.safetensors`` (weights in ``dtype``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(
            {"model": MODEL, "arch": config_dict(self.arch), "clip": self.clip_config},
            indent=1) + "\n")
        with atomic_path(path / WEIGHTS) as tmp:
            save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}, str(tmp))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WorldOracle:
        """A saved oracle in float32, in eval mode; a damaged ``config.json`` or weights file is a ``ValueError``
        naming the file and what is wrong with it, before anything is allocated."""
        path = Path(path)
        file = path / "config.json"
        config = read_oracle_config(path, MODEL, ("arch", "clip"))
        try:
            for key in ("arch", "clip"):
                if not isinstance(config[key], dict):
                    raise ValueError(f"{key!r} must be an object, got {type(config[key]).__name__}")  # noqa: TRY004
            try:
                arch = OracleArch(**config["arch"])
            except TypeError as e:  # a key OracleArch does not have
                raise ValueError(f"'arch': {e}") from None
            _check_clip_sizes(config["clip"])
        except ValueError as e:
            raise ValueError(f"oracle config {file}: {e}") from None
        try:
            model = cls(config["clip"], arch)
        except (TypeError, ValueError, KeyError, AssertionError) as e:  # transformers' and torch's own checks
            raise ValueError(f"oracle config {file}: 'clip' is not a CLIP configuration ({e})") from None
        state = {k: v.float() for k, v in load_safetensors(path / WEIGHTS, "oracle weights").items()}
        load_oracle_state(model, state, path)
        return model.eval()


# What a CLIP configuration in an oracle's config.json may ask for (checked before the towers are built).
CLIP_SIZES = {"hidden_size": MAX_WIDTH, "intermediate_size": 4 * MAX_WIDTH, "num_hidden_layers": MAX_DEPTH,
              "num_attention_heads": MAX_WIDTH, "vocab_size": 2**20, "max_position_embeddings": 4096,
              "image_size": 1024, "patch_size": 1024, "projection_dim": MAX_WIDTH}


def _check_clip_sizes(clip: dict) -> None:
    """The sizes in a CLIP configuration (``text_config``, ``vision_config``) within ``CLIP_SIZES``'s bounds."""
    for tower in ("text_config", "vision_config"):
        sub = clip.get(tower, {})
        if not isinstance(sub, dict):
            raise ValueError(f"'clip' {tower!r} must be an object, got {type(sub).__name__}")  # noqa: TRY004
        for key, most in CLIP_SIZES.items():
            if key in sub:
                require_number(sub[key], f"'clip' {tower} {key!r}", integer=True, at_least=1, at_most=most)
    if "projection_dim" in clip:
        require_number(clip["projection_dim"], "'clip' 'projection_dim'", integer=True, at_least=1,
                       at_most=CLIP_SIZES["projection_dim"])


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask [B, model_max_length] (fixed padding: a score never depends on the batch)."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


class WorldOracleScorer:
    """The scorer protocol of ``tandem.scorers`` around ``WorldOracle``: ``scorer(images, prompts) -> Tensor[B]``."""

    name = "world-oracle"
    kind = "world-oracle"

    def __init__(self, model, tokenizer, path: Path | None = None, device: str = "cpu", batch_size: int = 256):
        self.model, self.tokenizer, self.path = model.to(device).eval(), tokenizer, path
        self.device, self.batch_size = device, batch_size
        self.image_size = model.image_size if hasattr(model, "image_size") else model.vision.config.image_size

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> WorldOracleScorer:
        """Load ``path`` [the shipped world's ``oracle/``] (its ``tokenizer/`` beside the weights)."""
        from transformers import CLIPTokenizer

        path = Path(path) if path is not None else world_dir() / "oracle"
        if not (path / WEIGHTS).exists():
            raise FileNotFoundError(f"no world oracle in {path} (no {WEIGHTS}); train one with "
                                    "`tandem world train oracle --out DIR` (it lands in DIR/oracle)")
        quiet_hub_libraries()

        model = read_json_file(path / "config.json", "oracle config").get("model")
        if model == oracle_net.MODEL:  # Oracle II
            net = oracle_net.CompositionalOracle.from_pretrained(path)
        elif model == MODEL:
            net = WorldOracle.from_pretrained(path)
        else:
            raise ValueError(f"oracle config {path / 'config.json'}: 'model' names no world oracle "
                             f"({oracle_net.MODEL!r} or {MODEL!r}), got {model!r}")
        return cls(net, load_pretrained(CLIPTokenizer.from_pretrained, path / "tokenizer", "oracle tokenizer"), path,
                   device)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        """Scores of images against their prompts.

        Args:
            images: float Tensor[B, 3, 32, 32] in [0, 1], or B uint8 arrays [32, 32, 3] or PIL images.
            prompts: B captions.
        Returns:
            Tensor[B], float32 on the CPU; higher is better (Oracle II: the calibrated P(satisfied)).
        """
        x = to_image_tensor(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(x):
            raise ValueError(f"got {len(x)} images and {len(prompts)} prompts (one prompt per image)")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the world oracle scores {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"image values must be in [0, 1], got [{x.min():.3f}, {x.max():.3f}]")
        out = []
        for s in range(0, len(x), self.batch_size):
            ids, mask = tokenize(self.tokenizer, prompts[s:s + self.batch_size])
            scores = self.model(x[s:s + self.batch_size].to(self.device), ids.to(self.device), mask.to(self.device))
            if isinstance(scores, tuple):  # Oracle II: (soft score, logit of P(satisfied))
                scores = self.model.p_satisfied(scores[1])
            out.append(scores.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def fingerprint(self) -> dict:
        """What makes the scores: kind, resolved directory and sha256 of the weights file."""
        if self.path is None:  # an in-memory model: digest its parameters
            import hashlib

            h = hashlib.sha256()
            for k, v in self.model.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            return {"kind": self.kind, "path": None, "weights": "sha256:" + h.hexdigest()}
        return {"kind": self.kind, "path": str(self.path.resolve()), "weights": file_digest(self.path / WEIGHTS)}


def _world_oracle(source: str, device: str | torch.device) -> WorldOracleScorer:
    """``load_scorer("world-oracle[:DIR]")``: the oracle in DIR [the shipped world's]."""
    return WorldOracleScorer.from_pretrained(source or None, device=device)


register_scorer(WorldOracleScorer.kind, _world_oracle)  # tandem.scorers.SCORER_PLUGINS names this module for it


# -- training data: tandem's own samples, labelled by the judge --------------------------------------


@dataclass(frozen=True)
class SampleRecipe:
    """The sample kinds drawn for every prompt, all from the prompt's own initial noise."""

    student_steps: tuple[int, ...] = (1, 2, 4)
    student_guidance_scale: float = 6.0
    teacher_steps: tuple[int, ...] = (5, 25)       # DPM-Solver++ 2M
    teacher_guidance_scale: float = 4.5
    refine_from_steps: int = 4                      # teacher img2img from this student's latents
    refine_strengths: tuple[float, ...] = (0.3, 0.5, 0.7)  # prompt i uses strengths[i % len]
    refine_schedule_steps: int = 10                 # img2img runs int(10 * strength) of these
    corrupt: bool = True                            # the exact rendering and a corrupted copy

    def __post_init__(self):
        for n in (*self.student_steps, *self.teacher_steps, self.refine_from_steps, self.refine_schedule_steps):
            require_number(n, "sample recipe steps", integer=True, at_least=1)
        for scale in (self.student_guidance_scale, self.teacher_guidance_scale):
            require_number(scale, "sample recipe guidance scale", at_least=1.0)
        for strength in self.refine_strengths:
            require_number(strength, "sample recipe refine strength", above=0.0, at_most=1.0)

    def kinds(self) -> tuple[str, ...]:
        kinds = [f"student{n}" for n in self.student_steps] + [f"teacher{n}" for n in self.teacher_steps]
        if self.refine_strengths:
            kinds.append("refined")
        return tuple(kinds + (["render", "corrupt"] if self.corrupt else []))


def corrupt_rendering(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One defect: pixel noise, a recoloured object, an erased object or an extra square blob."""
    out = image.copy()
    kind = rng.integers(4)
    fg = np.argwhere(out.astype(int).sum(-1) > 60)
    if kind == 0 or len(fg) == 0:
        return np.clip(out + rng.normal(0, 40, out.shape), 0, 255).astype(np.uint8)
    y, x = fg[rng.integers(len(fg))]
    same = (out == out[y, x]).all(-1)
    if kind == 1:
        out[same] = rng.integers(0, 256, 3)
    elif kind == 2:
        out[same] = 0
    else:
        cy, cx = rng.integers(2, 28, 2)
        r = rng.integers(2, 5)
        out[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = rng.integers(0, 256, 3)
    return out


def corrupt(images: np.ndarray, seed: int) -> np.ndarray:
    """``corrupt_rendering`` of image i with ``default_rng([seed, i])`` (independent of the batch)."""
    return np.stack([corrupt_rendering(im, np.random.default_rng([seed, i])) for i, im in enumerate(images)])


def draw_prompts(stream_seed: int, n: int, exclude: set[str]) -> tuple[list[str], np.ndarray]:
    """The first ``n`` scenes of the training stream ``stream_seed`` whose captions are not in ``exclude``.

    Returns:
        captions (list of n), renderings (uint8 [n, 32, 32, 3]).
    """
    prompts, renders, step = [], [], 0
    while len(prompts) < n:
        captions, images = sample_batch(stream_seed, step, 256)
        keep = [i for i, c in enumerate(captions) if c not in exclude][: n - len(prompts)]
        prompts += [captions[i] for i in keep]
        renders.append(images[keep])
        step += 1
    return prompts, np.concatenate(renders)


def _student_latents(pipe, prompts: list[str], indices: list[int], steps: int, guidance_scale: float,
                     seed: int) -> torch.Tensor:
    """The x0 latents [B, 4, h, w] that ``generate.generate_student`` decodes for these prompt indices."""
    original = student_kind(pipe).max_steps(pipe.scheduler)  # the world's consistency student brings its sampler
    gens = [prompt_generator(seed, i) for i in indices]
    return sample_student(pipe, [prompts[i] for i in indices], initial_latents(pipe, seed, indices, gens), gens,
                          StudentSettings(steps, guidance_scale), original)


@torch.no_grad()
def generate_kind(kind: str, prompts: list[str], seed: int, recipe: SampleRecipe, world: str | Path,
                  batch_size: int = 250, pipes: dict | None = None) -> np.ndarray:
    """uint8 images [N, 32, 32, 3] of one generated sample ``kind`` (``student<n>``, ``teacher<n>``, ``refined``).

    Prompt i's initial noise is ``prompt_generator(seed, i)`` for every kind, so the kinds of one
    prompt are drawn from the same noise. ``pipes`` caches the loaded pipelines between calls.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    from ..models import load_teacher_pipeline  # looked up at call time: tests replace it

    pipes = pipes if pipes is not None else {}
    spec = resolve_model(str(world))
    if kind.startswith("teacher"):
        if "teacher" not in pipes:
            pipes["teacher"] = load_teacher_pipeline(spec)
        settings = TeacherSettings(int(kind.removeprefix("teacher")), "dpm", recipe.teacher_guidance_scale)
        return np.stack(generate_teacher(pipes["teacher"], prompts, settings, seed, batch_size))
    if "student" not in pipes:  # the world's consistency student, <world>/student (cd), whose samples it learned
        pipes["student"] = load_student(Path(spec.path) / "student", teacher_source=str(world))
    student = pipes["student"]
    if kind.startswith("student"):
        settings = StudentSettings(int(kind.removeprefix("student")), recipe.student_guidance_scale)
        return np.stack(generate_student(student, prompts, settings, seed, batch_size))
    if kind != "refined":
        raise ValueError(f"unknown generated sample kind {kind!r}")
    if "teacher" not in pipes:
        pipes["teacher"] = load_teacher_pipeline(spec)
    img2img = StableDiffusionImg2ImgPipeline(**pipes["teacher"].components)
    img2img.scheduler = make_scheduler("dpm", pipes["teacher"].scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    refine_seed = derive_seed(seed, REFINE_NOISE_KEY)
    out = np.zeros((len(prompts), 32, 32, 3), np.uint8)
    for s, strength in enumerate(recipe.refine_strengths):
        chosen = list(range(s, len(prompts), len(recipe.refine_strengths)))
        for start in range(0, len(chosen), batch_size):
            chunk = chosen[start:start + batch_size]
            latents = _student_latents(student, prompts, chunk, recipe.refine_from_steps,
                                       recipe.student_guidance_scale, seed)
            refined = img2img([prompts[i] for i in chunk], image=latents, strength=strength,
                              num_inference_steps=recipe.refine_schedule_steps,
                              guidance_scale=recipe.teacher_guidance_scale,
                              generator=[prompt_generator(refine_seed, i) for i in chunk], output_type="latent").images
            out[chunk] = np.stack(decode_latents(img2img, refined))
    return out


def build_split(data_dir: Path, stream_seed: int, n: int, recipe: SampleRecipe, world: str | Path,
                exclude: set[str], log: Callable[[str], None] = print) -> tuple[list[str], dict[str, np.ndarray]]:
    """Prompts and labelled samples of one split, each kind cached as ``data_dir/<kind>.npz``.

    Returns:
        prompts, and flat arrays over (kind, prompt): ``images`` uint8 [N, 32, 32, 3], ``prompt`` and
        ``kind`` indices, the judge's ``score`` and ``satisfied``.
    """
    from .checker import check_batch  # defers scipy (world.checker)

    data_dir.mkdir(parents=True, exist_ok=True)
    prompts, renders = draw_prompts(stream_seed, n, exclude)
    made_by = json.dumps({"stream_seed": stream_seed, "world": str(Path(world).resolve()),
                          "recipe": config_dict(recipe)}, indent=1) + "\n"
    for name, content in (("prompts.txt", "\n".join(prompts) + "\n"), ("recipe.json", made_by)):
        if (data_dir / name).exists() and (data_dir / name).read_text() != content:
            raise ValueError(f"{data_dir / name} differs from what this run would draw; the cached samples "
                             "belong to another config: train into a new output directory")
        atomic_write_text(data_dir / name, content)
    kinds, pipes, parts = recipe.kinds(), {}, []
    for k, kind in enumerate(kinds):
        cache = data_dir / f"{kind}.npz"
        if cache.exists():
            part = dict(np.load(cache))
        else:
            t0 = time.time()
            if kind == "render":
                images = renders
            elif kind == "corrupt":
                images = corrupt(renders, stream_seed)
            else:
                images = generate_kind(kind, prompts, stream_seed, recipe, world, pipes=pipes)
            results = check_batch(list(images), prompts)
            part = {"images": images, "score": np.array([r.score for r in results], np.float32),
                    "satisfied": np.array([r.satisfied for r in results])}
            with atomic_path(cache) as tmp, tmp.open("wb") as f:  # a file object: savez adds no suffix
                np.savez_compressed(f, **part)
            log(f"oracle data {data_dir.name}/{kind}: {len(prompts)} images in {time.time() - t0:.0f}s, "
                f"judge score {part['score'].mean():.3f}, satisfied {part['satisfied'].mean():.3f}")
        if len(part["images"]) != len(prompts):
            raise ValueError(f"{cache} holds {len(part['images'])} images for {len(prompts)} prompts")
        parts.append({**part, "prompt": np.arange(len(prompts)), "kind": np.full(len(prompts), k)})
    return prompts, {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# -- evaluation -------------------------------------------------------------------------------------


def pairwise_agreement(pred: np.ndarray, score: np.ndarray, prompt: np.ndarray, kind: np.ndarray | None = None,
                       kinds: tuple[int, int] | None = None) -> tuple[float, int]:
    """Share of same-prompt pairs with different judge scores that ``pred`` orders as the judge does.

    ``kinds=(a, b)``: only pairs of one image of kind ``a`` and one of kind ``b``. A tie in ``pred``
    counts as half an agreement. Returns (agreement, number of pairs).
    """
    agree, total = 0.0, 0
    order = np.argsort(prompt, kind="stable")
    bounds = np.flatnonzero(np.diff(prompt[order])) + 1
    for idx in np.split(order, bounds):
        i, j = np.triu_indices(len(idx), 1)
        i, j = idx[i], idx[j]
        keep = score[i] != score[j]
        if kinds is not None:
            keep &= ((kind[i] == kinds[0]) & (kind[j] == kinds[1])) | ((kind[i] == kinds[1]) & (kind[j] == kinds[0]))
        i, j = i[keep], j[keep]
        product = np.sign(pred[i] - pred[j]) * np.sign(score[i] - score[j])
        agree += float((product > 0).sum() + 0.5 * (product == 0).sum())
        total += len(i)
    return (agree / total if total else float("nan")), total


def best_threshold_accuracy(pred: np.ndarray, satisfied: np.ndarray) -> tuple[float, float]:
    """The best accuracy of ``pred >= t`` as a predictor of ``satisfied`` over all cut-offs t; (accuracy, t)."""
    order = np.argsort(-pred, kind="stable")
    p, s = pred[order], satisfied[order].astype(np.int64)
    # cut after position m (the top m are predicted satisfied), only between distinct values
    true_pos = np.concatenate([[0], np.cumsum(s)])
    m = np.arange(len(p) + 1)
    correct = true_pos + ((len(p) - m) - (s.sum() - true_pos))
    valid = np.concatenate([[True], p[1:] != p[:-1], [True]])
    best = int(np.argmax(np.where(valid, correct, -1)))
    threshold = float(p[best - 1]) if best > 0 else float("inf")
    return float(correct[best] / len(p)), threshold


def evaluate(scorer: WorldOracleScorer, prompts: list[str], data: dict, kinds: tuple[str, ...],
             seen_prompts: set[str] = frozenset()) -> dict:
    """The oracle against the judge on held-out samples: pairwise agreement (all same-prompt pairs,
    generated-only pairs, per kind pair of interest), Spearman with the soft score, satisfied accuracy."""
    from scipy.stats import spearmanr

    pred = scorer(data["images"], [prompts[i] for i in data["prompt"]]).numpy()
    score, prompt, kind = data["score"], data["prompt"], data["kind"]
    sat = data["satisfied"].astype(bool)
    report: dict = {"n_prompts": len(prompts), "n_images": len(pred)}
    report["pairwise_agreement"], report["pairs"] = pairwise_agreement(pred, score, prompt)

    def pair(a: str, b: str) -> None:
        if a in kinds and b in kinds:
            agree, n = pairwise_agreement(pred, score, prompt, kind, (kinds.index(a), kinds.index(b)))
            report[f"pairwise_agreement_{a}_vs_{b}"], report[f"pairs_{a}_vs_{b}"] = agree, n

    pair("student4", "teacher25")
    pair("student4", "refined")
    generated = ~np.isin(kind, [kinds.index(k) for k in ("render", "corrupt") if k in kinds])
    report["pairwise_agreement_generated"], report["pairs_generated"] = pairwise_agreement(
        pred[generated], score[generated], prompt[generated])
    unseen = np.array([prompts[i] not in seen_prompts for i in prompt])
    report["prompts_seen_in_training"] = float(np.mean([p in seen_prompts for p in prompts]))
    report["pairwise_agreement_unseen_prompts"], report["pairs_unseen_prompts"] = pairwise_agreement(
        pred[unseen], score[unseen], prompt[unseen])
    report["spearman_soft_score"] = float(spearmanr(pred, score).statistic)
    report["spearman_soft_score_generated"] = float(spearmanr(pred[generated], score[generated]).statistic)
    acc, tau = best_threshold_accuracy(pred, sat)
    report["satisfied_accuracy_best_threshold"], report["satisfied_best_threshold"] = acc, tau
    report["satisfied_base_rate"] = float(sat.mean())
    if "student4" in kinds:  # what the adaptive pipeline thresholds: 4-step student images across prompts
        s4 = kind == kinds.index("student4")
        report["student4_spearman_soft_score"] = float(spearmanr(pred[s4], score[s4]).statistic)
        report["student4_satisfied_accuracy_best_threshold"] = best_threshold_accuracy(pred[s4], sat[s4])[0]
        report["student4_satisfied_base_rate"] = float(sat[s4].mean())
    report["by_kind"] = {k: {"judge_score": float(score[kind == i].mean()),
                             "satisfied": float(sat[kind == i].mean()),
                             "oracle_score": float(pred[kind == i].mean())} for i, k in enumerate(kinds)}
    return report


# -- training ---------------------------------------------------------------------------------------


@dataclass
class OracleTrainConfig:
    arch: OracleArch = field(default_factory=OracleArch)
    recipe: SampleRecipe = field(default_factory=SampleRecipe)
    seed: int = 7
    n_train: int = 800             # training prompts (x len(recipe.kinds()) images each)
    n_eval: int = 300              # held-out prompts, another stream
    max_steps: int = 800
    prompts_per_batch: int = 12    # every sample kind of each: the ranking pairs are within a prompt
    lr: float = 3e-4               # fusion layers and head
    tower_lr_scale: float = 0.3    # the trainable CLIP layers train at lr * this
    # Embeddings + the first layers of both towers stay fixed (ImageReward freezes 70% of BLIP's). Measured on
    # 160 training prompts held out of a 640-prompt fit (800 steps): pairwise agreement 0.754 with 3 of 4
    # layers frozen, 0.756 with 2 (Spearman 0.650 vs 0.671); freezing the whole text tower as well: 0.749.
    frozen_tower_layers: int = 2
    freeze_text: bool = False      # keep the whole text tower as the world CLIP trained it
    warmup_steps: int = 50
    weight_decay: float = 0.01
    rank_weight: float = 1.0       # pairwise logistic loss on same-prompt pairs, beside the regression
    rank_sharpness: float = 5.0    # pair loss = softplus(-sharpness * (s_better - s_worse))
    checkpoint_every: int = 100
    threads: int = 1               # the machine's cores are shared: one thread is faster under contention
    world: str | None = None       # whose student/teacher draw the data and whose tokenizer it uses [shipped]
    clip: str | None = None        # the CLIPModel directory the towers start from [<world>/clip]

    def __post_init__(self):
        require_training_fields(self)
        for name in ("n_train", "n_eval", "prompts_per_batch"):
            require_number(getattr(self, name), name, integer=True, at_least=1)
        require_number(self.tower_lr_scale, "tower_lr_scale", at_least=0.0)
        require_number(self.frozen_tower_layers, "frozen_tower_layers", integer=True, at_least=0)
        require_number(self.weight_decay, "weight_decay", at_least=0.0)
        require_number(self.rank_weight, "rank_weight", at_least=0.0)
        require_number(self.rank_sharpness, "rank_sharpness", above=0.0)


def oracle_loss(pred: torch.Tensor, target: torch.Tensor, group: torch.Tensor, rank_weight: float,
                rank_sharpness: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE to the judge's soft score + ImageReward's pairwise loss -log sigmoid(k (s_w - s_l)) (their
    eq. 2) over every pair (w, l) of images of one prompt that the judge scores w above l."""
    mse = F.mse_loss(pred, target)
    pairs = (group[:, None] == group[None, :]) & (target[:, None] > target[None, :])
    if pairs.any():
        rank = F.softplus(-rank_sharpness * (pred[:, None] - pred[None, :])[pairs]).mean()
    else:
        rank = pred.sum() * 0
    return mse + rank_weight * rank, {"mse": mse.detach(), "rank": rank.detach()}


def trainable_groups(model: WorldOracle, cfg: OracleTrainConfig) -> list[dict]:
    """Freeze what ``cfg`` keeps fixed; optimizer groups: fusion + head at ``lr``, tower layers at a fraction."""
    for tower in (model.vision, model.text):
        tower.embeddings.requires_grad_(False)
        for layer in tower.encoder.layers[:cfg.frozen_tower_layers]:
            layer.requires_grad_(False)
    model.vision.pre_layrnorm.requires_grad_(False)  # part of the cached vision prefix
    if cfg.freeze_text:
        model.text.requires_grad_(False)
    towers = [p for m in (model.vision, model.text) for p in m.parameters() if p.requires_grad]
    in_towers = {id(p) for p in towers}
    fresh = [p for p in model.parameters() if p.requires_grad and id(p) not in in_towers]
    return [{"params": fresh, "lr": cfg.lr}, {"params": towers, "lr": cfg.lr * cfg.tower_lr_scale}]


class OracleBatches:
    """Batch ``step``: every image of ``prompts_per_batch`` prompts chosen by ``default_rng([seed, step])``
    (a resumed run sees the batches an uninterrupted one would).

    The frozen bottom of the vision tower runs once per image, here: batches carry its output.
    """

    def __init__(self, model: WorldOracle, tokenizer, prompts: list[str], data: dict[str, np.ndarray],
                 prompts_per_batch: int, frozen_layers: int, seed: int, chunk: int = 256):
        counts = np.bincount(data["prompt"], minlength=len(prompts))
        if (counts != counts[0]).any() or counts[0] < 2:
            raise ValueError("every prompt needs the same number (>= 2) of images")
        self.ids, self.mask = tokenize(tokenizer, prompts)
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
        with torch.no_grad():
            self.prefix = torch.cat([model.vision_prefix(images[s:s + chunk].float() / 255, frozen_layers)
                                     for s in range(0, len(images), chunk)])
        self.target = torch.from_numpy(data["score"]).float()
        self.rows = np.argsort(data["prompt"], kind="stable").reshape(len(prompts), counts[0])
        self.prompts_per_batch, self.frozen_layers, self.seed = min(prompts_per_batch, len(prompts)), frozen_layers, seed

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        chosen = np.random.default_rng([self.seed, step]).choice(len(self.rows), self.prompts_per_batch, replace=False)
        rows = self.rows[chosen].reshape(-1)
        return {"prefix": self.prefix[rows], "ids": self.ids[chosen], "mask": self.mask[chosen],
                "group": torch.from_numpy(np.repeat(np.arange(len(chosen)), self.rows.shape[1])),
                "target": self.target[rows]}


class OracleTraining:
    """The oracle's loss (``oracle_loss``: regression to the judge's soft score + ImageReward's ranking loss) on
    batch ``i`` of ``batches`` (an ``OracleBatches``, set once the data is ready); the text tower runs once per
    prompt. The frozen layers are fixed when the method is made; fusion and head train at ``cfg.lr``, the
    trainable tower layers at ``cfg.lr * cfg.tower_lr_scale``."""

    name = "oracle"
    uses_data = False

    def __init__(self, model: WorldOracle, cfg: OracleTrainConfig, batches: OracleBatches | None = None):
        self.model, self.cfg, self.batches = model, cfg, batches
        self.groups = trainable_groups(model, cfg)

    def trainables(self):
        cfg = self.cfg
        # the trainable parameters (``params``) in two groups, each at its own peak LR
        return [Trainable("oracle", self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                          lr_schedule="cosine", grad_clip=1.0,
                          make_optimizer=lambda params: torch.optim.AdamW(self.groups, weight_decay=cfg.weight_decay))]

    def frozen(self) -> dict:
        return {}

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        if self.batches is None:
            raise RuntimeError("the oracle's training batches are not set (OracleTraining.batches)")
        model, cfg, batch = self.model, self.cfg, self.batches(ctx.batch_index)
        model.train()
        text = model.encode_text(batch["ids"], batch["mask"])
        image_tokens = model.image_tokens(batch["prefix"], cfg.frozen_tower_layers)
        pred = model.score(image_tokens, text[batch["group"]], batch["mask"][batch["group"]])
        loss, parts = oracle_loss(pred, batch["target"], batch["group"], cfg.rank_weight, cfg.rank_sharpness)
        return {"loss": loss, **parts}


def train_oracle(out: str | Path, cfg: OracleTrainConfig | None = None, resume: bool = False) -> Path:
    """Draw and label the data (cached in ``out/data``), train, export to ``out/oracle`` and evaluate it there.

    Returns:
        the exported oracle directory (config.json, model.safetensors, tokenizer/, train_config.json, eval.json).
    """
    from transformers import CLIPTokenizer

    from .train import finish_world_run, open_world_run, world_trainer  # defers diffusers and transformers

    cfg = cfg if cfg is not None else OracleTrainConfig()
    world = Path(cfg.world) if cfg.world else world_dir()
    clip_dir = Path(cfg.clip) if cfg.clip else world / "clip"
    for need in (world / "tokenizer", world / "student", world / "unet", clip_dir):
        if not need.is_dir():
            raise FileNotFoundError(f"no {need.name}/ in {need.parent}: the oracle needs the world's tokenizer, "
                                    "teacher and student, and a CLIP to start from")
    keep = ("data",)  # a new run may start from an earlier run's data cache
    open_world_run(out, cfg, resume, keep)
    # the run opens (train_config.json written) before the data is drawn: a run killed while drawing it resumes
    method = OracleTraining(WorldOracle.from_clip(clip_dir, cfg.arch), cfg)
    trainer = world_trainer(method, cfg, out, resume, batch_size=cfg.prompts_per_batch, log_every=10, keep=keep)
    log = _run_logger(trainer.dir / "log.jsonl")
    kinds = cfg.recipe.kinds()
    fixed = set(load_prompts("val")) | set(load_prompts("test"))
    t0 = time.time()
    train_prompts, train = build_split(trainer.dir / "data" / "train", TRAIN_STREAM_SEED, cfg.n_train, cfg.recipe,
                                       world, fixed, log)
    eval_prompts, held = build_split(trainer.dir / "data" / "eval", EVAL_STREAM_SEED, cfg.n_eval, cfg.recipe,
                                     world, fixed, log)
    data_seconds = time.time() - t0
    log(f"oracle data ready: {len(train['images'])} training and {len(held['images'])} held-out images "
        f"({data_seconds:.0f}s in this call)")

    tokenizer = CLIPTokenizer.from_pretrained(world / "tokenizer")
    model = method.model
    t0 = time.time()
    method.batches = OracleBatches(model, tokenizer, train_prompts, train, cfg.prompts_per_batch,
                                   cfg.frozen_tower_layers, cfg.seed)
    log(f"frozen vision prefix of {len(train['images'])} images cached in {time.time() - t0:.0f}s")
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    model.eval()
    target = trainer.dir / "oracle"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target / "tokenizer")
    t0 = time.time()
    seen = set(train_prompts)
    report = evaluate(WorldOracleScorer.from_pretrained(target), eval_prompts, held, kinds, seen)  # fp16, as saved
    fp32 = evaluate(WorldOracleScorer(model, tokenizer), eval_prompts, held, kinds, seen)
    report["float32_weights"] = {k: fp32[k] for k in ("pairwise_agreement", "spearman_soft_score",
                                                      "satisfied_accuracy_best_threshold")}
    report["sources"] = {
        "train": f"stream seed {TRAIN_STREAM_SEED}: first {cfg.n_train} captions not in the val/test prompt lists",
        "eval": f"stream seed {EVAL_STREAM_SEED}: first {cfg.n_eval} captions not in the val/test prompt lists",
        "kinds": list(kinds), "world": str(world), "clip": str(clip_dir), "weights_dtype": "float16"}
    report["seconds"] = {"data_this_call": round(data_seconds), "training_this_call": round(train_seconds),
                         "evaluation": round(time.time() - t0)}
    atomic_write_text(target / "eval.json", json.dumps(report, indent=2) + "\n")
    finish_world_run(trainer, cfg, [target], {"steps": cfg.max_steps,
                                              "eval": {k: v for k, v in report.items() if k != "by_kind"}})
    log(f"oracle eval: pairwise agreement {report['pairwise_agreement']:.3f} "
        f"(student4 vs teacher25 {report.get('pairwise_agreement_student4_vs_teacher25', float('nan')):.3f}), "
        f"spearman {report['spearman_soft_score']:.3f}, "
        f"satisfied accuracy {report['satisfied_accuracy_best_threshold']:.3f}")
    return target


def _run_logger(log_path: Path) -> Callable[[str], None]:
    """Print ``message`` and append it to the run's log (a record without a step, which a resume keeps)."""
    def log(message: str) -> None:
        print(message, flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), "message": message}) + "\n")
    return log
