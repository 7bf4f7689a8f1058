"""``kvdrive bench io``: how close kvdrive's transfers come to the hardware, in one run.

(a) pinned host -> GPU: one large memcpy (the peak) vs the batched row copy of randomly
    chosen groups (Triton kernel over UVA, and the staging fallback), plus the GPU ->
    host write-back scatter, and the tiered cache's fetch (indices already on the GPU), of
    bf16 rows and of each compressed format's stored rows: dequantized by one kernel reading
    the host rows in place, and copied raw to the GPU then dequantized there (staged);
(b) disk: raw O_DIRECT sequential read (large blocks) and random group-size reads (plain
    threads, no kvdrive), vs kvdrive's pool read of random groups at several queue
    depths, per request (``read``) and as one native batch into a host arena (``read_to``,
    the disk tier's path);
(c) (b) with the pool over two paths.
CUDA parts are skipped, with a note, where there is no GPU; sizes shrink with ``--tiny``.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvdrive import device as dev
from kvdrive.quant.dequant import dequant_rows
from kvdrive.quant.formats import quantize, stored_bytes
from kvdrive.results import write_result
from kvdrive.storage.gather import RowCopier, copy_rows, triton_available
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout, align_up
from kvdrive.storage.pool import DiskAddr, DiskPool, PoolPath

GIB = 1 << 30
MIB = 1 << 20
RAW_BLOCK = 1 << 20  # sequential reads: 1 MiB requests
RAW_DEPTH = 8
TRITON_BLOCKS = (1024, 2048, 4096, 8192)


def add_arguments(p) -> None:
    p.add_argument(
        "--dir",
        action="append",
        default=None,
        help="directory on the disk to test (repeat for more devices; default /tmp)",
    )
    p.add_argument("--disk-gib", type=float, default=4.0, help="GiB of groups written per disk test (default 4)")
    p.add_argument("--host-gib", type=float, default=2.0, help="GiB of pinned host arena for (a) (default 2)")
    p.add_argument("--group-tokens", type=int, default=16, help="G (default 16: 64 KiB for Llama-3.1-8B)")
    p.add_argument("--batch", type=int, default=2048, help="groups per batched transfer (default 2048)")
    p.add_argument("--depths", type=int, nargs="+", default=[16, 32, 64], help="read queue depths to try")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, median kept (default 5)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("-o", "--out", default="bench/results/io.json", help="JSON result path")


def _llama_layout(g: int) -> GroupLayout:
    # Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128, bf16 -> 4 KiB per token per layer.
    return GroupLayout(32, 8, 128, torch.bfloat16, g)


def _median_s(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (compiles the kernel, faults pages in)
    times = []
    for _ in range(repeats):
        dev.synchronize(device)
        t0 = time.perf_counter()
        fn()
        dev.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def bench_host_gpu(args, layout: GroupLayout, notes: list[str]) -> dict:
    if not dev.has_cuda():
        notes.append("no CUDA GPU: section (a) host<->GPU skipped")
        return {"skipped": "no CUDA GPU"}
    cuda = torch.device("cuda")
    slots = int(args.host_gib * GIB) // layout.slot_bytes
    host = HostTier(layout, slots * layout.slot_bytes, pin=True)
    n = min(args.batch, slots)
    nbytes = n * layout.group_bytes
    flat = host.rows.view(-1)[:nbytes]
    big = torch.empty(nbytes, dtype=torch.uint8, device=cuda)
    out = {
        "pinned": host.pinned,
        "groups": n,
        "bytes": nbytes,
        "memcpy_h2d_gbps": _gbps(nbytes, _median_s(lambda: big.copy_(flat, non_blocking=True), args.repeats, cuda)),
        "memcpy_d2h_gbps": _gbps(nbytes, _median_s(lambda: flat.copy_(big, non_blocking=True), args.repeats, cuda)),
    }
    src_w = host.rows.view(torch.int32)  # (S, slot_words)
    dst_w = torch.empty(n, layout.group_words, dtype=torch.int32, device=cuda)
    rng = np.random.default_rng(0)
    pick = rng.choice(slots, n, replace=False).tolist()
    rows = list(range(n))
    methods = {"staging": RowCopier(cuda, "staging")}
    if triton_available():
        methods.update({f"triton_block{b}": RowCopier(cuda, "triton", block=b) for b in TRITON_BLOCKS})
    else:
        notes.append("triton not installed: only the staging gather was measured")
    for name, c in methods.items():
        out[f"gather_h2d_{name}_gbps"] = _gbps(
            nbytes, _median_s(lambda c=c: c.copy(src_w, pick, dst_w, rows, layout.group_words), args.repeats, cuda)
        )
        out[f"scatter_d2h_{name}_gbps"] = _gbps(
            nbytes, _median_s(lambda c=c: c.copy(dst_w, rows, src_w, pick, layout.group_words), args.repeats, cuda)
        )
    best = max((k for k in out if k.startswith("gather_h2d_")), key=out.get)
    out["gather_best"] = best
    out["gather_vs_memcpy"] = round(out[best] / out["memcpy_h2d_gbps"], 3)
    out["fetch_rows_gbps"] = _fetch_rows(src_w, dst_w, pick, layout, args.repeats, cuda)
    out["fetch_rows_vs_memcpy"] = round(out["fetch_rows_gbps"] / out["memcpy_h2d_gbps"], 3)
    if triton_available():
        out["fetch_formats"] = _fetch_formats(layout, n, args.repeats, cuda)
    return out


def _fetch_rows(src_w, dst_w, pick, layout, repeats: int, cuda) -> float:
    """The tiered cache's fetch: host rows -> GPU rows with both index lists already on the GPU."""
    src_idx = torch.tensor(pick, dtype=torch.int64, device=cuda)
    dst_idx = torch.arange(len(pick), dtype=torch.int64, device=cuda)
    s = _median_s(lambda: copy_rows(src_w, src_idx, dst_w, dst_idx, layout.group_words), repeats, cuda)
    return _gbps(len(pick) * layout.group_bytes, s)


