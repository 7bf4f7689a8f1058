"""Hit rate of the tiered cache's GPU selection cache on a real model decoding real text.

``kvdrive eval --hits``. Per context length, the text samples are prefilled once (exactly,
into the harness's ``SparseKVCache``) and their continuation is teacher-forced once under
the sparse setting while ``SelectionTrace`` records every layer's selection: the
step-to-step overlap it reports is the locality that bounds any cache, and it does not
depend on the cache (the tiered cache selects exactly what the sparse cache selects; the
tests of ``tiered.cache`` prove the logits equal). Then, per point of the grid (eviction x
cache size x prefetch), a fresh ``TieredSparseKVCache`` imports the prefilled KV through
the ``KVCache`` import path (``plan(seq, T)``, ``append`` per layer, ``commit``) and decodes
the same continuation; its ``stats()`` after the first decode step (the cold fill) and over
the remaining steps are the result.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.eval.harness import Runner, Setting
from kvdrive.retrieval.predict import forced_mask
from kvdrive.retrieval.select import selection_mask
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache
from kvdrive.tiered.selection_cache import EVICTIONS


@dataclass(frozen=True)
class HitsSpec:
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    lengths: tuple[int, ...] = (2048, 4096)
    budgets: tuple[float, ...] = (0.0625,)  # fractions of the context
    summaries: tuple[str, ...] = ("mean",)
    group_tokens: int = 16
    sink: int = 16
    window: int = 64
    steps: int = 48
    samples: int = 2
    text: str = "austen"
    seed: int = 0
    evictions: tuple[str, ...] = EVICTIONS
    cache_x: tuple[float, ...] = (1.0, 2.0, 4.0)  # selection-cache size as a multiple of the budget
    prefetch: tuple[bool, ...] = (True, False)
    rebalance_after: int = 0  # 0: capacities stay even (a rebalance restarts the caches empty)
    disk: str | None = None  # also run every point over a disk pool in this directory
    host_fraction: float = 0.25  # with disk: the host arena as a fraction of the KV

    def __post_init__(self):
        if self.steps < 2:
            raise KvdriveError("--steps must be >= 2 (the first decode step is the cold fill)")
        bad = [e for e in self.evictions if e not in EVICTIONS]
        if bad:
            raise KvdriveError(f"evictions must be among {', '.join(EVICTIONS)}, got {bad}")
        if "lowrank_offline" in self.summaries:
            raise KvdriveError("--hits does not fit offline low-rank bases: use minmax, mean or lowrank_seq")
        if any(x <= 0 for x in self.cache_x) or not 0 < self.host_fraction <= 1:
            raise KvdriveError("cache sizes must be > 0 and the host fraction in (0, 1]")


@dataclass(frozen=True)
class CachePoint:
    """One point of the grid; ``none`` eviction ignores ``cache_x`` (the cache holds one selection)."""

    eviction: str
    cache_x: float
    prefetch: bool
    disk: bool = False

    @property
    def label(self) -> str:
        size = "" if self.eviction == "none" else f"/x{self.cache_x:g}"
        return f"{self.eviction}{size}/{'prefetch' if self.prefetch else 'no-prefetch'}{'/disk' if self.disk else ''}"


def grid(spec: HitsSpec) -> list[CachePoint]:
    tiers = (False, True) if spec.disk else (False,)
    points = []
    for disk in tiers:
        for ev in spec.evictions:
            for x in spec.cache_x[:1] if ev == "none" else spec.cache_x:
                points.extend(CachePoint(ev, x, p, disk) for p in spec.prefetch)
    return points


def overlap(cur: torch.Tensor, prev: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float: share of the groups selected now (``cur`` (B, N) bool) that were also in
    ``prev`` (B, N) bool; groups in ``ignore`` (B, N) are left out of ``cur``. An empty set
    counts 1 (nothing needed fetching)."""
    if ignore is not None:
        cur = cur & ~ignore
    total = cur.sum(1).float()
    return torch.where(total > 0, (cur & prev).sum(1).float() / total.clamp(min=1), torch.ones_like(total))


