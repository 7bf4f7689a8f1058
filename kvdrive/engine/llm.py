"""``LLM``: the Python API, in the shape vLLM users know.

    from kvdrive import LLM, SamplingParams
    with LLM() as llm:                            # embedded SmolLM2-135M-Instruct
        outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
        for piece in llm.stream("Tell me a story"): print(piece, end="")

An ``LLM`` owns one KV cache, built at the first request and kept (rebuilt larger only
when a request needs more sequences or tokens than it holds), and the prefix pool it
opened; ``close()`` (or leaving the ``with`` block) releases both: the tiered cache's
disk extents are deleted, the prefix pool's files closed and unlocked. Every argument is
checked before the model loads; a mistake is a ``KvdriveError`` naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvdrive.cache.base import KVCache
from kvdrive.cache.paged import PagedKVCache
from kvdrive.engine import generation
from kvdrive.engine.core import PREFILL_CHUNK, Engine
from kvdrive.engine.request import Request
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.models.flops import prefill_activation_bytes
from kvdrive.models.loader import load_model


@dataclass(frozen=True)
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"


Prompt = str | list[int] | dict


class LLM:
    """A model plus its KV cache, ready to generate.

    ``model``: see ``kvdrive.models.loader`` (None = embedded SmolLM2). ``max_model_len``
    caps prompt + output tokens (default: the model's context length).
    """

    def __init__(
        self,
        model: str | None = None,
        device=None,
        dtype=None,
        max_model_len: int | None = None,
        seed: int = 0,
        prefix_cache=None,
        loaded=None,
        kv_cache=None,
        max_batch: int | None = None,
        tenant: str | None = None,
        step_tokens: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        """``loaded``: an already loaded ``LoadedModel`` to use instead of loading ``model``.
        ``kv_cache``: a ``kvdrive.TieredConfig`` to keep the KV in host memory (and on
        disk) and attend sparsely with a GPU selection cache; None keeps all KV on the device.
        ``max_batch``: most sequences decoding at once (default: every request; with
        ``kv_cache``, no more than host memory holds); the rest queue and are admitted as
        sequences finish. ``prefix_cache``: a ``kvdrive.PrefixConfig`` (this LLM
        opens the pool and closes it) or an open ``PrefixPool`` shared with other ``LLM``s
        of the same weights (its owner closes it); repeated prompt prefixes then load their
        KV from the pool instead of being recomputed. ``tenant``: the prefix pool tenant of
        this LLM's requests (None: the pool's), so tenants sharing a pool never meet.
        ``step_tokens``: tokens one engine step may run, decode and prefill together, so a long
        prompt is prefilled in chunks between decode steps of the others (None: every admitted
        prompt is prefilled whole before the next decode step). ``prefill_chunk``: most prompt
        tokens one prefill forward computes; larger chunks run the GPU's attention and GEMMs
        closer to their peak and need that many tokens' activations (the plain cache leaves
        them free when it sizes itself), and a whole prompt in one chunk is the fastest prefill
        (with ``KVDRIVE_PREFILL_KERNEL=cudnn`` on an H100: docs/bench.md)."""
        _check_args(
            model, max_model_len, seed, prefix_cache, loaded, kv_cache, max_batch, tenant, step_tokens, prefill_chunk
        )
        self.max_batch, self.step_tokens, self.prefill_chunk = max_batch, step_tokens, prefill_chunk
        self._cache: KVCache | None = None
        self.prefix = None
        self._owns_prefix = False
        self._closed = False
        self.loaded = loaded if loaded is not None else load_model(model, device=device, dtype=dtype, seed=seed)
        self.model, self.config, self.tokenizer = self.loaded.model, self.loaded.config, self.loaded.tokenizer
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise KvdriveError(f"max_model_len must be in 1..{limit} (the model's context), got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self._next_seq = 0
        if kv_cache is not None:  # the tiered cache leaves GPU room for the largest prefill forward
            kv_cache = kv_cache.for_model(self.config)
            kv_cache = replace(kv_cache, prefill_tokens=max(kv_cache.prefill_tokens, prefill_chunk))
        self.kv_cache = kv_cache
        self.tenant = tenant
        if prefix_cache is not None:
            self._open_prefix(prefix_cache)

    def _open_prefix(self, prefix_cache) -> None:
        from kvdrive.models.identity import weights_digest
        from kvdrive.prefix.pool import PrefixPool

        digest = weights_digest(self.model)
        if isinstance(prefix_cache, PrefixPool):
            if prefix_cache.weights != digest:
                raise KvdriveError(
                    "this prefix pool keys its chunks by other weights than this model's: share a pool "
                    "only between LLMs of the same weights, or give this one its own PrefixConfig"
                )
            self.prefix = prefix_cache
        else:
            self.prefix = PrefixPool(self.config, self.model.dtype, prefix_cache, weights=digest)
            self._owns_prefix = True

    @property
    def cache(self) -> KVCache | None:
        """The KV cache of this LLM's requests (built at the first one; None before and after close)."""
        return self._cache

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release the KV cache (the tiered cache's disk extents are deleted) and the prefix pool
        this LLM opened (its files are kept for the next run). Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        cache, self._cache = self._cache, None
        try:
            if cache is not None:
                cache.close()
        finally:
            if self._owns_prefix and self.prefix is not None:
                self.prefix.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if not _is_token_list(ids):
                raise KvdriveError("a prompt dict needs 'prompt_token_ids': a list of token ids (ints)")
            text = prompt.get("prompt")
            return (text if isinstance(text, str) else None), list(ids)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KvdriveError(f"{self.loaded.source} has no tokenizer: pass token ids instead of text")
            return prompt, self.tokenizer(check_text(prompt, "the prompt"), add_special_tokens=True)["input_ids"]
        if _is_token_list(prompt):
            return None, list(prompt)
        raise KvdriveError(
            f"a prompt is a string, a list of token ids, or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}"
        )

    def apply_chat_template(self, messages: list[dict]) -> str:
        _check_messages(messages)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise KvdriveError(f"{self.loaded.source} has no chat template; send a plain prompt (--raw)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generation ------------------------------------------------------------------------
    def _requests(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]):
        if self._closed:
            raise KvdriveError("this LLM is closed: make a new one")
        if isinstance(prompts, (str, dict)) or _is_token_list(prompts, allow_empty=False):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise KvdriveError(
                f"give at least one prompt (a string, a list of token ids or a dict), got {prompts!r:.40}"
            )
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise KvdriveError("sampling_params is a SamplingParams or a list of them, one per prompt")
        if len(params) != len(prompts):
            raise KvdriveError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        texts, reqs = [], []
        vocab = self.config.vocab_size
        for prompt, p in zip(prompts, params):
            text, ids = self.encode(prompt)
            if not ids:
                raise KvdriveError("empty prompt: give at least one token")
            if any(not 0 <= t < vocab for t in ids):
                raise KvdriveError(f"prompt token ids must be in 0..{vocab - 1}")
            if len(ids) >= self.max_model_len:
                raise KvdriveError(
                    f"prompt has {len(ids)} tokens but the context is {self.max_model_len}; shorten the prompt"
                    + ("" if self.max_model_len == self.config.max_position_embeddings else " or raise max_model_len")
                )
            reqs.append(self.new_request(ids, p, self.tenant))
            texts.append(text)
        return texts, reqs

    def new_request(self, prompt_ids: list[int], params: SamplingParams, tenant: str | None = None) -> Request:
        """A request for checked prompt ids (shorter than ``max_model_len``), with the next
        sequence id; ``max_tokens`` capped by what is left of the context."""
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.model.device).manual_seed(params.seed)
        max_new = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        req = Request(self._next_seq, list(prompt_ids), params, max_new, gen, tenant=tenant)
        self._next_seq += 1
        return req

    def _cache_for(self, n: int, max_len: int, pool_tokens: int | None = None) -> KVCache:
        """The cache, built once and kept; rebuilt larger when this call needs more sequences,
        longer ones, or more tokens in all than it holds (the old one is closed first).
        ``pool_tokens``: tokens the plain cache's page pool holds (None: ``n`` sequences of ``max_len``)."""
        old = self._cache
        if (
            old is not None
            and old.max_seqs >= n
            and old.max_len >= max_len
            and old.token_capacity >= (pool_tokens or 0)
        ):
            return old
        if old is not None:
            n, max_len = max(n, old.max_seqs), max(max_len, old.max_len)
            pool_tokens = pool_tokens and max(pool_tokens, old.token_capacity)
            self._cache = None
            old.close()
        if self.kv_cache is not None:
            from kvdrive.tiered.cache import TieredSparseKVCache

            n = min(
                n,
                TieredSparseKVCache.seqs_that_fit(
                    self.config, max_len, self.model.dtype, self.kv_cache, self.model.device
                ),
            )
            self._cache = TieredSparseKVCache(
                self.config, n, max_len, self.model.device, self.model.dtype, self.kv_cache
            )
        else:
            self._cache = PagedKVCache(self.config, n, max_len, self.model.device, self.model.dtype, pool_tokens)
        return self._cache

    def _events(self, reqs) -> Iterator[generation.TokenEvent]:
        max_len = max(len(r.prompt_ids) + r.max_new for r in reqs)
        n = min(len(reqs), self.max_batch or len(reqs))
        if self.kv_cache is not None:
            from kvdrive.tiered.admission import check_disk_tier

            check_disk_tier(self.config, self.model.dtype, self.kv_cache, [len(r.prompt_ids) for r in reqs], max_len, n)
        cache = self._cache_for(n, max_len)
        n = min(n, cache.max_seqs)
        try:
            yield from generation.run(
                self.model,
                cache,
                reqs,
                self.config.eos_token_ids,
                self.tokenizer,
                prefix=self.prefix,
                max_batch=n,
                step_tokens=self.step_tokens,
                prefill_chunk=self.prefill_chunk,
            )
        finally:  # a stream abandoned or a failed step: its sequences leave the cache kept for the next call
            for r in reqs:
                if r.seq_id in cache.seqs:
                    cache.free(r.seq_id)

    def engine(self, max_seqs: int, step_tokens: int | None = None, prefill_chunk: int | None = None) -> Engine:
        """An online engine over this LLM's cache, sized for ``max_seqs`` sequences of up to
        ``max_model_len`` tokens (fewer where memory holds fewer: the engine's ``sched.max_batch``
        says how many). The caller adds requests (``new_request``) and steps it from one thread;
        one request's error ends that request only. While it runs, this LLM's ``generate`` and
        ``stream`` must not be called (they share the cache)."""
        if self._closed:
            raise KvdriveError("this LLM is closed: make a new one")
        max_len = self.max_model_len
        if self.kv_cache is not None:
            from kvdrive.tiered.admission import check_disk_tier

            check_disk_tier(self.config, self.model.dtype, self.kv_cache, [max_len], max_len, max_seqs)
            cache = self._cache_for(max_seqs, max_len)
        else:  # pages for every sequence at max_len, or what the device holds: admission counts pages
            fit = self._plain_tokens_that_fit(max_len)
            cache = self._cache_for(max_seqs, max_len, fit if fit < max_seqs * max_len else None)
        return Engine(
            self.model,
            cache,
            self.config.eos_token_ids,
            self.tokenizer,
            prefix=self.prefix,
            max_batch=min(max_seqs, cache.max_seqs),
            step_tokens=step_tokens,
            prefill_chunk=prefill_chunk or self.prefill_chunk,
            isolate_errors=True,
        )

    def _plain_tokens_that_fit(self, max_len: int) -> int:
        """Tokens whose KV the device's free memory holds in the plain cache (at least one
        sequence of ``max_len``, or ``CapacityError``)."""
        from kvdrive.tiered.admission import gpu_room
        from kvdrive.tiered.host_kv import host_room

        c = self.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.model.dtype.itemsize
        per_seq = per_token * max_len
        room = gpu_room(self.model.device) if self.model.device.type == "cuda" else host_room()
        if room is None:
            return 1 << 62
        room -= prefill_activation_bytes(c, self.model.dtype.itemsize, self.prefill_chunk)
        if room < per_seq:
            raise CapacityError(
                f"one sequence of {max_len} tokens needs {per_seq / 2**30:.2f} GiB of KV, "
                f"{room / 2**30:.2f} GiB is free: lower max_model_len, or keep the KV in host "
                "memory with the tiered cache (a budget)"
            )
        return room // per_token

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        texts, reqs = self._requests(prompts, sampling_params)
        for _ in self._events(reqs):
            pass
        return [RequestOutput(t, r.prompt_ids, r.output_ids, r.text, r.finish_reason) for t, r in zip(texts, reqs)]

    def stream_events(self, prompt: Prompt, sampling_params: SamplingParams | None = None):
        """Yield a ``TokenEvent`` (token id, text delta, finish reason) per generated token of one request."""
        _, reqs = self._requests([prompt], sampling_params)
        yield from self._events(reqs)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as tokens are generated."""
        for event in self.stream_events(prompt, sampling_params):
            if event.text_delta:
                yield event.text_delta

    def chat(self, messages: list[dict], sampling_params=None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], sampling_params)[0]


def check_text(text: str, what: str) -> str:
    """``text`` if it can be encoded as UTF-8, else a ``KvdriveError`` naming the first bad character
    (a lone surrogate: text decoded from bytes that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KvdriveError(
            f"{what} is not valid Unicode text: {err.object[err.start]!r} at character {err.start} "
            "is a lone surrogate (bytes that were not UTF-8?); pass UTF-8 text"
        ) from None
    return text


def _is_token_list(x, allow_empty: bool = True) -> bool:
    return (
        isinstance(x, (list, tuple))
        and (allow_empty or len(x) > 0)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    )


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise KvdriveError("chat needs a non-empty list of messages, e.g. [{'role': 'user', 'content': 'Hi'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise KvdriveError(
                f"message {i} must be a dict with a 'role' and a 'content' string, "
                f"e.g. {{'role': 'user', 'content': 'Hi'}}; got {m!r:.60}"
            )
        check_text(m["content"], f"message {i}'s content")


def _check_args(
    model, max_model_len, seed, prefix_cache, loaded, kv_cache, max_batch, tenant, step_tokens, prefill_chunk
) -> None:
    """Every ``LLM`` argument, checked before the model loads (a disk directory that cannot be
    written is refused now, not after a minute of loading)."""
    from kvdrive.prefix.pool import PrefixConfig, PrefixPool
    from kvdrive.storage.pool import check_dir
    from kvdrive.tiered.config import TieredConfig

    if model is not None and not isinstance(model, str):
        raise KvdriveError(f"model is a spec string (e.g. 'smollm2', 'random:llama-3.2-1b' or a path), got {model!r}")
    for name, value, optional in (
        ("max_model_len", max_model_len, True),
        ("max_batch", max_batch, True),
        ("step_tokens", step_tokens, True),
        ("prefill_chunk", prefill_chunk, False),
    ):
        if (value is not None or not optional) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise KvdriveError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise KvdriveError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    if kv_cache is not None and not isinstance(kv_cache, TieredConfig):
        raise KvdriveError(f"kv_cache is a kvdrive.TieredConfig or None, got {type(kv_cache).__name__}")
    if prefix_cache is not None and not isinstance(prefix_cache, (PrefixConfig, PrefixPool)):
        raise KvdriveError(
            f"prefix_cache is a PrefixConfig, an open PrefixPool or None, got {type(prefix_cache).__name__}"
        )
    if tenant is not None and not isinstance(tenant, str):
        raise KvdriveError(f"tenant is a string, got {tenant!r}")
    if loaded is not None and not hasattr(loaded, "model"):
        raise KvdriveError("loaded is a LoadedModel (kvdrive.models.loader.load_model)")
    for p in kv_cache.disk if kv_cache is not None else ():
        check_dir(p.path, "kv_cache disk path")
    for p in prefix_cache.disks if isinstance(prefix_cache, PrefixConfig) else ():
        check_dir(p.path, "prefix_cache disk path")
