"""The ShapesWorld editing benchmark: the shipped lists are what their documented command makes,
and every case is a well-posed one-attribute edit under the exact checker."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.world.checker import check
from tandem.world.conditional import scene_for_caption
from tandem.world.edits import EDIT_SIZES, generate_edits, load_edits, make_edit, read_edit_file
from tandem.world.grammar import parse_caption
from tandem.world.scene import render


@pytest.mark.parametrize("split", ["val", "test"])
def test_shipped_edit_lists_are_regenerated_exactly(split):
    assert load_edits(split) == generate_edits(split, EDIT_SIZES[split])


def _spec(parsed, j):
    o = parsed.objects[j]
    return {"color": o.color, "shape": o.shape, "size": o.size, "position": o.position}


def test_every_test_edit_changes_one_attribute_of_one_object():
    for case in load_edits("test"):
        before, after = parse_caption(case.source), parse_caption(case.prompt)
        assert len(before.objects) == len(after.objects) and before.relation == after.relation
        for j in range(len(before.objects)):
            if j != case.object:
                assert before.objects[j] == after.objects[j]
        old, new = _spec(before, case.object), _spec(after, case.object)
        assert new[case.attribute] == case.after and old[case.attribute] in (case.before, None)
        assert all(old[a] == new[a] for a in old if a != case.attribute)


def test_edits_are_well_posed():
    for case in load_edits("val")[:100]:
        source = case.image()
        assert check(source, case.source).satisfied  # the input is a clean rendering of its caption
        assert not check(source, case.prompt).satisfied  # leaving the image alone fails the edit
        drawn = scene_for_caption(case.prompt, np.random.default_rng(case.index))
        assert check(render(drawn), case.prompt).satisfied


def test_make_edit_rejects_unknown_splits():
    with pytest.raises(ValueError, match="unknown split"):
        make_edit("train", 0)


@pytest.mark.parametrize("split", ["val", "test"])
def test_make_edit_of_an_index_is_the_recorded_case_whatever_came_before(split):
    """Case i depends on (split, i) alone: asked for out of order, with numpy's global generator moved
    between calls, ``make_edit`` gives the case the shipped list recorded for i, and None for each index
    the list skipped (an ill-posed draw)."""
    recorded = {case.index: case for case in load_edits(split)[:12]}
    assert len(recorded) < max(recorded) + 1  # the first indices include a skipped one
    np.random.seed(0)
    for index in reversed(range(max(recorded) + 1)):
        np.random.random()
        assert make_edit(split, index) == recorded.get(index), index


def test_read_edit_file_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read edit file"):
        read_edit_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no edits"):
        read_edit_file(tmp_path / "empty.jsonl")
