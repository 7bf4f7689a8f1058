"""Per-group key summaries and the scorers that rank groups against a query.

A summary is computed once, when a group of G tokens is full (prefill or decode), from
its post-RoPE keys, and stays on the GPU beside the batch's other summaries, padded as
``(B, N_max, *summary_shape)``. Scoring a decode query against it gives one number per
(sequence, KV head, group): an estimate of the group's largest attention logit in the
attention's own units (``scale * q.k``), so a softmax over groups is meaningful.

RoPE: the pool holds post-RoPE keys and decode queries are post-RoPE, so every summary
lives in the rotated frame and ``q.k`` needs no position arithmetic. min/max bounds and
means are exact statements about the rotated keys. The low-rank bases are fitted on
post-RoPE keys too (``kvdrive.retrieval.lowrank``); a pre-RoPE basis would need the
query rotated back per token (O(D) per token, the cost of full attention). docs/attention.md.

Implementations, chosen by name through ``make_summarizer``:

* ``minmax`` (Quest): per-channel min and max of the keys; scores are upper bounds.
* ``mean``: the mean key (ShadowKV's landmarks); scores are the mean logit.
* ``lowrank_offline`` (KVSwap): keys of all KV heads projected on a basis fitted offline
  from calibration keys; scores are the max over tokens of the approximate logit.
* ``lowrank_seq`` (ShadowKV-style): same, with a basis fitted per sequence at prefill.
* ``tokenmax``: every token's key in 2 bits per channel within the group's min/max; scores
  are the max over the group's tokens of the dequantized logit (``token_summary``).
* ``tokenlse``: the same summary, scored by the log-sum-exp of the group's dequantized logits
  (its estimated attention mass): a spike still dominates, and a group of several matching
  tokens (a fact the question resembles) outranks a group of one.
* ``oracle``: every key kept; scores are each group's true share of the attention (evaluation only).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from kvdrive.device import use_triton
from kvdrive.errors import KvdriveError
from kvdrive.retrieval import token_summary
from kvdrive.retrieval.pages import leading

HEAD_REDUCE = ("max", "mean")
_GATHER_CHUNK = 256  # lowrank_seq: per-group bases gathered at once (256 x 1024 x 32 x 4 B = 32 MiB)


class GroupSummarizer(ABC):
    """Summarize full groups; score summaries against decode queries.

    Contract: ``summarize`` is pure (nothing mutated) and returns a new tensor in the
    keys' dtype. ``score`` reads its inputs only and returns float32 ``(B, H_kv, N)``,
    ``-inf`` where ``valid`` is False; higher = more important. The query heads of one KV
    group (``h // (H_q // H_kv)``) are combined by ``head_reduce`` (max: the group's
    most attentive head decides; mean). ``rows`` names the sequence (row of per-sequence
    state) of each summary or query; only ``lowrank_seq`` reads it.
    """

    name: str = ""
    # True: a sequence's summaries need ``fit(row, keys)`` on its whole prompt first (so they
    # are computed after the prefill, not chunk by chunk)
    fits_prompt: bool = False

    def __init__(self, num_kv_heads: int, head_dim: int, group_tokens: int):
        for label, v in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("group_tokens", group_tokens)):
            if v <= 0:
                raise KvdriveError(f"summary {self.name}: {label} must be positive, got {v}")
        self.num_kv_heads, self.head_dim, self.group_tokens = num_kv_heads, head_dim, group_tokens

    @property
    @abstractmethod
    def summary_shape(self) -> tuple[int, ...]:
        """Shape of one group's summary."""

    @abstractmethod
    def summarize(self, keys: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """keys (N, H_kv, G, D) post-RoPE, full groups -> (N, *summary_shape)."""

    @abstractmethod
    def logits(
        self, q: torch.Tensor, summaries: torch.Tensor, rows: torch.Tensor | None, scale: float = 1.0
    ) -> torch.Tensor:
        """q (B, H_kv, R, D), summaries (B, N, *shape) -> unscaled estimates (B, H_kv, R, N) float32
        (``scale``: the attention's, for estimates that are not linear in the logits)."""

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype summaries are stored in when the model runs in ``dtype``."""
        return dtype

    def bytes_per_group(self, dtype: torch.dtype) -> int:
        """GPU bytes one group's summary costs when the model runs in ``dtype``."""
        n = 1
        for s in self.summary_shape:
            n *= s
        return n * self.storage_dtype(dtype).itemsize

    def bytes_per_sequence(self, dtype: torch.dtype) -> int:
        """Per-sequence state (a fitted basis) on top of the per-group cost."""
        return 0

    def score(
        self,
        q: torch.Tensor,
        summaries: torch.Tensor,
        valid: torch.Tensor | None,
        scale: float,
        head_reduce: str = "max",
        rows: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        impl: str = "auto",
    ) -> torch.Tensor:
        """q (B, H_q, D), summaries (B, N, *shape), valid (B, N) bool -> (B, H_kv, N) float32.

        ``counts`` (B,) int: groups summarized per row, in place of ``valid`` (columns at or past
        a row's count are invalid). ``impl``: 'auto' runs one fused Triton launch on CUDA for
        the ``minmax`` and ``mean`` summaries (``kvdrive.retrieval.score_triton``), 'triton' forces it
        (the interpreter on CPU), 'torch' the reference.
        """
        b, h_q, d = q.shape
        if h_q % self.num_kv_heads or d != self.head_dim:
            raise ValueError(f"query (B, {h_q}, {d}) does not fit {self.num_kv_heads} KV heads of dim {self.head_dim}")
        if tuple(summaries.shape[2:]) != self.summary_shape or summaries.shape[0] != b:
            raise ValueError(f"summaries {tuple(summaries.shape)} are not (B={b}, N, *{self.summary_shape})")
        if head_reduce not in HEAD_REDUCE:
            raise KvdriveError(f"head_reduce must be one of {HEAD_REDUCE}, got {head_reduce!r}")
        if valid is not None and counts is not None:
            raise ValueError("give valid or counts, not both")
        fused = self.name in ("minmax", "mean", "tokenmax", "tokenlse") and use_triton(impl, q)
        if fused and valid is None and summaries.stride(-1) == 1 and q.stride(-1) == 1:  # a mask: torch
            if counts is None:
                counts = torch.full((b,), summaries.shape[1], device=q.device)
            if self.name in ("tokenmax", "tokenlse"):
                from kvdrive.retrieval.score_triton import token_scores

                return token_scores(
                    q, summaries, counts, scale, self.num_kv_heads, head_reduce, self.group_tokens, self.name
                )
            from kvdrive.retrieval.score_triton import group_scores

            return group_scores(q, summaries, counts, scale, self.num_kv_heads, head_reduce, self.name)
        if counts is not None:
            valid = leading(counts, summaries.shape[1])
        q4 = q.view(b, self.num_kv_heads, h_q // self.num_kv_heads, d)  # (B, H_kv, R, D)
        est = self.logits(q4, summaries, rows, scale)  # (B, H_kv, R, N)
        s = est.amax(dim=2) if head_reduce == "max" else est.mean(dim=2)
        s = s * scale  # (B, H_kv, N)
        if valid is not None:
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
        return s


def _per_head_dot(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q (B, H_kv, R, E), table (B, N, H_kv, E) -> (B, H_kv, R, N) float32.

    NOTE: one GEMM per sequence, (N, H_kv*E) @ block-diagonal (H_kv*E, H_kv*R): the table
    is read once, in place, as the tall operand cuBLAS streams well. The zero blocks cost
    H_kv x the (tiny) FLOPs; per-head skinny bmms ran at a quarter of the bandwidth.
    """
    b, h, r, e = q.shape
    n = table.shape[1]
    eye = torch.eye(h, dtype=table.dtype, device=table.device)
    qbd = torch.einsum("jk,bjre->bjekr", eye, q.to(table.dtype)).reshape(b, h * e, h * r)  # block-diagonal
    out = torch.bmm(table.reshape(b, n, h * e), qbd)  # (B, N, H_kv*R)
    return out.view(b, n, h, r).permute(0, 2, 3, 1).float()


class MinMaxSummarizer(GroupSummarizer):
    """Quest: per channel min/max of the keys; ``q.k <= sum_d max(q_d min_d, q_d max_d)``.

    Summary (H_kv, 2D) = [max | min] per head, so the bound is one dot product of
    [relu(q) | min(q, 0)] with it. Costs 2/G of the keys' bytes.
    """

    name = "minmax"

    @property
    def summary_shape(self):
        return (self.num_kv_heads, 2 * self.head_dim)

    def summarize(self, keys, rows=None):
        return torch.cat((keys.amax(dim=2), keys.amin(dim=2)), dim=-1)  # (N, H_kv, 2D)

    def logits(self, q, summaries, rows, scale=1.0):
        qf = q.float()
        split = torch.cat((qf.clamp(min=0), qf.clamp(max=0)), dim=-1)  # (B, H_kv, R, 2D)
        if summaries.dtype != torch.float32:
            # NOTE: bf16 rounding of q or of the bounds could break the bound by ~1e-2
            # relative; the bounds rank groups, they are not used as exact bounds here.
            split = split.to(summaries.dtype)
        return _per_head_dot(split, summaries)


class MeanSummarizer(GroupSummarizer):
    """Mean key per head (landmark); scores are the group's mean logit. Costs 1/G of the keys."""

    name = "mean"

    @property
    def summary_shape(self):
        return (self.num_kv_heads, self.head_dim)

    def summarize(self, keys, rows=None):
        return keys.mean(dim=2, dtype=torch.float32).to(keys.dtype)  # (N, H_kv, D), fp32 sum

    def logits(self, q, summaries, rows, scale=1.0):
        return _per_head_dot(q, summaries)


class LowRankSummarizer(GroupSummarizer):
    """KVSwap: every token's keys of all KV heads, concatenated (H_kv*D), projected on a
    rank-r basis A (orthonormal columns); summary (G, r). For query head h of KV head j,
    ``q_h.k_j ~= (q_h A_j).(k A)`` with A_j the rows of head j; a group scores the max over
    its tokens. ``r * itemsize`` bytes per token: 64 B at r=32 in bf16 vs 2 KiB of keys.
    """

    name = "lowrank_offline"
    per_row = False  # one basis for every sequence

    def __init__(self, num_kv_heads, head_dim, group_tokens, basis: torch.Tensor):
        super().__init__(num_kv_heads, head_dim, group_tokens)
        if basis.dim() != 2 or basis.shape[0] != num_kv_heads * head_dim:
            raise KvdriveError(
                f"low-rank basis must be (H_kv*D={num_kv_heads * head_dim}, r), got {tuple(basis.shape)}"
            )
        self.basis = basis  # (H_kv*D, r)
        self.rank = basis.shape[1]

    @property
    def summary_shape(self):
        return (self.group_tokens, self.rank)

    def _bases(self, rows):
        return self.basis[None]  # (1, H_kv*D, r)

    def summarize(self, keys, rows=None):
        n, h, g, d = keys.shape
        if self.per_row and isinstance(rows, torch.Tensor) and n > _GATHER_CHUNK:
            # NOTE: per-group bases are gathered; chunks bound that copy (a whole prompt's
            # groups at the first decode step) to _GATHER_CHUNK bases.
            return torch.cat(
                [
                    self.summarize(keys[i : i + _GATHER_CHUNK], rows[i : i + _GATHER_CHUNK])
                    for i in range(0, n, _GATHER_CHUNK)
                ]
            )
        flat = keys.permute(0, 2, 1, 3).reshape(n, g, h * d)  # (N, G, H_kv*D)
        a = self._bases(rows).to(keys.dtype)  # (N or 1, H_kv*D, r)
        return torch.matmul(flat, a)  # (N, G, r)

    def logits(self, q, summaries, rows, scale=1.0):
        b, h, r, d = q.shape
        a = self._bases(rows).to(summaries.dtype).view(-1, h, d, self.rank)  # (B or 1, H_kv, D, r)
        qp = torch.matmul(q.to(summaries.dtype), a)  # (B, H_kv, R, r)
        n, g = summaries.shape[1], self.group_tokens
        # tall operand first: (N*G, r) @ (r, H_q) per sequence, then the max over each group's tokens
        est = torch.bmm(summaries.reshape(b, n * g, self.rank), qp.reshape(b, h * r, self.rank).mT)  # (B, N*G, H_q)
        return est.view(b, n, g, h, r).amax(dim=2).permute(0, 2, 3, 1).float()  # (B, H_kv, R, N)


class SeqLowRankSummarizer(LowRankSummarizer):
    """ShadowKV-style: one basis per sequence row, fitted on its own prefill keys.

    ``fit(row, keys)`` must run before that row's groups are summarized or scored;
    a row's basis stays valid until ``fit`` is called for the row again.
    """

    name = "lowrank_seq"
    per_row = True
    fits_prompt = True

    def __init__(
        self,
        num_kv_heads,
        head_dim,
        group_tokens,
        rank: int,
        max_seqs: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not 0 < rank <= num_kv_heads * head_dim:
            raise KvdriveError(f"lowrank_seq: rank must be in 1..{num_kv_heads * head_dim}, got {rank}")
        bases = torch.zeros(max_seqs, num_kv_heads * head_dim, rank, device=device, dtype=dtype)
        super().__init__(num_kv_heads, head_dim, group_tokens, bases[0])
        self.bases = bases  # (max_seqs, H_kv*D, r)

    def bytes_per_sequence(self, dtype):
        return self.bases[0].numel() * dtype.itemsize

    def fit(self, row: int, keys: torch.Tensor) -> None:
        """keys (T, H_kv, D) post-RoPE of one sequence (its prefill)."""
        from kvdrive.retrieval.lowrank import KeyGram

        gram = KeyGram(self.num_kv_heads, self.head_dim, keys.device)
        gram.add(keys)
        self.bases[row] = gram.basis(self.rank).to(self.bases.device, self.bases.dtype)

    def _bases(self, rows):
        if rows is None:
            raise ValueError("lowrank_seq needs the sequence row of every summary and query")
        if isinstance(rows, int):
            return self.bases[rows][None]  # (1, H_kv*D, r): one sequence's prefill
        # NOTE: a gather of N bases (N * H_kv*D * r): fine for a decode step's few filled
        # groups; pass an int row for a whole prefill.
        return self.bases[rows]  # (N, H_kv*D, r)


class TokenMaxSummarizer(GroupSummarizer):
    """Every token's key in 2 bits per channel within the group's per-channel [min, max]; a
    group scores the max over its tokens of ``q . k`` (``kvdrive.retrieval.token_summary``). Costs
    ``D / 2`` bytes per token and head: a quarter of a bf16 key."""

    name = "tokenmax"

    @property
    def summary_shape(self):
        return (self.num_kv_heads, token_summary.summary_bytes(self.group_tokens, self.head_dim))

    def storage_dtype(self, dtype):
        return torch.uint8

    def summarize(self, keys, rows=None):
        return token_summary.encode(keys)  # (N, H_kv, bytes)

    def logits(self, q, summaries, rows, scale=1.0):
        keys = token_summary.decode(summaries, self.group_tokens, self.head_dim)  # (B, N, H_kv, G, D)
        est = torch.einsum("bhrd,bnhgd->bhrng", q.float(), keys)
        return self.reduce_tokens(est, scale)  # (B, H_kv, R, N)

    @staticmethod
    def reduce_tokens(est: torch.Tensor, scale: float) -> torch.Tensor:
        return est.amax(dim=-1)


class TokenLseSummarizer(TokenMaxSummarizer):
    """``tokenmax``'s summary, a group scored by ``logsumexp_t(scale * q . k_t) / scale`` over its
    tokens: its estimated attention mass in logit units (between the best token's logit and
    that plus ``log(G) / scale``)."""

    name = "tokenlse"

    @staticmethod
    def reduce_tokens(est: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.logsumexp(est * scale, dim=-1) / scale


class OracleSummarizer(GroupSummarizer):
    """An evaluation oracle, not a summary: it keeps every key (twice the keys' memory) and scores
    a group by its true share of each query head's attention, ``log sum_t softmax(q.k)_t`` over
    the group's tokens, so top-k picks the groups that hold the most attention mass. With
    ``mode='per_head'`` that is the exact per-KV-head top-k: the best any selection at the budget
    can do, to tell a budget that is too small from scoring that is poor."""

    name = "oracle"

    @property
    def summary_shape(self):
        return (self.num_kv_heads, self.group_tokens, self.head_dim)

    def summarize(self, keys, rows=None):
        return keys.clone()  # (N, H_kv, G, D)

    def score(self, q, summaries, valid, scale, head_reduce="max", rows=None, counts=None, impl="auto"):
        b, h_q, d = q.shape
        n = summaries.shape[1]
        if counts is not None:
            valid = leading(counts, n)
        q4 = q.float().view(b, self.num_kv_heads, h_q // self.num_kv_heads, d)
        logits = torch.einsum("bhrd,bnhgd->bhrng", q4, summaries.float()) * scale  # (B, H_kv, R, N, G)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :, None], float("-inf"))
        group = torch.logsumexp(logits, dim=-1)  # (B, H_kv, R, N)
        share = group - torch.logsumexp(group, dim=-1, keepdim=True)  # log of each group's share, per query head
        s = share.amax(dim=2) if head_reduce == "max" else torch.logsumexp(share, dim=2) - math.log(share.shape[2])
        return s.masked_fill(s.isnan(), float("-inf"))

    def logits(self, q, summaries, rows, scale=1.0):
        raise NotImplementedError("the oracle scores through score()")


SUMMARIZERS = {
    c.name: c
    for c in (
        MinMaxSummarizer,
        MeanSummarizer,
        LowRankSummarizer,
        SeqLowRankSummarizer,
        TokenMaxSummarizer,
        TokenLseSummarizer,
        OracleSummarizer,
    )
}


def make_summarizer(name: str, num_kv_heads: int, head_dim: int, group_tokens: int, **kwargs) -> GroupSummarizer:
    """By name; ``lowrank_offline`` takes ``basis=``, ``lowrank_seq`` takes ``rank=, max_seqs=``."""
    if name not in SUMMARIZERS:
        raise KvdriveError(f"unknown summary {name!r}; choose one of {sorted(SUMMARIZERS)}")
    return SUMMARIZERS[name](num_kv_heads, head_dim, group_tokens, **kwargs)


class SummaryTable:
    """One layer's summaries of a set of sequence rows, padded: ``data`` (rows, N_cap, *shape).

    ``counts[row]`` is the number of full groups summarized. Writes are one batched scatter
    (no per-sequence loop); ``data[:B]`` is the padded (B, N_max, ...) view scorers take.
    Memory is ``rows * N_cap * bytes_per_group`` preallocated: no allocation per step.
    """

    def __init__(self, summarizer: GroupSummarizer, max_seqs: int, max_groups: int, device, dtype: torch.dtype):
        self.summarizer = summarizer
        self.data = torch.zeros(
            max_seqs, max_groups, *summarizer.summary_shape, device=device, dtype=summarizer.storage_dtype(dtype)
        )
        self.counts = torch.zeros(max_seqs, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.summarizer.bytes_per_sequence(self.data.dtype)

    def write(self, rows: torch.Tensor | int, groups: torch.Tensor, keys: torch.Tensor) -> None:
        """rows (N,) int64 or one int row (a prefill); groups (N,) int64; keys (N, H_kv, G, D)
        of the full groups at those places."""
        summ = self.summarizer.summarize(keys, rows).to(self.data.dtype)  # (N, *shape)
        if isinstance(rows, int):
            rows = torch.full_like(groups, rows)
        self.data[rows, groups] = summ
        self.counts.scatter_reduce_(0, rows, groups + 1, reduce="amax")

    def valid(self, rows: int) -> torch.Tensor:
        """(rows, N_cap) bool: which padded columns hold a summary."""
        return leading(self.counts[:rows], self.data.shape[1])

    def reset(self, row: int) -> None:
        self.counts[row] = 0
