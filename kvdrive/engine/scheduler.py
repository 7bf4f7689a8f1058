"""The scheduler: which requests wait, which one is being prefilled, which decode, and how
many prompt tokens a step may prefill.

Three queues, every request in at most one of them:

* ``waiting``: submitted, nothing in the cache yet (FCFS);
* ``prefilling``: admitted (the cache holds its sequence), its prompt entering the cache
  chunk by chunk across steps; at most one at a time, so a long prompt's chunks never
  interleave with another prompt's (the disk tier's arena holds one prompt being prefilled);
* ``running``: prompt in the cache, one token per step.

Admission: the head of ``waiting`` is admitted when fewer than ``max_batch`` sequences are
admitted and the cache can take it now (a free sequence slot; for the paged cache, free pages
for its prompt + max_tokens too), never past what the cache holds (a request that could never
fit is refused when it is submitted); the head waits, FCFS, until finished ones free room. The step budget: every running
sequence decodes one token, and prefill takes what is left of ``step_tokens``, at least
``PREFILL_FLOOR`` (a batch as large as the budget still lets prompts in), at most
``prefill_chunk`` tokens per forward. With a ``chunk_cost`` (the engine's:
``kvdrive.models.flops.ChunkCost``) a chunk spends its work in tokens of a prompt's start, not
its length: a chunk deep in a long prompt attends to its whole prefix, so it is shorter, and
every step does about the same work however far the prompt has got (running streams keep
a flat inter-token latency); a chunk is never shorter than ``MIN_CHUNK`` tokens, so a prompt
always moves. ``step_tokens=None``: no budget, every admissible prompt is prefilled whole in
one step.

Plain Python: no torch, O(1) per operation except ``remove`` of a waiting request (O(n)).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvdrive.engine.request import Request
from kvdrive.errors import KvdriveError

PREFILL_FLOOR = 64  # prefill work (tokens of a prompt's start) a step may do however many sequences decode
MIN_CHUNK = 16  # prompt tokens a chunk under a budget holds at least, whatever they cost


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        step_tokens: int | None,
        prefill_chunk: int,
        chunk_cost: Callable[[int, int], float] | None = None,
    ):
        """``chunk_cost(prefix, n)``: the work of prefilling ``n`` tokens after ``prefix`` in
        budget units, with a ``fit(prefix, most, budget)`` method (None: a chunk costs its length)."""
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise KvdriveError(f"{name} must be an integer >= 1, got {value!r}")
        if step_tokens is not None and (not isinstance(step_tokens, int) or step_tokens < 1):
            raise KvdriveError(f"step_tokens must be an integer >= 1 or None (no budget), got {step_tokens!r}")
        self.max_batch, self.step_tokens, self.prefill_chunk = max_batch, step_tokens, prefill_chunk
        self.chunk_cost = chunk_cost
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []

    @property
    def num_admitted(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def prefill_quota(self) -> float | None:
        """Prefill work this step may do, given that every running sequence decodes (None: no bound)."""
        if self.step_tokens is None:
            return None
        return max(self.step_tokens - len(self.running), PREFILL_FLOOR)

    def next_prefill(self, fits: Callable[[Request], bool]) -> tuple[Request | None, bool]:
        """The request to prefill next and whether it is newly admitted (the caller registers it
        in the cache); (None, False) when none is being prefilled and none may be admitted.
        ``fits(req)``: whether the cache can register ``req`` now."""
        if self.prefilling is not None:
            return self.prefilling, False
        if self.waiting and self.num_admitted < self.max_batch and fits(self.waiting[0]):
            self.prefilling = self.waiting.popleft()
            return self.prefilling, True
        return None, False

    def chunk(self, req: Request, quota: float | None, first: bool = True) -> int:
        """Tokens of ``req``'s prompt the next prefill forward computes within ``quota`` (0: none
        fits); the step's ``first`` chunk holds at least ``MIN_CHUNK`` tokens (or the rest of
        the prompt) whatever they cost."""
        n = min(self.prefill_chunk, len(req.prompt_ids) - req.prefilled)
        if quota is None:
            return n
        fit = min(n, int(quota)) if self.chunk_cost is None else self.chunk_cost.fit(req.prefilled, n, quota)
        return max(fit, min(n, MIN_CHUNK)) if first else max(fit, 0)

    def cost(self, prefix: int, n: int) -> float:
        """What a chunk of ``n`` tokens after ``prefix`` takes from a step's quota."""
        return n if self.chunk_cost is None else self.chunk_cost(prefix, n)

    def prefilled(self, req: Request) -> None:
        """``req``'s prompt is all in the cache and its first token sampled: it decodes from now on
        (unless that token finished it)."""
        assert req is self.prefilling
        self.prefilling = None
        if req.finish_reason is None:
            self.running.append(req)

    def finished(self, done: list[Request]) -> None:
        """Drop the running requests that finished this step."""
        if done:
            gone = {id(r) for r in done}
            self.running = [r for r in self.running if id(r) not in gone]

    def remove(self, seq_id: int) -> tuple[Request | None, bool]:
        """Take ``seq_id`` out of whichever queue holds it: (the request, whether the cache holds
        its sequence); (None, False) if it is not here (finished, or never added)."""
        if self.prefilling is not None and self.prefilling.seq_id == seq_id:
            req, self.prefilling = self.prefilling, None
            return req, True
        for i, req in enumerate(self.running):
            if req.seq_id == seq_id:
                del self.running[i]
                return req, True
        for req in self.waiting:
            if req.seq_id == seq_id:
                self.waiting.remove(req)
                return req, False
        return None, False
