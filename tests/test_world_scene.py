"""The ShapesWorld renderer and sampler against shared/shapes-world.md.

Pixel sets, bounds and probabilities are written here from the spec's formulas, not
taken from tandem.world.scene.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np

from tandem.world.scene import Scene, SceneObject, make_example, object_mask, render, sample_scene

SPEC_PALETTE = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (150, 60, 200), "cyan": (40, 200, 210),
    "orange": (240, 130, 30), "white": (235, 235, 235),
}
SPEC_RADII = {"small": {3, 4}, "large": {6, 7}}
SPEC_CELL_CENTRES = (8, 16, 24)
SPEC_PHRASES = {
    (0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
    (0, 1): "at the left", (1, 1): "in the center", (2, 1): "at the right",
    (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right",
}
N_SEEDS = 1000
N_STAT_SCENES = 4000


@functools.cache
def scenes(n: int) -> tuple[Scene, ...]:
    return tuple(sample_scene(seed) for seed in range(n))


def spec_pixels(shape: str, cx: int, cy: int, r: int) -> set[tuple[int, int]]:
    """(x, y) pixels of one object, straight from the spec's definitions."""
    pixels = set()
    for y in range(cy - r, cy + r + 1):
        for x in range(cx - r, cx + r + 1):
            if shape == "circle":
                inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
            elif shape == "square":
                inside = True
            else:  # triangle: row k = y - (cy - r) covers |x - cx| <= r * k / (2r) = k / 2
                inside = 2 * abs(x - cx) <= y - (cy - r)
            if inside:
                pixels.add((x, y))
    return pixels


def spec_image(scene: Scene) -> np.ndarray:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for o in scene.objects:
        for x, y in spec_pixels(o.shape, o.cx, o.cy, o.radius):
            image[y, x] = SPEC_PALETTE[o.color]
    return image


def row_widths(mask: np.ndarray) -> list[int]:
    return [int(w) for w in mask.sum(axis=1) if w]


def test_shape_pixel_sets_at_small_radii():
    cx, cy = 12, 15
    triangle3 = object_mask("triangle", cx, cy, 3)
    assert row_widths(triangle3) == [1, 1, 3, 3, 5, 5, 7]
    assert triangle3[cy - 3, cx] and triangle3[cy + 3, cx - 3] and triangle3[cy + 3, cx + 3]
    assert row_widths(object_mask("triangle", cx, cy, 4)) == [1, 1, 3, 3, 5, 5, 7, 7, 9]
    circle3 = object_mask("circle", cx, cy, 3)
    assert circle3.sum() == 29 and row_widths(circle3) == [1, 5, 5, 7, 5, 5, 1]
    assert row_widths(object_mask("circle", cx, cy, 4)) == [1, 5, 7, 7, 9, 7, 7, 5, 1]
    assert object_mask("square", cx, cy, 3).sum() == 49
    for shape in ("circle", "square", "triangle"):
        for r in (3, 4, 6, 7):
            ys, xs = np.nonzero(object_mask(shape, cx, cy, r))
            assert set(zip(xs.tolist(), ys.tolist())) == spec_pixels(shape, cx, cy, r)
            # the bounding box is centred on (cx, cy) with side 2r + 1
            assert (xs.min(), xs.max(), ys.min(), ys.max()) == (cx - r, cx + r, cy - r, cy + r)


def test_render_matches_spec_formulas_and_palette():
    allowed = {(0, 0, 0), *SPEC_PALETTE.values()}
    for scene in scenes(N_SEEDS):
        image = render(scene)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, spec_image(scene))
        assert {tuple(p) for p in image.reshape(-1, 3).tolist()} <= allowed


def test_objects_inside_canvas_apart_and_in_distinct_cells():
    for scene in scenes(N_SEEDS):
        boxes = []
        for o in scene.objects:
            xs, ys = zip(*spec_pixels(o.shape, o.cx, o.cy, o.radius))
            assert 0 <= min(xs) and max(xs) <= 31 and 0 <= min(ys) and max(ys) <= 31
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                empty_columns = max(b[0] - a[2], a[0] - b[2]) - 1
                empty_rows = max(b[1] - a[3], a[1] - b[3]) - 1
                assert empty_columns >= 1 or empty_rows >= 1, (scene.seed, a, b)
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)


