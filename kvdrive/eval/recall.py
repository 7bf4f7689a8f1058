"""Recall of next-layer prediction, measured during a teacher-forced decode.

While layer l computes, InfiniGen / KVSwap guess layer l+1's groups from layer l's input
hidden state (``kvdrive.retrieval.predict``). ``RecallProbe`` measures that guess on a real
model without touching the model's code: forward pre-hooks record each decoder layer's
input ``(x, cos, sin)`` during a decode step; after the step, for every sparse layer
L >= 1 the query predicted from layer L-1's input (layer L's input norm, Wq, q-norm and
RoPE) is scored and selected by the cache itself (``cache.attend``; the output is
discarded, the summaries are the ones the true query used, the budget is the same), and
the predicted selection is compared with the true one. Sink and window groups are left
out of both (every selection lists them), so recall counts only the groups the budget
had to choose.
"""

from __future__ import annotations

import torch

from kvdrive.cache.base import ForwardBatch
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.errors import KvdriveError
from kvdrive.retrieval.predict import forced_mask, predict_query, recall


class RecallProbe:
    """Accumulates per-layer recall over decode steps; use as a context manager around them.

    ``layers``: the sparse layers to measure (each needs layer L-1, so L >= 1). Between
    steps the probe holds only running sums; the recorded inputs live for one step.
    """

    def __init__(self, model, layers: list[int], sparse: SparseConfig):
        if any(layer < 1 for layer in layers):
            raise KvdriveError("next-layer prediction needs a previous layer: layers must be >= 1")
        self.model, self.layers = model, sorted(layers)
        sel = sparse.selection()
        self.g, self.n_sink, self.n_window = sparse.group_tokens, sel.n_sink, sel.n_window
        self._inputs: dict[int, tuple] = {}  # layer -> (x (B, 1, hidden), cos, sin) of this step
        self._hooks = []
        self._sum = {layer: 0.0 for layer in self.layers}  # sum over steps and sequences
        self._count = 0  # sequence-steps

    def __enter__(self) -> RecallProbe:
        blocks = self.model.model.layers
        for i in sorted({layer - 1 for layer in self.layers} | set(self.layers)):
            self._hooks.append(blocks[i].register_forward_pre_hook(self._recorder(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._inputs = [], {}

    def _recorder(self, layer: int):
        def hook(module, args):
            if len(args) < 3:
                raise KvdriveError("RecallProbe expects decoder layers called as block(x, cos, sin, cache, batch)")
            self._inputs[layer] = args[:3]

        return hook

    def after_step(self, cache: SparseKVCache, batch: ForwardBatch) -> None:
        """Call after the model's forward of one decode step (T = 1), before ``commit``."""
        if batch.num_new != 1:
            raise KvdriveError("recall is measured on decode steps (one new token per sequence)")
        true = {layer: cache.last_selection[layer] for layer in self.layers}
        lens = [s + 1 for s in batch.start]
        n_max = max(-(-n // self.g) for n in lens)
        num_groups = torch.tensor([-(-n // self.g) for n in lens], device=batch.positions.device)  # (B,)
        ignore = forced_mask(num_groups, n_max, self.n_sink, self.n_window)  # (B, N)
        blocks = self.model.model.layers
        for layer in self.layers:
            x = self._inputs[layer - 1][0][:, -1]  # (B, hidden): layer L-1's input
            _, cos, sin = self._inputs[layer]  # layer L's RoPE tables at these positions
            block = blocks[layer]
            q = predict_query(x, block.input_layernorm, block.self_attn.project_q, cos, sin)  # (B, H_q, D)
            cache.attend(layer, q[:, :, None, :], batch)  # selects with the predicted query
            r = recall(cache.last_selection[layer], true[layer], n_max, ignore)  # (B,)
            self._sum[layer] += float(r.sum())
        cache.last_selection.update(true)
        self._count += len(lens)

    def result(self) -> dict:
        """{"per_layer": {layer: mean recall}, "mean": over layers, "samples": sequence-steps}."""
        if not self._count:
            return {"per_layer": {}, "mean": None, "samples": 0}
        per = {str(layer): self._sum[layer] / self._count for layer in self.layers}
        return {"per_layer": per, "mean": sum(per.values()) / len(per) if per else None, "samples": self._count}
