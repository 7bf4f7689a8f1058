"""``step_meta``: what every layer of one forward through the tiered cache shares, the
``ForwardBatch.meta`` that ``TieredSparseKVCache.plan`` (and ``place``) makes.

* the batch: ``slots`` (B,) on the device, ``slot_list``, ``slot_range`` (a slice where the
  slots are contiguous: views instead of gathers, else None), ``static`` (a graphed step:
  fixed shapes, no host work);
* lengths after the forward: ``lens`` (host), ``len_t`` (B,), ``num_groups`` (B,) with the
  partly filled group, ``last_len`` (B,) int32, the tokens in that group;
* the new tokens (``positions``): ``offs`` (B, T), each one's offset in its group; a decode
  token's ``group`` (B,) and ``host_rows`` (B,) (its row where the host tier's rows are
  affine and the same in every layer, else None);
* filled as the layers run: ``prefetch`` (layer -> the event its prefetch recorded),
  ``ahead`` (layer -> the disk reads its prediction found), ``selections`` (deferred disk
  misses: each layer's selection, sent to the host at ``commit``), ``masks`` (prefill
  attention's span masks, by window), ``new_kv`` (a prefill chunk's k, v of the layer being computed).

Each part of a micro-batched step plans its own batch, so no two parts share one.
"""

from __future__ import annotations

import torch


def step_meta(slots: torch.Tensor, slot_list: list[int], len_t: torch.Tensor, lens, static: bool, g: int) -> dict:
    """The batch and its lengths after the forward (device ``len_t`` and host ``lens``), groups of ``g`` tokens."""
    num_groups = (len_t + g - 1) // g  # (B,) incl. the partly filled group
    contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
    return {
        "slots": slots,
        "slot_list": slot_list,
        "lens": lens,
        "len_t": len_t,
        "num_groups": num_groups,
        "last_len": (len_t - (num_groups - 1) * g).to(torch.int32),
        "static": static,
        "prefetch": {},
        "ahead": {},
        "masks": {},
        "selections": [],
        "slot_range": slice(slot_list[0], slot_list[0] + len(slot_list)) if contiguous else None,
    }


def add_positions(meta: dict, positions: torch.Tensor, g: int, host) -> None:
    """The new tokens at ``positions`` (B, T): their offsets in their groups and, for a decode
    token, its group and (layer-independent where affine) host row in ``host``."""
    meta["offs"] = positions % g
    if positions.shape[1] == 1:
        meta["group"] = positions[:, 0] // g
        meta["host_rows"] = meta["slots"] * host.n + meta["group"] if host.affine_rows else None
