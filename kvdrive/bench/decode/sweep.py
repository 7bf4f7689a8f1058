"""``kvdrive bench decode``: decode throughput of every KV placement side by side, one run,
one GPU, one model, the same contexts and batches.

Contexts are filled without a prefill (``fill_random``: seeded random post-RoPE K/V
through each cache's own plan/append/commit path), then each system decodes greedily
with the real model; only the decode steps after warm-up are timed. Every row also
carries the roofline bound of its step (``roofline.py``) and the fraction of it
reached. A (context, batch) that a system cannot hold is skipped with the reason,
never crashes the run. Systems are listed in ``systems.py``, the options in ``args.py``; what
they are and how to read the numbers is in docs/bench.md.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from kvdrive import device as devices
from kvdrive.bench import roofline
from kvdrive.bench.decode.args import decode_tokens, options, run_config
from kvdrive.bench.decode.fill import fill_random, fill_text
from kvdrive.bench.decode.points import GIB, Options, Shape
from kvdrive.bench.decode.report import merge, plot, run_notes, save
from kvdrive.bench.decode.systems import (
    SYSTEMS,
    System,
    hf_decode,
    mem_available,
    remove_disk_files,
    skip_reason,
)
from kvdrive.cache.base import KVCache
from kvdrive.engine.micro_batch import MicroBatchedDecode
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.progress import progress
from kvdrive.storage.layout import GroupLayout


def _release(dev: torch.device) -> None:
    """Give freed GPU memory and cached pinned host blocks back before the next row."""
    gc.collect()
    if dev.type != "cuda":
        return
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    accel = getattr(torch, "accelerator", None)
    empty_host = getattr(accel, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def _step_fn(model, cache: KVCache, seq_ids: list[int], ids: torch.Tensor, graphs: bool):
    """One decode step of the batch: ids (B, 1) -> logits (B, V), committed."""
    if graphs and model.device.type == "cuda" and cache.supports_cuda_graphs:
        from kvdrive.engine.cuda_graph import GraphedDecodeStep

        graph = GraphedDecodeStep(model, cache, seq_ids, ids)

        def step(x):
            logits = graph(x)
            graph.commit()
            return logits

        step.graphed = True
        return step
    parts = MicroBatchedDecode(model, cache)

    def step(x):
        logits, batches = parts.forward(seq_ids, x)
        for batch in batches:
            cache.commit(batch)
        return logits

    step.graphed = False
    return step


def _feeder(args, vocab: int, batch: int, dev):
    """logits (B, V) -> the next step's input ids (B, 1), per ``args.feed`` (``decode_tokens``)."""
    if args.feed == "greedy":
        return lambda logits: logits.argmax(-1, keepdim=True)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    return lambda logits: torch.randint(0, vocab, (batch, 1), generator=gen, device=dev)


def _breakdown(model, cache: KVCache, seq_ids: list[int], ids: torch.Tensor, args) -> dict:
    """ms per step by phase over ``--breakdown-steps`` extra eager steps, from the cache's
    ``StepProfile`` (events between phases; not the timed steps, which may be a graph)."""
    from kvdrive.tiered.cache import StepProfile

    cache.profile = StepProfile(model.device)
    step = _step_fn(model, cache, seq_ids, ids, graphs=False)
    feed = _feeder(args, model.config.vocab_size, len(seq_ids), model.device)
    for _ in range(args.breakdown_steps):
        ids = feed(step(ids))
    out = cache.profile.summary(args.breakdown_steps)
    cache.profile = None
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def per_step(stats: dict, steps: int) -> dict:
    """Hit rates over the groups selected and bytes / times per decode step, from cache stats."""
    out = {}
    sel = stats.get("groups_selected") or 0
    if sel:
        for k in ("gpu_hits", "prefetched_hits", "sync_fetched", "deferred"):  # deferred: left out, read behind
            if k in stats:
                out[f"{k}_rate"] = stats[k] / sel
    for k in (
        "bytes_host_to_gpu",
        "bytes_gpu_to_host",
        "disk_reads",
        "read_ahead",
        "deferred_reads",
        "disk_writes",
        "host_waits",
    ):  # host_waits: the engine thread waited for the GPU to free arena slots
        if k in stats:
            out[f"{k}_per_step"] = stats[k] / steps
    if isinstance(stats.get("time_ms"), dict):
        out["time_ms_per_step"] = {k: v / steps for k, v in stats["time_ms"].items()}
    return out