def _fetch_formats(layout: GroupLayout, n: int, repeats: int, cuda) -> dict:
    """The compressed tiers' fetch of ``n`` random groups of each format: stored rows in pinned
    host memory -> typed rows on the GPU. ``direct``: the dequantizer reads the host rows over
    PCIe (what the tiered cache runs); ``looped``: the same on a quarter of the SMs (the tiered
    cache's ``fetch_programs`` with micro-batches); ``staged``: the row copy brings the stored
    bytes to the GPU, where the dequantizer reads them. GB/s of stored bytes crossing, and
    groups/s."""
    h, g, d = layout.group_shape
    elems = 2 * h * g * d
    slots = 4 * n  # more rows than fetched: the picks are scattered
    dst = torch.empty(n, elems, dtype=layout.dtype, device=cuda)
    src_idx = torch.tensor(np.random.default_rng(1).choice(slots, n, replace=False), device=cuda)
    dst_idx = torch.arange(n, device=cuda)
    quarter = max(1, torch.cuda.get_device_properties(cuda).multi_processor_count // 4)
    out = {"looped_programs": quarter}
    for fmt in ("fp8", "int8", "int4"):
        stored = align_up(stored_bytes(fmt, h, g, d, layout.dtype.itemsize), 16)
        rows = torch.empty(slots, stored, dtype=torch.uint8).pin_memory()
        for lo in range(0, slots, n):  # real codes (no NaN bytes), written a batch at a time
            groups = torch.randn(min(n, slots - lo), 2, h, g, d, device=cuda, dtype=layout.dtype)
            rows[lo : lo + groups.shape[0], : stored_bytes(fmt, h, g, d, 2)].copy_(quantize(groups, fmt))
        stage = torch.empty(n, stored, dtype=torch.uint8, device=cuda)
        words = stored // 4

        def direct(fmt=fmt, rows=rows):
            dequant_rows(rows, src_idx, dst, dst_idx, fmt, (h, g, d))

        def looped(fmt=fmt, rows=rows):
            dequant_rows(rows, src_idx, dst, dst_idx, fmt, (h, g, d), programs=quarter)

        def staged(fmt=fmt, rows=rows, stage=stage, words=words):
            copy_rows(rows.view(torch.int32), src_idx, stage.view(torch.int32), dst_idx, words)
            dequant_rows(stage, dst_idx, dst, dst_idx, fmt, (h, g, d))

        row = {"stored_bytes": stored, "bytes_over_bf16": round(stored / layout.group_bytes, 3)}
        for name, fn in (("direct", direct), ("looped", looped), ("staged", staged)):
            s = _median_s(fn, repeats, cuda)
            row[f"{name}_gbps"] = _gbps(n * stored, s)
            row[f"{name}_groups_per_s"] = round(n / s)
        out[fmt] = row
        del rows, stage
    return out


def _raw_disk(path: str, nbytes: int, group_bytes: int, depths: list[int], batch: int) -> dict:
    """No kvdrive: an O_DIRECT file read sequentially in 1 MiB requests, then random group reads."""
    import mmap

    name = os.path.join(path, f".kvdrive-bench-raw-{os.getpid()}")
    nblocks = nbytes // RAW_BLOCK
    bufs = [mmap.mmap(-1, RAW_BLOCK) for _ in range(RAW_DEPTH)]
    for b in bufs:
        b.write(os.urandom(RAW_BLOCK))  # not zeros: some devices compress
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        os.posix_fallocate(fd, 0, nblocks * RAW_BLOCK)
        with ThreadPoolExecutor(RAW_DEPTH) as ex:
            t0 = time.perf_counter()
            list(ex.map(lambda i: os.pwritev(fd, [bufs[i % RAW_DEPTH]], i * RAW_BLOCK), range(nblocks)))
            w = time.perf_counter() - t0
            t0 = time.perf_counter()
            list(ex.map(lambda i: os.preadv(fd, [bufs[i % RAW_DEPTH]], i * RAW_BLOCK), range(nblocks)))
            r = time.perf_counter() - t0
        groups = nblocks * RAW_BLOCK // group_bytes
        offs = np.random.default_rng(2).choice(groups, min(groups, batch * 4), replace=False) * group_bytes
        random = {}
        for depth in depths:
            gbufs = [memoryview(mmap.mmap(-1, group_bytes)) for _ in range(depth)]
            with ThreadPoolExecutor(depth) as ex:
                t0 = time.perf_counter()
                list(
                    ex.map(
                        lambda j, gbufs=gbufs, depth=depth: os.preadv(fd, [gbufs[j % depth]], int(offs[j])),
                        range(len(offs)),
                    )
                )
                random[str(depth)] = _gbps(len(offs) * group_bytes, time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)
    total = nblocks * RAW_BLOCK
    return {
        "seq_write_gbps": _gbps(total, w),
        "seq_read_gbps": _gbps(total, r),
        "random_group_read_gbps": max(random.values()),
        "random_group_read_gbps_by_depth": random,
        "seq_block_bytes": RAW_BLOCK,
        "seq_depth": RAW_DEPTH,
        "bytes": total,
    }


def bench_disk(args, layout: GroupLayout, paths: list[str], device: torch.device) -> dict:
    """kvdrive's pool over ``paths``: batched write GB/s, random group reads per depth, one
    request at a time (``read``) and as one native batch into a host arena (``read_to``)."""
    n = max(args.batch, int(args.disk_gib * GIB) // layout.slot_bytes)
    per_path = -(-n // len(paths)) * layout.slot_bytes + 64 * MIB
    out: dict = {"paths": paths, "groups": n, "group_bytes": layout.group_bytes, "depths": {}}
    batch = min(args.batch, n)
    arena = HostTier(layout, batch * layout.slot_bytes, pin=device.type == "cuda")
    arena.rows.copy_(torch.randint(0, 255, arena.rows.shape, dtype=torch.uint8))  # not zeros: some devices compress
    base = np.uint64(arena.rows.data_ptr())
    slot_addrs = base + np.arange(batch, dtype=np.uint64) * np.uint64(layout.slot_bytes)
    bufs = [arena.buffer(i) for i in range(batch)]
    for depth in args.depths:
        pool = DiskPool.open([PoolPath(p, per_path, 1.0) for p in paths], layout, read_depth=depth)
        try:
            out["direct"] = [d.direct for d in pool.devices]
            addrs = np.array(pool.alloc(n), dtype=np.int64).reshape(-1, 2)  # (n, 2): device, slot
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                part = addrs[lo : lo + batch]
                ok = pool.write_from(part[:, 0], part[:, 1], slot_addrs[: len(part)]).ok()
                assert ok.all(), "disk write failed"
            out.setdefault("write_gbps", _gbps(n * layout.group_bytes, time.perf_counter() - t0))
            rng = np.random.default_rng(3)
            reads = [rng.choice(n, batch, replace=False) for _ in range(args.repeats)]
            t0 = time.perf_counter()
            for pick in reads:  # one request per group, all devices at once
                picked = [DiskAddr(int(d), int(s)) for d, s in addrs[pick]]
                assert all(r is None for r in pool.read(picked, bufs).result())
            pool_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for pick in reads:  # one native batch per device, as the disk tier reads into its arena
                assert pool.read_to(addrs[pick, 0], addrs[pick, 1], slot_addrs).ok().all()
            batch_s = time.perf_counter() - t0
            moved = len(reads) * batch * layout.group_bytes
            latency = pool.devices[0].metrics.snapshot().latency.get("disk_read")
            out["depths"][str(depth)] = {
                "pool_read_gbps": _gbps(moved, pool_s),
                "pool_read_to_gbps": _gbps(moved, batch_s),
                "read_latency_ms": latency.__dict__ if latency else None,
            }
        finally:
            pool.close()
    best = max(out["depths"], key=lambda d: out["depths"][d]["pool_read_gbps"])
    out["best_depth"] = int(best)
    return out


def run(args) -> int:
    if args.tiny:
        args.disk_gib, args.host_gib, args.batch, args.depths, args.repeats = 0.01, 0.01, 32, [4], 2
    paths = args.dir or ["/tmp"]
    device = dev.resolve("auto")
    layout = _llama_layout(args.group_tokens)
    notes = [
        f"layout {layout.name}: {layout.group_bytes} B groups (Llama-3.1-8B shape)",
        "io_uring not measured: no PyPI binding runs cleanly here (liburing 2026.3.30 dies with "
        "SIGILL at ring creation on the dev machine); disk I/O is preadv/pwritev on a thread pool",
    ]
    results = {"a_host_gpu": bench_host_gpu(args, layout, notes)}
    raw = _raw_disk(paths[0], int(args.disk_gib * GIB), layout.group_bytes, args.depths, args.batch)
    one = bench_disk(args, layout, paths[:1], device)
    best = one["depths"][str(one["best_depth"])]["pool_read_gbps"]
    results["b_disk"] = {
        "raw": raw,
        "kvdrive": one,
        "pool_read_vs_raw_seq": round(best / raw["seq_read_gbps"], 3),
        "pool_read_vs_raw_random": round(best / raw["random_group_read_gbps"], 3),
        "pool_read_vs_raw_random_same_depth": {
            d: round(v["pool_read_gbps"] / raw["random_group_read_gbps_by_depth"][d], 3)
            for d, v in one["depths"].items()
        },
    }
    two = [os.path.join(p, f"kvdrive-pool-{i}") for i, p in enumerate((paths * 2)[:2])]
    for p in two:
        os.makedirs(p, exist_ok=True)
    if len(set(os.stat(p).st_dev for p in two)) == 1:
        notes.append("(c) both pool paths are on one file system/device: shows the pool's overhead, not a gain")
    pooled = bench_disk(args, layout, two, device)
    best2 = pooled["depths"][str(pooled["best_depth"])]["pool_read_gbps"]
    results["c_pool_two_paths"] = {"kvdrive": pooled, "pool_read_vs_raw_seq": round(best2 / raw["seq_read_gbps"], 3)}
    for p in two:
        os.rmdir(p)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    path = write_result(args.out, "io", config, results, notes)
    _summary(results, path)
    return 0


def _summary(r: dict, path) -> None:
    a = r["a_host_gpu"]
    if "skipped" not in a:
        print(
            f"(a) memcpy h2d {a['memcpy_h2d_gbps']} GB/s; best gather {a['gather_best']} "
            f"{a[a['gather_best']]} GB/s = {a['gather_vs_memcpy']:.0%} of memcpy (target 80%); "
            f"tiered fetch {a['fetch_rows_gbps']} GB/s"
        )
        for fmt, f in a.get("fetch_formats", {}).items():
            if fmt == "looped_programs":
                continue
            bf16_groups = a["fetch_rows_gbps"] * 1e9 / a["bytes"] * a["groups"]
            print(
                f"    {fmt} fetch: direct {f['direct_gbps']} GB/s, on {a['fetch_formats']['looped_programs']} programs "
                f"{f['looped_gbps']} GB/s, staged {f['staged_gbps']} GB/s of stored bytes; "
                f"groups/s over bf16's: {f['direct_groups_per_s'] / bf16_groups:.2f}x direct, "
                f"{f['staged_groups_per_s'] / bf16_groups:.2f}x staged"
            )
    b = r["b_disk"]
    print(
        f"(b) raw seq read {b['raw']['seq_read_gbps']} GB/s, raw random {b['raw']['random_group_read_gbps_by_depth']} "
        f"GB/s by depth; kvdrive pool read {b['kvdrive']['depths']} "
    )
    print(
        f"    = {b['pool_read_vs_raw_seq']:.0%} of raw seq (target 85%), {b['pool_read_vs_raw_random']:.0%} of raw random"
    )
    print(f"(c) two paths: {r['c_pool_two_paths']['pool_read_vs_raw_seq']:.0%} of raw seq; JSON: {path}")
