"""Next-layer prediction for prefetch (InfiniGen / KVSwap) and its recall metric.

While layer l computes, layer l+1's groups can be guessed from a hidden state that is
already known: pass it through layer l+1's input RMSNorm and Wq, rotate by RoPE at the
current position, and score layer l+1's summaries with that query. The caller picks the
hidden state (layer l's input lets the fetch start earliest; the residual after layer l's
attention is closer to the truth) and supplies the layer's own modules, so the
prediction uses exactly the model's norm, q-norm and RoPE.

``recall`` measures a prediction: the fraction of the groups the true query selects that
the predicted selection also lists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvdrive.retrieval.select import Selection, selection_mask


def predict_query(
    hidden: torch.Tensor,
    input_norm: Callable[[torch.Tensor], torch.Tensor],
    project_q: Callable[..., torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """hidden (B, hidden) -> predicted post-RoPE query (B, H_q, D) of the next layer.

    ``input_norm`` is layer l+1's input RMSNorm; ``project_q(x (B, 1, hidden), cos, sin)``
    returns post-RoPE (B, H_q, 1, D) (``Attention.project_q`` of the model); cos/sin are the
    RoPE tables of layer l+1 at the current positions, (B, 1, 1, D).
    """
    x = input_norm(hidden[:, None, :])  # (B, 1, hidden)
    return project_q(x, cos, sin)[:, :, 0]  # (B, H_q, D)


def recall(predicted: Selection, true: Selection, n_max: int, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32: |pred & true| / |true| per sequence, over heads and groups.

    ``ignore`` (B, n_max) bool drops groups from both (e.g. sinks and window, which every
    selection lists); a sequence whose true set is empty has recall 1.
    """
    p = selection_mask(predicted, n_max)  # (B, H_kv', N)
    t = selection_mask(true, n_max)
    if p.shape[1] != t.shape[1]:  # shared vs per-head: compare per head
        h = max(p.shape[1], t.shape[1])
        p, t = p.expand(-1, h, -1), t.expand(-1, h, -1)
    if ignore is not None:
        t = t & ~ignore[:, None, :]
    hit = (p & t).sum(dim=(1, 2)).float()
    total = t.sum(dim=(1, 2)).float()
    return torch.where(total > 0, hit / total.clamp(min=1), torch.ones_like(total))


def forced_mask(num_groups: torch.Tensor, n_max: int, n_sink: int, n_window: int) -> torch.Tensor:
    """(B, n_max) bool: sink and window groups (always selected), for ``recall(ignore=...)``."""
    idx = torch.arange(n_max, device=num_groups.device)[None, :]
    ng = num_groups.long()[:, None]
    return (idx < ng) & ((idx < n_sink) | (idx >= ng - n_window))
