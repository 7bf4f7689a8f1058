"""Plot the disk tier's decode rows: tokens/s against the host memory each row used.

Reads ``kvdrive bench decode`` result JSONs (kvdrive_host and kvdrive_ssd rows), draws each
kvdrive_ssd row at the host memory it used, labelled with its arena and the share of selections
left out a step, with host-only and 0.70x of it as lines.

    python bench/scripts/plot_ssd_arena.py RESULT.json [RESULT.json ...] -o PLOT.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(kvdrive_host rows, kvdrive_ssd rows) with the --ssd-host-gib of each file's command."""
    host, ssd = [], []
    for path in paths:
        d = json.loads(Path(path).read_text())
        cmd = d["command"].split()
        arena = float(cmd[cmd.index("--ssd-host-gib") + 1]) if "--ssd-host-gib" in cmd else None
        for r in d["results"]["rows"]:
            if r.get("status") != "ok":
                continue
            if r["system"] == "kvdrive_host":
                host.append(r)
            elif r["system"] == "kvdrive_ssd":
                ssd.append(dict(r, arena_gib=arena))
    return host, ssd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="decode result JSONs of one call")
    p.add_argument("--target", type=float, default=0.70, help="ratio drawn as a line (default 0.70)")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    host, ssd = rows(args.results)
    gpu = json.loads(Path(args.results[0]).read_text())["environment"].get("gpu") or "CPU"
    if not host or not ssd:
        raise SystemExit("need kvdrive_host and kvdrive_ssd rows (bench decode --systems kvdrive_host kvdrive_ssd)")
    ref = max(r["tokens_per_s"] for r in host)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(ref, color="tab:blue", label=f"kvdrive_host: {ref:.0f} tok/s, {host[0]['host_mem_used_gib']:.1f} GiB")
    ax.axhline(args.target * ref, color="tab:gray", ls="--", label=f"{args.target:.2f}x of host-only (target)")
    for r in sorted(ssd, key=lambda r: r["host_mem_used_gib"]):
        x, y = r["host_mem_used_gib"], r["tokens_per_s"]
        left = r.get("per_step", {}).get("deferred_rate", 0.0)
        ax.plot(x, y, "o", color="tab:orange")
        ax.annotate(
            f"{r['arena_gib']:g} GiB arena\n{y / ref:.2f}x, {left:.2%} left out",
            (x, y),
            textcoords="offset points",
            xytext=(6, -24),
            fontsize=8,
        )
    ax.plot([], [], "o", color="tab:orange", label="kvdrive_ssd (defer): all KV on disk, arena in front")
    ax.set_xlabel("host memory used (GiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(0, ref * 1.15)
    ax.set_xlim(0, max(r["host_mem_used_gib"] for r in host + ssd) * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"SmolLM2-135M, real prose, 8K x 64, {gpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
