"""``TieredPrefill``: the prefill side of a ``TieredSparseKVCache``, and its exact attention.

* ``write``: a prefill chunk's whole groups go to the host tier as rows (one DMA per
  sequence for a host-only tier) and are summarized from their GPU copy at once; only the
  partial groups at the chunk's ends are written token by token (a compressed tier: into the
  slot's open row, in order: the head, sealed if it fills its group, then the whole groups,
  quantized on the device, then the tail);
* the stage: while a prompt is prefilled from position 0, every layer's KV of it also stays
  on the GPU (``begin`` decides, where the GPU has room; released by ``release`` once the
  prompt is done), so each chunk attends to its prefix with no host traffic;
* ``attend``: exact attention for a prefill chunk: over its own KV where it starts its
  prompts, else over the stage where the prompt has one (``chunk_attention``: no mask), else
  over the layer's KV gathered from host for the span the query sees, one layer's KV on the
  GPU at a time (also the decode of dense layers);
* ``remember`` / ``queries``: each prompt's last query per sparse layer, kept for the
  initial placement (``TieredSparseKVCache.place``).

Without the stage, chunk c of a prompt gathers c chunks of every layer from host: a prompt of
T tokens in chunks of C moves ~T^2 / (2C) tokens' KV host -> GPU, ``dense_bytes`` counts it.

Owns the prompts' last queries, the stages and the count of bytes its gathers moved. The host
tier, the layer specs and the group geometry are the cache's, passed in; summaries go through
``summarize(layer, slot, first, groups)``, passed in (``GroupSummaries.whole``, which owns the
summary tables).
"""

from __future__ import annotations

import torch

from kvdrive.cache.base import ForwardBatch, LayerSpec
from kvdrive.cache.contiguous import chunk_attention, grouped_sdpa
from kvdrive.cache.sparse import span_mask
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered import admission, tier_ops


