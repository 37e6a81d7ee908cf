"""Real-tier batch sources (``tandem.distill.data``) on tiny datasets built here: the same six
solid-colour images through an image folder (both layouts), webdataset shards and a Hugging Face
dataset; checked against the colours and captions they were built from."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tandem.distill.data import (
    HFDatasetSource,
    ImageFolderSource,
    WebDatasetSource,
    WorldSource,
    expand_braces,
    open_source,
)

R = 16
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
SIZES = [(40, 30), (30, 40), (16, 16), (50, 20), (20, 64), (9, 7)]


def examples() -> list[tuple[str, Image.Image]]:
    return [(name, Image.new("RGB", size, rgb)) for (name, rgb), size in zip(COLOURS.items(), SIZES)]


def expected_pixels(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1.0).view(3, 1, 1).expand(3, R, R)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_sidecar_folder(root):
    for i, (caption, image) in enumerate(examples()):
        d = root / ("sub" if i % 2 else "")  # recursive scan
        d.mkdir(parents=True, exist_ok=True)
        image.save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(caption + "\n")
    return root


def make_metadata_folder(root):
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (caption, image) in enumerate(examples()):
        image.save(root / "images" / f"{i}.png")
        key = "caption" if i == 0 else "text"  # both keys accepted
        lines.append(json.dumps({"file_name": f"images/{i}.png", key: caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(root):
    """Two shards ``root/00.tar``, ``root/01.tar``; one caption comes as json, plus a key without an image."""
    root.mkdir(parents=True, exist_ok=True)
    items = examples()
    for s in range(2):
        with tarfile.open(root / f"{s:02d}.tar", "w") as tar:
            for i in range(3 * s, 3 * s + 3):
                caption, image = items[i]
                add_member(tar, f"{i:06d}.png", png_bytes(image))
                if i == 4:
                    add_member(tar, f"{i:06d}.json", json.dumps({"caption": caption}).encode())
                else:
                    add_member(tar, f"{i:06d}.txt", caption.encode())
            add_member(tar, "__meta__.json", b"{}")
    return root


def make_hf_dataset():
    datasets = pytest.importorskip("datasets")
    captions, images = zip(*examples())
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": list(images), "text": list(captions)}, features=features)


def pairs(source) -> dict[str, torch.Tensor]:
    """One epoch of ``source`` (six examples) as {caption: pixels}."""
    batch = source.batch(0, 6)
    assert len(set(batch["captions"])) == 6
    return dict(zip(batch["captions"], batch["pixels"]))


def test_epochs_colours_and_shape(tmp_path):
    source = ImageFolderSource(make_sidecar_folder(tmp_path / "f"), R, seed=3)
    batches = [source.batch(i, 4) for i in range(6)]  # 24 positions = 4 epochs
    for b in batches:
        assert b["pixels"].shape == (4, 3, R, R) and b["pixels"].dtype == torch.float32
        for caption, pixels in zip(b["captions"], b["pixels"]):
            assert torch.equal(pixels, expected_pixels(COLOURS[caption]))
    sequence = [c for b in batches for c in b["captions"]]
    epochs = [sequence[e * 6:(e + 1) * 6] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(COLOURS)
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is drawn anew
    d = source.describe()
    assert json.loads(json.dumps(d)) == d
    assert (d["source"], d["resolution"], d["examples"], d["seed"]) == ("imagefolder", R, 6, 3)


def test_determinism_and_positions(tmp_path):
    root = make_sidecar_folder(tmp_path / "f")
    a, b = ImageFolderSource(root, R, seed=0), ImageFolderSource(root, R, seed=0)
    x, y = a.batch(5, 4), b.batch(5, 4)
    assert x["captions"] == y["captions"] and torch.equal(x["pixels"], y["pixels"])
    assert a.batch(5, 4)["captions"] == x["captions"]
    # batch i of size B is positions i*B .. (i+1)*B - 1, whatever B
    whole = a.batch(0, 12)
    assert a.batch(1, 3)["captions"] == whole["captions"][3:6]
    assert torch.equal(a.batch(3, 3)["pixels"], whole["pixels"][9:12])
    other = ImageFolderSource(root, R, seed=1).batch(0, 6)["captions"]
    assert other != a.batch(0, 6)["captions"] and sorted(other) == sorted(COLOURS)


def test_center_crop(tmp_path):
    bands = np.zeros((32, 96, 3), np.uint8)  # red | green | blue, left to right
    bands[:, :32], bands[:, 32:64], bands[:, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(bands).save(tmp_path / "wide.png")
    Image.fromarray(bands.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # red / green / blue, top down
    for name in ("wide", "tall"):
        (tmp_path / f"{name}.txt").write_text(name)
    batch = ImageFolderSource(tmp_path, R).batch(0, 2)
    for caption, pixels in zip(batch["captions"], batch["pixels"]):
        img = pixels if caption == "wide" else pixels.transpose(1, 2)  # columns along the long side
        green = expected_pixels((0, 255, 0))
        assert torch.equal(img[:, :, 1:-1], green[:, :, 1:-1])  # the middle band survives
        assert img[0, :, 0].mean() > -1 and img[2, :, 0].mean() == -1  # the first column bleeds red only
        assert img[2, :, -1].mean() > -1 and img[0, :, -1].mean() == -1  # the last column blue only


def test_flip(tmp_path):
    halves = np.zeros((R, R, 3), np.uint8)
    halves[:, : R // 2], halves[:, R // 2:] = (255, 0, 0), (0, 0, 255)
    Image.fromarray(halves).save(tmp_path / "h.png")
    (tmp_path / "h.txt").write_text("halves")
    plain = ImageFolderSource(tmp_path, R).batch(0, 8)["pixels"]
    assert all(torch.equal(p, plain[0]) for p in plain)  # off by default
    flipping = ImageFolderSource(tmp_path, R, flip=True)
    x = flipping.batch(0, 40)["pixels"]
    flipped = [torch.equal(p, plain[0].flip(-1)) for p in x]
    assert all(f or torch.equal(p, plain[0]) for f, p in zip(flipped, x))
    assert 0 < sum(flipped) < len(flipped)
    assert torch.equal(ImageFolderSource(tmp_path, R, flip=True).batch(2, 5)["pixels"], x[10:15])


def test_same_pairs_through_every_source(tmp_path):
    truth = {c: expected_pixels(rgb) for c, rgb in COLOURS.items()}
    shards = make_shards(tmp_path / "shards")
    sources = [
        ImageFolderSource(make_sidecar_folder(tmp_path / "sidecar"), R),
        ImageFolderSource(make_metadata_folder(tmp_path / "meta"), R),
        WebDatasetSource(str(shards / "{00..01}.tar"), R),
        WebDatasetSource(str(shards / "*.tar"), R),
        WebDatasetSource([shards / "00.tar", shards / "01.tar"], R),
    ]
    hf = make_hf_dataset()
    sources.append(HFDatasetSource(hf, R))
    hf.save_to_disk(str(tmp_path / "saved"))
    sources.append(HFDatasetSource(tmp_path / "saved", R))
    for source in sources:
        got = pairs(source)
        assert got.keys() == truth.keys(), source.describe()
        for caption, pixels in got.items():
            assert torch.equal(pixels, truth[caption]), (source.describe(), caption)
        assert json.loads(json.dumps(source.describe())) == source.describe()
    assert sources[2].describe()["shards"] == 2


def test_open_source(tmp_path):
    assert isinstance(open_source("world", R, seed=4), WorldSource)
    assert isinstance(open_source(str(make_sidecar_folder(tmp_path / "f")), R), ImageFolderSource)
    make_shards(tmp_path / "s")
    assert isinstance(open_source(str(tmp_path / "s" / "00.tar"), R), WebDatasetSource)
    assert open_source(str(tmp_path / "s" / "{00..01}.tar"), R).n == 6
    make_hf_dataset().save_to_disk(str(tmp_path / "hf"))
    assert isinstance(open_source(str(tmp_path / "hf"), R, seed=2), HFDatasetSource)
    with pytest.raises(ValueError, match="unknown data source .*'world', an image folder"):
        open_source(str(tmp_path / "nothing.zip"), R)


def test_expand_braces():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderSource(tmp_path / "missing", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* found under"):
        ImageFolderSource(tmp_path / "empty", R)
    root = make_sidecar_folder(tmp_path / "f")
    (root / "sub" / "img1.txt").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* no caption file .*img1\.png"):
        ImageFolderSource(root, R)
    meta = make_metadata_folder(tmp_path / "m") / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "{not json", *lines[2:]]))
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        ImageFolderSource(meta.parent, R)
    meta.write_text("\n".join([*lines[:2], json.dumps({"file_name": "images/2.png"})]))
    with pytest.raises(ValueError, match='line 3: expected {"file_name"'):
        ImageFolderSource(meta.parent, R)
    meta.write_text("\n".join([lines[0], json.dumps({"file_name": "images/gone.png", "text": "x"})]))
    with pytest.raises(FileNotFoundError, match="line 2: file not found: .*gone.png"):
        ImageFolderSource(meta.parent, R)


def test_webdataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        WebDatasetSource(str(tmp_path / "*.tar"), R)
    make_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"2 shard\(s\) not found: .*02.tar, .*03.tar$"):
        WebDatasetSource(str(tmp_path / "{00..03}.tar"), R)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add_member(tar, "a.png", png_bytes(Image.new("RGB", (4, 4))))
        add_member(tar, "b.jpg", png_bytes(Image.new("RGB", (4, 4))))
        add_member(tar, "b.txt", b"caption")
    with pytest.raises(ValueError, match="1 example.* no txt/json caption: a$"):
        WebDatasetSource(str(tmp_path / "bad.tar"), R)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="cannot read .*junk.tar as an uncompressed tar"):
        WebDatasetSource(str(tmp_path / "junk.tar"), R)


def test_hf_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"column 'caption' not in the dataset; available columns: \['image', 'text'\]"):
        HFDatasetSource(make_hf_dataset(), R, caption_column="caption")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        HFDatasetSource(tmp_path, R)
