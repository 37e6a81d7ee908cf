"""Oracle II's training data: the world stream drawn by tandem's own models and labelled by the judge,
cached on disk in shards.

Shard ``k`` of a split holds the scenes of batch ``k`` of the stream ``stream_seed`` (``sample_scenes``;
captions of the validation and test lists are dropped) and, for each caption, every sample kind of a
``DataRecipe`` from the caption's own initial noise:

* ``student1`` / ``student2`` / ``student4``: the world's student at 1, 2 and 4 steps;
* ``teacher``: the teacher (DPM-Solver++) at ``teacher_steps[i % len]`` steps;
* ``refined``: the 4-step student refined by the teacher at rollback ``refine_sigmas[i % len]``;
* ``control``: the 4-step student with a world ControlNet (edges, masks alternately), the control
  image drawn from the caption (``scenes_for_captions``);
* ``render``: the exact rendering, and ``corruptions`` *targeted* corruptions of its scene, each one
  near miss (a wrong colour, shape or size, a moved, missing, extra or swapped object), rendered
  exactly: ``corrupt-<what>``;
* ``edit``: ``edits_per_shard`` student edits (SDEdit at ``edit_strengths[j % len]``) of edit cases
  drawn from the seed family ``(EDIT_FAMILY, stream_seed)``, labelled against their edited captions.

Every image is labelled by the exact checker (soft ``score`` and ``satisfied``); the oracle never
calls it. A shard is written atomically once complete, so an interrupted build resumes at the first
missing shard; the recipe is stored beside the shards and a build with another recipe is refused.

    tandem world oracle-data --out runs/oracle2/data --split train --shards 20
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..checks import first_difference, read_text_file
from ..generate import derive_seed, prompt_generator
from ..outputs import atomic_path, atomic_write_text
from ..pipeline import load_preset
from ..presets import PRESETS
from ..training.checks import config_dict, require_number
from .conditional import scenes_for_captions
from .control import control_image
from .edits import _edited_scene, draw_edit
from .prompts import load_prompts
from .scene import CELL_TO_POSITION, COLORS, SHAPES, SIZES, Scene, _boxes_apart, _draw_object, render
from .stream import sample_scenes

EDIT_FAMILY = 17  # edit cases of the oracle's data: sample_scene((EDIT_FAMILY, stream_seed, index)); not 3 or 4 (the edit lists)
CORRUPTIONS = ("color", "shape", "size", "move", "drop", "extra", "swap")
KINDS = ("student1", "student2", "student4", "teacher", "refined", "control", "render",
         *(f"corrupt-{c}" for c in CORRUPTIONS), "edit")


@dataclass(frozen=True)
class DataRecipe:
    """What each shard draws; every field is part of the cache's identity."""

    shard_prompts: int = 500                       # stream scenes per shard (before the val/test captions drop)
    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: tuple[int, ...] = (5, 10, 25)   # caption i: teacher_steps[i % len], DPM-Solver++
    refine_sigmas: tuple[float, ...] = (0.3, 0.5, 0.7)
    refine_teacher_steps: int = 10
    control: tuple[str, ...] = ("edges", "mask")   # caption i: control[i % len]; () for none
    corruptions: int = 2                           # targeted corruptions of each rendering
    edits_per_shard: int = 250
    edit_strengths: tuple[float, ...] = (0.4, 0.6, 0.8)

    def __post_init__(self):
        require_number(self.shard_prompts, "shard_prompts", integer=True, at_least=1)
        for n in (*self.student_steps, *self.teacher_steps, self.refine_teacher_steps):
            require_number(n, "recipe steps", integer=True, at_least=1)
        for v in (*self.refine_sigmas, *self.edit_strengths):
            require_number(v, "recipe sigma/strength", above=0.0, at_most=1.0)
        require_number(self.corruptions, "corruptions", integer=True, at_least=0)
        require_number(self.edits_per_shard, "edits_per_shard", integer=True, at_least=0)
        if 4 not in self.student_steps and (self.refine_sigmas or self.control):
            raise ValueError("refined and control samples start from the 4-step student: keep 4 in student_steps")
        unknown = set(self.control) - {"edges", "mask"}
        if unknown:
            raise ValueError(f"unknown control kinds {sorted(unknown)}; expected edges or mask")


# -- targeted corruptions ---------------------------------------------------------------------------


