"""``SelectFetch``: which groups a sparse layer's decode query attends to, made resident in the
layer's ``SelectionCache``.

One call per sparse layer and step (and per prediction, with ``prefetch``): bring the layer's
summaries up to date (eager steps), score them with the query, select sinks + window + top
groups under the budget (one selection shared by the layer's heads), then ``ensure`` them in
the layer's cache: hits stay, misses are fetched from their host rows. Where the tier may
miss (a disk tier), the groups on disk only are handled first:

* ``disk_misses="wait"``: one host sync per layer reads them into the arena before the fetch
  (``resolve``); a prediction records them so the reads start while the layer before runs
  (``read_ahead``); a group whose read failed is dropped from the step's attention;
* ``disk_misses="defer"``: the step attends to what the GPU cache and the arena hold, and its
  selections reach the host after the step (``send_selections``), where the arena reads
  what was left out for later steps: no host sync.

Owns no state across steps: what one step hands from layer to layer (reads ahead,
selections) lives in the step's ``ForwardBatch.meta``.
"""

from __future__ import annotations

import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch
from kvdrive.cache.sparse import max_pages_for
from kvdrive.retrieval.pages import leading
from kvdrive.retrieval.select import SelectionConfig, select_groups_keyed
from kvdrive.tiered import tier_ops
from kvdrive.tiered.cache.group_summaries import GroupSummaries
from kvdrive.tiered.selection_cache import SelectionCache
from kvdrive.tiered.step_profile import no_mark


class SelectFetch:
    def __init__(
        self,
        summaries: GroupSummaries,
        host,
        sel_cfg: SelectionConfig,
        n: int,
        max_pages: int,
        defer: bool,
        device,
    ):
        """``n``: groups per sequence; ``max_pages``: the pages of one selection at ``max_len``;
        ``defer``: disk misses deferred (``TieredConfig.disk_misses``)."""
        self.summaries, self.host, self.sel_cfg, self.device = summaries, host, sel_cfg, device
        self.g, self.n, self.max_pages, self.defer = summaries.g, n, max_pages, defer

    def __call__(
        self,
        cache: SelectionCache,
        layer: int,
        qd: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        step_t: torch.Tensor,
        prefetch: bool,
        mark=no_mark,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s selection for query ``qd`` (B, H_q, D), made resident in ``cache``:
        (pages (B, P) into the cache's pool, num_pages (B,)). ``step_t``: the step's LRU stamp;
        ``prefetch``: a prediction (disk-only groups are read ahead, not waited for)."""
        m, g = batch.meta, self.g
        if not m["static"]:
            self.summaries.refresh(layer, m["slot_list"], batch.start)
        table, slots = self.summaries.tables[layer], m["slots"]
        n_max = self.n if m["static"] else max(-(-n // g) for n in m["lens"])
        num_groups = m["num_groups"]
        sl = m["slot_range"] if m["slot_range"] is not None else slots  # a range: views, no gather
        rows = slots if table.summarizer.name == "lowrank_seq" else None
        scores = table.summarizer.score(
            qd, table.data[sl, :n_max], None, scale, rows=rows, counts=table.counts[sl]
        )  # (B, H_kv, N)
        max_pages = min(n_max, self.max_pages if m["static"] else max_pages_for(self.sel_cfg, g, max(m["lens"])))
        sel, key = select_groups_keyed(scores, num_groups, self.sel_cfg, g, max_pages)  # key: lookahead's (B, N)
        num_pages = sel.num_pages
        mark("select")
        if self.host.affine_rows:  # the selection as it is: first head's groups, counts, host rows s*n + g
            pages = cache.ensure(
                slots,
                sel.groups[:, 0],
                num_pages,
                key,
                self.host.fetch_source(layer),
                self.host.n,
                step_t,
                prefetch,
            )
            mark("sync_fetch")
            return pages, num_pages
        if self.defer and not prefetch:  # serve what the GPU cache and host hold; the rest later
            groups, num_pages, src, flags = tier_ops.defer_split(
                sel.groups[:, 0], num_pages, slots, self.host.slot_gpu[layer], cache.table
            )
            m["selections"].append((layer, sel.groups[:, 0], flags))
            pages = cache.ensure(slots, groups, num_pages, key, self.host.fetch_source(layer), src, step_t, prefetch)
            mark("sync_fetch")
            return pages, num_pages
        groups = sel.groups[:, 0].long()  # (B, P)
        listed = leading(num_pages, groups.shape[1])
        src = self.host.rows(layer, slots, groups)  # (B, P) host rows, -1 on disk only
        if prefetch:  # the prefetch skips disk-only groups
            if not self.defer:  # read them ahead (deferred misses: no, that would need a host sync)
                ahead = listed & (src < 0) & (cache.table[slots[:, None], groups] < 0)
                m["ahead"][layer] = (
                    devices.to_host_async(groups),
                    devices.to_host_async(ahead),
                    devices.new_event(self.device),
                )
                m["ahead"][layer][2].record()
        else:  # one host sync: read what the GPU cache and host lack
            self.read_ahead(m, layer)  # not picked up by the layer before: submit it now
            cached = cache.table[slots[:, None], groups] >= 0
            g_np = groups.cpu().numpy()
            keep, cached = torch.stack((listed, cached)).cpu().numpy()  # both masks in one copy
            need = keep & ~cached
            failed = self.host.resolve(layer, m["slot_list"], g_np, need, keep)
            self.read_ahead(m, layer + 1)  # the next layer's disk reads overlap this layer's compute
            if failed.any():  # never served: drop those groups from this step's attention
                groups, listed, num_pages, _ = _compact(groups, listed, torch.as_tensor(failed, device=self.device))
            src = self.host.rows(layer, slots, groups)
            mark("disk_resolve")
        pages = cache.ensure(slots, groups, listed, key, self.host.fetch_source(layer), src, step_t, prefetch)
        mark("sync_fetch")
        return pages, num_pages

    def read_ahead(self, meta, layer: int) -> None:
        """Submit the disk reads of ``layer``'s predicted selection (its hint recorded them)."""
        ahead = meta["ahead"].pop(layer, None)
        if ahead is not None:
            groups, need, event = ahead
            event.synchronize()  # the prediction (side stream) and its copy to the host are done
            self.host.read_ahead(layer, meta["slot_list"], groups.numpy(), need.numpy())


def send_selections(host, batch: ForwardBatch, device) -> None:
    """One asynchronous copy of what each layer selected and left out (``disk_misses="defer"``);
    after a graph replay the captured tensors hold this step's values."""
    layers, groups, flags = zip(*batch.meta["selections"])
    groups = devices.to_host_async(torch.stack(groups).to(torch.int32))
    flags = devices.to_host_async(torch.stack(flags))
    event = devices.new_event(device)
    event.record()
    host.take_selections(batch.meta["slot_list"], list(layers), groups, flags, event)


def _compact(groups: torch.Tensor, listed: torch.Tensor, drop: torch.Tensor):
    """A selection (B, P) without its ``drop`` groups, each row's kept groups a prefix in their
    order (the partly filled group, always in host memory, stays last), on the device:
    (groups, listed, num_pages, order), ``order`` the permutation applied to each row."""
    order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices
    num_pages = (listed & ~drop).sum(1, dtype=torch.int32)
    return groups.gather(1, order), leading(num_pages, groups.shape[1]), num_pages, order
