"""The ShapesWorld v1 caption grammar: a strict parser and its inverse.

``parse_caption(text)`` turns a caption of the world (``shared/shapes-world.md``,
section "Captions") into a :class:`ParsedCaption`; ``ParsedCaption.to_text()`` writes it
back with ``scene.compose_caption``, so ``parse_caption(t).to_text() == t`` for every
caption the grammar accepts. Grammar::

    caption  := object
              | object " and " object
              | object ", " object " and " object
              | object " " relation " " object        (no positions in either object)
    object   := article [" " size] [" " color] " " shape [" " position]
    article  := "a" | "an"   ("an" iff the next word starts with a vowel)
    relation := "to the left of" | "to the right of" | "above" | "below"

Text outside the grammar raises :class:`CaptionError` with a one-line message naming the
problem and the word where it was found (words are counted from 1); the caption it quotes is cut
to its first 80 characters.

Semantic oddities that the renderer never produces but that an image could still
satisfy are accepted, because they are statements about the world, not grammar errors:
two objects with the same position phrase (two small objects fit in one third of the
canvas), two identical object phrases, and a relation between identical objects. The
checker judges them like any other caption.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.checks import quote
from tandem.world.scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, compose_caption

MAX_OBJECTS = 3
ARTICLES = ("a", "an")
VOWELS = "aeiou"

# Multi-word phrases as word tuples, longest first so "at the top left" beats "at the top".
_POSITION_WORDS = sorted((tuple(p.split()) for p in POSITIONS), key=len, reverse=True)
_RELATION_WORDS = sorted((tuple(r.split()) for r in RELATIONS), key=len, reverse=True)
_VOCABULARY = frozenset(
    ("and", *ARTICLES, *SIZES, *COLORS, *SHAPES)
    + tuple(w for p in _POSITION_WORDS for w in p)
    + tuple(w for r in _RELATION_WORDS for w in r)
)


class CaptionError(ValueError):
    """A caption outside the ShapesWorld grammar."""


def article_for(word: str) -> str:
    """The article that goes before ``word``: ``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[0] in VOWELS else "a"


@dataclass(frozen=True)
class ObjectSpec:
    """One object phrase. ``None`` means the caption does not state that attribute.

    ``position`` is the full phrase, e.g. ``"at the top left"``.
    """

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("size", self.size, SIZES),
            ("position", self.position, tuple(POSITIONS)),
        ):
            if (value is not None or name == "shape") and value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    def phrase(self) -> str:
        """``a|an [size] [color] shape [position]``."""
        words = [w for w in (self.size, self.color, self.shape) if w is not None]
        text = f"{article_for(words[0])} {' '.join(words)}"
        return text if self.position is None else f"{text} {self.position}"


@dataclass(frozen=True)
class ParsedCaption:
    """A caption as data: 1 to 3 objects and, for 2 objects, an optional relation.

    The relation relates ``objects[0]`` (A) to ``objects[1]`` (B): ``A <relation> B``.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a caption has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
            if len(self.objects) != 2:
                raise ValueError(f"a relation needs exactly 2 objects, got {len(self.objects)}")
            if any(o.position is not None for o in self.objects):
                raise ValueError("position and relation cannot both appear")

    def to_text(self) -> str:
        """The caption text; ``parse_caption(c.to_text()) == c``."""
        return compose_caption([o.phrase() for o in self.objects], self.relation)


def is_valid_caption(text: str) -> bool:
    """True iff ``text`` is a caption of the grammar."""
    try:
        parse_caption(text)
    except CaptionError:
        return False
    return True


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of the ShapesWorld grammar.

    Args:
        text: e.g. ``"a small cyan square and an orange triangle at the bottom right"``.

    Returns:
        The objects in caption order and the relation (or ``None``).

    Raises:
        CaptionError: on any text outside the grammar; the message names the problem and
            the word (counted from 1) where it was found.
    """
    if not isinstance(text, str):
        raise CaptionError(f"a caption must be a str, got {type(text).__name__}")
    return _Parser(text).parse()


