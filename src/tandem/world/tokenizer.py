"""A ``CLIPTokenizer`` whose vocabulary covers the ShapesWorld grammar, one token per word.

The vocabulary is learned by byte-pair encoding (Sennrich et al. 2016) on the grammar's
words: starting from characters, the most frequent adjacent pair is merged until every
word is a single token. Because encoding applies merges in the order they were learned,
each grammar word encodes to exactly one token; words outside the grammar still encode
(to characters and pieces), as with any BPE tokenizer.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer

from .scene import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32  # tokens, BOS and EOS included; the longest caption needs 29


def grammar_words() -> list[str]:
    words = {"a", "an", "and", ","} | set(COLORS) | set(SHAPES) | set(SIZES)
    for phrase in (*POSITIONS, *RELATIONS):
        words.update(phrase.split())
    return sorted(words)


def learn_bpe(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (base symbols, merges) such that every word becomes one token."""
    segmentations = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    base = sorted({s for seg in segmentations.values() for s in seg})
    merges: list[tuple[str, str]] = []
    while any(len(seg) > 1 for seg in segmentations.values()):
        pairs = Counter(p for seg in segmentations.values() for p in zip(seg, seg[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties alphabetically
        merges.append(best)
        for w, seg in segmentations.items():
            merged, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    merged.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segmentations[w] = merged
    return base, merges


def build_tokenizer() -> CLIPTokenizer:
    """The world tokenizer; special tokens come last, as in OpenAI's CLIP vocabulary."""
    base, merges = learn_bpe(grammar_words())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [","]
    symbols = sorted(set(base) | set(letters) | {c + "</w>" for c in letters})
    symbols += ["".join(m) for m in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_LENGTH,
    )
