"""A synthetic long-context task suite in the spirit of RULER (Hsieh et al., 2024), on real prose.

Families:

- ``needle``: one pass key (5 digits) hidden at a relative depth of the haystack.
- ``multikey``: four keyed 7-digit numbers at different depths; the asked key's needle sits
  at the requested depth, the other three values are the distractors.
- ``vartrack``: a chain ``VAR A = 12345. VAR B = VAR A. ...`` and two decoy chains spread
  through the haystack; which variables hold the asked value?
- ``cwe``: common-word extraction: a numbered list of words in which three words occur
  far more often than the rest; which are they?

The haystack is real prose (``corpus.TokenHaystack``); facts are inserted at sentence
boundaries. Every item is built in token space, so ``len(item.prompt_ids)`` equals the
requested length exactly (``cwe``: up to one list entry short). Items are deterministic
in (seed, family, length, index) and independent of the order they are built in.

Scoring needs no tokenizer: each item carries its candidate answers as token ids, all of
one length within an item (digits, one-token words, names of equal token count), so a
summed log-probability favours no candidate for being short. The
primary scorer ranks the candidates by a ``LogprobsFn`` (one call per item: the summed
log-probability of each candidate continuation); the score is precision at k, k the
number of right answers, ties ranked against the item. DATA.md explains why: small
models often know the key but answer it in words. ``generate_fn`` (greedy ids) is the
fallback, scored like RULER's string match: the share of right answers that appear.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvdrive.errors import KvdriveError
from kvdrive.eval.corpus import TokenHaystack, Tokenizer

FAMILIES = ("needle", "multikey", "vartrack", "cwe")
DEPTH_FAMILIES = ("needle", "multikey")  # families whose asked fact sits at a chosen depth
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_DIGITS = 5
VALUE_DIGITS = 7
VAR_VALUE_DIGITS = 5
NEEDLE_DISTRACTORS = 3
MULTIKEY_KEYS = 4
CHAIN_VARS = 4  # a value and three hops
DECOY_CHAINS = 2
VAR_NAME_CHARS = 5
CWE_COMMON = 3  # words to find
CWE_COMMON_COUNT = 30  # occurrences of each common word (RULER), capped at half the list
CWE_UNCOMMON_COUNT = 3  # occurrences of each other word, raised when the vocabulary runs short
CWE_DISTRACTORS = 5
MIN_HAYSTACK = 64  # tokens of prose at least
GENERATION_SLACK = 4  # tokens per answer allowed beyond its own length, for separators

LogprobsFn = Callable[[Sequence[int], Sequence[Sequence[int]]], Sequence[float]]
"""(prompt_ids, continuations) -> summed log-probability of each continuation after the prompt."""
GenerateFn = Callable[[Sequence[int], int], Sequence[int]]
"""(prompt_ids, max_new_tokens) -> greedily generated token ids."""

Ids = tuple[int, ...]


@dataclass(frozen=True)
class SuiteSpec:
    length: int  # tokens per prompt
    families: tuple[str, ...] = FAMILIES
    items: int = len(DEPTHS)  # per family; needle depths cycle through ``depths``
    depths: tuple[float, ...] = DEPTHS
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise KvdriveError(f"unknown task families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
        if self.items < 1:
            raise KvdriveError("items per task family must be at least 1")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise KvdriveError("needle depths are fractions of the haystack, in [0, 1]")


@dataclass(frozen=True)
class Item:
    """One task instance. The model reads ``prompt_ids`` = ``context_ids + question_ids``
    (a harness may prefill the context and decode the question under the setting under
    test); a candidate continuation follows the question directly."""

    family: str
    index: int
    context_ids: Ids
    question_ids: Ids  # the question and the start of the answer ("... is:")
    answers: tuple[str, ...]  # all right (k of them)
    distractors: tuple[str, ...]
    answer_ids: tuple[Ids, ...]  # " " + answer, as it follows the question
    distractor_ids: tuple[Ids, ...]
    bare_answer_ids: tuple[Ids, ...]  # the answer alone, for matching generated text
    depth: float | None  # requested relative depth of the asked fact (DEPTH_FAMILIES)
    haystack: tuple[int, int]  # [start, end) of prose + facts (or the word list) in context_ids
    spans: tuple[tuple[int, int], ...]  # [start, end) of each inserted fact in context_ids, the asked one first

    @property
    def prompt_ids(self) -> Ids:
        return self.context_ids + self.question_ids

    @property
    def candidates(self) -> list[list[int]]:
        """Every candidate continuation, the right answers first."""
        return [list(c) for c in self.answer_ids + self.distractor_ids]

    @property
    def k(self) -> int:
        return len(self.answers)

    @property
    def chance(self) -> float:
        """Expected score of a random ranking (precision at k)."""
        return self.k / (self.k + len(self.distractors))

    @property
    def max_new_tokens(self) -> int:
        return sum(len(a) + GENERATION_SLACK for a in self.answer_ids)


def _numbers(rng: random.Random, digits: int, count: int) -> list[str]:
    """``count`` distinct numbers of exactly ``digits`` digits."""
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), count)]


def _nearest(bounds: list[int], target: float) -> int:
    return min(bounds, key=lambda b: (abs(b - target), b))


def _insert(hay: list[int], positions: list[int], pieces: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert ``pieces[j]`` before ``hay[positions[j]]``; pieces at one position keep their order."""
    out: list[int] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    prev = 0
    for j in sorted(range(len(pieces)), key=lambda j: (positions[j], j)):
        out += hay[prev : positions[j]]
        prev = positions[j]
        spans[j] = (len(out), len(out) + len(pieces[j]))
        out += pieces[j]
    return out + hay[prev:], spans


