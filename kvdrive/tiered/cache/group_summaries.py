"""``GroupSummaries``: the key summaries of every sparse layer's full groups, kept in step with
the host tier.

Owns each sparse layer's ``SummaryTable`` (``tables``) and, per layer and sequence slot, how
many groups that table holds (``done``). Invariant: a slot's summarized groups are a prefix,
groups ``0 .. done - 1``; a group is summarized only once every group before it is. Where a
summary comes from:

* ``whole``: a prefill chunk's whole groups, from the chunk's KV on the device;
* ``sealed``: a compressed tier's group that filled, from its exact keys (only where it
  extends the prefix; the next ``refresh`` takes the others from host, in order);
* ``refresh``: at a decode step, every group filled since, read from host.

``lowrank_seq`` fits its basis on the whole prompt at the first ``refresh``; ``whole`` and
``sealed`` leave its tables alone.
"""

from __future__ import annotations

import torch

from kvdrive.cache.sparse import SparseConfig, layer_summarizer
from kvdrive.retrieval.summaries import SummaryTable

REFRESH_CHUNK = 4096  # groups gathered from host per summary batch (bounds the temporary)


class GroupSummaries:
    def __init__(
        self,
        sparse: SparseConfig,
        layers: list[int],
        host,
        kv_heads: int,
        head_dim: int,
        max_seqs: int,
        n: int,
        device,
        dtype,
    ):
        """``host``: the ``HostKV`` the groups are read from; ``n``: groups per sequence."""
        self.host, self.g, self.device = host, sparse.group_tokens, device
        self.tables = {
            l: SummaryTable(
                layer_summarizer(sparse, l, kv_heads, head_dim, max_seqs, device), max_seqs, n, device, dtype
            )
            for l in layers
        }
        self.done = {l: [0] * max_seqs for l in layers}  # groups in each table, per slot

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    def reset(self, slot: int) -> None:
        """A new sequence in ``slot``: nothing of it summarized."""
        for layer, table in self.tables.items():
            table.reset(slot)
            self.done[layer][slot] = 0

    def whole(self, layer: int, slot: int, first: int, groups: torch.Tensor) -> None:
        """A prefill chunk's whole groups ``first ..`` (n, 2, H_kv, G, D) of one sequence, on the
        device: summarized at once (``lowrank_seq`` fits on the whole prompt, at decode)."""
        table = self.tables.get(layer)
        if table is None or table.summarizer.fits_prompt:
            return
        self.refresh(layer, [slot], [first * self.g])  # the group the chunk completed, if any
        table.write(slot, torch.arange(first, first + groups.shape[0], device=self.device), groups[:, 0])
        self.done[layer][slot] = first + groups.shape[0]

    def sealed(
        self,
        layer: int,
        slot_list: list[int],
        groups: list[int],
        slots: torch.Tensor,
        groups_t: torch.Tensor,
        keys: torch.Tensor,
    ) -> None:
        """Group ``groups[j]`` of slot ``slot_list[j]`` (also ``groups_t``, ``slots`` on the device)
        sealed in ``layer`` with exact keys ``keys`` (n, H_kv, G, D): summarized where every
        group before it is."""
        table = self.tables.get(layer)
        if table is None or table.summarizer.fits_prompt:
            return
        done = self.done[layer]
        now = [j for j, (s, gr) in enumerate(zip(slot_list, groups)) if done[s] == gr]
        if now:
            table.write(slots[now], groups_t[now], keys[now])
            for j in now:
                done[slot_list[j]] = groups[j] + 1

    def refresh(self, layer: int, slot_list, starts) -> None:
        """Summarize the groups filled since this layer's last decode step (keys read from host):
        the whole batch's in one gather and one write per ``REFRESH_CHUNK`` groups (in decode,
        a few sequences complete a group each step; per-sequence calls cost launches)."""
        table, done = self.tables[layer], self.done[layer]
        summ = table.summarizer
        pair_slots, pair_groups = [], []
        for slot, n in zip(slot_list, starts):
            full = n // self.g
            if done[slot] == 0 and full and summ.fits_prompt:  # lowrank_seq: fit on the prompt's keys
                keys = torch.cat(
                    [
                        self.host.gather(layer, slot, list(range(i, min(i + REFRESH_CHUNK, full))))[:, 0]
                        for i in range(0, full, REFRESH_CHUNK)
                    ]
                )
                summ.fit(slot, keys.transpose(1, 2).reshape(-1, keys.shape[1], keys.shape[-1]))
            if full > done[slot]:
                pair_slots += [slot] * (full - done[slot])
                pair_groups += range(done[slot], full)
                done[slot] = full
        for i in range(0, len(pair_groups), REFRESH_CHUNK):
            s, g = pair_slots[i : i + REFRESH_CHUNK], pair_groups[i : i + REFRESH_CHUNK]
            table.write(
                torch.tensor(s, device=self.device),
                torch.tensor(g, device=self.device),
                self.host.gather_pairs(layer, s, g)[:, 0],
            )
