"""Training data for the Trainer: a *batch source* maps a batch index to a batch, as a pure
function of the index (so the data position of a run is its step, and resume is exact).

A batch is a dict ``{"captions": list[str], "pixels": float tensor [B, 3, H, W] in [-1, 1]}``.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..world.stream import images_to_tensor, sample_batch


class BatchSource(Protocol):
    def batch(self, index: int, size: int) -> dict: ...


class WorldSource:
    """ShapesWorld's unbounded stream of renderings and captions (``tandem.world.stream``)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def batch(self, index: int, size: int) -> dict:
        captions, images = sample_batch(self.seed, index, size)
        return {"captions": captions, "pixels": images_to_tensor(images)}

    def describe(self) -> dict:
        return {"source": "shapesworld", "seed": self.seed}


# -- real data: image-caption datasets ---------------------------------------------------------------

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class IndexedSource:
    """Base of the finite sources: ``n`` examples, ``load(k) -> (caption, PIL image)``.

    Batch ``i`` of size ``B`` holds positions ``i*B ... (i+1)*B - 1`` of an endless sequence of
    epochs; epoch ``e`` is the permutation of the examples drawn by ``default_rng([seed, e])``.
    Images are converted to RGB, their short side resized to ``resolution`` (bicubic), then
    center-cropped to ``resolution`` x ``resolution``; with ``flip`` each position is mirrored
    horizontally or not by a coin drawn from ``default_rng([seed, position, 1])``.
    """

    kind = "indexed"

    def __init__(self, n: int, resolution: int, seed: int = 0, flip: bool = False):
        if n < 1:
            raise ValueError(f"{self.kind}: the dataset holds no examples")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.n, self.resolution, self.seed, self.flip = n, int(resolution), int(seed), flip
        self._perms: dict[int, np.ndarray] = {}

    def load(self, k: int) -> tuple[str, Image.Image]:
        """Caption and image of example ``k`` (0 <= k < n)."""
        raise NotImplementedError

    def example(self, position: int) -> int:
        """The example at ``position`` of the endless sequence."""
        epoch, offset = divmod(position, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            perm = self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(perm[offset])

    def _flipped(self, position: int) -> bool:
        return self.flip and bool(np.random.default_rng([self.seed, position, 1]).random() < 0.5)

    def batch(self, index: int, size: int) -> dict:
        if index < 0 or size < 1:
            raise ValueError(f"batch index must be >= 0 and size >= 1, got {index}, {size}")
        captions, images = [], []
        for position in range(index * size, (index + 1) * size):
            caption, image = self.load(self.example(position))
            image = fit_square(image, self.resolution)
            if self._flipped(position):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            captions.append(caption)
            images.append(np.asarray(image, dtype=np.uint8))
        return {"captions": captions, "pixels": images_to_tensor(np.stack(images))}

    def describe(self) -> dict:
        return {"source": self.kind, "resolution": self.resolution, "examples": self.n, "seed": self.seed,
                "flip": self.flip}


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, short side resized to ``resolution`` (bicubic), center crop to ``resolution`` x ``resolution``."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _open_image(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {what}: {e}") from None
    return image


