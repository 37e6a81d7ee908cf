"""ShapesWorld control images and the world's ControlNets.

Two kinds of control image, both rendered exactly from a scene (32x32 RGB uint8, white on black):

* ``mask``: every object's silhouette (the spec's pixel sets) in white: the layout of shapes,
  sizes and positions, but not their colours, which the caption must still supply.
* ``edges``: the silhouettes' boundary pixels (object pixels with a 4-neighbour outside the
  object or the canvas): the same layout as a sparse outline, as Canny edges are for photos.

A world ControlNet is a ``diffusers.ControlNetModel`` initialised from the teacher UNet (its
zero convolutions start the residuals at 0, so training starts from the teacher itself) and
trained with the teacher frozen, on the training stream's scenes and their control images; the
EMA of its weights is exported in float16.
Its conditioning embedding downsamples by 4, the world VAE's factor (SD's by 8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..hub import quiet_hub_libraries
from ..models import world_dir
from ..outputs import atomic_write_text
from ..training.checks import require_decay, require_number, require_probability, require_training_fields
from ..training.config import Trainable
from .scene import CANVAS, Scene, object_mask, render
from .stream import sample_scenes

CONTROLS = ("mask", "edges")
# conv_in + one stride-2 block per step between these widths: 32x32 control -> 8x8 latent
CONDITIONING_CHANNELS = (16, 32, 64)


def _silhouettes(scene: Scene) -> list[np.ndarray]:
    return [object_mask(o.shape, o.cx, o.cy, o.radius) for o in scene.objects]


def control_image(scene: Scene, kind: str) -> np.ndarray:
    """The ``kind`` control image of ``scene``: uint8 [32, 32, 3], 255 on the control's pixels."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r}; expected one of {', '.join(CONTROLS)}")
    on = np.zeros((CANVAS, CANVAS), dtype=bool)
    for m in _silhouettes(scene):
        on |= _outline(m) if kind == "edges" else m
    return _white_on_black(on)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (outside the canvas counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _white_on_black(on: np.ndarray) -> np.ndarray:
    return np.repeat((on * 255).astype(np.uint8)[..., None], 3, axis=2)


def control_from_image(image: np.ndarray, kind: str, dark: int = 60) -> np.ndarray:
    """A ``kind`` control image read off an image (e.g. a rendering or a photo of the world):
    pixels brighter than ``dark`` in any channel are objects. On a clean rendering this equals
    ``control_image`` of its scene (tested)."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r}; expected one of {', '.join(CONTROLS)}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    on = image.max(axis=-1) > dark
    # one outline of all objects: the spec's objects never touch, so each keeps its own
    return _white_on_black(_outline(on) if kind == "edges" else on)


def control_fidelity(image: np.ndarray, control: np.ndarray, kind: str) -> float:
    """Intersection over union of the objects' pixels in ``image`` with the ``control``'s layout
    (both read as the ``kind`` control), in [0, 1]: how closely a generation follows its control."""
    got = control_from_image(image, kind)[..., 0] > 0
    want = control[..., 0] > 127
    union = (got | want).sum()
    return float((got & want).sum() / union) if union else 1.0


def control_to_tensor(controls: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] (diffusers' ControlNet convention)."""
    return torch.from_numpy(np.ascontiguousarray(controls)).permute(0, 3, 1, 2).float() / 255


def sample_control_batch(seed: int, step: int, batch_size: int, kind: str):
    """Captions, renderings and ``kind`` control images of batch ``step`` of the stream ``seed``."""
    scenes = sample_scenes(seed, step, batch_size)
    return ([s.caption for s in scenes], np.stack([render(s) for s in scenes]),
            np.stack([control_image(s, kind) for s in scenes]))


@dataclass
class ControlNetTrainConfig:
    control: str = "mask"
    seed: int = 6
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 50
    cond_dropout: float = 0.1  # p(caption -> ""), as for the teacher, so guidance works with control
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    threads: int = 2
    world: str | None = None  # the world whose teacher, VAE and text encoder it trains on [shipped]

    def __post_init__(self):
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; expected one of {', '.join(CONTROLS)}")
        require_training_fields(self)
        require_number(self.batch_size, "batch_size", integer=True, at_least=1)
        require_probability(self.cond_dropout, "cond_dropout")
        require_number(self.min_snr_gamma, "min_snr_gamma", above=0.0)
        require_decay(self.ema_decay, "ema_decay")
        require_number(self.grad_clip, "grad_clip", above=0.0)


def build_controlnet(unet):
    """A world ControlNet initialised from ``unet`` (the teacher)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


class ControlNetTraining:
    """ControlNet's objective (Zhang et al. 2023): the frozen teacher's epsilon-prediction loss with the
    ControlNet's residuals added, Min-SNR-gamma weighted and with caption dropout as the teacher's training, on
    batch ``i`` of the stream ``cfg.seed`` and its ``cfg.control`` images; the EMA of the weights is exported."""

    uses_data = False

    def __init__(self, cfg: ControlNetTrainConfig, world: Path):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .models import build_noise_scheduler  # defers diffusers and transformers

        self.cfg, self.name = cfg, f"controlnet-{cfg.control}"
        self.vae = AutoencoderKL.from_pretrained(world / "vae").eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(world / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(world / "text_encoder").eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(world / "unet", torch_dtype=torch.float32)
        self.unet = unet.float().eval().requires_grad_(False)
        self.controlnet = build_controlnet(self.unet).train()
        self.noise_scheduler = build_noise_scheduler()
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float64)

    def trainables(self):
        cfg = self.cfg
        return [Trainable("controlnet", self.controlnet, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                          grad_clip=cfg.grad_clip, emas={"ema": cfg.ema_decay})]

    def frozen(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        from .train import min_snr_loss, noised_batch, step_generator  # defers diffusers and transformers

        cfg, i = self.cfg, ctx.batch_index
        captions, images, controls = sample_control_batch(cfg.seed, i, cfg.batch_size, cfg.control)
        noisy, t, cond, noise = noised_batch(captions, images, step_generator(cfg.seed, i, 1), cfg.cond_dropout,
                                             self.vae, self.tokenizer, self.text_encoder, self.noise_scheduler)
        down, mid = self.controlnet(noisy, t, cond, controlnet_cond=control_to_tensor(controls), return_dict=False)
        pred = self.unet(noisy, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss, per_sample = min_snr_loss(pred, noise, t, self.alphas_cumprod, cfg.min_snr_gamma)
        return {"loss": loss, "mse": per_sample.mean().detach()}


def train_controlnet(out: str | Path, cfg: ControlNetTrainConfig | None = None,
                     resume: bool = False) -> Path:
    """Train a ``cfg.control`` ControlNet for the teacher of ``cfg.world``; export to ``out/controlnet``."""
    import copy

    from .train import finish_world_run, run_world_training  # defers diffusers and transformers

    cfg = cfg if cfg is not None else ControlNetTrainConfig()
    if cfg.control not in CONTROLS:
        raise ValueError(f"unknown control {cfg.control!r}; expected one of {', '.join(CONTROLS)}")
    quiet_hub_libraries()
    world = Path(cfg.world) if cfg.world is not None else world_dir()
    method, trainer = run_world_training(out, cfg, resume, lambda: ControlNetTraining(cfg, world))
    target = trainer.dir / "controlnet"
    # the EMA of the weights, in float16 as the shipped teacher (the checkpoint keeps float32)
    copy.deepcopy(trainer.export("controlnet", "ema")).half().save_pretrained(target)
    atomic_write_text(target / "control.json", json.dumps({"control": cfg.control}, indent=2) + "\n")
    finish_world_run(trainer, cfg, [target], {"steps": cfg.max_steps, "weights": "ema", "control": cfg.control})
    return target