class _Builder:
    """Builds items for one tokenizer and text; shares the haystack's memoized state."""

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.hay = TokenHaystack(tokenizer, text)
        self.bos = list(tokenizer.encode("", add_special_tokens=True))  # [] or [bos]
        self.enc = self.hay.encode

    def item(self, family: str, length: int, index: int, depth: float | None, seed: int) -> Item:
        rng = random.Random(f"kvdrive-tasks/{seed}/{family}/{length}/{index}")
        return getattr(self, f"_{family}")(length, index, depth, rng)

    def _finish(self, family, index, head, body, question, answers, distractors, depth, spans) -> Item:
        def ids(words: list[str], prefix: str) -> tuple[Ids, ...]:
            return tuple(tuple(self.enc(prefix + w)) for w in words)

        return Item(family=family, index=index, context_ids=tuple(head + body), question_ids=tuple(question),
                    answers=tuple(answers), distractors=tuple(distractors), answer_ids=ids(answers, " "),
                    distractor_ids=ids(distractors, " "), bare_answer_ids=ids(answers, ""), depth=depth,
                    haystack=(len(head), len(head) + len(body)),
                    spans=tuple((len(head) + a, len(head) + b) for a, b in spans))

    def _prose(self, family, index, length, instruction, facts, question, answers, distractors, depth, rng) -> Item:
        """``facts``: (relative depth, sentence) pairs, the asked one first."""
        head, q = self.bos + self.enc(instruction), self.enc(question)
        pieces = [self.enc(" " + sentence) for _, sentence in facts]
        n = length - len(head) - len(q) - sum(map(len, pieces))
        if n < MIN_HAYSTACK:
            raise KvdriveError(f"{length} tokens is too short for a {family} item: raise the length by "
                               f"{MIN_HAYSTACK - n} or more")
        hay = self.hay.sample(n, rng)
        bounds = self.hay.boundaries(hay)
        body, spans = _insert(hay, [_nearest(bounds, d * n) for d, _ in facts], pieces)
        return self._finish(family, index, head, body, q, answers, distractors, depth, spans)

    def _needle(self, length, index, depth, rng) -> Item:
        key, *others = _numbers(rng, PASSKEY_DIGITS, 1 + NEEDLE_DISTRACTORS)
        return self._prose(
            "needle", index, length,
            "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.\n\n",
            [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
            "\n\nWhat is the pass key? The pass key is", [key], others, depth, rng)

    def _multikey(self, length, index, depth, rng) -> Item:
        keys = rng.sample(self.hay.vocabulary, MULTIKEY_KEYS)
        values = _numbers(rng, VALUE_DIGITS, MULTIKEY_KEYS)
        depths = [depth] + [rng.random() for _ in keys[1:]]
        facts = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        asked = f"special magic number for {keys[0]} mentioned in the provided text"
        return self._prose(
            "multikey", index, length,
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n",
            facts, f"\n\nWhat is the {asked}? The {asked} is", values[:1], values[1:], depth, rng)

    def _vartrack(self, length, index, depth, rng) -> Item:
        n_chains = 1 + DECOY_CHAINS
        names: list[str] = []
        width = None  # tokens per name: all equal, so no candidate is favoured for being short
        while len(names) < CHAIN_VARS * n_chains:
            name = "".join(rng.choices(string.ascii_uppercase, k=VAR_NAME_CHARS))
            width = width or len(self.enc(" " + name))
            if name not in names and len(self.enc(" " + name)) == width:
                names.append(name)
        chains = [names[c * CHAIN_VARS : (c + 1) * CHAIN_VARS] for c in range(n_chains)]
        values = _numbers(rng, VAR_VALUE_DIGITS, n_chains)
        facts = []
        for chain, value in zip(chains, values):
            statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
            facts += zip(sorted(rng.random() for _ in statements), statements)
        return self._prose(
            "vartrack", index, length,
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n", facts,
            f"\n\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, {CHAIN_VARS} variables "
            f"are assigned the value {values[0]}, they are:",
            chains[0], [n for c in chains[1:] for n in c], None, rng)

    def _cwe(self, length, index, depth, rng) -> Item:
        head = self.bos + self.enc("Below is a numbered list of words. In these words, some appear more often "
                                   "than others. Memorize the ones that appear most often.\n")
        q = self.enc(f"\n\nQuestion: What are the {CWE_COMMON} most common words in the above list? Answer: "
                     f"The top {CWE_COMMON} words that appear most often in the list are:")
        budget, used, numbers = length - len(head) - len(q), 0, []
        while True:  # every vocabulary word is one token, so an entry is its number's tokens + 1
            ids = self.enc(f"\n{len(numbers) + 1}.")
            if used + len(ids) + 1 > budget:
                break
            numbers.append(ids)
            used += len(ids) + 1
        pool = list(self.hay.vocabulary)
        common = rng.sample(pool, CWE_COMMON)
        per_common = min(CWE_COMMON_COUNT, len(numbers) // (2 * CWE_COMMON))
        others = sorted(set(pool) - set(common))
        rest = len(numbers) - per_common * CWE_COMMON
        per_other = max(CWE_UNCOMMON_COUNT, math.ceil(rest / max(len(others), 1)))
        if per_other >= per_common or len(others) < CWE_DISTRACTORS:
            raise KvdriveError(f"cannot build a common-word list of {length} tokens from this text's "
                               f"{len(pool)} one-token words: use a longer text source or a different length")
        uncommon = rng.sample(others, math.ceil(rest / per_other))
        words = common * per_common + (uncommon * per_other)[:rest]
        rng.shuffle(words)
        body = [t for ids, w in zip(numbers, words) for t in ids + self.enc(" " + w)]
        return self._finish("cwe", index, head, body, q, common, rng.sample(uncommon, CWE_DISTRACTORS), None, [])


def make_suite(tokenizer: Tokenizer, text: str, spec: SuiteSpec) -> list[Item]:
    """``spec.items`` items of each family, each prompt ``spec.length`` tokens of ``tokenizer``."""
    builder = _Builder(tokenizer, text)
    return [builder.item(fam, spec.length, i, spec.depths[i % len(spec.depths)] if fam in DEPTH_FAMILIES else None,
                         spec.seed)
            for fam in spec.families for i in range(spec.items)]


def rank_score(item: Item, logprobs: Sequence[float]) -> float:
    """Precision at k of the candidates ranked by ``logprobs`` (in ``item.candidates`` order).
    A tie ranks the distractor first and NaN ranks last, so a scorer that cannot tell the
    answers from the distractors scores 0, never chance."""
    n = len(item.answer_ids) + len(item.distractor_ids)
    if len(logprobs) != n:
        raise ValueError(f"expected {n} log-probabilities (one per candidate), got {len(logprobs)}")
    lp = [-math.inf if math.isnan(x) else float(x) for x in logprobs]
    order = sorted(range(n), key=lambda j: (-lp[j], j < item.k))
    return sum(j < item.k for j in order[: item.k]) / item.k


def _contains(seq: Sequence[int], part: Sequence[int]) -> bool:
    m = len(part)
    return m > 0 and any(tuple(seq[i : i + m]) == tuple(part) for i in range(len(seq) - m + 1))


def generation_score(item: Item, generated: Sequence[int]) -> float:
    """Share of the right answers whose tokens appear in ``generated`` (RULER's string match)."""
    found = sum(_contains(generated, a) or _contains(generated, b) for a, b in zip(item.answer_ids, item.bare_answer_ids))
    return found / item.k


def score_item(item: Item, logprobs_fn: LogprobsFn | None = None, generate_fn: GenerateFn | None = None) -> float:
    """Score in [0, 1]: ranked by ``logprobs_fn`` when given (one call), else by ``generate_fn``."""
    if logprobs_fn is not None:
        return rank_score(item, logprobs_fn(item.prompt_ids, item.candidates))
    if generate_fn is not None:
        return generation_score(item, generate_fn(item.prompt_ids, item.max_new_tokens))
    raise ValueError("score_item needs logprobs_fn or generate_fn")