class ImageFolderSource(IndexedSource):
    """Images and captions in a local folder ``root``, in one of two layouts:

    (a) ``root/metadata.jsonl`` (the Hugging Face imagefolder convention): one JSON object a line,
        ``{"file_name": "rel/path.png", "text": "a caption"}`` (``"caption"`` is accepted for ``"text"``);
        blank lines are skipped.
    (b) otherwise every image under ``root`` (png/jpg/jpeg/webp, recursive, sorted by path), each
        with a sidecar ``<same stem>.txt`` holding its caption.
    """

    kind = "imagefolder"

    def __init__(self, root: str | Path, resolution: int, seed: int = 0, flip: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        meta = self.root / "metadata.jsonl"
        self.items = self._read_metadata(meta) if meta.is_file() else self._scan()
        super().__init__(len(self.items), resolution, seed, flip)

    def _read_metadata(self, meta: Path) -> list[tuple[Path, str]]:
        items = []
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta} line {lineno}: not valid JSON ({e.msg})") from None
            row = row if isinstance(row, dict) else {}
            caption, name = row.get("text", row.get("caption")), row.get("file_name")
            well_formed = isinstance(name, str) and isinstance(caption, str)
            if not well_formed:
                raise ValueError(f'{meta} line {lineno}: expected {{"file_name": str, "text" (or "caption"): str}}, '
                                 f"got {line.strip()[:80]}")
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(f"{meta} line {lineno}: file not found: {path}")
            items.append((path, caption))
        if not items:
            raise ValueError(f"{meta} lists no images")
        return items

    def _scan(self) -> list[tuple[Path, str]]:
        images = sorted(p for p in self.root.rglob("*")
                        if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {self.root}, "
                             "and no metadata.jsonl")
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            names = ", ".join(str(p.relative_to(self.root)) for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"{len(missing)} image(s) under {self.root} have no caption file <stem>.txt "
                             f"(and there is no metadata.jsonl): {names}{more}")
        return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]

    def load(self, k: int) -> tuple[str, Image.Image]:
        path, caption = self.items[k]
        return caption, _open_image(path.read_bytes(), str(path))

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.root)}


class HFDatasetSource(IndexedSource):
    """A Hugging Face ``datasets.Dataset``, or the path of one written by ``save_to_disk``.

    A saved ``DatasetDict`` gives its ``train`` split (or its only split). The image column may
    hold PIL images (the ``Image`` feature), ``{"bytes", "path"}`` dicts, paths or uint8 arrays.
    Needs the optional ``datasets`` package.
    """

    kind = "hf-dataset"

    def __init__(self, dataset, resolution: int, seed: int = 0, image_column: str = "image",
                 caption_column: str = "text", flip: bool = False):
        self.path = None
        if isinstance(dataset, (str, Path)):
            try:
                import datasets
            except ImportError:
                raise ImportError("reading a saved Hugging Face dataset needs the datasets package: "
                                  "pip install datasets") from None
            self.path = str(dataset)
            if not Path(dataset).is_dir():
                raise FileNotFoundError(f"dataset directory not found: {dataset}")
            dataset = datasets.load_from_disk(str(dataset))
            if isinstance(dataset, datasets.DatasetDict):
                splits = list(dataset)
                if "train" not in splits and len(splits) != 1:
                    raise ValueError(f"{self.path} holds splits {splits}; expected a 'train' split or only one")
                dataset = dataset["train" if "train" in splits else splits[0]]
        for column in (image_column, caption_column):
            if column not in dataset.column_names:
                raise ValueError(f"column {column!r} not in the dataset; available columns: {dataset.column_names}")
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        super().__init__(len(dataset), resolution, seed, flip)

    def load(self, k: int) -> tuple[str, Image.Image]:
        row = self.dataset[k]
        image, caption = row[self.image_column], row[self.caption_column]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            image = Path(image).read_bytes()
        if isinstance(image, bytes):
            image = _open_image(image, f"{self.image_column}[{k}]")
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        for column, value, wanted in ((self.image_column, image, Image.Image), (self.caption_column, caption, str)):
            well_formed = isinstance(value, wanted)
            if not well_formed:
                raise ValueError(f"column {column!r} row {k}: expected {wanted.__name__}, got {type(value).__name__}")
        return caption, image

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "image_column": self.image_column,
                "caption_column": self.caption_column}


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..009}`` numeric ranges (zero padding kept), in order."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


