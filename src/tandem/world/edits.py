"""ShapesWorld's editing benchmark: renderings whose caption is changed in one attribute.

Case ``i`` of a split starts from the scene ``sample_scene((EDIT_SEEDS[split], i))`` (families
disjoint from the prompt lists' 1 and 2 and from the training stream's 0) and, with the generator
``(EDIT_SEEDS[split], i, 1)``, picks one object and one of its attributes (colour, shape, size, or
position when the caption has no relation) and a new value for it. The edited caption states the
changed attribute (even if the source caption left it unstated) and keeps everything else.

A case is kept only if the edit is well posed: the *ideal* edit (the source scene with that one
change, its objects still apart and any relation still holding) satisfies the edited caption under
the exact checker, and the source rendering does not (so doing nothing fails). The shipped lists
are ``generate_edits(split, EDIT_SIZES[split])`` (``tandem world edits``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from ..checks import read_text_input
from .scene import (
    AXIS_CENTERS,
    CANVAS,
    CELL_TO_POSITION,
    COLORS,
    JITTER,
    POSITIONS,
    RADII,
    SHAPES,
    SIZES,
    Scene,
    _boxes_apart,
    relation_holds,
    render,
    sample_scene,
)

EDIT_SEEDS = {"val": 3, "test": 4}
EDIT_SIZES = {"val": 200, "test": 500}
ATTRIBUTES = ("color", "shape", "size", "position")


@dataclass(frozen=True)
class EditCase:
    split: str
    index: int       # the source scene is sample_scene((EDIT_SEEDS[split], index))
    source: str      # the source rendering's caption
    prompt: str      # the edited caption
    object: int      # which object (caption order) changes
    attribute: str
    before: str
    after: str

    def scene(self) -> Scene:
        return sample_scene((EDIT_SEEDS[self.split], self.index))

    def image(self) -> np.ndarray:
        """The source rendering: uint8 [32, 32, 3]."""
        return render(self.scene())

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _edited_scene(scene: Scene, j: int, attribute: str, after: str, rng: np.random.Generator) -> Scene:
    o = scene.objects[j]
    if attribute == "color":
        new = replace(o, color=after, says_color=True)
    elif attribute == "shape":
        new = replace(o, shape=after)
    elif attribute == "size":
        r = int(RADII[after][rng.integers(2)])
        new = replace(o, size=after, radius=r, says_size=True,
                      cx=min(max(o.cx, r), CANVAS - 1 - r), cy=min(max(o.cy, r), CANVAS - 1 - r))
    else:
        cell = POSITIONS[after]
        jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        r = o.radius
        new = replace(o, cell=cell, says_position=True,
                      cx=min(max(AXIS_CENTERS[cell[0]] + jx, r), CANVAS - 1 - r),
                      cy=min(max(AXIS_CENTERS[cell[1]] + jy, r), CANVAS - 1 - r))
    objects = list(scene.objects)
    objects[j] = new
    return Scene(tuple(objects), scene.relation)


def make_edit(split: str, index: int) -> EditCase | None:
    """Case ``index`` of ``split``, or None when its draw is not a well-posed edit (see the module doc)."""
    if split not in EDIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(EDIT_SEEDS)}")
    drawn = draw_edit(EDIT_SEEDS[split], index)
    if drawn is None:
        return None
    scene, j, attribute, before, after, prompt = drawn
    return EditCase(split, index, scene.caption, prompt, j, attribute, before, after)


def draw_edit(family: int, index: int) -> tuple[Scene, int, str, str, str, str] | None:
    """Edit ``index`` of the seed family ``family`` (a split's is ``EDIT_SEEDS[split]``): (source scene, object,
    attribute, before, after, edited caption), or None when the draw is not a well-posed edit."""
    from .checker import check  # defers scipy (world.checker)

    scene = sample_scene((family, index))
    rng = np.random.default_rng([family, index, 1])
    j = int(rng.integers(len(scene.objects)))
    o = scene.objects[j]
    attributes = [a for a in ATTRIBUTES if a != "position" or scene.relation is None]
    attribute = attributes[rng.integers(len(attributes))]
    if attribute == "color":
        before, choices = o.color, [c for c in COLORS if c != o.color]
    elif attribute == "shape":
        before, choices = o.shape, [s for s in SHAPES if s != o.shape]
    elif attribute == "size":
        before, choices = o.size, [s for s in SIZES if s != o.size]
    else:
        taken = {p.cell for p in scene.objects}
        before = o.position
        choices = [CELL_TO_POSITION[c] for c in sorted(CELL_TO_POSITION) if c not in taken]
    after = choices[rng.integers(len(choices))]
    target = _edited_scene(scene, j, attribute, after, rng)
    objects = target.objects
    if not all(_boxes_apart(a.bbox, b.bbox) for i, a in enumerate(objects) for b in objects[i + 1:]):
        return None
    if target.relation is not None and not relation_holds(
            target.relation, (objects[0].cx, objects[0].cy), (objects[1].cx, objects[1].cy)):
        return None
    prompt = target.caption
    if not check(render(target), prompt).satisfied or check(render(scene), prompt).satisfied:
        return None
    return scene, j, attribute, before, after, prompt


def generate_edits(split: str, n: int) -> list[EditCase]:
    """The first ``n`` well-posed cases of ``split``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cases, index = [], 0
    while len(cases) < n:
        case = make_edit(split, index)
        index += 1
        if case is not None:
            cases.append(case)
    return cases


def read_edit_file(path: str | Path) -> list[EditCase]:
    """Edit cases from a JSON-lines file (one ``EditCase`` per line)."""
    text = read_text_input(path, "edit file")  # a regular file of bounded size, else a one-line error
    try:
        lines = [line for line in text.splitlines() if line.strip()]
        cases = [EditCase(**json.loads(line)) for line in lines]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot read edit file {str(path)!r}: {error}") from error
    if not cases:
        raise ValueError(f"edit file {str(path)!r} holds no edits")
    return cases


def load_edits(split: str) -> list[EditCase]:
    """The shipped edit list of a split (``val``: 200 edits, ``test``: 500)."""
    if split not in EDIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(EDIT_SEEDS)}")
    resource = resources.files("tandem.world").joinpath("data").joinpath(f"edits_{split}.jsonl")
    with resources.as_file(resource) as path:
        return read_edit_file(path)
