"""``kvdrive bench suite headline``: regenerate the headline result set on a GPU machine.

Each entry is one benchmark command as the headline results record it (their "command"
field), with its output redirected into ``--out-dir`` and its disk paths under ``--disk``.
The commands run one after another, each in its own process (a fresh CUDA context, and
the command line each result records is its own). ``--dry-run`` prints them; ``--only``
picks entries by name.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from kvdrive.errors import KvdriveError

# name -> the arguments after ``kvdrive``; {out} and {disk} are filled in
SUITES = {
    "headline": {
        "model": "bench model -m random:llama-3.1-8b -c 4096 -b 1 16 -n 64 --repeats 3 -o {out}/model.json",
        "io": "bench io --dir {disk} -o {out}/io.json",
        "attention": "bench attention -o {out}/attention.json",
        "select": "bench select -o {out}/select.json",
        "ttft": "bench ttft --paths {disk}/ttft-pool/p0 {disk}/ttft-pool/p1 --host-gib 16 -o {out}/ttft.json",
        "decode-32k": (
            "bench decode --contexts 32768 --batches 16 --systems full_gpu sparse_host kvdrive_host "
            "-n 12 --row-seconds 5 --breakdown-steps 0 --no-plot -o {out}/decode-32k.json"
        ),
        "decode-128k": (
            "bench decode --contexts 131072 --batches 1 2 4 --systems sparse_host kvdrive_host "
            "-n 8 --row-seconds 3 --breakdown-steps 0 --no-plot -o {out}/decode-128k.json"
        ),
        "decode-ssd-prose": (
            "bench decode -m smollm2 --text persuasion-excerpt --contexts 8192 --batches 64 "
            "--budget 512 --sink 16 --window 64 --cache-tokens 1024 -n 64 --row-seconds 4 "
            "--breakdown-steps 0 --no-plot --disk-misses defer --systems kvdrive_host kvdrive_ssd "
            "--ssd-host-gib 7.2 --disk {disk}/decode-disk -o {out}/decode-ssd-prose.json"
        ),
    },
}


def add_arguments(p) -> None:
    p.add_argument("suite", choices=list(SUITES), help="which result set (headline: the README's results)")
    p.add_argument(
        "--out-dir", default="bench/results/headline", help="where the JSON results go (default bench/results/headline)"
    )
    p.add_argument("--disk", default="bench/disk", help="directory on the disk to measure (default bench/disk)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these entries of the suite")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def commands(suite: str, out_dir: str, disk: str, only: list[str] | None = None) -> dict[str, list[str]]:
    """name -> argv after ``kvdrive`` of each entry of ``suite`` (in order)."""
    entries = SUITES[suite]
    unknown = sorted(set(only or ()) - set(entries))
    if unknown:
        raise KvdriveError(f"{suite} has no entries {unknown}; it has {list(entries)}")
    return {
        name: shlex.split(cmd.format(out=shlex.quote(out_dir), disk=shlex.quote(disk)))
        for name, cmd in entries.items()
        if not only or name in only
    }


def run(args) -> int:
    todo = commands(args.suite, args.out_dir, args.disk, args.only)
    for name, argv in todo.items():
        print(f"[{name}] kvdrive {shlex.join(argv)}", flush=True)
    if args.dry_run:
        return 0
    for sub in ("ttft-pool/p0", "ttft-pool/p1", "decode-disk"):
        Path(args.disk, sub).mkdir(parents=True, exist_ok=True)
    failed = []
    for name, argv in todo.items():
        print(f"[{name}] running", flush=True)
        done = subprocess.run([sys.executable, "-m", "kvdrive", *argv], env=os.environ.copy())
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0
