"""The requests of ``kvdrive bench serve``: what is asked, and when it arrives.

* ``shared_prefix``: several long documents, several questions about each (document QA,
  multi-turn chat over one context); a request is its document followed by one question.
  The first request of a document is cold; later ones may find its prefix stored.
* ``random``: independent prompts with nothing in common.

Prompts are text cut from the evaluation corpus (the shipped Persuasion excerpt) for models
with a tokenizer, or token ids for random-weight models. A run's ``nonce`` opens every
prompt, so nothing a server stored in an earlier run can hit. Arrivals are a Poisson
process (``arrivals``): an open loop, requests are sent on schedule whether or not the
earlier ones have finished.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CHARS_PER_TOKEN = 4  # prose characters per token, to cut a text of about n tokens
TOKEN_RANGE = (1000, 30000)  # token ids of token prompts: inside every supported vocabulary
QUESTIONS = (
    "Who is the first person named in the document above?",
    "Summarise the document above in one sentence.",
    "What place is mentioned most often above?",
    "Which family does the text above talk about?",
    "What is the mood of the passage above?",
    "Name two characters who appear above.",
    "What happens at the very end of the passage above?",
    "Is anyone in the document above in debt?",
)


@dataclass(frozen=True)
class Item:
    prompt: str | list[int]
    group: str  # the document a shared-prefix request asks about ("" for independent prompts)
    first: bool  # the first request of its document
    max_tokens: int


class Prompts:
    """Text windows of the corpus, or token ids, of about a given number of tokens."""

    def __init__(self, tokens: bool, seed: int, nonce: str):
        self.tokens, self.rng, self.nonce = tokens, random.Random(seed), nonce
        if not tokens:
            from kvdrive.eval.corpus import load_text, unwrap

            self.text = unwrap(load_text("persuasion-excerpt").text)

    def body(self, n: int, label: str) -> str | list[int]:
        """About ``n`` tokens opening with ``label`` and the run's nonce."""
        if self.tokens:
            own = random.Random(f"{self.nonce}/{label}")  # a str seed is hashed the same in every process
            head = [own.randrange(*TOKEN_RANGE) for _ in range(8)]
            return head + [self.rng.randrange(*TOKEN_RANGE) for _ in range(max(0, n - len(head)))]
        chars = n * CHARS_PER_TOKEN
        start = self.rng.randrange(0, max(1, len(self.text) - chars))
        window = (self.text * (1 + chars // len(self.text) + 1))[start : start + chars]
        return f"[{label} {self.nonce}]\n{window}"

    def question(self, i: int) -> str | list[int]:
        if self.tokens:
            return [self.rng.randrange(*TOKEN_RANGE) for _ in range(16)]
        return "\n\nQuestion: " + QUESTIONS[i % len(QUESTIONS)] + "\nAnswer:"


def shared_prefix(
    docs: int, questions: int, doc_tokens: int, max_tokens: int, prompts: Prompts, seed: int
) -> list[Item]:
    """``docs`` x ``questions`` requests in a seeded shuffle (a document's questions spread over the run)."""
    bodies = [prompts.body(doc_tokens, f"document {d}") for d in range(docs)]
    pairs = [(d, q) for d in range(docs) for q in range(questions)]
    random.Random(seed).shuffle(pairs)
    seen, items = set(), []
    for d, q in pairs:
        items.append(Item(bodies[d] + prompts.question(q), f"doc{d}", d not in seen, max_tokens))
        seen.add(d)
    return items


def independent(n: int, prompt_tokens: int, max_tokens: int, prompts: Prompts) -> list[Item]:
    return [Item(prompts.body(prompt_tokens, f"prompt {i}"), "", True, max_tokens) for i in range(n)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests arriving at ``rate`` per second (Poisson)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
