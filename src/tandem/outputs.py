"""The output-directory contract shared by ``tandem generate`` and ``tandem world render``:

    DIR/00000.png, 00001.png, ...   one image per prompt, in input order
    DIR/records.jsonl               one JSON line per image
    DIR/config.json                 the exact settings of the run

A non-empty DIR is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class OutputDir:
    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path} exists and is not a directory")
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise FileExistsError(f"--out {self.path} is not empty; pass --overwrite to replace its contents")
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in ("records.jsonl", "config.json"):
                (self.path / name).unlink(missing_ok=True)
            for png in self.path.glob("[0-9][0-9][0-9][0-9][0-9].png"):
                png.unlink()

    def image_path(self, index: int) -> Path:
        return self.path / f"{index:05d}.png"

    def save_image(self, index: int, image: np.ndarray) -> None:
        """Save a uint8 [H, W, 3] image as DIR/<index>.png."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        Image.fromarray(image).save(self.image_path(index), format="PNG")

    def write_records(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def image_grid(images: list[np.ndarray] | np.ndarray, columns: int = 8, scale: int = 4, gap: int = 2) -> np.ndarray:
    """Tile uint8 [H, W, 3] images into one uint8 image (nearest-neighbour upscaled by ``scale``)."""
    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.full((rows * cell_h + gap, columns * cell_w + gap, 3), 64, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        big = im.repeat(scale, axis=0).repeat(scale, axis=1)
        grid[gap + r * cell_h: gap + r * cell_h + h * scale, gap + c * cell_w: gap + c * cell_w + w * scale] = big
    return grid
