"""``seal``: a compressed tier's open groups that filled become stored groups.

A sequence's open group is kept exact (``host_kv.OpenGroups``) while tokens arrive; once it
fills, in every layer at once: the host tier quantizes it on the device into its stored row
(``HostKV.seal``), its summary is taken from the exact keys in hand (``GroupSummaries.sealed``)
and, at decode, the GPU selection cache's copy of it (written token by token) is replaced by
the stored group's round trip. Invariant: attention over a sealed group sees what every later
fetch of it delivers. A decode step seals in ``commit``, before the event the disk tier's
write-behind waits for, so a disk slot always receives the stored bytes; a prefill chunk seals
as it writes (``TieredPrefill``).
"""

from __future__ import annotations

import torch

from kvdrive.quant.dequant import dequant_rows
from kvdrive.tiered.cache.group_summaries import GroupSummaries
from kvdrive.tiered.selection_cache import SelectionCache


def seal(
    host,
    summaries: GroupSummaries,
    caches: dict[int, SelectionCache],
    layers,
    slot_list: list[int],
    groups: list[int],
    cached: bool = False,
) -> None:
    """Group ``groups[i]`` of slot ``slot_list[i]`` filled in ``layers``: the host tier stores it
    quantized; its summary is taken from the exact keys (where every group before it is
    summarized: else the next refresh summarizes it from host); with ``cached`` (decode), the
    GPU cache's copy of it, written token by token, becomes the stored group's round trip, as
    every later fetch of it will be."""
    layers = list(layers)
    device = summaries.device
    slots = torch.tensor(slot_list, device=device)
    groups_t = torch.tensor(groups, device=device)
    exact, stored = host.seal(layers, slots, groups_t)
    for i, layer in enumerate(layers):
        summaries.sealed(layer, slot_list, groups, slots, groups_t, exact[i, :, 0])
        cache = caches.get(layer)
        if cached and cache is not None:
            dst = cache.lookup(slots, groups_t[:, None])[:, 0]  # the trash row where not cached
            lay = host.layout
            dequant_rows(
                stored[i],
                torch.arange(len(groups), device=device),
                cache.pool.view(cache.pool.shape[0], -1),
                dst,
                lay.kv_dtype,
                lay.group_shape,
            )
