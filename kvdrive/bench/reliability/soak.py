"""``kvdrive bench soak``: thousands of ``generate`` calls on one ``LLM`` with the tiered
cache's disk tier, sampling what a leak would grow: resident memory (RSS), open file
descriptors, threads, bytes on the disk directory, the host arena's bytes. After the
calls the LLM is closed and the directory must be empty; then a child process makes the
same LLM, generates and exits without ``close()``: its extents must be gone too.

``--model tiny`` (default): random weights of SmolLM2's architecture cut to 2 layers of
width 64 (a call takes milliseconds, so thousands fit in minutes on a CPU); ``smollm2``:
the real SmolLM2-135M with its tokenizer.

Flat means: after ``warmup`` calls, fds, threads and disk bytes never exceed their value at
the end of the warm-up, and RSS grows by less than ``rss_slack`` MiB (the allocator's noise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

PROMPT = "Captain Wentworth read the letter twice by the window of the inn at Bath before he spoke. "


def probe_process(path: str) -> dict:
    """This process's RSS (MiB), open fds, threads, and the bytes allocated under ``path``."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    disk = sum(os.stat(os.path.join(path, f)).st_blocks * 512 for f in os.listdir(path))
    return {
        "rss_mib": round(rss, 1),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "disk_bytes": disk,
        "files": len(os.listdir(path)),
    }


def tiny_model(seed: int = 0):
    """SmolLM2's architecture with random weights, 2 layers of width 64, no tokenizer."""
    from kvdrive.models import presets
    from kvdrive.models.decoder import DecoderLM
    from kvdrive.models.loader import LoadedModel
    from kvdrive.models.registry import from_hf_config

    hf = presets.hf_config("smollm2-135m")
    hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.vocab_size = 2, 64, 128, 512
    hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim = 4, 2, 16
    cfg = from_hf_config(hf)
    model = DecoderLM(cfg)
    presets.init_random_(model, seed)
    return LoadedModel(
        model.eval().fuse_projections(), cfg, None, "tiny (SmolLM2 architecture, 2 layers, random)", True
    )


def load(name: str):
    from kvdrive.models.loader import load_model

    return tiny_model() if name == "tiny" else load_model(name, device="cpu", dtype="float32")


def tiered_config(path: str, loaded=None):
    """Budget 64 tokens over a 256 MiB disk behind an arena of 16 groups a layer."""
    from kvdrive.cache.sparse import SparseConfig
    from kvdrive.storage.layout import GroupLayout
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.cache import TieredConfig

    sparse = SparseConfig(budget=64, sink_tokens=16, window_tokens=32)
    slot = (
        GroupLayout.from_config(loaded.config, loaded.model.dtype, sparse.group_tokens).slot_bytes
        if loaded is not None
        else 24576
    )  # SmolLM2, float32
    layers = loaded.config.num_hidden_layers if loaded is not None else 30
    return TieredConfig(
        sparse, cache_tokens=96, disk=(PoolPath(path, 256 << 20),), host_bytes=layers * 16 * slot, direct="off"
    )


def prompts(i: int, loaded=None):
    """Call ``i``'s prompt: 1 to 4 sentences (token ids without a tokenizer), so lengths vary
    and groups fill at different steps."""
    if loaded is not None and loaded.tokenizer is None:
        return [1 + (37 * i + 11 * t) % 500 for t in range(20 * (1 + i % 4))]
    return f"Call {i}. " + PROMPT * (1 + i % 4)


def soak(loaded, calls: int, path: str, every: int, max_tokens: int = 3) -> list[dict]:
    from kvdrive.engine.llm import LLM
    from kvdrive.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    samples = []
    t0 = time.perf_counter()
    with LLM(loaded=loaded, kv_cache=tiered_config(path, loaded)) as llm:
        for i in range(calls):
            llm.generate([prompts(i, loaded)], params)
            if i % every == every - 1 or i == 0:
                host = llm.cache.host if llm.cache is not None else None
                samples.append(
                    {
                        "call": i + 1,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "host_arena_bytes": host.nbytes if host is not None else 0,
                        **probe_process(path),
                    }
                )
    return samples


def flat(samples: list[dict], warmup: int, rss_slack: float) -> dict:
    """Whether each measure stayed at or below its value at the end of the warm-up."""
    base = next(s for s in samples if s["call"] >= warmup)
    after = [s for s in samples if s["call"] >= base["call"]]
    out = {k: max(s[k] for s in after) <= base[k] for k in ("fds", "threads", "disk_bytes", "files")}
    out["rss_mib"] = max(s["rss_mib"] for s in after) - base["rss_mib"] < rss_slack
    out["rss_growth_mib"] = round(max(s["rss_mib"] for s in after) - base["rss_mib"], 1)
    return out


def exit_without_close(path: str, model: str) -> list[str]:
    """Files left in ``path`` by a process that generated with the disk tier and exited without
    ``close()`` (the interpreter's exit must delete its extents)."""
    code = (
        "from kvdrive.engine.llm import LLM; from kvdrive.bench.reliability.soak import load, tiered_config, prompts; "
        "from kvdrive.engine.sampling import SamplingParams; "
        f"m = load({model!r}); llm = LLM(loaded=m, kv_cache=tiered_config({path!r}, m)); "
        "llm.generate([prompts(0, m)], SamplingParams(max_tokens=2)); import os; "
        f"assert any(f.endswith('.extent') for f in os.listdir({path!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return os.listdir(path)


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="model (default tiny)")
    p.add_argument("--calls", type=int, default=1000, help="generate calls (default 1000)")
    p.add_argument("--every", type=int, default=25, help="calls between samples (default 25)")
    p.add_argument("--warmup", type=int, default=100, help="calls before the measures must stay flat (default 100)")
    p.add_argument("--rss-slack", type=float, default=64.0, help="RSS growth after warm-up counted as flat, MiB")
    p.add_argument("--dir", default=None, help="disk directory (default: a temporary one)")
    p.add_argument("-o", "--out", default="bench/results/soak-cpu.json")


def run(args) -> int:
    from kvdrive.results import write_result

    loaded = load(args.model)
    with tempfile.TemporaryDirectory(dir=args.dir) as path:
        samples = soak(loaded, args.calls, path, args.every)
        left_after_close = os.listdir(path)
        left_after_exit = exit_without_close(path, args.model)
    verdict = flat(samples, args.warmup, args.rss_slack)
    verdict.update(left_after_close=left_after_close, left_after_exit=left_after_exit)
    for s in samples[:: max(1, len(samples) // 10)] + samples[-1:]:
        print(s)
    print(verdict)
    out = write_result(
        args.out,
        "soak",
        {
            "model": loaded.source,
            "device": "cpu",
            "calls": args.calls,
            "every": args.every,
            "warmup": args.warmup,
            "max_tokens": 3,
            "tiered": "budget 64, disk 256 MiB, host arena 16 groups a layer",
        },
        {"samples": samples, "verdict": verdict},
    )
    print(f"-> {out}")
    ok = all(v for k, v in verdict.items() if k not in ("rss_growth_mib", "left_after_close", "left_after_exit"))
    return 0 if ok and not left_after_close and not left_after_exit else 1
