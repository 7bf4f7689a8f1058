"""Attention-aware sparse retrieval: score groups, select them, attend over the selection.

One decode step of one layer, for a batch of sequences of different lengths:

    scores = summarizer.score(q, summaries, valid, scale)      # kvdrive.retrieval.summaries
    sel    = select_groups(scores, num_groups, cfg, G, P)      # select.py
    slots  = to_slots(sel.groups, slot_table)                  # pages.py
    out, lse = sparse_attention(q, kv_pool, slots, sel.num_pages, last_page_len, scale)

Modules: ``summaries`` (per-group key summaries and their scorers; fused score kernel:
``score_triton``), ``select`` (budget, sinks, window, shared/per-head top-k; kernels:
``select_triton``, ``select_split_triton``), ``sparse_attention`` (dispatch + Triton launcher;
kernels: ``sparse_attention_triton``; the pure-torch reference and the contract:
``sparse_attention_ref``), ``token_summary`` (the 2-bit token keys of ``tokenmax``), ``merge`` (exact LSE merge
of partial attentions), ``predict``
(next-layer query and recall), ``lowrank`` (basis fitting), ``pages``. Importing this package
imports torch only; Triton is imported when its path runs.
"""

from __future__ import annotations

from kvdrive.retrieval.merge import merge_attention, merge_attention_many
from kvdrive.retrieval.pages import PagedKV, all_pages, paginate, to_slots
from kvdrive.retrieval.select import Budget, Selection, SelectionConfig, select_groups, selection_mask
from kvdrive.retrieval.sparse_attention import IMPLS, resolve_impl, sparse_attention
from kvdrive.retrieval.summaries import SUMMARIZERS, GroupSummarizer, SummaryTable, make_summarizer

__all__ = [
    "IMPLS",
    "SUMMARIZERS",
    "Budget",
    "GroupSummarizer",
    "PagedKV",
    "Selection",
    "SelectionConfig",
    "SummaryTable",
    "all_pages",
    "make_summarizer",
    "merge_attention",
    "merge_attention_many",
    "paginate",
    "resolve_impl",
    "select_groups",
    "selection_mask",
    "sparse_attention",
    "to_slots",
]
