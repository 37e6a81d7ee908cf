"""Tandem's exact ground-truth judge: does a 32x32 image show what its caption says?

Implements ``shared/shapes-world.md``, section "What a caption promises":

1. ``find_blobs``: every pixel takes the nearest colour (Euclidean RGB) among the palette
   and black; each 8-connected component of one non-black colour with at least
   ``MIN_BLOB_PIXELS`` pixels is a blob. A blob's shape is the ideal circle, square or
   triangle (``scene.object_mask`` fitted to its bounding box, or a circle with its one-pixel
   tips rounded off) with the best IoU; its size is
   "small" when the longer bounding-box side is at most ``SMALL_MAX_SIDE`` pixels; its
   position is the third of the canvas, on each axis, that holds its bounding-box centre.
2. ``check``: the caption is *satisfied* iff an injective assignment of caption objects to
   blobs gives every object a blob with its shape and stated colour, size and position,
   the relation holds between the assigned centres (``scene.relation_holds``), and no blob
   is left over.

The soft ``score`` in [0, 1] agrees with that rule: it is 1.0 exactly on clean renderings
and below 1 whenever the rule fails. Per caption object it counts 1 unit for being assigned
a blob, 1 for the shape and 1 per stated colour, size and position, plus 1 unit for the
relation. ``attribute_share`` is the best count over injective assignments divided by
(all units + blobs left over); ``score = attribute_share * purity``, where ``purity`` is
1 minus the fraction of pixels farther than ``PURITY_TOLERANCE`` from every palette
colour and black (off-palette colours, blur, noise).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from tandem.world.grammar import ObjectSpec, ParsedCaption, parse_caption
from tandem.world.scene import (
    BACKGROUND,
    CANVAS,
    CELL_TO_POSITION,
    COLORS,
    PALETTE,
    SHAPES,
    object_mask,
    relation_holds,
)

MIN_BLOB_PIXELS = 6  # smaller components are ignored everywhere (spec: "6 pixels or more")
SMALL_MAX_SIDE = 10  # longest bounding-box side of a small blob; large is >= 11
PURITY_TOLERANCE = 40.0  # RGB distance; the closest palette pair (yellow, orange) is 81 apart

_CLASS_NAMES = ("black", *COLORS)  # pixel class 0 is the background
_CLASS_RGB = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.int64)  # [9, 3]
_CLASS_SQNORM = (_CLASS_RGB**2).sum(axis=1)  # [9]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Blob:
    """One connected single-colour region of an image, described in caption terms."""

    color: str
    n_pixels: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive
    center: tuple[float, float]  # ((x0 + x1) / 2, (y0 + y1) / 2)
    shape: str
    shape_iou: float  # IoU of the blob with the ideal ``shape`` fitted to ``bbox``
    size: str
    position: str  # e.g. "at the top left"

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape} {self.position} ({self.n_pixels} px)"


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one (image, caption) pair.

    ``assignment[i]`` is the index in ``blobs`` of the blob given to caption object ``i``
    by the best assignment (``None`` when there are fewer blobs than objects);
    ``extra_blobs`` are the indices of blobs that no object took. ``problems`` lists, in
    words, every unit of the best assignment that failed.
    """

    satisfied: bool
    score: float
    attribute_share: float
    purity: float
    units_satisfied: int
    units_total: int
    caption: ParsedCaption
    blobs: tuple[Blob, ...]
    assignment: tuple[int | None, ...]
    extra_blobs: tuple[int, ...]
    problems: tuple[str, ...]


def find_blobs(image: np.ndarray) -> list[Blob]:
    """The blobs of an image, by colour in palette order, then in scan order.

    Args:
        image (uint8 ndarray[32, 32, 3]): RGB, HWC.
    """
    _check_image(image)
    classes, _ = _classify_pixels(image)
    return _blobs(classes)


def check(image: np.ndarray, caption: str) -> CheckResult:
    """Judge one image against one caption (see the module docstring for the rule).

    Args:
        image (uint8 ndarray[32, 32, 3]): RGB, HWC.
        caption: a caption of the world's grammar; ``CaptionError`` if it is not one.
    """
    parsed = _parse(caption)
    _check_image(image)
    classes, n_impure = _classify_pixels(image)
    purity = 1.0 - n_impure / classes.size
    return _judge(parsed, tuple(_blobs(classes)), purity)


