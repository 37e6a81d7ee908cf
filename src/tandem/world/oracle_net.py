"""Oracle II: a small compositional image-text network that predicts whether an image satisfies its
caption, trained on the sharded world data of ``oracle_data``.

A caption promises objects with a colour, a shape, a size and a place; the image holds them at full
32x32 resolution. The network keeps both: a convolutional encoder (with coordinate channels, so
"where" is seen directly, and soft nearest-colour channels over the world's palette, so "which
colour" is too) turns the image into an 8x8 grid of tokens (the stem folds 2x2 pixel
patches into channels, losslessly, so the convolutions run at 16x16), a small transformer encodes
the caption's tokens, and the caption's tokens cross-attend to the image grid (BLIP's image-grounded
text encoder, as ImageReward uses, at the world's scale). Two heads read the pooled tokens: the
judge's soft score, and the logit of P(satisfied). The logit is calibrated afterwards by Platt
scaling (a, b of sigmoid(a * logit + b), fitted on a calibration split of its own), so the scorer's
output is a probability that a cascade can compare against its costs.

    tandem world train oracle --out runs/oracle2   # data (sharded, resumable), training, calibration, eval
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import MAX_DEPTH, MAX_WIDTH, load_safetensors, read_json_file
from ..outputs import atomic_path, atomic_write_text
from ..training.checks import config_dict, require_number
from .scene import COLORS, PALETTE

WEIGHTS = "model.safetensors"
MODEL = "tandem.world.oracle_net.CompositionalOracle"
# Bounds of what a saved oracle's config.json may ask for, checked before anything is allocated.
MAX_VOCAB = 2**20  # tokens in the caption vocabulary (the world's has 135)
MAX_TOKENS = 4096  # caption length
MAX_IMAGE_SIZE = 1024  # pixels on a side (the world's images have 32)


@dataclass(frozen=True)
class NetArch:
    channels: tuple[int, ...] = (32, 64)  # the encoder's levels (each after the first halves the grid)
    blocks: int = 1                       # residual blocks per level
    width: int = 64                       # token width of text, image grid and fusion
    text_layers: int = 1
    fusion_layers: int = 2
    heads: int = 4
    coords: bool = True                   # x, y coordinate channels beside RGB
    patch: int = 2                        # the stem folds patch x patch pixels into channels (lossless)
    palette: bool = True                  # soft nearest-colour channels over black + the world's palette

    def __post_init__(self):
        if not self.channels:
            raise ValueError("oracle arch channels: give at least one level")
        if len(self.channels) > MAX_DEPTH:
            raise ValueError(f"oracle arch channels: at most {MAX_DEPTH} levels, got {len(self.channels)}")
        for c in self.channels:
            require_number(c, "oracle arch channels", integer=True, at_least=8, at_most=MAX_WIDTH)
        for name, most in (("blocks", MAX_DEPTH), ("width", MAX_WIDTH), ("text_layers", MAX_DEPTH),
                           ("fusion_layers", MAX_DEPTH), ("heads", MAX_WIDTH), ("patch", 32)):  # patch: of 32 px
            require_number(getattr(self, name), f"oracle arch {name}", integer=True, at_least=1, at_most=most)
        if self.width % self.heads:
            raise ValueError(f"oracle arch width {self.width} must be a multiple of heads {self.heads}")


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class CompositionalOracle(nn.Module):
    """``(score, logit) = heads(mean_tokens(Fusion(Text(caption), Conv(image))))``.

    Args of ``forward``:
        images (Tensor[B, 3, 32, 32]): in [0, 1].
        input_ids, attention_mask (Tensor[B, L]): the world tokenizer's ids and mask.
    Returns:
        (score [B], logit [B]): the predicted soft score and the (uncalibrated) logit of P(satisfied).
    """

    def __init__(self, vocab_size: int, max_length: int, arch: NetArch = NetArch(), image_size: int = 32,
                 platt: tuple[float, float] = (1.0, 0.0)):
        super().__init__()
        self.vocab_size, self.max_length, self.arch, self.image_size = vocab_size, max_length, arch, image_size
        self.register_buffer("platt", torch.tensor(platt, dtype=torch.float32))

        self.register_buffer("colors", torch.tensor([(0, 0, 0)] + [PALETTE[c] for c in COLORS]).float() / 255)
        c_in = (3 + 2 * arch.coords + arch.palette * len(self.colors)) * arch.patch ** 2
        layers: list[nn.Module] = [nn.PixelUnshuffle(arch.patch), nn.Conv2d(c_in, arch.channels[0], 3, padding=1)]
        for i, c in enumerate(arch.channels):
            if i:
                layers.append(nn.Conv2d(arch.channels[i - 1], c, 3, stride=2, padding=1))
            layers += [_Block(c) for _ in range(arch.blocks)]
        layers += [nn.GroupNorm(8, arch.channels[-1]), nn.SiLU(), nn.Conv2d(arch.channels[-1], arch.width, 1)]
        self.encoder = nn.Sequential(*layers)
        grid = image_size // arch.patch // 2 ** (len(arch.channels) - 1)
        self.image_pos = nn.Parameter(torch.randn(grid * grid, arch.width) * 0.02)
        self.embed = nn.Embedding(vocab_size, arch.width)
        self.text_pos = nn.Parameter(torch.randn(max_length, arch.width) * 0.02)
        enc = nn.TransformerEncoderLayer(arch.width, arch.heads, 4 * arch.width, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(enc, arch.text_layers, enable_nested_tensor=False)
        dec = nn.TransformerDecoderLayer(arch.width, arch.heads, 4 * arch.width, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(dec, arch.fusion_layers, norm=nn.LayerNorm(arch.width))
        self.head = nn.Sequential(nn.Linear(arch.width, arch.width), nn.GELU(), nn.Linear(arch.width, 2))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if self.arch.palette:  # softmax over colours of -|pixel - colour|^2 / 0.01: which colour each pixel is near;
            # |pixel|^2 is the same for every colour, so it drops out: (2 pixel.colour - |colour|^2) / 0.01
            near = torch.einsum("bchw,kc->bkhw", images, 2 * self.colors) - (self.colors ** 2).sum(1)[:, None, None]
            near = torch.softmax(near / 0.01, 1)
            # probabilities below the smallest normal float are zeroed: they change no score, and subnormal
            # inputs make the convolutions on a CPU more than twice as slow
            x = torch.cat([x, near.masked_fill(near < torch.finfo(near.dtype).tiny, 0.0)], 1)
        if self.arch.coords:
            b, _, h, w = x.shape
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            x = torch.cat([x, torch.stack([xs, ys]).to(x).expand(b, 2, h, w)], 1)
        return self.encoder(x).flatten(2).transpose(1, 2) + self.image_pos

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.text_pos[: input_ids.shape[1]]
        return self.text(x, src_key_padding_mask=~attention_mask.bool())

    def fuse(self, image_tokens: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        fused = self.fusion(text, image_tokens, tgt_key_padding_mask=~mask)
        pooled = (fused * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out = self.head(pooled)
        return out[:, 0], out[:, 1]

    def forward(self, images, input_ids, attention_mask):
        return self.fuse(self.image_tokens(images), self.encode_text(input_ids, attention_mask), attention_mask)

    def p_satisfied(self, logit: torch.Tensor) -> torch.Tensor:
        """Calibrated P(satisfied) from the logit: sigmoid(a * logit + b)."""
        return torch.sigmoid(self.platt[0] * logit + self.platt[1])

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model": MODEL, "arch": config_dict(self.arch), "vocab_size": self.vocab_size,
                  "max_length": self.max_length, "image_size": self.image_size,
                  "platt": [float(v) for v in self.platt]}
        atomic_write_text(path / "config.json", json.dumps(config, indent=1) + "\n")
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()
                 if k not in ("platt", "colors")}
        with atomic_path(path / WEIGHTS) as tmp:
            save_file(state, str(tmp))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CompositionalOracle:
        """A saved oracle in float32, in eval mode; a damaged ``config.json`` or weights file is a ``ValueError``
        naming the file and what is wrong with it, before anything is allocated."""
        path = Path(path)
        file = path / "config.json"
        config = read_oracle_config(path, MODEL, ("arch", "vocab_size", "max_length", "image_size", "platt"))
        try:
            if not isinstance(config["arch"], dict):
                raise ValueError(f"'arch' must be an object, got {type(config['arch']).__name__}")  # noqa: TRY004
            try:
                arch = NetArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["arch"].items()})
            except TypeError as e:  # a key NetArch does not have, or channels that are not a list
                raise ValueError(f"'arch': {e}") from None
            require_number(config["vocab_size"], "'vocab_size'", integer=True, at_least=1, at_most=MAX_VOCAB)
            require_number(config["max_length"], "'max_length'", integer=True, at_least=1, at_most=MAX_TOKENS)
            require_number(config["image_size"], "'image_size'", integer=True, at_least=1, at_most=MAX_IMAGE_SIZE)
            platt = config["platt"]
            if not isinstance(platt, list) or len(platt) != 2:
                raise ValueError(f"'platt' must be two numbers [a, b], got {platt!r}")
            for v in platt:
                require_number(v, "'platt'")
        except ValueError as e:
            raise ValueError(f"oracle config {file}: {e}") from None
        model = cls(config["vocab_size"], config["max_length"], arch, config["image_size"], tuple(platt))
        state = {k: v.float() for k, v in load_safetensors(path / WEIGHTS, "oracle weights").items()}
        load_oracle_state(model, {**state, "platt": model.platt, "colors": model.colors}, path)
        return model.eval()


def read_oracle_config(path: Path, model: str, keys: tuple[str, ...]) -> dict:
    """The ``config.json`` of the oracle saved in ``path``, a ``model`` holding ``keys``, or a ``ValueError``
    naming the file and the key that is missing or wrong (not only the JSON parser's words)."""
    file = Path(path) / "config.json"
    config = read_json_file(file, "oracle config")
    if config.get("model") != model:
        raise ValueError(f"oracle config {file}: 'model' must be {model!r}, got {config.get('model')!r}")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"oracle config {file} lacks {', '.join(map(repr, missing))}; it is damaged, or not "
                         "tandem's")
    return config


def load_oracle_state(model: nn.Module, state: dict, path: Path) -> None:
    """``model.load_state_dict(state)``, or a ``ValueError`` saying that the weights in ``path`` do not fit its
    ``config.json``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" and, on the next line, the first error
        why = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
        raise ValueError(f"oracle weights {Path(path) / WEIGHTS} do not fit {Path(path) / 'config.json'}: "
                         f"{why[:200] + '…' if len(why) > 200 else why}") from None


def fit_platt(logit: np.ndarray, satisfied: np.ndarray, steps: int = 500) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit + b) against ``satisfied`` (Platt scaling)."""
    x = torch.as_tensor(logit, dtype=torch.float64)
    y = torch.as_tensor(satisfied, dtype=torch.float64)
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * x + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return a, b


def expected_calibration_error(p: np.ndarray, satisfied: np.ndarray, bins: int = 10) -> float:
    """Mean |P - observed rate| over equal-width probability bins, weighted by their counts."""
    p, y = np.asarray(p, float), np.asarray(satisfied, float)
    if not len(p):
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(p))


def auc(pred: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``pred`` for the boolean labels ``positive`` (ties count half)."""
    from scipy.stats import rankdata

    pred, positive = np.asarray(pred, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(pred)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
