"""ShapesWorld v1 scenes: the sampler, the renderer and the caption writer.

Everything here follows ``shared/shapes-world.md`` (the normative spec) to the pixel:
a scene is drawn from a seed, rendered as a 32x32 RGB uint8 image on black, and
described by a caption from the world's grammar. ``make_example(seed)`` is the
``(seed) -> (caption, image, scene)`` entry point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

CANVAS = 32
BACKGROUND = (0, 0, 0)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 130, 30),
    "white": (235, 235, 235),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RADII = {"small": (3, 4), "large": (6, 7)}

AXIS_CENTERS = (8, 16, 24)
# phrase -> (column, row), column/row index into AXIS_CENTERS
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (0, 0),
    "at the top": (1, 0),
    "at the top right": (2, 0),
    "at the left": (0, 1),
    "in the center": (1, 1),
    "at the right": (2, 1),
    "at the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "at the bottom right": (2, 2),
}
CELL_TO_POSITION = {cell: phrase for phrase, cell in POSITIONS.items()}
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_MIN_OFFSET = 4  # pixels between the two centres on the relation's axis
JITTER = 2

N_OBJECTS_P = {1: 0.5, 2: 0.35, 3: 0.15}
P_OMIT = {"size": 0.3, "color": 0.1, "position": 0.3}
P_RELATION = 0.5


@dataclass(frozen=True)
class SceneObject:
    """One drawn object and which of its attributes the caption states."""

    shape: str
    color: str
    size: str
    radius: int
    cx: int
    cy: int
    cell: tuple[int, int]
    says_size: bool = True
    says_color: bool = True
    says_position: bool = True

    @property
    def position(self) -> str:
        return CELL_TO_POSITION[self.cell]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive."""
        r = self.radius
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)

    def phrase(self) -> str:
        words = []
        if self.says_size:
            words.append(self.size)
        if self.says_color:
            words.append(self.color)
        words.append(self.shape)
        text = " ".join(words)
        article = "an" if text[0] in "aeiou" else "a"
        text = f"{article} {text}"
        if self.says_position:
            text = f"{text} {self.position}"
        return text


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # relates objects[0] (A) to objects[1] (B)
    seed: int | tuple[int, ...] | None = field(default=None, compare=False)

    @property
    def caption(self) -> str:
        return compose_caption([o.phrase() for o in self.objects], self.relation)

    def to_dict(self) -> dict:
        objects = []
        for o in self.objects:
            d = asdict(o)
            d["cell"] = list(o.cell)
            d["position"] = o.position
            objects.append(d)
        return {"caption": self.caption, "objects": objects, "relation": self.relation}


def compose_caption(phrases: list[str], relation: str | None = None) -> str:
    """Join object phrases as ``A``, ``A and B``, ``A, B and C`` or ``A <relation> B``."""
    if relation is not None:
        if len(phrases) != 2:
            raise ValueError(f"a relation needs exactly 2 objects, got {len(phrases)}")
        return f"{phrases[0]} {relation} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does centre ``a`` stand in ``relation`` to centre ``b`` (image y grows downwards)?"""
    (ax, ay), (bx, by) = a, b
    d = RELATION_MIN_OFFSET
    if relation == "to the left of":
        return ax <= bx - d
    if relation == "to the right of":
        return ax >= bx + d
    if relation == "above":
        return ay <= by - d
    if relation == "below":
        return ay >= by + d
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Bounding boxes with at least one empty pixel row or column between them."""
    return a[2] + 1 < b[0] or b[2] + 1 < a[0] or a[3] + 1 < b[1] or b[3] + 1 < a[1]


def _draw_object(rng: np.random.Generator, cell: tuple[int, int]) -> SceneObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    size = SIZES[rng.integers(len(SIZES))]
    radius = int(RADII[size][rng.integers(2)])
    jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
    cx = min(max(AXIS_CENTERS[cell[0]] + jx, radius), CANVAS - 1 - radius)
    cy = min(max(AXIS_CENTERS[cell[1]] + jy, radius), CANVAS - 1 - radius)
    return SceneObject(shape, color, size, radius, cx, cy, cell)


def sample_scene(seed: int | tuple[int, ...] | np.random.Generator) -> Scene:
    """Draw one scene; the same seed always gives the same scene.

    Args:
        seed: an int, a tuple of ints (hashed by numpy's SeedSequence), or a Generator.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    counts = list(N_OBJECTS_P)
    n = counts[rng.choice(len(counts), p=list(N_OBJECTS_P.values()))]
    while True:
        cells = [divmod(int(c), 3)[::-1] for c in rng.choice(9, size=n, replace=False)]
        objects = [_draw_object(rng, cell) for cell in cells]
        if all(
            _boxes_apart(objects[i].bbox, objects[j].bbox)
            for i in range(n)
            for j in range(i + 1, n)
        ):
            break
    stated = []
    for o in objects:
        keep = rng.random(3) >= np.array([P_OMIT["size"], P_OMIT["color"], P_OMIT["position"]])
        stated.append(
            SceneObject(**{**asdict(o), "says_size": bool(keep[0]), "says_color": bool(keep[1]),
                           "says_position": bool(keep[2])})
        )
    relation = None
    if n == 2 and not any(o.says_position for o in stated) and rng.random() < P_RELATION:
        a, b = stated
        held = [r for r in RELATIONS if relation_holds(r, (a.cx, a.cy), (b.cx, b.cy))]
        relation = held[rng.integers(len(held))]
    seed_value = None if isinstance(seed, np.random.Generator) else seed
    return Scene(tuple(stated), relation, seed_value)


def object_mask(shape: str, cx: float, cy: float, r: float, size: int = CANVAS) -> np.ndarray:
    """Boolean [size, size] mask of one shape, exactly as the spec defines it."""
    ys, xs = np.mgrid[0:size, 0:size]
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "triangle":
        rows = (ys >= cy - r) & (ys <= cy + r)
        return rows & (np.abs(xs - cx) * (2 * r) <= r * (ys - (cy - r)))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a uint8 array [32, 32, 3] (HWC, RGB)."""
    image = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    for o in scene.objects:
        image[object_mask(o.shape, o.cx, o.cy, o.radius)] = PALETTE[o.color]
    return image


def make_example(seed: int | tuple[int, ...]) -> tuple[str, np.ndarray, Scene]:
    """``(seed) -> (caption, image [32, 32, 3] uint8, scene)``."""
    scene = sample_scene(seed)
    return scene.caption, render(scene), scene