class WebDatasetSource(IndexedSource):
    """WebDataset tar shards (uncompressed), read with ``tarfile`` (no webdataset package needed).

    ``shards``: a path, a glob, a brace pattern (``data/{000..009}.tar``) or a list of these.
    Members are grouped into examples by key (the member name up to the first dot of its base
    name); an example takes its image from a jpg/jpeg/png/webp member and its caption from a txt
    member, else from a json member's ``"caption"`` or ``"text"``. Keys without an image are
    skipped. The index (shard, data offset and size of each member) is built once, so a batch
    reads its examples directly.
    """

    kind = "webdataset"

    def __init__(self, shards: str | Path | list[str | Path], resolution: int, seed: int = 0, flip: bool = False):
        self.spec = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else str(shards)
        self.shards = self._expand([self.spec] if isinstance(self.spec, str) else self.spec)
        # one entry an example: (shard, image offset, image size, caption offset, caption size, caption ext)
        self.index: list[tuple[int, int, int, int, int, str]] = []
        for s, path in enumerate(self.shards):
            self._index_shard(s, path)
        super().__init__(len(self.index), resolution, seed, flip)

    @staticmethod
    def _expand(specs: list[str]) -> list[str]:
        shards, missing = [], []
        for spec in specs:
            for p in expand_braces(spec):
                if any(c in p for c in "*?["):
                    matched = sorted(glob.glob(p))
                    if not matched:
                        raise FileNotFoundError(f"no shards match {p}")
                    shards += matched
                else:
                    (shards if Path(p).is_file() else missing).append(p)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FileNotFoundError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}{more}")
        if not shards:
            raise FileNotFoundError(f"no shards given: {specs}")
        return shards

    def _index_shard(self, s: int, path: str) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key_ext = re.fullmatch(r"((?:.*/)?[^./]+)\.([^/]*)", m.name)
                    if key_ext:
                        groups.setdefault(key_ext.group(1), {})[key_ext.group(2).lower()] = m
        except tarfile.TarError as e:
            raise ValueError(f"cannot read {path} as an uncompressed tar shard: {e}") from None
        uncaptioned = []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption = members.get("txt") or members.get("json")
            if image is None:
                continue
            if caption is None:
                uncaptioned.append(key)
                continue
            ext = "txt" if "txt" in members else "json"
            self.index.append((s, image.offset_data, image.size, caption.offset_data, caption.size, ext))
        if uncaptioned:
            more = f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else ""
            raise ValueError(f"{path}: {len(uncaptioned)} example(s) have an image but no txt/json caption: "
                             f"{', '.join(uncaptioned[:3])}{more}")

    def load(self, k: int) -> tuple[str, Image.Image]:
        s, image_at, image_size, caption_at, caption_size, ext = self.index[k]
        path = self.shards[s]
        with open(path, "rb") as f:
            f.seek(image_at)
            image_bytes = f.read(image_size)
            f.seek(caption_at)
            text = f.read(caption_size).decode("utf-8")
        if ext == "json":
            row = json.loads(text)
            caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(caption, str):
                raise ValueError(f"{path}: example {k}'s json has no string 'caption' or 'text'")
        else:
            caption = text.strip()
        return caption, _open_image(image_bytes, f"in {path} at offset {image_at}")

    def describe(self) -> dict:
        return {**super().describe(), "path": self.spec, "shards": len(self.shards)}


HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def open_source(spec: str, resolution: int, seed: int = 0) -> BatchSource:
    """The batch source ``spec`` names: ``world`` (ShapesWorld's stream; ``resolution`` is ignored),
    a ``save_to_disk`` dataset directory, an image folder, or webdataset shards (``.tar`` path,
    glob or brace pattern)."""
    spec = str(spec)
    if spec == "world":
        return WorldSource(seed)
    path = Path(spec)
    if path.is_dir():
        if any((path / m).is_file() for m in HF_SAVED_MARKERS):
            return HFDatasetSource(path, resolution, seed)
        return ImageFolderSource(path, resolution, seed)
    if ".tar" in spec:
        return WebDatasetSource(spec, resolution, seed)
    raise ValueError(f"unknown data source {spec!r}: expected 'world', an image folder (metadata.jsonl or "
                     "<image> + <stem>.txt), a datasets save_to_disk directory, or webdataset shards "
                     "(a .tar path, glob or brace pattern such as data/{000..009}.tar)")