def corrupt_scene(scene, what: str, rng: np.random.Generator):
    """The scene with one near-miss defect ``what`` (one of ``CORRUPTIONS``), or None where it does not apply
    (a swap needs two objects, a drop or move a free place, ...). The caption stays the original's."""
    objects = list(scene.objects)
    j = int(rng.integers(len(objects)))
    o = objects[j]
    if what in ("color", "shape", "size", "move"):
        if what == "move":
            taken = {p.cell for p in objects}
            choices = [CELL_TO_POSITION[c] for c in sorted(CELL_TO_POSITION) if c not in taken]
            attribute = "position"
        else:
            current = {"color": o.color, "shape": o.shape, "size": o.size}[what]
            choices = [v for v in {"color": COLORS, "shape": SHAPES, "size": SIZES}[what] if v != current]
            attribute = what
        if not choices:
            return None
        says = {k: getattr(o, k) for k in ("says_size", "says_color", "says_position")}
        edited = _edited_scene(scene, j, attribute, choices[rng.integers(len(choices))], rng)
        objects = [replace(p, **says) if i == j else p for i, p in enumerate(edited.objects)]  # caption unchanged
    elif what == "drop":
        if len(objects) < 2:
            return None
        objects.pop(j)
    elif what == "extra":
        free = [c for c in sorted(CELL_TO_POSITION) if c not in {p.cell for p in objects}]
        objects.append(_draw_object(rng, free[rng.integers(len(free))]))
    elif what == "swap":
        if len(objects) < 2:
            return None
        a, b = rng.choice(len(objects), 2, replace=False)
        pa, pb = objects[a], objects[b]
        objects[a] = replace(pa, cx=pb.cx, cy=pb.cy, cell=pb.cell, radius=pa.radius)
        objects[b] = replace(pb, cx=pa.cx, cy=pa.cy, cell=pa.cell, radius=pb.radius)
        for i in (a, b):  # keep each object inside the canvas at its new place
            p = objects[i]
            objects[i] = replace(p, cx=min(max(p.cx, p.radius), 31 - p.radius), cy=min(max(p.cy, p.radius), 31 - p.radius))
    else:
        raise ValueError(f"unknown corruption {what!r}; expected one of {CORRUPTIONS}")
    if not all(_boxes_apart(a.bbox, b.bbox) for i, a in enumerate(objects) for b in objects[i + 1:]):
        return None
    return Scene(tuple(objects), scene.relation)