class SelectionTrace:
    """Locality of the selections of a teacher-forced decode, per layer: a probe for
    ``Runner.decode`` (``after_step(cache, batch)`` reads ``cache.last_selection``).

    From the second step on, per layer and sequence: ``overlap`` (share of this step's
    groups selected at the previous step), ``chosen_overlap`` (the same over the groups
    the budget chose, sinks and window left out) and ``seen`` (share selected at any earlier
    step of the decode: the hit rate of an unbounded cache without prefetch). Holds one
    (B, N) mask per layer for the previous step and one for the union.
    """

    def __init__(self, n_max: int, n_sink: int, n_window: int):
        self.n_max, self.n_sink, self.n_window = n_max, n_sink, n_window
        self._prev: dict[int, torch.Tensor] = {}
        self._union: dict[int, torch.Tensor] = {}
        self._sums: dict[str, dict[int, float]] = {"overlap": {}, "chosen_overlap": {}, "seen": {}}
        self.per_step: list[float] = []  # overlap per step, mean over layers and sequences
        self._count = 0  # sequence-steps measured per layer

    def after_step(self, cache, batch) -> None:
        lens = torch.tensor([s + 1 for s in batch.start])
        ignore = forced_mask(-(-lens // cache.g), self.n_max, self.n_sink, self.n_window)  # (B, N)
        step = []
        for layer, sel in cache.last_selection.items():
            cur = selection_mask(sel, self.n_max).any(1).cpu()  # (B, N): shared selection, any head
            if layer in self._prev:
                last = overlap(cur, self._prev[layer])
                for name, r in (
                    ("overlap", last),
                    ("chosen_overlap", overlap(cur, self._prev[layer], ignore)),
                    ("seen", overlap(cur, self._union[layer])),
                ):
                    self._sums[name][layer] = self._sums[name].get(layer, 0.0) + float(r.sum())
                step.append(float(last.mean()))
                self._union[layer] |= cur
            else:
                self._union[layer] = cur.clone()
            self._prev[layer] = cur
        if step:
            self.per_step.append(sum(step) / len(step))
            self._count += len(batch.seq_ids)

    def result(self) -> dict:
        out = {"samples": self._count, "per_step_overlap": self.per_step}
        for name, sums in self._sums.items():
            per = {str(layer): s / self._count for layer, s in sorted(sums.items())} if self._count else {}
            out[name] = {"mean": sum(per.values()) / len(per) if per else None, "per_layer": per}
        return out


def import_prefix(src, dst, seq_id: int, length: int, num_layers: int) -> None:
    """Copy tokens [0, length) of ``seq_id`` from cache ``src`` into ``dst`` (already ``add``-ed)
    through the KVCache import path: ``plan(seq, T)``, ``append`` per layer, ``commit``."""
    batch = dst.plan([seq_id], length)
    for layer in range(num_layers):
        k, v = src.export_kv(seq_id, layer, 0, length)  # (H_kv, T, D) each
        dst.append(layer, k[None], v[None], batch)
    dst.commit(batch)


@torch.inference_mode()
def measure_point(
    lm,
    src,
    length: int,
    tokens: torch.Tensor,
    sparse: SparseConfig,
    point: CachePoint,
    cache_tokens: int,
    spec: HitsSpec,
    disk_dir: Path | None = None,
) -> dict:
    """Decode ``tokens`` (B, M) after the first ``length`` tokens of ``src``'s sequences 0..B-1
    through a fresh tiered cache; the cold first step and the warm rest reported apart."""
    b, m = tokens.shape
    extra = {}
    if point.disk:
        from kvdrive.storage.pool import PoolPath

        kv_bytes = lm.config.kv_bytes_per_token(lm.model.dtype) * (length + m) * b
        disk_dir.mkdir(parents=True, exist_ok=True)
        extra = {
            "disk": (PoolPath(str(disk_dir), 2 * kv_bytes + (64 << 20), weight=1.0),),
            "host_bytes": int(kv_bytes * spec.host_fraction),
            "direct": "off",
        }
    cfg = TieredConfig(
        sparse,
        cache_tokens=cache_tokens,
        eviction=point.eviction,
        prefetch=point.prefetch,
        rebalance_after=spec.rebalance_after,
        **extra,
    )
    cache = TieredSparseKVCache(lm.config, b, length + m + 8, lm.model.device, lm.model.dtype, cfg)
    try:
        for i in range(b):
            cache.add(i, cache.max_len)
            import_prefix(src, cache, i, length, lm.config.num_hidden_layers)
        cache.reset_stats()
        seqs = list(range(b))
        cold = None
        for t in range(m):
            batch = cache.plan(seqs, 1)
            lm.model(tokens[:, t : t + 1].to(lm.model.device), cache, batch)
            cache.commit(batch)
            if t == 0:
                cold = cache.stats()
                cache.reset_stats()
        warm = cache.stats()
        return {
            "cold": _rates(cold, b),
            "warm": _rates(warm, b),
            "capacity_groups": sorted(set(warm["capacity_per_layer"].values())),
        }
    finally:
        cache.close()


def _rates(s: dict, batch: int) -> dict:
    sel, fetched = s["groups_selected"], s["prefetched"]
    out = {
        "steps": s["steps"],
        "groups_selected_per_step": sel / s["steps"] / batch if s["steps"] else None,  # per sequence, all layers
        "hit_rate": s["hit_rate"],
        "gpu_hit_rate": s["gpu_hits"] / sel if sel else None,
        "prefetched_hit_rate": s["prefetched_hits"] / sel if sel else None,
        "sync_fetch_rate": s["sync_fetched"] / sel if sel else None,
        "prefetch_precision": s["prefetched_hits"] / fetched if fetched else None,
        "host_to_gpu_bytes_per_token": s["bytes_host_to_gpu"] / s["steps"] / batch if s["steps"] else None,
        "counts": {
            k: s[k]
            for k in (
                "groups_selected",
                "gpu_hits",
                "prefetched_hits",
                "sync_fetched",
                "prefetched",
                "bytes_host_to_gpu",
            )
        },
    }
    for k in ("disk_reads", "read_ahead", "disk_writes", "lost", "host_evictions"):
        if k in s:
            out.setdefault("host_tier", {})[k] = s[k]
            out.setdefault("host_tier_per_token", {})[k] = s[k] / s["steps"] / batch if s["steps"] else None
    return out


def measure(spec: HitsSpec, out: str | Path, plot: str | Path | None = None) -> Path:
    from kvdrive.eval.run import load_model_and_text, text_rows

    lm, text, ids = load_model_and_text(spec)
    rng = random.Random(spec.seed)
    base = SparseConfig(group_tokens=spec.group_tokens, sink_tokens=spec.sink, window_tokens=spec.window)
    points = grid(spec)
    results = []
    for length in spec.lengths:
        rows = text_rows(ids, length, spec.steps, spec.samples, rng)
        runner = Runner(lm, spec.samples, length + spec.steps + 8, base)
        t0 = time.perf_counter()
        runner.prefill([r[:length] for r in rows])
        tokens = torch.tensor([r[length : length + spec.steps] for r in rows])  # (B, M) teacher-forced inputs
        entry = {"length": length, "prefill_seconds": time.perf_counter() - t0, "settings": {}}
        results.append(entry)
        for summary in spec.summaries:
            for budget in spec.budgets:
                setting = Setting(summary, budget)
                runner.use(setting, [length] * spec.samples)
                sel = runner.sparse.selection()
                trace = SelectionTrace(runner.cache.max_groups, sel.n_sink, sel.n_window)
                t0 = time.perf_counter()
                runner.decode(tokens, trace)
                n_groups = torch.tensor([-(-length // spec.group_tokens)])
                budget_groups = max(int(sel.budget.groups(n_groups, spec.group_tokens)[0]), sel.n_sink + sel.n_window)
                budget_tokens = budget_groups * spec.group_tokens
                row = {
                    "budget_tokens": budget_tokens,
                    "locality": trace.result(),
                    "sparse_decode_seconds": time.perf_counter() - t0,
                    "points": {},
                }
                entry["settings"][setting.label] = row
                for point in points:
                    t0 = time.perf_counter()
                    cache_tokens = round(point.cache_x * budget_tokens)
                    res = measure_point(
                        lm,
                        runner.cache,
                        length,
                        tokens,
                        runner.sparse,
                        point,
                        cache_tokens,
                        spec,
                        Path(spec.disk) / f"hits-{length}" if point.disk else None,
                    )
                    res.update(cache_x=point.cache_x, cache_tokens=cache_tokens, seconds=time.perf_counter() - t0)
                    row["points"][point.label] = res
                    w = res["warm"]
                    print(
                        f"hits {length} {setting.label} {point.label}: hit rate {w['hit_rate']:.3f} "
                        f"({res['seconds']:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    _write(spec, lm, text, out, results)  # partial results survive an interrupted run
        print(f"length {length}: done", flush=True)
    path = _write(spec, lm, text, out, results)
    if plot:
        plot_hits(path, plot)
    return path


def _write(spec, lm, text, out, results) -> Path:
    from kvdrive.results import write_result

    config = {
        **asdict(spec),
        "model": lm.source,
        "text_source": text.source,
        "text_licence": text.licence,
        "model_dtype": str(lm.model.dtype),
        "device": str(lm.model.device),
    }
    notes = [
        "per length: the samples are prefilled once; each grid point imports that KV into a fresh tiered cache "
        "and teacher-forces the same continuation (batch = samples)",
        "cold = the first decode step (the cache fills); warm = the remaining steps - 1 steps, after reset_stats",
        "rates are over groups selected (sparse layers x sequences x steps), sink and window groups included: "
        "hit_rate = gpu_hit_rate + prefetched_hit_rate = 1 - sync_fetch_rate; prefetch_precision = "
        "prefetched_hits / prefetched (groups a prediction fetched that the true selection then used)",
        "host_to_gpu_bytes_per_token: selection-cache fills (sync + prefetch) per sequence and decode step, all layers",
        "cache_tokens = cache_x x the budget in tokens at the prefill length; capacity_groups is what each layer got",
        "locality (from the sparse cache's selections, the same as the tiered cache's): overlap = share of a "
        "step's selected groups selected at the previous step; chosen_overlap = the same over the groups the "
        "budget chose (sinks and window excluded); seen = share selected at any earlier step (an unbounded "
        "cache without prefetch); per layer, mean over steps 2..M and sequences",
    ]
    return write_result(out, "eval-hits", config, results, notes)


def plot_hits(result_json: str | Path, png: str | Path) -> Path:
    """Warm hit rate against cache size (multiple of the budget), one panel per length and
    sparse setting: one colour per eviction, solid with prefetch, dashed without; ``none``
    (no reuse across steps) is a flat line; the grey line is the selection's ``seen`` share."""
    import json

    from kvdrive.plotting import pyplot

    plt = pyplot()
    doc = json.loads(Path(result_json).read_text())
    panels = [(e["length"], label, row) for e in doc["results"] for label, row in e["settings"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.6, 3.6), squeeze=False)
    colours = dict(zip(EVICTIONS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (length, label, row) in zip(axes[0], panels):
        xs = sorted({p["cache_x"] for p in row["points"].values()})
        for ev in EVICTIONS:
            for pre, style in ((True, "-"), (False, "--")):
                pts = [
                    p
                    for name, p in row["points"].items()
                    if name.startswith(ev + "/") and not name.endswith("/disk") and ("/prefetch" in name) == pre
                ]
                if not pts:
                    continue
                if ev == "none":
                    ys = [pts[0]["warm"]["hit_rate"]] * len(xs)
                    px = xs
                else:
                    pts.sort(key=lambda p: p["cache_x"])
                    px, ys = [p["cache_x"] for p in pts], [p["warm"]["hit_rate"] for p in pts]
                ax.plot(
                    px, ys, style, marker="o", color=colours[ev], label=f"{ev}, {'prefetch' if pre else 'no prefetch'}"
                )
        seen = row["locality"]["seen"]["mean"]
        if seen is not None:
            ax.axhline(seen, color="grey", lw=1, label="seen before (unbounded cache)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}x" for x in xs])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("selection cache / budget")
        ax.set_title(f"{length} tokens, {label}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate (warm steps)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(png)
