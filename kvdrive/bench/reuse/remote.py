"""``kvdrive bench remote``: time to first token of a stored prefix from the remote tier, the
local disk, or recompute, beside the transfer engine's own bandwidth, in one run.

On one machine: a Mooncake master and a pool holder on loopback (``LocalMooncake``); the
transfer engine's benchmark (``transfer_engine_bench``, target and initiator processes,
reads and writes of one object's size) for the bytes/s the network path can carry; a
writer process (``--role writer``) that prefills the prompt and writes its chunks into the
store; then this process measures, for the same prompt:

  recompute   prefill the whole prompt (the engine's chunked prefill);
  disk        the prefix pool on one disk path (stored here, page cache dropped, loaded);
  remote      a pool with no local tier: every chunk read from the holder's segment
              through the transfer engine (TCP over loopback here), each value checked.

TTFT = load (or recompute) + suffix prefill + the first token's argmax, synchronized;
``--reps`` of each load, median and best reported. Both processes build the model from
the same spec and seed, so their KV is the same and the first tokens must match.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

from kvdrive import device as devices
from kvdrive.bench.reuse.ttft import _drop_page_cache, _fresh, _prefill
from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.commands.common import BENCH_MODEL, add_model_options
from kvdrive.prefix.config import PrefixConfig, RemoteConfig
from kvdrive.prefix.mooncake_local import LocalMooncake, binary, free_port, loopback_env
from kvdrive.prefix.pool import PrefixPool
from kvdrive.results import write_result
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import PoolPath

TINY = dict(model="random:smollm2-135m", context=2048, chunk_tokens=64, te_seconds=2)
TE_RESULT = re.compile(r"throughput ([0-9.]+) GB/s")


def add_arguments(p) -> None:
    add_model_options(p, default=BENCH_MODEL)
    p.add_argument("-c", "--context", type=int, default=32768, help="prompt tokens")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--path", default="bench/remote-pool", help="disk directory of the local pool")
    p.add_argument("--reps", type=int, default=3, help="loads of each kind (median and best reported)")
    p.add_argument("--te-seconds", type=int, default=5, help="seconds of each transfer_engine_bench run")
    p.add_argument("--te-threads", type=int, default=4)
    p.add_argument("--te-batch", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes (random SmolLM2 shape, 2K prompt)")
    p.add_argument("-o", "--out", default="bench/results/remote-ttft.json")
    p.add_argument("--role", default="measure", choices=["measure", "writer"], help=argparse.SUPPRESS)
    p.add_argument("--master", default="", help=argparse.SUPPRESS)
    p.add_argument("--metadata", default="", help=argparse.SUPPRESS)


def _prompt(cfg, context: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (context,), generator=gen).to(device)


def _remote(args, write_bytes: int = 1 << 20) -> RemoteConfig:
    # generous deadlines: a miss here would measure recompute, not the store (misses are reported)
    return RemoteConfig(
        master=args.master,
        metadata=args.metadata,
        admit_after=1,
        timeout_s=10.0,
        floor_gbps=0.05,
        write_buffer_bytes=max(write_bytes, 1 << 20),
        flush_s=600.0,
        connect_wait_s=30.0,
    )


def writer(args) -> int:
    """The other process: prefill the prompt and write every chunk of it into the store."""
    from kvdrive.models.loader import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, cfg, dev = loaded.model, loaded.config, loaded.model.device
    layout = GroupLayout.from_config(cfg, model.dtype, args.chunk_tokens)
    kv_bytes = (args.context // args.chunk_tokens) * layout.num_layers * (layout.group_bytes + 64)
    ids = _prompt(cfg, args.context, dev)
    cache = ContiguousKVCache(cfg, 1, args.context, dev, model.dtype)
    pool = PrefixPool(
        cfg,
        model.dtype,
        PrefixConfig(
            model=args.model, chunk_tokens=args.chunk_tokens, remote=_remote(args, int(kv_bytes * 1.05) + (64 << 20))
        ),
    )
    with torch.inference_mode():
        _fresh(cache, 0, args.context)
        token = _prefill(model, cache, 0, ids)
        devices.synchronize(dev)
        t0 = time.perf_counter()
        pool.store(cache, 0, ids.tolist())
        store_s = time.perf_counter() - t0
        flushed = pool.remote.flush(600)
        flush_s = time.perf_counter() - t0
    stats = pool.stats().remote
    pool.close()
    print(
        json.dumps(
            {
                "first_token": token,
                "store_s": store_s,
                "store_and_send_s": flush_s,
                "flushed": flushed,
                "written_chunks": stats.written,
                "written_bytes": stats.written_bytes,
                "write_gbps": stats.written_bytes / flush_s / 1e9,
                "write_skipped": stats.write_skipped,
            }
        )
    )
    return 0


def transfer_engine_bench(mc: LocalMooncake, block: int, seconds: int, threads: int, batch: int) -> dict:
    """Loopback read and write GB/s of the transfer engine's own benchmark at ``block`` bytes."""
    exe, target = binary("transfer_engine_bench"), f"127.0.0.1:{free_port()}"
    buf = max(256 << 20, 2 * threads * batch * block)
    common = ["--protocol=tcp", f"--metadata_server={mc.metadata}", f"--buffer_size={buf}", "--report_precision=3"]
    out = {"block_bytes": block, "threads": threads, "batch": batch, "seconds": seconds, "buffer_bytes": buf}
    env = loopback_env()
    tgt = subprocess.Popen(
        [exe, "--mode=target", f"--local_server_name={target}", *common],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        time.sleep(2.0)  # the target registers its segment with the metadata server
        for op in ("read", "write"):
            res = subprocess.run(
                [
                    exe,
                    "--mode=initiator",
                    f"--local_server_name=127.0.0.1:{free_port()}",
                    f"--segment_id={target}",
                    f"--block_size={block}",
                    f"--batch_size={batch}",
                    f"--threads={threads}",
                    f"--duration={seconds}",
                    f"--operation={op}",
                    *common,
                ],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=False,
                env=env,
            )
            m = TE_RESULT.search(res.stderr + res.stdout)
            out[f"{op}_gbps"] = float(m.group(1)) if m else None
            if not m:
                out[f"{op}_error"] = (res.stderr or res.stdout)[-500:]
    finally:
        tgt.terminate()
        tgt.wait(10)
    return out


def _load_ttft(pool, model, cache, ids, ref, recompute_s, paths=()) -> dict:
    """One load of the stored prefix into an empty sequence, then the suffix: its row."""
    dev = model.device
    _fresh(cache, 1, len(ids))
    if paths:
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
    return {
        "ttft_s": ttft,
        "load_s": load_s,
        "tokens_loaded": done,
        "bytes_read": rep.bytes_read,
        "read_gbps": rep.bytes_read / load_s / 1e9,
        "chunks_from_remote": rep.chunks_from_remote,
        "chunks_from_disk": rep.chunks_from_disk,
        "remote_misses": rep.remote_misses,
        "first_token_matches": tok == ref,
        "ttft_over_recompute": ttft / recompute_s,
    }


def _summary(rows: list[dict]) -> dict:
    return {
        "ttft_s_median": statistics.median(r["ttft_s"] for r in rows),
        "ttft_s_best": min(r["ttft_s"] for r in rows),
        "read_gbps_median": statistics.median(r["read_gbps"] for r in rows),
        "all_first_tokens_match": all(r["first_token_matches"] for r in rows),
        "reps": rows,
    }


def run(args) -> int:
    if args.tiny:
        args.model, args.context, args.chunk_tokens = TINY["model"], TINY["context"], TINY["chunk_tokens"]
        args.te_seconds = min(args.te_seconds, TINY["te_seconds"])
    if args.role == "writer":
        return writer(args)
    from kvdrive.models.loader import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, cfg, dev = loaded.model, loaded.config, loaded.model.device
    layout = GroupLayout.from_config(cfg, model.dtype, args.chunk_tokens)
    chunks = (args.context - 1) // args.chunk_tokens
    kv_bytes = args.context * layout.token_bytes * layout.num_layers
    segment = int(kv_bytes * 1.25) + (256 << 20)
    path = os.path.abspath(args.path)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    results: dict = {"context": args.context, "kv_gib": kv_bytes / 2**30, "chunks_loadable": chunks}
    load_avg = os.getloadavg()  # other work on the machine shapes CPU-side numbers
    with LocalMooncake(segment_bytes=segment, log_dir=os.path.join(path, "mooncake-logs")) as mc:
        args.master, args.metadata = mc.master, mc.metadata
        results["transfer_engine_bench"] = transfer_engine_bench(
            mc, layout.group_bytes, args.te_seconds, args.te_threads, args.te_batch
        )
        print("transfer_engine_bench", results["transfer_engine_bench"], flush=True)
        cmd = [
            sys.executable,
            "-m",
            "kvdrive",
            "bench",
            "remote",
            "--role",
            "writer",
            "--master",
            mc.master,
            "--metadata",
            mc.metadata,
            "-m",
            args.model,
            "--device",
            args.device,
            "-c",
            str(args.context),
            "--chunk-tokens",
            str(args.chunk_tokens),
            *(["--dtype", args.dtype] if args.dtype else []),
        ]
        w = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if w.returncode != 0:
            print(w.stderr[-3000:], file=sys.stderr)
            return 1
        results["writer"] = json.loads(w.stdout.strip().splitlines()[-1])
        if any(k != "present" for k in results["writer"].get("write_skipped", {})):
            results["writer"]["log_tail"] = w.stderr[-4000:]  # why the writes failed
        print("writer", results["writer"], flush=True)
        ids = _prompt(cfg, args.context, dev)
        cache = ContiguousKVCache(cfg, 2, args.context, dev, model.dtype)
        with torch.inference_mode():
            _fresh(cache, 0, 2 * args.chunk_tokens + 1)
            _prefill(model, cache, 0, ids[: 2 * args.chunk_tokens + 1])  # warm-up: kernels, allocator
            _fresh(cache, 0, args.context)
            devices.synchronize(dev)
            t0 = time.perf_counter()
            ref = _prefill(model, cache, 0, ids)
            devices.synchronize(dev)
            recompute_s = time.perf_counter() - t0
            results["recompute"] = {
                "ttft_s": recompute_s,
                "first_token_matches_writer": ref == results["writer"]["first_token"],
            }
            disk = PrefixPool(
                cfg,
                model.dtype,
                PrefixConfig(
                    model=args.model,
                    disks=(PoolPath(path, int(kv_bytes * 1.2) + (64 << 20)),),
                    chunk_tokens=args.chunk_tokens,
                    admit_after=1,
                ),
            )
            disk.staging.reserve(chunks)  # steady state: the staging ring exists
            disk.store(cache, 0, ids.tolist())
            results["disk"] = _summary(
                [_load_ttft(disk, model, cache, ids, ref, recompute_s, [path]) for _ in range(args.reps)]
            )
            disk.close(remove=True)
            remote = PrefixPool(
                cfg,
                model.dtype,
                PrefixConfig(  # it only loads: a write ring of a few objects
                    model=args.model,
                    chunk_tokens=args.chunk_tokens,
                    remote=_remote(args, 4 * (layout.group_bytes + 128)),
                ),
            )
            results["remote"] = _summary(
                [_load_ttft(remote, model, cache, ids, ref, recompute_s) for _ in range(args.reps + 1)][1:]
            )  # the first registers its ring
            results["remote"]["stats"] = remote.stats().remote.__dict__
            remote.close()
    te = results["transfer_engine_bench"].get("read_gbps")
    results["remote"]["read_over_transfer_engine"] = results["remote"]["read_gbps_median"] / te if te else None
    for k in ("disk", "remote"):
        print(
            k, {x: results[k][x] for x in ("ttft_s_median", "read_gbps_median", "all_first_tokens_match")}, flush=True
        )
    print("recompute", results["recompute"], flush=True)
    config = {
        "model": loaded.source,
        "dtype": str(model.dtype),
        "device": str(dev),
        "context": args.context,
        "chunk_tokens": args.chunk_tokens,
        "object_bytes": layout.group_bytes + 64,
        "objects_per_chunk": layout.num_layers,
        "reps": args.reps,
        "path": path,
        "segment_bytes": segment,
        "protocol": "tcp",
        "transport": "loopback, one machine",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_avg,
        "load_average_at_end": os.getloadavg(),
    }
    notes = [
        "random weights of the real architecture's shape" if loaded.random_weights else "real weights",
        "TTFT = load (or recompute) + suffix prefill + argmax of the first token, synchronized",
        "remote: written by another process (--role writer) into a pool holder's segment (mooncake_client); "
        "read by a pool with no local tier, so every chunk crosses the transfer engine (TCP, loopback)",
        "remote: the first load registers the read ring with the store and is not counted",
        "disk: page cache dropped (posix_fadvise DONTNEED) before each load; O_DIRECT where supported",
        "transfer_engine_bench: the wheel's own binary, target + initiator over the same metadata server, "
        "block = one object's KV; GB = 1e9 bytes",
    ]
    out = write_result(args.out, "remote", config, results, notes)
    shutil.rmtree(path, ignore_errors=True)  # the pool's files and the store's logs (kept when a step fails)
    print(f"wrote {out}")
    return 0
