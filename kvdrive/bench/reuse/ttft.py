"""``kvdrive bench ttft``: time to first token of a repeated long prompt, three ways.

(a) recompute: prefill the whole prompt (the engine's chunked prefill);
(b) serial: the stored prefix read chunk after chunk, tier by tier (host copy, else
    disk), through buffered file reads, one thread, then copied to the GPU: the
    retrieval path the Unified KV Pooling paper measured and beat;
(c) kvdrive: ``PrefixPool.load``, every device's share of each layer at once with
    O_DIRECT, pipelined with the import, then the suffix prefill.

Each is timed to the first token's logits (argmax included), page cache dropped for
the pool's extents before (b) and (c). ``--kv-dtype`` runs (b) and (c) once per storage
format of the pool (bf16, fp8, int8, int4) in one process, beside the same recompute, and
reports each compressed format's load and TTFT as a fraction of bf16's. Configurations: the first disk path alone, all
paths, and (``--host-gib``) the first path with a pinned host arena as a pool member,
at the longest context. Read bandwidth is compared with the sum of the devices' probed
bandwidths; paths on one file system count once (two directories on one disk measure
pool overhead, not more bandwidth).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import torch
import xxhash

from kvdrive import device as devices
from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.commands.common import BENCH_MODEL, add_model_options
from kvdrive.commands.probe import measure
from kvdrive.prefix.pool import PrefixConfig, PrefixPool
from kvdrive.quant.dequant import dequant_rows
from kvdrive.quant.formats import KV_DTYPES, dequantize, quantize
from kvdrive.results import write_result
from kvdrive.storage import probe
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import PoolPath

PREFILL_CHUNK = 2048  # the engine's prefill piece
TINY = dict(model="random:smollm2-135m", contexts=[96, 160], chunk_tokens=16, probe_mib=4)


def add_arguments(p) -> None:
    add_model_options(p, default=BENCH_MODEL)
    p.add_argument("-c", "--contexts", type=int, nargs="+", default=[32768, 65536, 131072], help="prompt tokens")
    p.add_argument("--paths", nargs="+", default=["bench/ttft-pool"], help="disk directories of the pool")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--host-gib", type=float, default=0.0, help="also run a pool with this pinned host arena")
    p.add_argument("--probe-mib", type=int, default=1024, help="MiB read per path by the bandwidth probe")
    p.add_argument(
        "--kv-dtype",
        nargs="+",
        choices=KV_DTYPES,
        default=["bf16"],
        metavar="{bf16,fp8,int8,int4}",
        help="storage formats of the pool, each measured in this run (default bf16: the model dtype)",
    )
    p.add_argument("--no-serial", action="store_true", help="skip baseline (b), the serial buffered read")
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes (random SmolLM2 shape, short prompts)")
    p.add_argument("-o", "--out", default="bench/results/ttft.json")


def _prefill(model, cache, seq, ids, start=0) -> int:
    logits = None
    for b in range(start, len(ids), PREFILL_CHUNK):
        piece = ids[b : b + PREFILL_CHUNK][None]
        batch = cache.plan([seq], piece.shape[1])
        logits = model(piece, cache, batch)
        cache.commit(batch)
    return int(logits.argmax())


def _fresh(cache, seq, tokens):
    """Sequence ``seq`` empty, with room for ``tokens`` (the bench owns both sequences of the cache)."""
    with contextlib.suppress(KeyError):
        cache.free(seq)
    cache.add(seq, tokens)


def _drop_page_cache(paths) -> None:
    for root in paths:
        for name in os.listdir(root):
            if name.endswith(".extent"):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def serial_buffered_load(pool: PrefixPool, cache, seq, ids) -> tuple[int, int]:
    """Baseline (b): chunk by chunk, layer by layer, buffered preads on one thread, checksum, copy."""
    lay, c = pool.layout, pool.config.chunk_tokens
    hit = pool.lookup(ids.tolist(), max_chunks=(len(ids) - 1) // c)
    buf = torch.empty(lay.slot_bytes, dtype=torch.uint8)
    mv, fds, nbytes = memoryview(buf.numpy()), {}, 0
    dev = cache.device
    try:
        for src in hit.sources:
            batch = cache.plan([seq], c)
            for layer in range(lay.num_layers):
                if src.tier == "host":
                    row = pool.host.rows[src.slots[layer], : lay.stored_bytes]
                else:
                    path, off = pool.pool.devices[src.device].locate(src.slots[layer])
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    os.preadv(fds[path], [mv], off)
                    if xxhash.xxh3_64_intdigest(mv[: lay.stored_bytes]) != src.sums[layer]:  # its row's
                        raise RuntimeError("checksum mismatch in the baseline read")
                    row = buf[: lay.stored_bytes]
                kv = dequantize(row[None].to(dev), lay.kv_dtype, lay.group_shape, lay.dtype)[0]  # (2, H_kv, C, D)
                cache.append(layer, kv[0][None], kv[1][None], batch)
                nbytes += lay.stored_bytes
            cache.commit(batch)
    finally:
        for fd in fds.values():
            os.close(fd)
    return hit.tokens, nbytes


def _probe_paths(paths, slot_bytes, mib) -> dict:
    out = {}
    for p in paths:
        res = measure(p, slot_bytes, mib << 20)
        probe.save(res)
        out[p] = {
            "read_gbps": res.read_gbps,
            "write_gbps": res.write_gbps,
            "direct": res.direct,
            "st_dev": os.stat(p).st_dev,
        }
    return out


def _device_gbps(probes: dict, paths) -> tuple[float, float]:
    """(sum over paths, sum over distinct devices taking each device's best path)."""
    per_dev: dict[int, float] = {}
    for p in paths:
        per_dev[probes[p]["st_dev"]] = max(per_dev.get(probes[p]["st_dev"], 0.0), probes[p]["read_gbps"])
    return sum(probes[p]["read_gbps"] for p in paths), sum(per_dev.values())


def _measure(name, pool, model, cache, ids, ref_token, recompute_s, paths, device_gbps, serial=True) -> dict:
    dev = model.device
    c = pool.config.chunk_tokens
    pool.staging.reserve((len(ids) - 1) // c)  # steady state: the staging ring exists
    row = {"config": name, "kv_dtype": pool.layout.kv_dtype}
    if serial:
        row["serial_buffered"] = _serial(pool, model, cache, ids, ref_token, recompute_s, paths)
    # (c) kvdrive
    _fresh(cache, 1, len(ids))
    _drop_page_cache(paths)
    devices.synchronize(dev)
    t0 = time.perf_counter()
    done = pool.load(model, cache, 1, ids.tolist())
    devices.synchronize(dev)
    load_s = time.perf_counter() - t0
    tok = _prefill(model, cache, 1, ids, done)
    devices.synchronize(dev)
    ttft = time.perf_counter() - t0
    rep = pool.last_load
    gbps = rep.bytes_read / load_s / 1e9
    row["kvdrive"] = {
        "ttft_s": ttft,
        "load_s": load_s,
        "suffix_prefill_s": ttft - load_s,
        "tokens_loaded": done,
        "chunks_from_disk": rep.chunks_from_disk,
        "chunks_from_host": rep.chunks_from_host,
        "bytes_read": rep.bytes_read,
        "read_gbps": gbps,
        "first_token_matches": tok == ref_token,
        "speedup_vs_recompute": recompute_s / ttft,
        "ttft_over_recompute": ttft / recompute_s,
        "read_gbps_over_device_sum": gbps / device_gbps if device_gbps else None,
    }
    print(
        name,
        len(ids),
        {k: row[k]["ttft_s"] for k in ("serial_buffered", "kvdrive") if k in row},
        f"recompute {recompute_s:.2f}s, kvdrive {gbps:.2f} GB/s of {device_gbps:.2f}",
        flush=True,
    )
    return row


def _serial(pool, model, cache, ids, ref_token, recompute_s, paths) -> dict:
    """Baseline (b), timed to the first token."""
    dev = model.device
    _fresh(cache, 1, len(ids))
    _drop_page_cache(paths)
    devices.synchronize(dev)
    t0 = time.perf_counter()
    done, nbytes = serial_buffered_load(pool, cache, 1, ids)
    devices.synchronize(dev)
    load_s = time.perf_counter() - t0
    tok = _prefill(model, cache, 1, ids, done)
    devices.synchronize(dev)
    ttft = time.perf_counter() - t0
    return {
        "ttft_s": ttft,
        "load_s": load_s,
        "tokens_loaded": done,
        "read_gbps": nbytes / load_s / 1e9,
        "speedup_vs_recompute": recompute_s / ttft,
        "first_token_matches": tok == ref_token,
    }


def _warm_format(layout: GroupLayout, dev) -> None:
    """Compile (Triton) and first-touch (torch) a format's quantizer and dequantizer at the rows'
    real width, so no load's timing includes them."""
    if not layout.compressed:
        return
    groups = torch.randn(2, *layout.slot_shape, device=dev).to(layout.dtype)
    rows = quantize(groups, layout.kv_dtype)  # (2, stored_bytes)
    out = torch.empty(2, groups[0].numel(), dtype=layout.dtype, device=dev)
    at = torch.arange(2, device=dev)
    dequant_rows(rows, at, out, at, layout.kv_dtype, layout.group_shape)
    devices.synchronize(dev)


def _label(name: str, kv_dtype: str) -> str:
    """A configuration's name in results: bf16 keeps the plain name."""
    return name if kv_dtype == "bf16" else f"{name} {kv_dtype}"


def _vs_bf16(entry: dict, names: list[str], fmts: list[str]) -> dict:
    """Each compressed pool's load and TTFT over the bf16 pool's (same configuration and context)."""
    out = {}
    for name in names:
        if name not in entry:
            continue
        ref = entry[name]["kvdrive"]
        for f in fmts:
            if f != "bf16" and _label(name, f) in entry:
                got = entry[_label(name, f)]["kvdrive"]
                out[_label(name, f)] = {
                    "load_over_bf16": got["load_s"] / ref["load_s"],
                    "ttft_over_bf16": got["ttft_s"] / ref["ttft_s"],
                    "ttft_over_recompute": got["ttft_over_recompute"],
                    "bf16_ttft_over_recompute": ref["ttft_over_recompute"],
                }
    return out


def run(args) -> int:
    from kvdrive.models.loader import load_model

    if args.tiny:
        args.model, args.contexts, args.chunk_tokens = TINY["model"], TINY["contexts"], TINY["chunk_tokens"]
        args.probe_mib = min(args.probe_mib, TINY["probe_mib"])
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, cfg, dev = loaded.model, loaded.config, loaded.model.device
    layout = GroupLayout.from_config(cfg, model.dtype, args.chunk_tokens)
    kv_token = layout.token_bytes * layout.num_layers
    paths = [os.path.abspath(p) for p in args.paths]
    for p in paths:
        os.makedirs(p, exist_ok=True)
    probes = _probe_paths(paths, layout.slot_bytes, args.probe_mib)
    max_ctx = max(args.contexts)
    configs = [("disk x1", paths[:1])] + ([(f"disk x{len(paths)}", paths)] if len(paths) > 1 else [])
    fmts = list(dict.fromkeys(args.kv_dtype))
    layouts = {f: GroupLayout.from_config(cfg, model.dtype, args.chunk_tokens, f) for f in fmts}

    def budget_of(f: str) -> int:
        """Disk bytes of the longest prompt's chunks in format ``f``, with a tenth to spare."""
        slot_token = layouts[f].slot_bytes * layout.num_layers // args.chunk_tokens
        return int(max_ctx * slot_token * 1.1) + args.chunk_tokens * slot_token

    pools = {}
    for f in fmts:
        for name, ps in configs:
            dirs = [os.path.join(p, name.replace(" ", "") + ("" if f == "bf16" else f"-{f}")) for p in ps]
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                probe.save(
                    probe.DeviceProbe(**{**probe.load(os.path.dirname(d), layout.slot_bytes).__dict__, "path": d})
                )
            pools[_label(name, f)] = (
                PrefixPool(
                    cfg,
                    model.dtype,
                    PrefixConfig(
                        model=args.model,
                        disks=tuple(PoolPath(d, budget_of(f) // len(dirs) + layouts[f].slot_bytes) for d in dirs),
                        chunk_tokens=args.chunk_tokens,
                        admit_after=1,
                        kv_dtype=f,
                    ),
                ),
                dirs,
                _device_gbps(probes, ps)[1],
            )
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, cfg.vocab_size, (max_ctx,), generator=gen).to(dev)
    cache = ContiguousKVCache(cfg, 2, max_ctx, dev, model.dtype)
    results = []
    serial = not args.no_serial
    with torch.inference_mode():
        _fresh(cache, 0, max_ctx)
        _prefill(model, cache, 0, base[: 2 * args.chunk_tokens + 1])  # warm-up: kernels, allocator
        for f in fmts:
            _warm_format(layouts[f], dev)
        for ctx in sorted(args.contexts):
            ids = base[:ctx]
            _fresh(cache, 0, ctx)
            devices.synchronize(dev)
            t0 = time.perf_counter()
            ref = _prefill(model, cache, 0, ids)
            devices.synchronize(dev)
            recompute_s = time.perf_counter() - t0
            entry = {"context": ctx, "kv_gib": ctx * kv_token / 2**30, "recompute": {"ttft_s": recompute_s}}
            for name, (pool, dirs, dgbps) in pools.items():
                t0 = time.perf_counter()
                pool.store(cache, 0, ids.tolist())
                store_s = time.perf_counter() - t0
                row = _measure(name, pool, model, cache, ids, ref, recompute_s, dirs, dgbps, serial)
                row["store_s"] = store_s
                entry[name] = row
            entry["vs_bf16"] = _vs_bf16(entry, [n for n, _ in configs], fmts)
            results.append(entry)
        for pool, _, _ in pools.values():
            pool.close(remove=True)
        if args.host_gib > 0:  # the unified pool: host arena + first disk, at the longest context
            ids = base[:max_ctx]
            for f in fmts:
                d = os.path.join(paths[0], "host" + ("" if f == "bf16" else f"-{f}"))
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                pool = PrefixPool(
                    cfg,
                    model.dtype,
                    PrefixConfig(
                        model=args.model,
                        disks=(PoolPath(d, budget_of(f), weight=probes[paths[0]]["read_gbps"]),),
                        host_bytes=int(args.host_gib * 2**30),
                        chunk_tokens=args.chunk_tokens,
                        admit_after=1,
                        kv_dtype=f,
                    ),
                )
                t0 = time.perf_counter()
                pool.store(cache, 0, ids.tolist())
                store_s = time.perf_counter() - t0
                host_gbps = pool.host_weight
                name = _label("host + disk x1", f)
                row = _measure(
                    name,
                    pool,
                    model,
                    cache,
                    ids,
                    ref,
                    recompute_s,
                    [d],
                    host_gbps + probes[paths[0]]["read_gbps"],
                    serial,
                )
                row.update(store_s=store_s, host_gbps_measured=host_gbps, stats=pool.stats().__dict__)
                results[-1][name] = row
                pool.close(remove=True)
            results[-1]["vs_bf16"].update(_vs_bf16(results[-1], ["host + disk x1"], fmts))
    config = {
        "model": loaded.source,
        "dtype": str(model.dtype),
        "device": str(dev),
        "contexts": args.contexts,
        "chunk_tokens": args.chunk_tokens,
        "slot_bytes": layout.slot_bytes,
        "kv_dtypes": fmts,
        "stored_slot_bytes": {f: layouts[f].slot_bytes for f in fmts},
        "kv_bytes_per_token": kv_token,
        "paths": paths,
        "probes": probes,
        "host_gib": args.host_gib,
        "prefill_chunk": PREFILL_CHUNK,
    }
    notes = [
        "random weights of the real architecture's shape" if loaded.random_weights else "real weights",
        "TTFT = load (or recompute) + suffix prefill + argmax of the first token, synchronized",
        "page cache dropped (posix_fadvise DONTNEED) on the extents before (b) and (c); (c) reads with O_DIRECT",
        "prompts share one random token stream, so the 64K and 128K stores reuse the shorter ones' chunks",
        "read_gbps_over_device_sum: achieved / sum of probed read GB/s over distinct devices (st_dev)",
        "staging ring allocated before timing (steady state); the first load of a pool allocates it",
        "vs_bf16: a compressed pool's load_s and ttft_s over the bf16 pool's of the same configuration, same run",
    ]
    path = write_result(args.out, "ttft", config, results, notes)
    print(f"wrote {path}")
    return 0
