"""Run a model with full attention and with sparse configurations on the same inputs.

One prefill serves every configuration: the prompt is prefilled (exactly) into a
``SparseKVCache``; for each configuration the cache is reconfigured, truncated back
to the prompt, and the continuation is decoded token by token (teacher forcing), so
the sparse selection runs on every continuation token as it would in generation.
The reference is the same cache with a budget that covers the context, which the
tests prove equal to full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.eval.recall import RecallProbe

FULL_BUDGET = 1 << 30  # tokens: more than any context, so every group is selected


@dataclass(frozen=True)
class Setting:
    """One point of a sweep; ``summary=None`` is full attention. ``kv_dtype``: the storage format
    whose round trip decode attends to (``SparseConfig.kv_dtype``)."""

    summary: str | None
    budget: float  # fraction of the context
    mode: str = "shared"
    kv_dtype: str = "bf16"
    dense: tuple[int, ...] | None = None  # global layers attended whole; None: the run's base setting

    @property
    def label(self) -> str:
        name = "full"
        if self.summary is not None:
            dense = "" if self.dense is None else "+dense=" + ",".join(map(str, self.dense))
            name = f"{self.summary}{dense}@{self.budget:g}/{self.mode}"
        return name if self.kv_dtype == "bf16" else f"{name}+{self.kv_dtype}"

    @property
    def in_bf16(self) -> Setting:
        """The same setting over the model dtype's KV (what a compressed one is compared with)."""
        return replace(self, kv_dtype="bf16")


class Runner:
    """Prefill once, then decode continuations under many settings."""

    def __init__(self, lm, batch: int, max_len: int, base: SparseConfig, chunk: int = 2048):
        self.model, self.base, self.chunk = lm.model, base, chunk
        self.cache = SparseKVCache(
            lm.config, batch, max_len, lm.model.device, lm.model.dtype, replace(base, budget=FULL_BUDGET)
        )
        self.batch = batch
        self.sparse = self.cache.sparse  # the configuration of the current setting

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Prefill one prompt per sequence; returns the last-token logits (B, V)."""
        out = []
        for i, ids in enumerate(rows):
            if i in self.cache.seqs:
                self.cache.free(i)
            self.cache.add(i, self.cache.max_len)
            t = torch.tensor(ids, device=self.model.device)[None]
            for begin in range(0, t.shape[1], self.chunk):
                piece = t[:, begin : begin + self.chunk]
                b = self.cache.plan([i], piece.shape[1])
                logits = self.model(piece, self.cache, b)
                self.cache.commit(b)
            out.append(logits[0])
        return torch.stack(out)

    def use(self, setting: Setting, lengths: list[int]) -> None:
        """Switch to ``setting`` and rewind every sequence to ``lengths``."""
        if setting.summary is None:
            cfg = replace(self.base, budget=FULL_BUDGET, kv_dtype=setting.kv_dtype)
        else:
            cfg = replace(
                self.base, summary=setting.summary, budget=setting.budget, mode=setting.mode, kv_dtype=setting.kv_dtype
            )
            if setting.dense is not None:
                cfg = replace(cfg, dense_layers=setting.dense)
        self.cache.reconfigure(cfg)
        self.sparse = cfg
        for i, n in enumerate(lengths):
            self.cache.truncate(i, n)

    def recall_probe(self) -> RecallProbe:
        """A probe of next-layer prediction for the current setting's sparse layers."""
        cfg = self.model.config
        layers = [layer for layer in cfg.global_layers if layer >= 1 and layer not in self.sparse.dense_layers]
        return RecallProbe(self.model, layers, self.sparse)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, probe: RecallProbe | None = None) -> torch.Tensor:
        """Teacher-force tokens (B, M) one step at a time -> logits (B, M, V) float32.

        With ``probe`` (entered by the caller), next-layer recall is measured at every step."""
        out = []
        seqs = list(range(tokens.shape[0]))
        for t in range(tokens.shape[1]):
            b = self.cache.plan(seqs, 1)
            out.append(self.model(tokens[:, t : t + 1].to(self.model.device), self.cache, b))
            if probe is not None:
                probe.after_step(self.cache, b)
            self.cache.commit(b)
        return torch.stack(out, 1)

    def selected_fraction(self) -> float:
        """Share of the context the last decode step attended (``attended_share``)."""
        lens = [self.cache.length(i) for i in self.cache.seqs.seq_ids()]
        return attended_share(self.cache, self.model.config.global_layers, lens)


def attended_share(cache: SparseKVCache, layers, lens: list[int]) -> float:
    """Share of the context the last decode step attended, averaged over ``layers`` (a dense
    layer, with no selection, attends all of it) and over sequences of lengths ``lens``."""
    lens_t = torch.tensor(lens, dtype=torch.float32)
    shares = []
    for layer in layers:
        sel = cache.last_selection.get(layer) if layer in cache.tables else None
        tokens = lens_t if sel is None else sel.num_pages.float().cpu() * cache.g
        shares.append(tokens.clamp(max=lens_t) / lens_t)
    return float(torch.stack(shares).mean()) if shares else 1.0
