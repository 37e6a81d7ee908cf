"""Ground-truth renderings of a given caption: draw a scene that says exactly what the
caption says, with every unstated attribute drawn at random as the spec prescribes."""

from __future__ import annotations

import numpy as np

from ..generate import prompt_seed
from .grammar import ParsedCaption, parse_caption
from .scene import (
    AXIS_CENTERS,
    CANVAS,
    COLORS,
    JITTER,
    POSITIONS,
    RADII,
    SIZES,
    Scene,
    SceneObject,
    _boxes_apart,
    relation_holds,
)

MAX_ATTEMPTS = 10_000


def scene_for_caption(caption: str | ParsedCaption, rng: np.random.Generator) -> Scene:
    """Draw a scene whose own caption is ``caption``.

    Raises:
        CaptionError: the text is outside the grammar.
        ValueError: the caption cannot be drawn (two objects stated in one position).
    """
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    specs = parsed.objects
    stated_cells = [POSITIONS[s.position] for s in specs if s.position is not None]
    if len(set(stated_cells)) != len(stated_cells):
        raise ValueError(f"cannot draw {parsed.to_text()!r}: two objects in the same position")
    for _ in range(MAX_ATTEMPTS):
        free = [c for c in (divmod(i, 3)[::-1] for i in range(9)) if c not in stated_cells]
        order = rng.permutation(len(free))
        free_iter = iter([free[i] for i in order])
        objects = []
        for s in specs:
            cell = POSITIONS[s.position] if s.position is not None else next(free_iter)
            color = s.color if s.color is not None else COLORS[rng.integers(len(COLORS))]
            size = s.size if s.size is not None else SIZES[rng.integers(len(SIZES))]
            radius = int(RADII[size][rng.integers(2)])
            jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
            cx = min(max(AXIS_CENTERS[cell[0]] + jx, radius), CANVAS - 1 - radius)
            cy = min(max(AXIS_CENTERS[cell[1]] + jy, radius), CANVAS - 1 - radius)
            objects.append(SceneObject(s.shape, color, size, radius, cx, cy, cell,
                                       says_size=s.size is not None, says_color=s.color is not None,
                                       says_position=s.position is not None))
        apart = all(_boxes_apart(a.bbox, b.bbox) for i, a in enumerate(objects) for b in objects[i + 1:])
        related = parsed.relation is None or relation_holds(
            parsed.relation, (objects[0].cx, objects[0].cy), (objects[1].cx, objects[1].cy))
        if apart and related:
            return Scene(tuple(objects), parsed.relation)
    raise ValueError(f"could not draw a scene for {parsed.to_text()!r} in {MAX_ATTEMPTS} attempts")



def scenes_for_captions(captions: list[str], seed: int) -> list[Scene]:
    """``scene_for_caption`` of caption i drawn from the generator of ``(seed, i)`` (``tandem world render``)."""
    return [scene_for_caption(c, np.random.default_rng(prompt_seed(seed, i))) for i, c in enumerate(captions)]