def check_batch(
    images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]
) -> list[CheckResult]:
    """``[check(image, caption) for ...]`` over a batch.

    Args:
        images (uint8 ndarray[B, 32, 32, 3] or a list of B uint8 ndarray[32, 32, 3]).
        captions: B captions.
    """
    if isinstance(captions, str):
        raise ValueError("captions must be a sequence of strings, got a single str")
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"images must be [B, {CANVAS}, {CANVAS}, 3], got shape {images.shape}")
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    results = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        try:
            results.append(check(image, caption))
        except ValueError as error:  # CaptionError included; say which item failed
            raise type(error)(f"item {index}: {error}") from error
    return results


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"image must be a numpy uint8 array [{CANVAS}, {CANVAS}, 3], got {type(image).__name__}"
        )
    if image.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"image must have shape ({CANVAS}, {CANVAS}, 3) (HWC), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in [0, 255], got dtype {image.dtype}")


@functools.lru_cache(maxsize=4096)
def _parse(caption: str) -> ParsedCaption:
    return parse_caption(caption)


def _classify_pixels(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Nearest class (0 = black, 1.. = COLORS) per pixel [32, 32], and the impure-pixel count."""
    pixels = image.reshape(-1, 3).astype(np.int64)
    sq_dist = (pixels**2).sum(axis=1, keepdims=True) - 2 * pixels @ _CLASS_RGB.T + _CLASS_SQNORM
    classes = sq_dist.argmin(axis=1)
    nearest = sq_dist[np.arange(len(classes)), classes]
    n_impure = int((nearest > PURITY_TOLERANCE**2).sum())
    return classes.reshape(image.shape[:2]), n_impure


def _blobs(classes: np.ndarray) -> list[Blob]:
    blobs = []
    counts = np.bincount(classes.ravel(), minlength=len(_CLASS_NAMES))
    for class_index in np.flatnonzero(counts[1:] >= MIN_BLOB_PIXELS) + 1:
        labels, _ = ndimage.label(classes == class_index, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel())
        for label, slices in enumerate(ndimage.find_objects(labels), start=1):
            if sizes[label] >= MIN_BLOB_PIXELS:
                blobs.append(_describe(_CLASS_NAMES[class_index], labels[slices] == label, slices))
    return blobs


def _describe(color: str, mask: np.ndarray, slices: tuple[slice, slice]) -> Blob:
    """A blob from its mask cropped to its bounding box."""
    (y0, y1), (x0, x1) = ((s.start, s.stop - 1) for s in slices)
    candidates, shape_of = _ideal_shapes(*mask.shape)  # [K, h, w], [K]
    iou = (candidates & mask).sum(axis=(1, 2)) / (candidates | mask).sum(axis=(1, 2))
    best = int(iou.argmax())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cell = tuple(min(int(v * 3 // CANVAS), 2) for v in (cx, cy))
    return Blob(
        color=color,
        n_pixels=int(mask.sum()),
        bbox=(x0, y0, x1, y1),
        center=(cx, cy),
        shape=SHAPES[shape_of[best]],
        shape_iou=float(iou[best]),
        size="small" if max(mask.shape) <= SMALL_MAX_SIDE else "large",
        position=CELL_TO_POSITION[cell],
    )


@functools.cache
def _ideal_shapes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ideal masks for a bounding box of that size, and the shape index of each.

    Bool [K, height, width]: a circle, a square and a triangle filling the box (for a square
    box of side 2r + 1 exactly ``scene.object_mask(shape, r, r, r)``; other boxes stretch the
    shape per axis), plus a circle one pixel larger than the box, cropped to it: the spec's
    circle has one-pixel tips at its four extremes, and a drawing that rounds them off has a
    box two pixels smaller whose blob is that cropped circle, not a square.
    """
    ry, rx = (height - 1) / 2, (width - 1) / 2
    if height == width:
        masks = [object_mask(s, rx, rx, rx, size=width) for s in SHAPES]
    else:
        masks = [_ellipse(height, width, ry, rx), np.ones((height, width), dtype=bool),
                 _stretched_triangle(height, width, ry, rx)]
    masks.append(_ellipse(height, width, ry + 1, rx + 1))
    shape_of = np.array([0, 1, 2, SHAPES.index("circle")])
    stacked = np.stack(masks)
    stacked.setflags(write=False)  # shared through the cache
    return stacked, shape_of


def _ellipse(height: int, width: int, ay: float, ax: float) -> np.ndarray:
    """Ellipse with semi-axes (ay, ax) centred in a height x width box."""
    ys, xs = np.mgrid[0:height, 0:width]
    dx, dy = xs - (width - 1) / 2, ys - (height - 1) / 2
    return (dx * ay) ** 2 + (dy * ax) ** 2 <= (ax * ay) ** 2


def _stretched_triangle(height: int, width: int, ry: float, rx: float) -> np.ndarray:
    """Apex-up triangle filling the box: row y covers |dx| <= rx * y / (2 ry)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.abs(xs - rx) * (2 * ry) <= rx * ys


def _object_units(spec: ObjectSpec, blob: Blob) -> int:
    """Units one object earns on one blob: assigned, shape, and each stated attribute."""
    return (
        1
        + (blob.shape == spec.shape)
        + (spec.color is not None and blob.color == spec.color)
        + (spec.size is not None and blob.size == spec.size)
        + (spec.position is not None and blob.position == spec.position)
    )


def _judge(parsed: ParsedCaption, blobs: tuple[Blob, ...], purity: float) -> CheckResult:
    objects = parsed.objects
    units_total = sum(2 + (o.color is not None) + (o.size is not None) + (o.position is not None)
                      for o in objects) + (parsed.relation is not None)
    units = np.array([[_object_units(o, b) for b in blobs] for o in objects], dtype=np.int64)
    units = units.reshape(len(objects), len(blobs))
    assignment: list[int | None] = [None] * len(objects)
    relation_met = False
    if parsed.relation is not None and len(blobs) >= 2:
        # A relation caption has exactly 2 objects: try every ordered pair of distinct blobs.
        centers = np.array([b.center for b in blobs])  # [M, 2]
        holds = relation_holds(parsed.relation, (centers[:, None, 0], centers[:, None, 1]),
                               (centers[None, :, 0], centers[None, :, 1]))  # [M, M]
        pair_units = units[0][:, None] + units[1][None, :] + holds
        np.fill_diagonal(pair_units, -1)
        a, b = np.unravel_index(int(pair_units.argmax()), pair_units.shape)
        assignment[0], assignment[1] = int(a), int(b)
        relation_met = bool(holds[a, b])
    elif len(blobs) > 0:
        # Every object that can take a blob should (each assignment adds >= 1 unit and removes
        # a left-over blob), so the best is a maximum-weight matching of size min(K, M).
        rows, cols = linear_sum_assignment(units, maximize=True)
        for row, col in zip(rows, cols):
            assignment[int(row)] = int(col)
    units_satisfied = int(sum(units[i, j] for i, j in enumerate(assignment) if j is not None))
    units_satisfied += relation_met
    taken = {j for j in assignment if j is not None}
    extra = tuple(j for j in range(len(blobs)) if j not in taken)
    attribute_share = units_satisfied / (units_total + len(extra))
    return CheckResult(
        satisfied=units_satisfied == units_total and not extra,
        score=attribute_share * purity,
        attribute_share=attribute_share,
        purity=purity,
        units_satisfied=units_satisfied,
        units_total=units_total,
        caption=parsed,
        blobs=blobs,
        assignment=tuple(assignment),
        extra_blobs=extra,
        problems=_problems(parsed, blobs, assignment, relation_met, extra),
    )


def _problems(parsed: ParsedCaption, blobs: tuple[Blob, ...], assignment: list[int | None],
              relation_met: bool, extra: tuple[int, ...]) -> tuple[str, ...]:
    """Human-readable list of the units the best assignment misses."""
    problems = []
    for index, (spec, j) in enumerate(zip(parsed.objects, assignment)):
        name = f"object {index + 1} {spec.phrase()!r}"
        if j is None:
            problems.append(f"{name}: no blob left for it")
            continue
        blob = blobs[j]
        for attribute in ("shape", "color", "size", "position"):
            wanted = getattr(spec, attribute)
            if wanted is not None and getattr(blob, attribute) != wanted:
                problems.append(f"{name}: blob {j} has {attribute} {getattr(blob, attribute)!r}")
    if parsed.relation is not None and not relation_met and None not in assignment:
        a, b = (blobs[j].center for j in assignment)
        problems.append(f"relation {parsed.relation!r} fails between centres {a} and {b}")
    problems += [f"extra blob {j}: {blobs[j].describe()}" for j in extra]
    return tuple(problems)
