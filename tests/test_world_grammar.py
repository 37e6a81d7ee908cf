"""The caption grammar (tandem.world.grammar) and the shipped prompt lists (world.prompts)."""

from __future__ import annotations

import pytest

from tandem.world.grammar import (
    CaptionError,
    ObjectSpec,
    ParsedCaption,
    is_valid_caption,
    parse_caption,
)
from tandem.world.prompts import generate_prompts, load_prompts, read_prompt_file
from tandem.world.scene import sample_scene

SPEC_EXAMPLES = {
    "a large red circle at the top left": ParsedCaption(
        (ObjectSpec("circle", "red", "large", "at the top left"),)
    ),
    "a small cyan square and an orange triangle at the bottom right": ParsedCaption(
        (ObjectSpec("square", "cyan", "small"),
         ObjectSpec("triangle", "orange", None, "at the bottom right"))
    ),
    "a blue triangle to the left of a large white square": ParsedCaption(
        (ObjectSpec("triangle", "blue"), ObjectSpec("square", "white", "large")),
        "to the left of",
    ),
    "a small green circle at the top, a yellow square and a purple triangle in the center":
        ParsedCaption(
            (ObjectSpec("circle", "green", "small", "at the top"), ObjectSpec("square", "yellow"),
             ObjectSpec("triangle", "purple", None, "in the center"))
        ),
}

# (caption, words the error message must contain)
INVALID = [
    ("", ["empty"]),
    ("a pink circle", ["unknown word 'pink'", "word 2"]),
    ("a red circle at the top middle", ["unknown word 'middle'", "word 7"]),
    ("a orange circle", ["wrong article 'a'", "'orange'"]),
    ("an red circle", ["wrong article 'an'", "'red'"]),
    ("an large circle", ["wrong article"]),
    ("a red", ["expected a shape after 'red'"]),
    ("a large red at the top", ["expected a shape after 'red'", "'at'"]),
    ("a red large circle", ["expected a shape after 'red'", "size, colour, shape"]),
    ("a circle red", ["after 'circle'", "'red'"]),
    ("red circle", ["expected 'a' or 'an'", "word 1"]),
    ("A red circle", ["lower case"]),
    ("a red circle.", ["period"]),
    ("a red  circle", ["single spaces"]),
    (" a red circle", ["single spaces"]),
    ("a red circle\n", ["single spaces"]),
    ("a red circle,", ["ends with a comma"]),
    ("a, red circle", ["misplaced comma after 'a'"]),
    ("a circle above, a square", ["misplaced comma after 'above'"]),
    ("a circle at the top,left", ["misplaced comma"]),
    ("a circle above a square and a triangle", ["a relation needs exactly 2 objects"]),
    ("a circle and a square below a triangle", ["a relation needs exactly 2 objects"]),
    ("a circle at the top above a square", ["position and relation cannot both appear"]),
    ("a circle above a square in the center", ["position and relation cannot both appear"]),
    ("a circle, a square, a triangle and a circle", ["more than 3 objects"]),
    ("a circle and a square and a triangle", ["'A, B and C'"]),
    ("a circle, a square", ["'A and B'"]),
    ("a circle, a square, and a triangle", ["no comma before 'and'"]),
    ("a circle and", ["expected an object after 'and'"]),
    ("a circle at the", ["incomplete position 'at the'"]),
    ("a circle to the left a square", ["incomplete relation"]),
    ("a circle to a square", ["incomplete relation"]),
]


def test_spec_examples_parse_and_round_trip():
    for text, expected in SPEC_EXAMPLES.items():
        parsed = parse_caption(text)
        assert parsed == expected
        assert parsed.to_text() == text
        assert is_valid_caption(text)


def test_round_trip_and_attributes_on_generated_captions():
    n_relations = 0
    for seed in range(1500):
        scene = sample_scene(seed)
        parsed = parse_caption(scene.caption)
        assert parsed.to_text() == scene.caption
        assert parsed.relation == scene.relation
        n_relations += scene.relation is not None
        assert len(parsed.objects) == len(scene.objects)
        for spec, o in zip(parsed.objects, scene.objects):
            assert spec.shape == o.shape
            assert spec.color == (o.color if o.says_color else None)
            assert spec.size == (o.size if o.says_size else None)
            assert spec.position == (o.position if o.says_position else None)
    assert n_relations > 0


@pytest.mark.parametrize("text, fragments", INVALID)
def test_invalid_captions_raise_with_named_problem(text, fragments):
    with pytest.raises(CaptionError) as info:
        parse_caption(text)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not is_valid_caption(text)


def test_caption_error_is_a_value_error_and_non_strings_are_rejected():
    assert issubclass(CaptionError, ValueError)
    with pytest.raises(CaptionError):
        parse_caption(None)  # type: ignore[arg-type]


def test_semantic_oddities_are_grammatical():
    # never rendered, but statements an image can satisfy: the checker judges them
    for text in ("a small circle at the top and a small square at the top",
                 "a red circle and a red circle",
                 "a circle above a circle"):
        assert parse_caption(text).to_text() == text


def test_parsed_caption_validates_its_fields():
    with pytest.raises(ValueError, match="unknown color"):
        ObjectSpec("circle", color="pink")
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("star")
    with pytest.raises(ValueError, match="exactly 2 objects"):
        ParsedCaption((ObjectSpec("circle"),), "above")
    with pytest.raises(ValueError, match="position and relation"):
        ParsedCaption((ObjectSpec("circle", position="at the top"), ObjectSpec("square")), "above")
    with pytest.raises(ValueError, match="1 to 3 objects"):
        ParsedCaption(())
    assert ParsedCaption((ObjectSpec("circle", "orange"),)).to_text() == "an orange circle"


# --- the shipped prompt lists -------------------------------------------------------------


def test_shipped_prompt_lists_are_the_generated_ones_and_disjoint():
    val, test = load_prompts("val"), load_prompts("test")
    assert len(val) == 500 and len(test) == 1000
    assert len(set(val)) == len(val) and len(set(test)) == len(test)
    assert not set(val) & set(test)
    assert test == generate_prompts("test", 1000)
    assert val == generate_prompts("val", 500)
    assert all(is_valid_caption(p) for p in val + test)
    # the test list is the first distinct captions of scenes (2, 0), (2, 1), ...
    assert test[0] == sample_scene((2, 0)).caption
    assert generate_prompts("test", 5) == test[:5]


def test_prompt_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        generate_prompts("train", 3)
    with pytest.raises(ValueError, match="unknown split"):
        load_prompts("train")
    with pytest.raises(ValueError, match="n must be"):
        generate_prompts("test", 0)
    path = tmp_path / "prompts.txt"
    path.write_text("  a red circle \n\n\na blue square\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red circle", "a blue square"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
