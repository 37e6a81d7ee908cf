"""The range of a model's VAE latents of its training data: what reflected diffusion (:mod:`tandem.reflect`,
``--reflect static`` and dynamic's bound) thresholds to by default. Measured once per model into
``latent_range.json`` beside it:

    python -m tandem.distill.latent_range world --images 4096 --seed 0 --data world --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..models import resolve_model
from ..outputs import atomic_write_text
from ..reflect import RANGE_FILE
from .data import open_source


@torch.no_grad()
def measure_latent_range(model: str = "world", images: int = 4096, seed: int = 0, batch_size: int = 256,
                         data: str = "world") -> dict:
    """The range of a model's scaled VAE latents of its training data (posterior samples times the
    VAE's ``scaling_factor``, as distillation encodes them): min, max and the bound ``max(|min|, |max|)``,
    with per-channel extremes and a few quantiles for reference.

    Args:
        model: ``world`` or a model directory (its ``vae/``).
        images: how many images, drawn as batches ``0, 1, ...`` of ``data``'s stream with ``seed``.
        data: ``world`` (the world's renderings) or any ``--data`` source of ``tandem distill``.
    """
    from diffusers import AutoencoderKL

    spec = resolve_model(model)
    vae = AutoencoderKL.from_pretrained(Path(spec.path) / "vae").float().eval()
    resolution = vae.config.sample_size
    source = open_source(data, resolution, seed)
    generator = torch.Generator().manual_seed(seed)
    latents, seen, index = [], 0, 0
    while seen < images:
        pixels = source.batch(index, min(batch_size, images - seen))["pixels"]
        dist = vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator)
        latents.append((dist.mean + dist.std * eps) * vae.config.scaling_factor)
        seen, index = seen + pixels.shape[0], index + 1
    x = torch.cat(latents)
    flat = x.flatten()
    sample = flat[torch.randperm(flat.numel(), generator=generator)[:1_000_000]]  # torch.quantile's size limit
    lo, hi = float(flat.min()), float(flat.max())
    return {"what": "range of the scaled VAE latents (posterior samples x scaling_factor) of the training data: "
                    "the default of --reflect static and of dynamic's bound",
            "lo": lo, "hi": hi, "bound": max(abs(lo), abs(hi)),
            "per_channel": {"lo": x.amin(dim=(0, 2, 3)).tolist(), "hi": x.amax(dim=(0, 2, 3)).tolist()},
            "quantiles": {str(q): float(torch.quantile(sample, q)) for q in (1e-4, 1e-3, 0.5, 0.999, 0.9999)},
            "std": float(flat.std()), "images": seen, "seed": seed, "data": data,
            "command": f"python -m tandem.distill.latent_range {model} --images {images} --seed {seed} --data {data} --write"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tandem.distill.latent_range",
                                     description="Measure a model's latent range for --reflect (static / dynamic).")
    parser.add_argument("model", help="'world' or a model directory")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="world")
    parser.add_argument("--write", action="store_true", help=f"write MODEL/{RANGE_FILE}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure_latent_range(args.model, args.images, args.seed, data=args.data)
    text = json.dumps(result, indent=2) + "\n"
    if args.write:
        path = Path(resolve_model(args.model).path) / RANGE_FILE
        atomic_write_text(path, text)
        print(f"wrote {path}")
    print(text, end="")


if __name__ == "__main__":
    main()