def test_centres_within_jitter_of_cell_after_clamping_and_sizes_map_to_radii():
    radii_seen = {"small": Counter(), "large": Counter()}
    for scene in scenes(N_SEEDS):
        for o in scene.objects:
            assert o.radius in SPEC_RADII[o.size]
            radii_seen[o.size][o.radius] += 1
            assert o.position == SPEC_PHRASES[o.cell]
            for centre, cell_index in ((o.cx, o.cell[0]), (o.cy, o.cell[1])):
                low = max(SPEC_CELL_CENTRES[cell_index] - 2, o.radius)
                high = min(SPEC_CELL_CENTRES[cell_index] + 2, 31 - o.radius)
                assert low <= centre <= high, (scene.seed, o)
    for size, counts in radii_seen.items():  # uniform over the two radii
        n = sum(counts.values())
        for r in SPEC_RADII[size]:
            assert abs(counts[r] / n - 0.5) < 5 * math.sqrt(0.25 / n)


def test_jitter_is_uniform_on_unconstrained_objects():
    # one-object scenes are never redrawn, and a middle-cell centre is never clamped
    offsets = Counter()
    for scene in scenes(N_STAT_SCENES):
        if len(scene.objects) == 1:
            o = scene.objects[0]
            if o.cell[0] == 1:
                offsets[o.cx - 16] += 1
            if o.cell[1] == 1:
                offsets[o.cy - 16] += 1
    n = sum(offsets.values())
    assert set(offsets) == {-2, -1, 0, 1, 2}
    for count in offsets.values():
        assert abs(count / n - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)


def test_relations_hold_and_only_on_two_objects_without_positions():
    for scene in scenes(N_STAT_SCENES):
        if scene.relation is None:
            continue
        assert len(scene.objects) == 2
        assert not any(o.says_position for o in scene.objects)
        a, b = scene.objects
        assert {
            "to the left of": a.cx <= b.cx - 4,
            "to the right of": a.cx >= b.cx + 4,
            "above": a.cy <= b.cy - 4,
            "below": a.cy >= b.cy + 4,
        }[scene.relation], (scene.seed, scene.caption)
        assert f" {scene.relation} " in scene.caption


def test_determinism():
    for seed in (0, 7, (1, 3), (2, 999)):
        caption, image, scene = make_example(seed)
        caption2, image2, scene2 = make_example(seed)
        assert caption == caption2 and scene == scene2 and np.array_equal(image, image2)
    images = {render(scene).tobytes() for scene in scenes(200)}
    assert len(images) >= 195  # different seeds give different scenes (rare exact repeats)
    assert sample_scene((1, 0)) != sample_scene((2, 0))


def within(count: int, n: int, p: float, n_se: float = 5.0) -> bool:
    return abs(count / n - p) <= n_se * math.sqrt(p * (1 - p) / n)


def test_caption_statistics_match_spec():
    all_scenes = scenes(N_STAT_SCENES)
    n_objects = Counter(len(s.objects) for s in all_scenes)
    for k, p in {1: 0.5, 2: 0.35, 3: 0.15}.items():
        assert within(n_objects[k], len(all_scenes), p), (k, n_objects)
    objects = [o for s in all_scenes for o in s.objects]
    for attribute, p_omit in {"size": 0.3, "color": 0.1, "position": 0.3}.items():
        omitted = sum(not getattr(o, f"says_{attribute}") for o in objects)
        assert within(omitted, len(objects), p_omit), (attribute, omitted / len(objects))
    eligible = [s for s in all_scenes
                if len(s.objects) == 2 and not any(o.says_position for o in s.objects)]
    with_relation = sum(s.relation is not None for s in eligible)
    # eligible: 2 objects (0.35), neither names a position (0.3 ** 2) -> about 126 of 4000
    assert len(eligible) > 80 and within(with_relation, len(eligible), 0.5)
    # omitted attributes are still drawn at random
    for attribute, values in {"color": SPEC_PALETTE, "size": SPEC_RADII}.items():
        drawn = {getattr(o, attribute) for o in objects if not getattr(o, f"says_{attribute}")}
        assert drawn == set(values)


def spec_caption(scene: Scene) -> str:
    """The caption written from the spec's grammar, independently of Scene.caption."""
    phrases = []
    for o in scene.objects:
        words = ([o.size] if o.says_size else []) + ([o.color] if o.says_color else []) + [o.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        position = [SPEC_PHRASES[o.cell]] if o.says_position else []
        phrases.append(" ".join([article, *words, *position]))
    if scene.relation is not None:
        return f"{phrases[0]} {scene.relation} {phrases[1]}"
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def test_captions_follow_the_grammar_and_article_rule():
    for scene in scenes(N_SEEDS):
        assert scene.caption == spec_caption(scene)
    captions = [s.caption for s in scenes(N_SEEDS)]
    assert any(" an orange " in f" {c} " for c in captions)
    assert not any(" a orange " in f" {c} " or " an " + w in c
                   for c in captions for w in ("red", "small", "large", "circle", "square"))
    hand_made = Scene((SceneObject("circle", "orange", "large", 6, 8, 8, (0, 0),
                                   says_size=False, says_position=False),))
    assert hand_made.caption == "an orange circle"
