"""What deferred disk misses cost in accuracy: teacher-forced top-1 agreement with the exact path.

Each sequence is a window of real prose, prefilled; then the text's own next tokens are fed one
at a time (teacher forcing, so every configuration sees the same inputs) and each step's argmax
is compared with that of the exact tiered cache (KV all in host memory, same budget, which the
tests prove equal to the GPU-resident sparse cache). Configurations: the disk tier with the
exact wait path, and with deferred misses at several arena sizes. Prints and writes JSON.

    python bench/scripts/defer_agreement.py -o bench/results/defer-agreement-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval import corpus
from kvdrive.models.loader import load_model
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache


def run(
    model, cfg: TieredConfig, rows: list[list[int]], prompt: int, chunk: int, after_prefill=None, place: bool = True
) -> tuple[torch.Tensor, dict]:
    """Argmax (B, steps) and cache stats for teacher-forced decoding of ``rows`` after ``prompt``
    tokens. Each prompt is placed once prefilled (``place``), as the engine does;
    ``after_prefill(cache)`` is called once every prompt is in."""
    b, total = len(rows), len(rows[0])
    cache = TieredSparseKVCache(model.config, b, total + 8, model.device, model.dtype, tiered=cfg)
    ids = torch.tensor(rows, device=model.device)
    for i in range(b):
        cache.add(i, total + 8)
        for s in range(0, prompt, chunk):
            batch = cache.plan([i], min(chunk, prompt - s))
            model(ids[i : i + 1, s : s + batch.num_new], cache, batch)
            cache.commit(batch)
        if place:
            cache.place([i])
    if after_prefill is not None:
        after_prefill(cache)
    preds = []
    for t in range(prompt, total):
        batch = cache.plan(list(range(b)), 1)
        preds.append(model(ids[:, t : t + 1], cache, batch).argmax(-1))
        cache.commit(batch)
    cache.host.drain()  # the last steps' selections reach the counters
    stats = cache.stats()
    cache.close()
    return torch.stack(preds, 1), stats


def prose_rows(lm, text: str, span: int, batch: int) -> list[list[int]]:
    """``batch`` consecutive windows of ``span`` tokens of the text source ``text``."""
    ids = lm.tokenizer(corpus.load_text(text).text, add_special_tokens=False)["input_ids"]
    if span * batch > len(ids):
        raise SystemExit(f"the text has {len(ids)} tokens, {span * batch} are needed")
    return [ids[i * span : (i + 1) * span] for i in range(batch)]


def add_row(out: dict, row: dict) -> None:
    """One result row: into the JSON's rows, and printed as it comes."""
    out["rows"].append(row)
    print(row, flush=True)


def write_out(out: dict, path: str, t0: float) -> None:
    """The result JSON, with the seconds since ``t0``."""
    out["seconds"] = time.perf_counter() - t0
    Path(path).write_text(json.dumps(out, indent=1))
    print("wrote", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("--text", default="persuasion-excerpt")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens per sequence (default 4096)")
    p.add_argument("--steps", type=int, default=96, help="teacher-forced decode steps (default 96)")
    p.add_argument("--batch", type=int, default=2, help="sequences, each its own window of the text (default 2)")
    p.add_argument(
        "--arenas",
        type=float,
        nargs="+",
        default=[0.6, 0.4],
        help="host arena sizes as shares of the whole KV (default 0.6 0.4)",
    )
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (default 1024)")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)

    lm = load_model(args.model)
    model = lm.model
    rows = prose_rows(lm, args.text, args.prompt + args.steps, args.batch)
    span = args.prompt + args.steps
    sparse = SparseConfig(budget=512, sink_tokens=16, window_tokens=64, group_tokens=16)
    base = {"sparse": sparse, "cache_tokens": 1024}
    kv_bytes = model.config.kv_bytes_per_token(model.dtype) * (span + 8) * args.batch
    t0 = time.perf_counter()
    ref, _ = run(model, TieredConfig(**base), rows, args.prompt, args.chunk)
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "model": lm.source,
        "dtype": str(model.dtype),
        "device": str(model.device),
        "text": args.text,
        "prompt_tokens": args.prompt,
        "steps": args.steps,
        "batch": args.batch,
        "sparse": {"budget": 512, "sink": 16, "window": 64, "group_tokens": 16, "cache_tokens": 1024},
        "kv_bytes": kv_bytes,
        "reference": "tiered cache with all KV in host memory (exact sparse path)",
        "rows": [],
    }
    configs = [("wait", args.arenas[0])] + [("defer", a) for a in args.arenas]
    for mode, share in configs:
        tmp = Path(tempfile.mkdtemp(prefix="kvdrive-defer-"))
        try:
            cfg = TieredConfig(
                **base,
                disk=(PoolPath(str(tmp), 4 * kv_bytes + (64 << 20)),),
                host_bytes=int(share * kv_bytes),
                direct="auto",
                disk_misses=mode,
            )
            got, st = run(model, cfg, rows, args.prompt, args.chunk)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        agree = (got == ref).float().mean().item()
        row = {
            "disk_misses": mode,
            "arena_share": share,
            "top1_agreement": agree,
            "groups_selected": st["groups_selected"],
            "deferred": st.get("deferred", 0),
            "deferred_share": st.get("deferred", 0) / max(st["groups_selected"], 1),
            "disk_reads": st.get("disk_reads", 0),
            "deferred_reads": st.get("deferred_reads", 0),
            "lost": st.get("lost", 0),
        }
        add_row(out, row)
    write_out(out, args.out, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
