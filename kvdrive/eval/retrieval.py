"""The retrieval suite: facts hidden in real prose, asked for, scored by exact match of greedy output.

Families (RULER-style, Hsieh et al. 2024):

- ``passkey``: one 5-digit pass key, stated once at a relative depth of the haystack.
- ``multikey``: six keyed 7-digit numbers ("the special magic number for *word*"); the asked
  one sits at the item's depth, the other five at random depths.
- ``vartrack``: a chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ``VAR C = VAR B.`` (its first
  statement at the item's depth, the rest after it) and a decoy chain; asked for the value
  of the chain's last variable: a multi-hop lookup that aggregates three statements.

An item is right when the first run of digits in the greedy continuation is the answer
(``score``). Depths of one family spread evenly over ``DEPTH_RANGE``; items are
deterministic in (seed, family, length, index). Every prompt of a family and length has
the same token count and the same question length, so items batch without padding.
This module knows nothing about models.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from kvdrive.errors import KvdriveError
from kvdrive.eval.corpus import TokenHaystack, Tokenizer

FAMILIES = ("passkey", "multikey", "vartrack")
DEPTH_RANGE = (0.05, 0.95)
MULTIKEY_KEYS = 6
CHAIN_HOPS = 3  # variables in the asked chain
MIN_HAYSTACK = 64  # tokens of prose at least
ANSWER_SLACK = 3  # tokens decoded beyond the answer's own (a leading space, punctuation)
DIGITS = re.compile(r"\d+")
Ids = tuple[int, ...]


@dataclass(frozen=True)
class Item:
    """One question: ``context_ids`` (instruction + prose with the facts) then ``question_ids``
    (which end where the answer starts)."""

    family: str
    index: int
    depth: float  # relative depth of the asked fact in the haystack
    context_ids: Ids
    question_ids: Ids
    answer: str  # the digits to produce
    span: tuple[int, int]  # [start, end) of the asked fact in context_ids
    max_new_tokens: int

    @property
    def prompt_ids(self) -> Ids:
        return self.context_ids + self.question_ids


def depths(n: int) -> list[float]:
    """``n`` depths evenly over DEPTH_RANGE."""
    lo, hi = DEPTH_RANGE
    return [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]


def score(item: Item, text: str) -> bool:
    """Exact match: the first run of digits in the generated ``text`` is the answer."""
    m = DIGITS.search(text)
    return m is not None and m.group() == item.answer


class Builder:
    """Items for one tokenizer and one text (the haystack's memoized state is shared)."""

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.hay = TokenHaystack(tokenizer, text)
        self.bos = list(tokenizer.encode("", add_special_tokens=True))  # [] or [bos]
        self.enc = self.hay.encode
        self._name_width: int | None = None

    def build(self, family: str, length: int, n: int, seed: int = 0) -> list[Item]:
        if family not in FAMILIES:
            raise KvdriveError(f"unknown retrieval family {family!r}; choose from {', '.join(FAMILIES)}")
        return [
            getattr(self, f"_{family}")(length, i, d, random.Random(f"kvdrive-retrieval/{seed}/{family}/{length}/{i}"))
            for i, d in enumerate(depths(n))
        ]

    def _assemble(self, family, index, length, depth, instruction, facts, question, answer, rng) -> Item:
        """``facts``: (relative depth, sentence), the asked one first."""
        head, q = self.bos + self.enc(instruction), self.enc(question)
        pieces = [self.enc(" " + sentence) for _, sentence in facts]
        n = length - len(head) - len(q) - sum(map(len, pieces))
        if n < MIN_HAYSTACK:
            raise KvdriveError(
                f"{length} tokens is too short for a {family} item: raise the length by {MIN_HAYSTACK - n} or more"
            )
        hay = self.hay.sample(n, rng)
        bounds = self.hay.boundaries(hay)
        at = [min(bounds, key=lambda b, d=d: (abs(b - d * n), b)) for d, _ in facts]
        body: list[int] = []
        order = sorted(range(len(facts)), key=lambda j: (at[j], j))
        prev, where = 0, {}
        for j in order:
            body += hay[prev : at[j]]
            prev = at[j]
            where[j] = len(head) + len(body)
            body += pieces[j]
        body += hay[prev:]
        span = (where[0], where[0] + len(pieces[0]))
        answer_tokens = len(self.enc(" " + answer))
        return Item(family, index, depth, tuple(head + body), tuple(q), answer, span, answer_tokens + ANSWER_SLACK)

    def _passkey(self, length, index, depth, rng) -> Item:
        key = str(rng.randrange(10_000, 100_000))
        return self._assemble(
            "passkey",
            index,
            length,
            depth,
            "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.\n\n",
            [(depth, f"The pass key is {key}. Remember it.")],
            "\n\nWhat is the pass key? The pass key is",
            key,
            rng,
        )

    def _words(self, rng, k: int) -> list[str]:
        """``k`` distinct one-token words of the text (so every question has one length)."""
        words = self.hay.vocabulary
        if len(words) < k:
            raise KvdriveError(
                f"the tokenizer makes {len(words)} words of the text a single token, and an item needs {k}: "
                "it cuts words into pieces (a broken conversion?); check it with kvdrive generate, or run other --tasks"
            )
        return rng.sample(words, k)

    def _multikey(self, length, index, depth, rng) -> Item:
        keys = self._words(rng, MULTIKEY_KEYS)
        values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), MULTIKEY_KEYS)]
        where = [depth] + [rng.uniform(*DEPTH_RANGE) for _ in keys[1:]]
        asked = f"special magic number for {keys[0]} mentioned in the provided text"
        return self._assemble(
            "multikey",
            index,
            length,
            depth,
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n",
            [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(where, keys, values)],
            f"\n\nWhat is the {asked}? The {asked} is",
            values[0],
            rng,
        )

    def _names(self, rng, k: int) -> list[str]:
        """``k`` distinct 5-capital variable names of the tokenizer's most common token count, so
        every question of the family has one length."""
        if self._name_width is None:
            probe = random.Random("kvdrive-retrieval/names")
            widths = [len(self.enc(" " + "".join(probe.choices(string.ascii_uppercase, k=5)))) for _ in range(64)]
            self._name_width = max(set(widths), key=widths.count)
        names: list[str] = []
        while len(names) < k:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if len(self.enc(" " + name)) == self._name_width and name not in names:
                names.append(name)
        return names

    def _vartrack(self, length, index, depth, rng) -> Item:
        names = self._names(rng, 2 * CHAIN_HOPS)
        chain, decoy = names[:CHAIN_HOPS], names[CHAIN_HOPS:]
        value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
        facts = [(depth, f"VAR {chain[0]} = {value}.")]
        later = sorted(rng.uniform(depth, DEPTH_RANGE[1]) for _ in chain[1:])
        facts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(later, chain, chain[1:])]
        spots = sorted(rng.uniform(*DEPTH_RANGE) for _ in decoy)
        facts += [(spots[0], f"VAR {decoy[0]} = {other}.")]
        facts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(spots[1:], decoy, decoy[1:])]
        return self._assemble(
            "vartrack",
            index,
            length,
            depth,
            "Memorize and track the chain of variable assignments hidden in the following text.\n\n",
            facts,
            f"\n\nWhat is the value of VAR {chain[-1]}? Follow the chain of assignments. "
            f"The value of VAR {chain[-1]} is",
            value,
            rng,
        )


# -- statistics --------------------------------------------------------------------------------

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def paired_difference(ref: Sequence[bool], test: Sequence[bool], z: float = Z95) -> dict:
    """``test`` minus ``ref`` on the same items: lost (ref right, test wrong), won, and the
    difference in accuracy with a 95% interval (Newcombe's method 10 for paired proportions)."""
    if len(ref) != len(test) or not ref:
        raise ValueError("paired outcomes of the same, non-empty item list")
    n = len(ref)
    lost = sum(r and not t for r, t in zip(ref, test))
    won = sum(t and not r for r, t in zip(ref, test))
    a, b = sum(ref), sum(test)
    l1, u1 = wilson(b, n, z)
    l2, u2 = wilson(a, n, z)
    p1, p2 = b / n, a / n
    both = sum(r and t for r, t in zip(ref, test))
    neither = n - both - lost - won
    # correlation of the paired outcomes (phi), zero when a margin is degenerate
    den = (both + lost) * (won + neither) * (both + won) * (lost + neither)
    phi = (both * neither - lost * won) / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"lost": lost, "won": won, "difference": d, "interval": [max(-1.0, lo), min(1.0, hi)]}
