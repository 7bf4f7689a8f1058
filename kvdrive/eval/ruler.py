"""A synthetic long-context task suite in the spirit of RULER, built from real prose.

Families: ``needle`` (one pass key at depths 0..1), ``multikey`` (several keyed numbers,
asked for one: the others are the distractors), ``vartrack`` (chains of variable
assignments, asked for the value a chain ends with), ``cwe`` (common-word extraction
from a long word list). Every item is scored by which candidate answer the model finds
most likely (DATA.md: small models often know the key but answer in words), so items
carry the right answer first, then distractors of the same form. Deterministic per seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
WORDS = ("apple", "river", "candle", "violet", "harbor", "meadow", "lantern", "copper", "falcon", "orchid",
         "saddle", "thimble", "quarry", "walnut", "beacon", "glacier")


@dataclass(frozen=True)
class Item:
    family: str
    context_ids: list[int]  # prefilled exactly
    question_ids: list[int]  # decoded under the sparse setting
    candidates: list[list[int]]  # right answer first
    depth: float | None = None


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _hay(hay_ids: list[int], n: int, rng: random.Random) -> list[int]:
    start = rng.randrange(0, len(hay_ids) - n)
    return hay_ids[start : start + n]


def _insert(hay: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    """Insert token pieces at relative depths of ``hay`` (later depths first, so indices hold)."""
    out = list(hay)
    for depth, piece in sorted(pieces, key=lambda p: -p[0]):
        pos = round(depth * len(hay))
        out[pos:pos] = piece
    return out


def _needle(tok, hay_ids, length, rng, depth):
    key, others = _number(rng), [_number(rng) for _ in range(3)]
    needle = _ids(tok, f"\nThe special magic number is: {key}.\n")
    question = _ids(tok, "\nWhat is the special magic number mentioned in the text above? The special magic number is:")
    ctx = _insert(_hay(hay_ids, length - len(needle) - len(question), rng), [(depth, needle)])
    return Item("needle", ctx, question, [_ids(tok, f" {n}") for n in [key] + others], depth)


def _multikey(tok, hay_ids, length, rng, depth):
    words = rng.sample(WORDS, 4)
    nums = [_number(rng) for _ in words]
    needles = [_ids(tok, f"\nThe special magic number for {w} is: {n}.\n") for w, n in zip(words, nums)]
    question = _ids(tok, f"\nWhat is the special magic number for {words[0]} mentioned in the text above? "
                         f"The special magic number for {words[0]} is:")
    budget = length - sum(map(len, needles)) - len(question)
    spots = [depth] + [rng.random() for _ in needles[1:]]
    ctx = _insert(_hay(hay_ids, budget, rng), list(zip(spots, needles)))
    return Item("multikey", ctx, question, [_ids(tok, f" {n}") for n in nums], depth)


def _vartrack(tok, hay_ids, length, rng, depth, hops: int = 3):
    names = rng.sample([f"{a}{b}" for a in "QWXZ" for b in "KJVP"], 4 * (hops + 1))
    values = [str(rng.randrange(10_000, 100_000)) for _ in range(4)]
    pieces = []
    for c, value in enumerate(values):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        at = sorted(rng.random() for _ in statements)
        pieces += [(d, _ids(tok, f"\n{s}\n")) for d, s in zip(at, statements)]
        if c == 0:
            last = chain[-1]
    question = _ids(tok, f"\nFollow the assignments above. The value of VAR {last} is:")
    ctx = _insert(_hay(hay_ids, length - sum(len(p) for _, p in pieces) - len(question), rng), pieces)
    return Item("vartrack", ctx, question, [_ids(tok, f" {v}") for v in values], None)


def _cwe(tok, hay_ids, length, rng, depth):
    words = rng.sample(WORDS, 8)
    question = _ids(tok, "\nWhich word appears most often in the list above? Answer: the word")
    weights = [6, 3, 3, 3, 2, 2, 2, 2]  # the first word is twice as frequent as any other
    lines, n = [], 0
    while True:
        word = rng.choices(words, weights)[0]
        piece = _ids(tok, f"{len(lines) + 1}. {word}\n")
        if n + len(piece) + len(question) + 8 > length:
            break
        lines.append(piece)
        n += len(piece)
    counts = {w: sum(1 for line in lines if tok.decode(line).strip().endswith(w)) for w in words}
    ranked = sorted(words, key=lambda w: -counts[w])
    head = _ids(tok, "Below is a numbered list of words.\n")
    ctx = head + [t for line in lines for t in line]
    return Item("cwe", ctx, question, [_ids(tok, f" {w}") for w in [ranked[0]] + ranked[1:4]], None)


FAMILIES = {"needle": _needle, "multikey": _multikey, "vartrack": _vartrack, "cwe": _cwe}


def make_suite(tok, text: str, length: int, families, items: int, seed: int = 0) -> list[Item]:
    """``items`` items of each family whose context + question fill ``length`` tokens."""
    rng = random.Random(f"{seed}:{length}")
    hay_ids = _ids(tok, text)
    suite = []
    for fam in families:
        for i in range(items):
            suite.append(FAMILIES[fam](tok, hay_ids, length, rng, DEPTHS[i % len(DEPTHS)]))
    return suite
