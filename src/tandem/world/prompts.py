"""The fixed validation and test prompt lists of ShapesWorld v1.

Spec (``shared/shapes-world.md``, "Splits"): both lists come from fixed seeds and never
overlap. The test list is the captions of scenes ``(2, 0), (2, 1), ...`` with repeats
dropped; the validation list does the same with scenes ``(1, i)`` and also drops every
caption of the shipped test list (its first ``SPLIT_SIZES["test"]`` captions).
The shipped files under ``data/`` are ``generate_prompts(split, SPLIT_SIZES[split])``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tandem.checks import read_text_input
from tandem.world.scene import sample_scene

SPLIT_SEEDS = {"val": 1, "test": 2}  # scene i of a split is sample_scene((SPLIT_SEEDS[split], i))
SPLIT_SIZES = {"val": 500, "test": 1000}  # lengths of the shipped lists


def generate_prompts(split: str, n: int) -> list[str]:
    """The first ``n`` distinct captions of a split's scene stream.

    Args:
        split: ``"val"`` or ``"test"``.
        n: number of captions, >= 1.
    """
    _check_split(split)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    excluded = set(generate_prompts("test", SPLIT_SIZES["test"])) if split == "val" else set()
    prompts: list[str] = []
    seen: set[str] = set()
    index = 0
    while len(prompts) < n:
        caption = sample_scene((SPLIT_SEEDS[split], index)).caption
        index += 1
        if caption not in seen and caption not in excluded:
            seen.add(caption)
            prompts.append(caption)
    return prompts


def load_prompts(split: str) -> list[str]:
    """The shipped prompt list of a split (``val``: 500 prompts, ``test``: 1000)."""
    _check_split(split)
    resource = resources.files("tandem.world").joinpath("data").joinpath(f"prompts_{split}.txt")
    with resources.as_file(resource) as path:
        return read_prompt_file(path)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line, stripped, blank lines skipped."""
    text = read_text_input(path, "prompt file")  # a regular file of bounded size, else a one-line error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