class _Parser:
    """Recursive descent over the caption's words; ``self.i`` is the next word's index."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words, self.comma_after = _tokenize(text)
        self.i = 0

    def fail(self, message: str) -> CaptionError:
        return CaptionError(f"{message} in {quote(self.text)}")

    def where(self, index: int) -> str:
        return f"{self.words[index]!r} at word {index + 1}"

    def parse(self) -> ParsedCaption:
        objects = [self.parse_object()]
        separators: list[str] = []
        while self.i < len(self.words) or self.comma_after[-1]:
            separators.append(self.parse_separator())
            objects.append(self.parse_object())
        return self.assemble(objects, separators)

    def parse_separator(self) -> str:
        prev = self.i - 1
        if self.comma_after[prev]:
            if self.i == len(self.words):
                raise self.fail("caption ends with a comma")
            if self.words[self.i] == "and":
                raise self.fail(f"no comma before 'and' ({self.where(self.i)})")
            return ","
        word = self.words[self.i]
        if word == "and":
            self.no_comma_after(self.i)
            self.i += 1
            return "and"
        if any(word == r[0] for r in _RELATION_WORDS):
            relation = " ".join(self.match_phrase(_RELATION_WORDS, "relation"))
            self.no_comma_after(self.i - 1)
            return relation
        raise self.fail(
            f"expected ',', 'and', a relation or the end after {self.words[prev]!r}, "
            f"got {self.where(self.i)}"
        )

    def parse_object(self) -> ObjectSpec:
        if self.i == len(self.words):
            raise self.fail(f"expected an object after {self.words[self.i - 1]!r} at the end")
        start = self.i
        article = self.words[start]
        if article not in ARTICLES:
            raise self.fail(f"expected 'a' or 'an' to start an object, got {self.where(start)}")
        self.no_comma_after(start)
        self.i += 1
        if self.i == len(self.words):
            raise self.fail(f"expected a shape after {article!r} at the end")
        if article != article_for(self.words[self.i]):
            raise self.fail(
                f"wrong article {article!r} before {self.where(self.i)}; "
                f"expected {article_for(self.words[self.i])!r}"
            )
        size = self.take(SIZES)
        color = self.take(COLORS)
        if self.i == len(self.words):
            raise self.fail(f"expected a shape after {self.words[self.i - 1]!r} at the end")
        word = self.words[self.i]
        if word not in SHAPES:
            hint = " (attributes go size, colour, shape)" if word in SIZES + COLORS else ""
            raise self.fail(
                f"expected a shape after {self.words[self.i - 1]!r}, got {self.where(self.i)}{hint}"
            )
        self.i += 1
        position = None
        if not self.comma_after[self.i - 1] and self.i < len(self.words):
            if self.words[self.i] in ("at", "in"):
                position = " ".join(self.match_phrase(_POSITION_WORDS, "position"))
        return ObjectSpec(shape=word, color=color, size=size, position=position)

    def take(self, allowed: tuple[str, ...]) -> str | None:
        """Consume the next word if it is in ``allowed``."""
        if self.i < len(self.words) and self.words[self.i] in allowed:
            self.no_comma_after(self.i)
            self.i += 1
            return self.words[self.i - 1]
        return None

    def match_phrase(self, phrases: list[tuple[str, ...]], kind: str) -> tuple[str, ...]:
        """Consume the longest phrase of ``phrases`` that starts at the next word."""
        start = self.i
        for phrase in phrases:
            if tuple(self.words[start : start + len(phrase)]) == phrase:
                for k in range(start, start + len(phrase) - 1):
                    self.no_comma_after(k)
                self.i = start + len(phrase)
                return phrase
        tail = " ".join(self.words[start : start + 4])
        raise self.fail(f"unknown or incomplete {kind} {tail!r} at word {start + 1}")

    def no_comma_after(self, index: int) -> None:
        if self.comma_after[index]:
            raise self.fail(f"misplaced comma after {self.where(index)}")

    def assemble(self, objects: list[ObjectSpec], separators: list[str]) -> ParsedCaption:
        relations = [s for s in separators if s in RELATIONS]
        if relations:
            if len(objects) != 2:
                raise self.fail(f"a relation needs exactly 2 objects, got {len(objects)}")
            if any(o.position is not None for o in objects):
                raise self.fail("position and relation cannot both appear")
            return ParsedCaption(tuple(objects), relations[0])
        if len(objects) > MAX_OBJECTS:
            raise self.fail(f"more than {MAX_OBJECTS} objects ({len(objects)})")
        expected = {1: [], 2: ["and"], 3: [",", "and"]}[len(objects)]
        if separators != expected:
            pattern = {2: "'A and B'", 3: "'A, B and C'"}[len(objects)]
            raise self.fail(f"{len(objects)} objects must be joined as {pattern}")
        return ParsedCaption(tuple(objects))


def _tokenize(text: str) -> tuple[list[str], list[bool]]:
    """Words and, per word, whether a comma follows it; checks case, spacing and vocabulary."""
    if not text:
        raise CaptionError("empty caption")
    if text != text.lower():
        raise CaptionError(f"caption must be lower case in {quote(text)}")
    if text.endswith("."):
        raise CaptionError(f"caption must not end with a period in {quote(text)}")
    if text != text.strip() or "  " in text or any(c.isspace() and c != " " for c in text):
        raise CaptionError(f"words must be separated by single spaces in {quote(text)}")
    words, comma_after = [], []
    for index, token in enumerate(text.split(" ")):
        word = token.removesuffix(",")
        if not word or "," in word:
            raise CaptionError(f"misplaced comma at word {index + 1} in {quote(text)}")
        if word not in _VOCABULARY:
            raise CaptionError(f"unknown word {quote(word)} at word {index + 1} in {quote(text)}")
        words.append(word)
        comma_after.append(token.endswith(","))
    return words, comma_after
