"""The online engine: ``add_request`` / ``abort`` / ``step`` over one KV cache.

One ``step``: every running sequence decodes one token in one batched forward (a captured
CUDA graph where the cache allows), then prompts are prefilled in chunks under the step's
token budget (``Scheduler``): a long prompt enters the cache across many steps while the
running streams keep decoding. A request is admitted (its sequence registered in the
cache, its stored prefix loaded from the prefix pool) when the cache can take it now
(``KVCache.can_add``: a free slot, and free pages for the paged cache); a
request that finishes, or is aborted, frees its KV at once. ``LLM`` and the server run
on this same engine.

Not thread-safe: one thread owns an ``Engine`` (``AsyncEngine`` runs it on its own).
With ``isolate_errors``, a failure of one request's admission or prefill that the user can fix
(``KvdriveError``) ends that request with ``finish_reason="error"`` and the others go on (the
server); otherwise, and for anything else, the exception propagates.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvdrive import env
from kvdrive.cache.base import KVCache, TierBytes
from kvdrive.engine.micro_batch import MicroBatchedDecode
from kvdrive.engine.request import Detokenizer, Request, TokenEvent, accept_token, end_event
from kvdrive.engine.sampling import sample
from kvdrive.engine.scheduler import Scheduler
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.models.flops import ChunkCost

PREFILL_CHUNK = 2048  # tokens per prefill forward (8192 measured no faster on an H100: docs/bench.md)


@dataclass
class EngineCounters:
    """Totals since the engine was built (monotonic)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    computed_prompt_tokens: int = 0  # of those, prefilled by the model (the rest came from the prefix pool)
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix pool
    prefix_hits: int = 0  # prompt tokens loaded from it
    steps: int = 0
    graph_captures: int = 0  # CUDA-graph captures of the decode step (a new batch, or a grown span)
    graph_capture_seconds: float = 0.0  # their wall time, warm-up included: the engine stalls meanwhile
    finished: Counter = field(default_factory=Counter)  # finish reason -> requests


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine holds and has done, read between steps (for metrics)."""

    running: int
    waiting: int
    prefilling: int
    kv_tokens: int  # tokens committed in the cache
    kv_capacity_tokens: int  # tokens the cache holds, all sequences together
    tiers: dict[str, TierBytes]
    cache_stats: dict  # ``KVCache.stats()``
    prefix_stats: object | None  # ``PrefixStats`` with a prefix pool
    counters: EngineCounters
    device_memory: int | None  # bytes torch has allocated on a CUDA device (None elsewhere)
    device_reserved: int | None = None  # bytes torch's caching allocator holds on it


class Engine:
    def __init__(
        self,
        model,
        cache: KVCache,
        eos_ids: tuple[int, ...],
        tokenizer,
        *,
        prefix=None,
        max_batch: int | None = None,
        step_tokens: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        cuda_graphs: bool = True,
        on_prefill: Callable[[int], None] | None = None,
        isolate_errors: bool = False,
    ):
        """``prefix``: a ``PrefixPool`` (``load``/``store`` with a ``tenant``), or None.
        ``max_batch``: sequences admitted at once (default and cap: the cache's ``max_seqs``).
        ``step_tokens``: work a step may do, decode and prefill together, in tokens of a prompt's
        start (a decode token counts one, a prefill chunk its FLOPs over one token's:
        ``kvdrive.models.flops.ChunkCost``); None: no budget, every admissible prompt prefilled
        whole in the step it is admitted. ``cuda_graphs``:
        replay a captured decode step on CUDA when the cache supports it (captured again when
        the batch changes). ``on_prefill(n)``: called after each prefill chunk of ``n`` tokens."""
        self.model, self.cache, self.eos_ids, self.prefix = model, cache, eos_ids, prefix
        self.sched = Scheduler(
            min(max_batch or cache.max_seqs, cache.max_seqs), step_tokens, prefill_chunk, ChunkCost(model.config)
        )
        self.detok = Detokenizer(tokenizer)
        self.use_graphs = cuda_graphs and model.device.type == "cuda" and cache.supports_cuda_graphs
        self._graph = None
        self.padded_graphs = self.use_graphs and cache.supports_padded_graphs and env.padded_graphs_enabled()
        self._decode_step = MicroBatchedDecode(model, cache)
        self.on_prefill, self.isolate_errors = on_prefill, isolate_errors
        self.counters = EngineCounters()

    # -- requests ----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue ``req``; refused now (``KvdriveError``) if the cache could never hold it."""
        if not req.prompt_ids:
            raise KvdriveError("empty prompt: give at least one token")
        if req.finish_reason is not None or req.prefilled or req.output_ids:
            raise KvdriveError(f"request {req.seq_id} has already run: make a new one")
        if req.total_tokens > min(self.cache.max_len, self.cache.token_capacity):
            raise CapacityError(
                f"request {req.seq_id} needs {req.total_tokens} tokens (prompt + max_tokens), the "
                f"cache holds {self.cache.max_len} per sequence and {self.cache.token_capacity} in all: "
                "lower max_tokens or shorten the prompt"
            )
        self.sched.add(req)

    def abort(self, seq_id: int, reason: str = "abort", error: str | None = None) -> Request | None:
        """Stop ``seq_id`` wherever it is and free its KV now, finished with ``reason`` ("abort" or
        "error"); returns it (None: not here)."""
        req, held = self.sched.remove(seq_id)
        if req is None:
            return None
        if held:
            self.cache.free(seq_id)
        end_event(req, reason, error)
        self.counters.finished[reason] += 1
        return req

    def has_unfinished(self) -> bool:
        return self.sched.has_work()

    @property
    def num_running(self) -> int:
        return len(self.sched.running)

    @property
    def num_waiting(self) -> int:
        return len(self.sched.waiting)

    # -- one step ----------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Decode every running sequence once, then prefill under the step's budget. Returns the
        step's events: a token per decoded sequence, the first token of each prompt completed,
        an error event per request that failed."""
        events = self._decode() if self.sched.running else []
        quota, first = self.sched.prefill_quota(), True
        while quota is None or quota > 0:
            req, new = self.sched.next_prefill(self._fits)
            if req is None:
                break
            try:
                if new:
                    self._admit(req)
                begin = req.prefilled
                n = self.sched.chunk(req, quota, first)
                if n == 0:  # the rest of the quota buys no token of this prompt
                    break
                first = False
                logits = self._prefill_chunk(req, n)
                if req.prefilled == len(req.prompt_ids):
                    events.append(self._first_token(req, logits))
            except KvdriveError as err:
                if not self.isolate_errors:
                    raise
                self.sched.remove(req.seq_id)
                if req.seq_id in self.cache.seqs:
                    self.cache.free(req.seq_id)
                events.append(end_event(req, "error", str(err)))
                self.counters.finished["error"] += 1
                continue
            if quota is not None:
                quota -= self.sched.cost(begin, n)
        self.counters.steps += 1
        return events

    def _fits(self, req: Request) -> bool:
        return self.cache.can_add(req.total_tokens)

    def _admit(self, req: Request) -> None:
        """Register ``req``'s sequence and load its longest stored prefix from the prefix pool."""
        self.cache.add(req.seq_id, req.total_tokens, prompt_tokens=len(req.prompt_ids))
        self.counters.prompt_tokens += len(req.prompt_ids)
        if self.prefix is not None and req.use_prefix:
            done = self.prefix.load(self.model, self.cache, req.seq_id, req.prompt_ids, tenant=req.tenant)
            req.prefilled = req.cached_tokens = done
            self.counters.prefix_queries += len(req.prompt_ids)
            self.counters.prefix_hits += done
            if self.on_prefill is not None and done:
                self.on_prefill(done)

    def _prefill_chunk(self, req: Request, n: int) -> torch.Tensor:
        """The next ``n`` prompt tokens of ``req`` through the model: logits (1, V) of the last."""
        begin = req.prefilled
        piece = torch.tensor(req.prompt_ids[begin : begin + n], device=self.model.device)[None]  # (1, T)
        batch = self.cache.plan([req.seq_id], n)
        logits = self.model(piece, self.cache, batch)
        self.cache.commit(batch)
        req.prefilled += n
        self.counters.computed_prompt_tokens += n
        if self.on_prefill is not None:
            self.on_prefill(n)
        return logits

    def _first_token(self, req: Request, logits: torch.Tensor) -> TokenEvent:
        """The prompt is in the cache: store its new chunks in the prefix pool, place its KV, and
        sample its first token from the last prompt token's logits."""
        if self.prefix is not None and req.use_prefix:
            self.prefix.store(self.cache, req.seq_id, req.prompt_ids, tenant=req.tenant)
        self.cache.place([req.seq_id])  # the tiered cache: initial placement by the prompt's attention
        token = sample(logits, [req.params], [req.generator])[0]
        event = self._accept(req, token)
        self.sched.prefilled(req)
        return event

    def _captured(self, seconds: float) -> None:
        self.counters.graph_captures += 1
        self.counters.graph_capture_seconds += seconds

    def _padded_decode(self, seq_ids: list[int], ids: torch.Tensor) -> torch.Tensor | None:
        """Logits of a step under the kept graph of its padded size; None once a capture failed
        (one graph per batch takes over, after a warning that names the cause)."""
        from kvdrive.engine.cuda_graph import GraphCaptureError, PaddedDecodeGraphs

        if self._graph is None:
            self._graph = PaddedDecodeGraphs(self.model, self.cache, self.sched.max_batch, self._captured)
        try:
            return self._graph(seq_ids, ids)
        except GraphCaptureError as err:
            warnings.warn(f"{err}; decoding with one CUDA graph per batch from now on", stacklevel=2)
            self.padded_graphs, self._graph = False, None
            return None

    def _decode(self) -> list[TokenEvent]:
        running = self.sched.running
        seq_ids = [r.seq_id for r in running]
        ids = torch.tensor([[r.output_ids[-1]] for r in running], device=self.model.device)  # (B, 1)
        logits = self._padded_decode(seq_ids, ids) if self.padded_graphs else None
        if logits is not None:
            self._graph.commit(seq_ids)
        elif self.use_graphs:
            if self._graph is None or not self._graph.matches(seq_ids):
                from kvdrive.engine.cuda_graph import GraphedDecodeStep

                self._graph = GraphedDecodeStep(self.model, self.cache, seq_ids, ids, on_capture=self._captured)
            logits = self._graph(ids)
            self._graph.commit()
        else:
            logits, batches = self._decode_step.forward(seq_ids, ids)
            for batch in batches:
                self.cache.commit(batch)
        tokens = sample(logits, [r.params for r in running], [r.generator for r in running])
        events = [self._accept(req, token) for req, token in zip(running, tokens)]
        self.sched.finished([r for r in running if r.finish_reason is not None])
        return events

    def _accept(self, req: Request, token: int) -> TokenEvent:
        """Take one sampled token; a request that finishes frees its KV at once."""
        before = len(req.output_ids)
        event = accept_token(req, token, self.eos_ids, self.detok)
        self.counters.generation_tokens += len(req.output_ids) - before  # an end-of-sequence token is not output
        if req.finish_reason is not None:
            self.cache.free(req.seq_id)
            self.counters.finished[req.finish_reason] += 1
        return event

    # -- reporting ---------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        """Queues, cache occupancy and counters now (the cache's ``stats`` may sync the device)."""
        c = self.cache
        return EngineSnapshot(
            running=len(self.sched.running),
            waiting=len(self.sched.waiting),
            prefilling=int(self.sched.prefilling is not None),
            kv_tokens=c.seqs.tokens(),
            kv_capacity_tokens=c.token_capacity,
            tiers=c.tier_bytes(),
            cache_stats=c.stats(),
            prefix_stats=self.prefix.stats() if self.prefix is not None else None,
            counters=EngineCounters(
                **{k: (Counter(v) if isinstance(v, Counter) else v) for k, v in vars(self.counters).items()}
            ),
            device_memory=torch.cuda.memory_allocated(c.device) if c.device.type == "cuda" else None,
            device_reserved=torch.cuda.memory_reserved(c.device) if c.device.type == "cuda" else None,
        )
