"""``LLM``: the Python API, in the shape vLLM users know.

    from kvdrive import LLM, SamplingParams
    llm = LLM()                                   # embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    for piece in llm.stream("Tell me a story"): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.engine import generation
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError
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

    def __init__(self, model: str | None = None, device=None, dtype=None, max_model_len: int | None = None,
                 seed: int = 0, prefix_cache=None, loaded=None, kv_cache=None, max_batch: int | None = None):
        """``loaded``: an already loaded ``LoadedModel`` to use instead of loading ``model``.
        ``kv_cache``: a ``kvdrive.tiered.cache.TieredConfig`` to keep the KV in host memory (and on
        disk) and attend sparsely with a GPU selection cache; None keeps all KV on the device.
        ``max_batch``: most sequences decoding at once (default: every request; with
        ``kv_cache``, no more than host memory holds); the rest queue and are admitted as
        sequences finish."""
        if max_batch is not None and max_batch < 1:
            raise KvdriveError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.loaded = loaded if loaded is not None else load_model(model, device=device, dtype=dtype, seed=seed)
        self.model, self.config, self.tokenizer = self.loaded.model, self.loaded.config, self.loaded.tokenizer
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise KvdriveError(f"max_model_len must be in 1..{limit} (the model's context), got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self._next_seq = 0
        # ``prefix_cache``: a ``kvdrive.prefix.pool.PrefixConfig``; repeated prompt prefixes then load
        # their KV from the pool (host memory + disks) instead of being recomputed.
        self.kv_cache = kv_cache
        self.prefix = None
        if prefix_cache is not None:
            from kvdrive.prefix.pool import PrefixPool

            self.prefix = PrefixPool(self.config, self.model.dtype, prefix_cache)

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KvdriveError(f"{self.loaded.source} has no tokenizer: pass token ids instead of text")
            return prompt, self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise KvdriveError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise KvdriveError(f"{self.loaded.source} has no chat template; send a plain prompt (--raw)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generation ------------------------------------------------------------------------
    def _requests(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]):
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
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
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.model.device).manual_seed(p.seed)
            max_new = min(p.max_tokens, self.max_model_len - len(ids))
            reqs.append(generation.Request(self._next_seq, ids, p, max_new, gen))
            self._next_seq += 1
            texts.append(text)
        return texts, reqs

    def _events(self, reqs) -> Iterator[generation.TokenEvent]:
        max_len = max(len(r.prompt_ids) + r.max_new for r in reqs)
        n = min(len(reqs), self.max_batch or len(reqs))
        if self.kv_cache is not None:
            from kvdrive.tiered.cache import TieredSparseKVCache

            n = min(n, TieredSparseKVCache.seqs_that_fit(self.config, max_len, self.model.dtype, self.kv_cache,
                                                         self.model.device))
            cache = TieredSparseKVCache(self.config, n, max_len, self.model.device, self.model.dtype, self.kv_cache)
        else:
            cache = ContiguousKVCache(self.config, n, max_len, self.model.device, self.model.dtype)
        return generation.run(self.model, cache, reqs, self.config.eos_token_ids, self.tokenizer, prefix=self.prefix)

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