def _decode_row(model, system: System, shape: Shape, opts: Options, args, dev, haystack=None) -> dict:
    avail0 = mem_available()
    t0 = time.perf_counter()
    cache = system.build(shape, dev, opts)
    try:
        seq_ids = list(range(shape.batch))
        for s in seq_ids:
            cache.add(s, shape.context)
        if haystack is not None:
            ids = fill_text(model, cache, seq_ids, shape.filled, haystack, args.fill_chunk, args.seed)  # (B, 1)
        else:
            fill_random(cache, seq_ids, shape.filled, shape.config, dev, shape.dtype, args.fill_chunk, args.seed)
            gen = torch.Generator(device=dev).manual_seed(args.seed)
            ids = torch.randint(0, shape.config.vocab_size, (shape.batch, 1), generator=gen, device=dev)  # (B, 1)
        devices.synchronize(dev)
        row = {"fill_s": time.perf_counter() - t0, "host_mem_used_gib": max(0, avail0 - mem_available()) / GIB}
        placed = cache.stats().get("bytes_placed_from_disk")
        if placed:  # a disk tier's initial placement read these back into the arena (in fill_s)
            row["placed_from_disk_gib"] = placed / GIB
        step = _step_fn(model, cache, seq_ids, ids, not args.no_cuda_graphs)
        feed = _feeder(args, shape.config.vocab_size, shape.batch, dev)
        for _ in range(args.warmup + system.settle_steps(opts) - 1):
            ids = feed(step(ids))
        devices.synchronize(dev)
        if dev.type == "cuda":  # the fill's peak (a tiered prefill stage, say) is not the decode's
            row["fill_peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        ids = feed(step(ids))
        devices.synchronize(dev)
        warm = time.perf_counter() - t0
        steps = max(min(3, args.new_tokens), min(args.new_tokens, int(args.row_seconds / warm)))
        cache.reset_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            ids = feed(step(ids))
        devices.synchronize(dev)
        elapsed = time.perf_counter() - t0
        row.update(tokens_per_s=shape.batch * steps / elapsed, step_ms=elapsed / steps * 1e3, steps_timed=steps)
        stats = cache.stats()
        if stats:
            stats = _jsonable(stats)
            row.update(stats=stats, per_step=per_step(stats, steps))
        row["cuda_graph"] = step.graphed
        if args.profile:
            from kvdrive.bench.kernel_profile import profile_steps

            name = f"{system.name}-{shape.context}-b{shape.batch}" + (f"-{opts.kv_dtype}" if system.formats else "")
            row["profile"] = profile_steps(step, ids, args.profile_steps, Path(args.profile), name)
        if args.breakdown_steps and cache.supports_profile:
            row.setdefault("per_step", {})["time_ms_per_step"] = _breakdown(model, cache, seq_ids, ids, args)
        return row
    finally:
        cache.close()  # disk-backed caches: stop I/O threads, close extent files


def _slot_bytes(config, dtype: torch.dtype, group_tokens: int, kv_dtype: str = "bf16") -> int:
    """Bytes of one disk slot of the tiered caches' pool: a group of one layer in its format, aligned."""
    return GroupLayout.from_config(config, dtype, group_tokens, kv_dtype).slot_bytes


def _disk_bytes(shape: Shape, row: dict, group_tokens: int, kv_dtype: str) -> int:
    """Bytes a disk-backed row read from disk per step: its reads, read-ahead and reads behind
    (deferred misses), whole slots."""
    ps = row.get("per_step", {})
    reads = ps.get("disk_reads_per_step", 0) + ps.get("read_ahead_per_step", 0) + ps.get("deferred_reads_per_step", 0)
    return int(reads * _slot_bytes(shape.config, shape.dtype, group_tokens, kv_dtype))


def _pcie_bytes(system: System, shape: Shape, row: dict) -> int:
    if system.pcie == "all_kv":
        return shape.all_kv
    if system.pcie == "measured":
        return int(row.get("per_step", {}).get("bytes_host_to_gpu_per_step", 0))
    return 0


def measure_row(loaded, system: System, shape: Shape, opts: Options, args, bw, weights: int, haystack=None) -> dict:
    """Run one (system, context, batch); returns the row (skipped rows carry ``reason``)."""
    dev = loaded.model.device
    head = {"system": system.name, "context": shape.context, "batch": shape.batch, "filled": shape.filled}
    if system.formats:
        head["kv_dtype"] = opts.kv_dtype
    reason = skip_reason(system, shape, opts, args, dev, loaded)
    if reason:
        return {**head, "status": "skipped", "reason": reason}
    est = {"est_gpu_gib": system.gpu_bytes(shape, opts) / GIB, "est_host_gib": system.host_bytes(shape, opts) / GIB}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        if system.build is None:
            gen = torch.Generator(device=dev).manual_seed(args.seed)
            prompts = torch.randint(
                0,
                shape.config.vocab_size,
                (shape.batch, shape.context - args.hf_new_tokens - 1),
                generator=gen,
                device=dev,
            )
            row = hf_decode(loaded, prompts, args.hf_new_tokens)
        else:
            row = _decode_row(loaded.model, system, shape, opts, args, dev, haystack)
    except (torch.OutOfMemoryError, CapacityError) as err:
        return {**head, "status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:200]}", **est}
    except KvdriveError as err:
        return {**head, "status": "skipped", "reason": str(err), **est}
    except Exception as err:  # noqa: BLE001 -- a bug in one system must not lose the other rows of a long run
        if "out of memory" in str(err).lower():  # e.g. pinned host allocation: a RuntimeError from CUDA
            return {**head, "status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:200]}", **est}
        traceback.print_exc()
        return {**head, "status": "error", "reason": f"{type(err).__name__}: {err}", **est}
    if dev.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    step_bytes = roofline.StepBytes(
        weights,
        system.gpu_kv_read(shape, opts),
        _pcie_bytes(system, shape, row),
        _disk_bytes(shape, row, args.group_tokens, opts.kv_dtype),
    )
    b = roofline.bound(shape.batch, step_bytes, bw)
    row["roofline"] = {
        "weights_bytes": step_bytes.weights,
        "gpu_kv_bytes": step_bytes.gpu_kv,
        "pcie_bytes": step_bytes.pcie,
        **(b.as_dict() if b else {}),
    }
    row["fraction_of_bound"] = row["tokens_per_s"] / b.tokens_per_s if b else None
    return {**head, "status": "ok", **row, **est}


def run(args) -> int:
    from kvdrive.models.loader import load_model

    if args.merge:
        return _summarize(merge(args.merge, args.out), args.no_plot)
    parts = 1 if args.micro_batches == "auto" else args.micro_batches
    if min(args.warmup, args.new_tokens, min(args.contexts), min(args.batches), parts) < 1:
        raise KvdriveError("--warmup, --new-tokens, --contexts, --batches and --micro-batches must be >= 1")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    model, dev, dtype, config = loaded.model, loaded.model.device, loaded.model.dtype, loaded.config
    args.feed = decode_tokens(args, loaded.random_weights)
    opts = options(args)
    haystack = None
    if args.text:
        from kvdrive.eval.corpus import TokenHaystack, load_text

        if loaded.tokenizer is None:
            raise KvdriveError(
                f"--text needs a real model with a tokenizer; {args.model} has random weights (use e.g. -m smollm2)"
            )
        haystack = TokenHaystack(loaded.tokenizer, load_text(args.text).text)
    bw = roofline.measure(dev, args.bw_mib << 20)
    if any(SYSTEMS[n].on_disk for n in args.systems):
        disk_bw, disk_ms = roofline.measure_disk(args.disk[0], _slot_bytes(config, dtype, args.group_tokens))
        bw = replace(bw, disk=disk_bw, disk_latency_ms=disk_ms)
    _release(dev)
    weights = roofline.weight_bytes_read(model)
    config_doc = run_config(args, loaded, opts.sparse, weights)
    notes = run_notes(loaded.random_weights, args.warmup, args.rebalance_after, args.feed)
    rows = []
    points = [
        (c, s, f, b)
        for c in args.contexts
        for s in args.systems
        for f in (args.kv_dtype if SYSTEMS[s].formats else ["bf16"])
        for b in sorted(args.batches)
    ]
    # Every system decodes from the same filled length: room for the longest warm-up of the run.
    settle = max(SYSTEMS[n].settle_steps(opts) for n in args.systems)
    room = (
        max(
            args.hf_new_tokens,
            args.warmup + settle + args.new_tokens + args.breakdown_steps + (args.profile_steps if args.profile else 0),
        )
        + 1
    )
    failed: dict[tuple[int, str, str], int] = {}  # (context, system, format) -> batch that ran out of memory
    with torch.inference_mode():
        for ctx, name, fmt, b in progress(points, desc="decode rows"):
            system, row_opts = SYSTEMS[name], replace(opts, kv_dtype=fmt)
            shape = Shape(config, dtype, b, ctx, room)
            if (ctx, name, fmt) in failed:
                row = {
                    "system": name,
                    **({"kv_dtype": fmt} if system.formats else {}),
                    "context": ctx,
                    "batch": b,
                    "filled": shape.filled,
                    "status": "skipped",
                    "reason": f"batch {failed[ctx, name, fmt]} already ran out of memory",
                }
            else:
                row = measure_row(loaded, system, shape, row_opts, args, bw, weights, haystack)
                if row.get("reason", "").startswith("out of memory"):
                    failed[ctx, name, fmt] = b
            _release(dev)
            if system.disk_bytes(shape, row_opts):
                remove_disk_files(row_opts)
            rows.append(row)
            path = save(args.out, config_doc, bw.as_dict(), rows, notes)  # a run cut short keeps its rows
            print(
                {
                    k: round(v, 3) if isinstance(v, float) else v
                    for k, v in row.items()
                    if k not in ("stats", "per_step", "roofline")
                },
                flush=True,
            )
    return _summarize(path, args.no_plot)


def _summarize(path, no_plot: bool) -> int:
    print(f"wrote {path}")
    for r in json.loads(path.read_text())["results"]["ratios"]:
        fmt = f" {r['kv_dtype']} / {r['vs_kv_dtype']}" if "kv_dtype" in r else ""
        print(f"context {r['context']}: {r['system']} / {r['vs']}{fmt} = {r['ratio']:.2f}x")
    if not no_plot:
        try:
            for png in plot(path):
                print(f"wrote {png}")
        except KvdriveError as err:
            print(f"no plot: {err}")
    return 0