def corruptions_of(scene, n: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """``n`` renderings of distinct corruptions of ``scene`` that apply (fewer where fewer apply)."""
    out = []
    for what in rng.permutation(CORRUPTIONS):
        if len(out) == n:
            break
        changed = corrupt_scene(scene, str(what), rng)
        if changed is not None:
            out.append((str(what), render(changed)))
    return out


# -- shards -----------------------------------------------------------------------------------------


class ShardDrawer:
    """Draws shards with the world's pipelines (loaded once): ``drawer(split_seed, k) -> dict of arrays``."""

    def __init__(self, recipe: DataRecipe, world: str | Path | None = None, batch_size: int = 250):
        self.recipe, self.batch_size = recipe, batch_size
        presets = {"": "world", **{kind: f"world-{kind}" for kind in recipe.control}}
        self.pipes = {}
        for kind, name in presets.items():
            preset = replace(PRESETS[name], scorer=None)  # nothing here scores: the oracle is not loaded
            if world is not None:
                preset = replace(preset, teacher=str(world))  # its own student, by the world kind
            self.pipes[kind] = load_preset(preset)

    def prompts(self, stream_seed: int, k: int, exclude: set[str]):
        scenes = [s for s in sample_scenes(stream_seed, k, self.recipe.shard_prompts) if s.caption not in exclude]
        return [s.caption for s in scenes], scenes

    def __call__(self, stream_seed: int, k: int, exclude: set[str],
                 progress: Callable[[str], None] = lambda what: None) -> dict[str, np.ndarray]:
        from .checker import check_batch  # defers scipy (world.checker)

        r, pipe, bs = self.recipe, self.pipes[""], self.batch_size
        captions, scenes = self.prompts(stream_seed, k, exclude)
        seed = derive_seed(stream_seed, k)  # caption i's noise: prompt_generator(seed, i), for every kind
        n = len(captions)
        images, group, kind = [], [], []

        def add(what: str, idx: list[int], drawn) -> None:
            images.extend(np.asarray(im, np.uint8) for im in drawn)
            group.extend(idx)
            kind.extend([KINDS.index(what)] * len(idx))

        everyone = list(range(n))
        for steps in r.student_steps:
            progress(f"student{steps}")
            add(f"student{steps}", everyone,
                pipe(captions, mode="student", num_inference_steps=steps, seed=seed, batch_size=bs).images)
        progress("teacher")
        for steps, idx in subsets_of(n, r.teacher_steps):
            out = pipe([captions[i] for i in idx], mode="teacher", teacher_steps=steps, teacher_scheduler="dpm",
                       generator=_generators(seed, idx), batch_size=bs)
            add("teacher", idx, out.images)
        progress("refined")
        for sigma, idx in subsets_of(n, r.refine_sigmas):
            out = pipe([captions[i] for i in idx], mode="refine-all", num_inference_steps=4, rollback_sigma=sigma,
                       teacher_steps=r.refine_teacher_steps, teacher_scheduler="dpm", generator=_generators(seed, idx),
                       batch_size=bs)
            add("refined", idx, out.images)
        progress("control")
        for control, idx in subsets_of(n, r.control):
            controls = [control_image(sc, control) for sc in scenes_for_captions([captions[i] for i in idx], seed)]
            out = self.pipes[control]([captions[i] for i in idx], mode="student", num_inference_steps=4,
                                      control_image=controls, generator=_generators(seed, idx), batch_size=bs)
            add("control", idx, out.images)
        for i, scene in enumerate(scenes):
            add("render", [i], [render(scene)])
            rng = np.random.default_rng([stream_seed, k, i, 1])
            for what, im in corruptions_of(scene, r.corruptions, rng):
                add(f"corrupt-{what}", [i], [im])
        edit_captions = []
        if r.edits_per_shard:
            progress("edit")
            cases, index = [], k * 10 * r.edits_per_shard  # shard k's own range of the family
            family = derive_seed(EDIT_FAMILY, stream_seed)
            while len(cases) < r.edits_per_shard:
                drawn = draw_edit(family, index)
                index += 1
                if drawn is not None and drawn[5] not in exclude:
                    cases.append(drawn)
            edit_captions = [c[5] for c in cases]
            for strength, idx in subsets_of(len(cases), r.edit_strengths):
                out = pipe.edit([render(cases[j][0]) for j in idx], [edit_captions[j] for j in idx],
                                strength=strength, mode="student", generator=_generators(derive_seed(seed, 1), idx),
                                batch_size=bs)
                add("edit", [n + j for j in idx], out.images)
        progress("judge")
        all_captions = captions + edit_captions
        results = check_batch(images, [all_captions[g] for g in group])
        return {"images": np.stack(images), "group": np.array(group, np.int32), "kind": np.array(kind, np.int16),
                "score": np.array([x.score for x in results], np.float32),
                "satisfied": np.array([x.satisfied for x in results]),
                "captions": np.array(all_captions)}


def subsets_of(n: int, values) -> list[tuple[object, list[int]]]:
    """Indices 0..n-1 dealt round-robin to ``values``: [(value, indices)]."""
    return [(v, list(range(s, n, len(values)))) for s, v in enumerate(values)]


def _generators(seed: int, idx: list[int]):
    return [prompt_generator(seed, i) for i in idx]


def build_shards(out: str | Path, split_seed: int, shards: int, recipe: DataRecipe = DataRecipe(),
                 world: str | Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Shards ``0 .. shards-1`` of the stream ``split_seed`` in ``out`` (``shard-00000.npz`` ...), drawing
    only the missing ones. Returns the shard paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = json.dumps({"stream_seed": split_seed, "recipe": config_dict(recipe), "kinds": list(KINDS),
                           "world": str(Path(world).resolve()) if world else "shipped"}, indent=1) + "\n"
    made = out / "recipe.json"
    if made.exists() and (text := read_text_file(made, "oracle data recipe")) != identity:
        try:
            differs = first_difference(json.loads(text), json.loads(identity))
        except json.JSONDecodeError:
            differs = "not JSON"
        raise ValueError(f"{made} was made with another recipe, stream or world ({differs}); use another directory")
    atomic_write_text(made, identity)
    exclude = set(load_prompts("val")) | set(load_prompts("test"))
    paths = [out / f"shard-{k:05d}.npz" for k in range(shards)]
    drawer = None
    for k, path in enumerate(paths):
        if path.exists():
            continue
        drawer = drawer or ShardDrawer(recipe, world)
        t0 = time.time()
        shard = drawer(split_seed, k, exclude)
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, **shard)
        log(f"oracle data {out.name}/{path.name}: {len(shard['images'])} images of {len(shard['captions'])} "
            f"captions in {time.time() - t0:.0f}s, satisfied {shard['satisfied'].mean():.3f}")
    return paths


def load_shards(paths: list[Path]) -> dict[str, np.ndarray]:
    """The shards concatenated; ``group`` is renumbered to index the concatenated ``captions``."""
    parts, offset = [], 0
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
        part["group"] = part["group"].astype(np.int64) + offset
        offset += len(part["captions"])
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