class _Stage:
    """One prompt's KV on the GPU while it is prefilled: ``k[l]``, ``v[l]`` (H_kv, capacity, D),
    positions ``[0, filled[l])`` of layer l written."""

    __slots__ = ("k", "v", "filled")

    def __init__(self, layers: int, heads: int, capacity: int, head_dim: int, device, dtype):
        shape = (heads, capacity, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.filled = [0] * layers


class TieredPrefill:
    """``stage``: keep a prompt's KV on the GPU while it is prefilled (False: every chunk gathers
    its prefix from host, the ablation)."""

    def __init__(
        self,
        host,
        layout: GroupLayout,
        layer_specs: tuple[LayerSpec, ...],
        summarize,
        device,
        stage: bool = True,
        seal=None,
        activation_bytes=lambda tokens: 0,
    ):
        """``seal(layers, slot_list, groups)``: the cache's sealing of open groups that filled
        (compressed tiers); ``activation_bytes(tokens)``: GPU bytes a prefill forward of that many
        tokens allocates besides the KV (left free when a stage is decided)."""
        self.host, self.layer_specs, self.summarize, self.device = host, layer_specs, summarize, device
        self.seal, self.activation_bytes = seal, activation_bytes
        self.g, self.group_shape, self.group_bytes = layout.group_tokens, layout.slot_shape, layout.group_bytes
        self.dtype = layout.dtype
        self._last_q: dict[int, dict[int, torch.Tensor]] = {}  # slot -> layer -> the prompt's last query (H_q, D)
        self.dense_bytes = 0  # host -> GPU bytes gathered by ``attend``
        self.stage = stage
        self._stages: dict[int, _Stage] = {}  # slot -> its prompt's KV on the GPU, while prefilled
        self._reserved: dict[int, int] = {}  # slot -> tokens its prompt may prefill (the stage's capacity)

    # -- the stages -----------------------------------------------------------------------
    def stage_bytes(self, tokens: int) -> int:
        """GPU bytes of one prompt's stage of ``tokens`` tokens, every layer."""
        return len(self.layer_specs) * self.group_bytes // self.g * tokens

    def reserve(self, slot: int, prompt_tokens: int) -> None:
        """A new sequence in ``slot`` whose prompt may prefill ``prompt_tokens`` (its stage's capacity:
        decode never reads a stage, so the output tokens need no room in it)."""
        self.release([slot])
        self._reserved[slot] = prompt_tokens

    def begin(self, slot_list, starts, num_new: int) -> None:
        """A prefill chunk of ``num_new`` tokens a sequence is planned: a prompt starting at
        position 0 gets a stage if a later chunk may read it (the chunk is not the whole prompt)
        and the GPU has room for the prompt's tokens and the chunk's activations (now, after
        headroom); otherwise it attends from host."""
        if not self.stage:
            return
        forward = self.activation_bytes(num_new * len(slot_list))
        for slot, start in zip(slot_list, starts):
            if start == 0:
                self._stages.pop(slot, None)
                cap, room = self._reserved.get(slot, 0), self._room()
                if num_new < cap and (room is None or self.stage_bytes(cap) + forward <= room):
                    h, d = self.group_shape[1], self.group_shape[3]
                    self._stages[slot] = _Stage(len(self.layer_specs), h, cap, d, self.device, self.dtype)

    def _room(self) -> int | None:
        """GPU bytes a stage may take now, after headroom (None: no limit, off CUDA); memory the
        allocator holds unused counts as free."""
        room = admission.gpu_room(self.device)
        if room is None:
            return None
        return room + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def release(self, slot_list) -> None:
        """The prompts of ``slot_list`` are done (or gone): free their stages."""
        for s in slot_list:
            self._stages.pop(s, None)

    def staged(self, slot: int) -> bool:
        """Whether the prompt in ``slot`` is being prefilled with its KV on the GPU."""
        return slot in self._stages

    def _put_stage(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens [start, start + T) of ``layer``, k/v (H_kv, T, D), into the slot's stage; a stage
        that would get a gap or overflow is dropped (the host tier holds everything anyway)."""
        st = self._stages.get(slot)
        if st is None:
            return
        end = start + k.shape[1]
        if st.filled[layer] != start or end > st.k[layer].shape[1]:
            del self._stages[slot]
            return
        st.k[layer][:, start:end] = k
        st.v[layer][:, start:end] = v
        st.filled[layer] = end

    # -- the prompts' last queries ------------------------------------------------------
    def remember(self, layer: int, q: torch.Tensor, slot_list) -> None:
        """The last query (B, H_q, T, D) of a prefill chunk, per sequence: the latest chunk's wins."""
        for i, slot in enumerate(slot_list):
            self._last_q.setdefault(slot, {})[layer] = q[i, :, -1].clone()  # (H_q, D)

    def queries(self, slot_list, layer: int) -> torch.Tensor:
        """(B, H_q, D): the remembered last query of ``layer`` of each of ``slot_list``."""
        return torch.stack([self._last_q[s][layer] for s in slot_list])

    def has_queries(self, slot_list) -> bool:
        return all(s in self._last_q for s in slot_list)

    def forget(self, slot_list) -> None:
        for s in slot_list:
            self._last_q.pop(s, None)

    # -- write path ---------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, rows: torch.Tensor) -> None:
        """A prefill chunk's k, v (B, H_kv, T, D) of ``layer``: the groups it fills whole go to the
        host tier as whole rows and are summarized right away; only the partial groups at its
        ends are written token by token (``rows`` (B, T): each token's host row)."""
        g, t = self.g, batch.num_new
        if self.host.compressed:
            self._write_open(layer, k, v, batch)
            return
        typed, offs = self.host.typed(layer), batch.meta["offs"]
        for b, (slot, start) in enumerate(zip(batch.meta["slot_list"], batch.start)):
            self._put_stage(layer, slot, start, k[b], v[b])
            first = -(-start // g)  # first group that starts inside the chunk
            n = (start + t) // g - first  # groups the chunk covers whole
            if n <= 0:
                tier_ops.write_tokens(typed, rows[b : b + 1], offs[b : b + 1], k[b : b + 1], v[b : b + 1])
                continue
            lo, hi = first * g - start, (first + n) * g - start  # token span of the whole groups
            for a, z in ((0, lo), (hi, t)):
                if z > a:
                    tier_ops.write_tokens(
                        typed, rows[b : b + 1, a:z], offs[b : b + 1, a:z], k[b : b + 1, :, a:z], v[b : b + 1, :, a:z]
                    )
            self._put_whole(layer, slot, first, k[b, :, lo:hi], v[b, :, lo:hi])

    def _put_whole(self, layer: int, slot: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Whole groups ``first ..`` of one sequence, k/v (H_kv, n*G, D), into the host tier, summarized."""
        h, d, g = k.shape[0], k.shape[2], self.g
        kv = torch.stack((k, v))  # (2, H, n*G, D)
        groups = kv.view(2, h, -1, g, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, 2, H, G, D)
        self.host.put(layer, slot, first, groups)
        self.summarize(layer, slot, first, groups)

    def _write_open(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """``write`` for a compressed tier: per sequence, the head tokens into the open row (sealed
        if they fill its group), the whole groups quantized into their rows, the tail tokens
        into the open row (the next open group)."""
        g, t = self.g, batch.num_new
        opened, offs = self.host.opened.typed(layer), batch.meta["offs"]
        for b, (slot, start) in enumerate(zip(batch.meta["slot_list"], batch.start)):
            self._put_stage(layer, slot, start, k[b], v[b])
            end = start + t
            head = min(end, -(-start // g) * g) - start  # tokens finishing the group open before the chunk
            tail = max(head, end // g * g - start)  # the chunk's tokens from here on are the new open group's
            if head:
                self._write_span(opened, slot, offs[b], k[b], v[b], 0, head)
                if (start + head) % g == 0:  # the head filled its group
                    self.seal([layer], [slot], [start // g])
            if tail > head:
                self._put_whole(layer, slot, (start + head) // g, k[b, :, head:tail], v[b, :, head:tail])
            if t > tail:
                self._write_span(opened, slot, offs[b], k[b], v[b], tail, t)

    def _write_span(self, opened, slot: int, offs, k, v, a: int, z: int) -> None:
        """Tokens [a, z) of one sequence's chunk (k/v (H_kv, T, D), offs (T,)) into its open row."""
        row = torch.full((1, z - a), slot, dtype=torch.int64, device=self.device)
        tier_ops.write_tokens(opened, row, offs[None, a:z], k[None, :, a:z], v[None, :, a:z])

    # -- exact attention ----------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch, spec: LayerSpec) -> torch.Tensor:
        """Exact attention of q (B, H_q, T, D) over this layer's KV: from the prompts' stages when
        every sequence of the batch has one, else gathered from host for the span the query sees
        (the chunk's own tokens straight from the GPU)."""
        m, g = batch.meta, self.g
        if batch.num_new > 1 and not any(batch.start):  # no prefix: the chunk sees only its own KV
            k_new, v_new = m["new_kv"][layer]
            return chunk_attention(q, k_new, v_new, 0, spec)
        stages = [self._stages.get(s) for s in m["slot_list"]]
        if batch.num_new > 1 and all(st is not None and st.filled[layer] == n for st, n in zip(stages, m["lens"])):
            out = [
                chunk_attention(q[i : i + 1], st.k[layer][None], st.v[layer][None], start, spec)
                for i, (st, start) in enumerate(zip(stages, batch.start))
            ]  # (1, H_q, T, D) each
            return out[0] if len(out) == 1 else torch.cat(out)
        first = [0 if spec.window is None else max(0, s - spec.window + 1) // g for s in batch.start]
        n_pages = max(-(-n // g) - f for n, f in zip(m["lens"], first))
        b = batch.batch_size
        kv = torch.zeros(b, n_pages, *self.group_shape, device=self.device, dtype=self.dtype)
        for i, (slot, f, n) in enumerate(zip(m["slot_list"], first, m["lens"])):
            span = -(-n // g) - f
            kv[i, :span] = self.host.gather(layer, slot, list(range(f, f + span)))
            self.dense_bytes += span * self.host.fetch_bytes
        if batch.num_new > 1:  # the chunk's own tokens straight from the GPU, not the host round trip
            k_new, v_new = m["new_kv"][layer]
            first_t = torch.tensor(first, device=self.device)
            local = batch.positions - first_t[:, None] * g  # (B, T) token index within the gathered span
            bi = torch.arange(b, device=self.device)[:, None].expand_as(local)
            kv[bi, local // g, 0, :, local % g] = k_new.transpose(1, 2)
            kv[bi, local // g, 1, :, local % g] = v_new.transpose(1, 2)
        key = spec.window
        if key not in m["masks"]:
            m["masks"][key] = span_mask(torch.tensor(first, device=self.device), n_pages, g, batch.positions, key)
        h, d = self.group_shape[1], self.group_shape[3]
        k = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, h, n_pages * g, d)
        v = kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, h, n_pages * g, d)
        return grouped_sdpa(q, k, v, m["masks"][key], spec.scale, spec.softcap)
