"""What ``kvdrive bench decode`` makes of its rows: each system's best batch per context,
kvdrive's ratios to the others, and the plots (from the JSON, so they can be redrawn).

matplotlib (the ``plot`` extra) is imported only when a plot is drawn, with Agg.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvdrive.bench import roofline
from kvdrive.errors import KvdriveError
from kvdrive.plotting import pyplot
from kvdrive.results import write_result

# the design's targets, each system at its best batch: kvdrive over the ShadowKV-style
# baseline, and host + SSD against host only
TARGETS = {("kvdrive_host", "sparse_host"): 1.74, ("kvdrive_ssd", "kvdrive_host"): 0.70}
PANEL = (5.0, 3.8)
NOT_MEASURED = "not measured: "


def row_label(row: dict) -> str:
    """A row's system, with its tiers' storage format where that is not the model dtype
    (``kvdrive_host@fp8``): each (system, format) is a line of its own."""
    fmt = row.get("kv_dtype", "bf16")
    return row["system"] if fmt == "bf16" else f"{row['system']}@{fmt}"


def best_and_ratios(rows: list[dict]) -> tuple[dict, list[dict]]:
    """``best[context][label]`` (``row_label``) = the batch with the most tokens/s; ratios at each
    one's best batch, per context: kvdrive_host over every system not on disk, kvdrive_ssd over
    kvdrive_host and over kvswap_ssd (with the target where ``TARGETS`` sets one), and each
    compressed setting of a system over the same system at bf16 (``kv_dtype``, ``vs_kv_dtype``)."""
    best: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            per_ctx = best.setdefault(str(r["context"]), {})
            label = row_label(r)
            cur = per_ctx.get(label)
            if cur is None or r["tokens_per_s"] > cur["tokens_per_s"]:
                per_ctx[label] = {"tokens_per_s": r["tokens_per_s"], "batch": r["batch"]}
    ratios = []
    for ctx, systems in best.items():
        for label in systems:
            base, _, fmt = label.partition("@")
            if fmt and base in systems:
                ratios.append(
                    {
                        "context": int(ctx),
                        "system": base,
                        "kv_dtype": fmt,
                        "vs": base,
                        "vs_kv_dtype": "bf16",
                        "ratio": systems[label]["tokens_per_s"] / systems[base]["tokens_per_s"],
                    }
                )
        systems = {s: v for s, v in systems.items() if "@" not in s}
        pairs = [("kvdrive_host", s) for s in systems if s not in ("kvdrive_host", "kvdrive_ssd", "kvswap_ssd")]
        for ours, other in [*pairs, ("kvdrive_ssd", "kvdrive_host"), ("kvdrive_ssd", "kvswap_ssd")]:
            if ours in systems and other in systems:
                ratio = {
                    "context": int(ctx),
                    "system": ours,
                    "vs": other,
                    "ratio": systems[ours]["tokens_per_s"] / systems[other]["tokens_per_s"],
                }
                if (ours, other) in TARGETS:
                    ratio["target"] = TARGETS[ours, other]
                ratios.append(ratio)
    return best, ratios


def run_notes(random_weights: bool, warmup: int, rebalance_after: int, feed: str = "greedy") -> list[str]:
    """What a reader of the JSON must know to read the numbers."""
    settle = (
        f" (+{rebalance_after + 1} for the tiered caches, past their capacity rebalance)" if rebalance_after else ""
    )
    return [
        "random weights of the real architecture" if random_weights else "real weights",
        (
            "context = tokens per sequence when decoding ends (the size each cache is built for); the fill stops "
            "at 'filled', decoding adds the rest"
        ),
        (
            "contexts filled with seeded N(0,1) post-RoPE K/V through each cache's plan/append/commit (no prefill); "
            "hf_offload prefills random token ids. Sparse selection over random KV and random weights has no real "
            "locality: hit rates and selection overlap between steps are not those of real text"
        ),
        (
            f"decode timed over steps_timed steps after {warmup} warm-up steps{settle}, perf_counter around "
            "a synchronized region; tokens/s = batch * steps / seconds; each step's input: "
            + (
                "the argmax of the last step's logits"
                if feed == "greedy"
                else "a seeded random token (the same sequence for every system), not the argmax"
            )
        ),
        "hf_offload: (time of prefill + N+1 tokens - time of prefill + 1 token) / N, one repeat",
        roofline.FORMULA,
        (
            "PCIe bytes per step: streaming and hf_offload = the whole KV of the batch; sparse_host/kvdrive_host = "
            "measured bytes_host_to_gpu / steps; full_gpu and sparse_gpu = 0. GPU bytes read: the whole KV for full "
            "attention; for sparse systems the budget's tokens per global layer plus the minmax summaries of every group"
        ),
        (
            "ratios: each system's best tokens/s over batches per context; targets: "
            + ", ".join(f"{a} / {b} >= {t}" for (a, b), t in TARGETS.items())
        ),
        (
            "kvdrive_ssd, kvswap_ssd: the roofline's disk term is (disk reads + read-ahead + reads behind per step) x "
            "slot bytes / bandwidths.disk_read_gbps (random slot reads, queue depth 32, first --disk path); it assumes "
            "the reads overlap everything, while a layer that waits for its reads also pays the disk's latency"
        ),
    ]


def save(
    out: str | Path,
    config: dict,
    bandwidths: dict,
    rows: list[dict],
    notes: list[str],
    environment_of: dict | None = None,
    sources: list[dict] | None = None,
) -> Path:
    """Write the result with each system's best batch, the ratios and a note per row not measured
    (``environment_of``, ``sources``: see ``kvdrive.results.write_result``)."""
    best, ratios = best_and_ratios(rows)
    missing = [
        f"{NOT_MEASURED}{row_label(r)} @ {r['context']} x {r['batch']} {r['status']}: {r['reason']}"
        for r in rows
        if r["status"] != "ok"
    ]
    results = {"bandwidths": bandwidths, "rows": rows, "best": best, "ratios": ratios}
    out = Path(out)
    tmp = write_result(
        out.with_name(out.name + ".part"),
        "decode",
        config,
        results,
        [*notes, *missing],
        environment_of=environment_of,
        sources=sources,
    )
    return tmp.replace(out)  # atomic: a run killed mid-write keeps the previous rows


def merge(paths: list[str], out: str | Path) -> Path:
    """One result from several runs (a sweep split to fit a time limit): rows of later files
    replace rows of earlier ones for the same (system, context, batch); config, bandwidths,
    notes and environment of the first, plus where each row came from and, per input, its
    command and environment (a merged input contributes its own sources)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows: dict[tuple, dict] = {}
    for p, doc in zip(paths, docs):
        if doc.get("bench") != "decode":
            raise KvdriveError(f"{p} is not a kvdrive bench decode result")
        for r in doc["results"]["rows"]:
            rows[row_label(r), r["context"], r["batch"]] = {**r, "from": str(p)}
    first = docs[0]
    merged_from = {}
    for p, d in zip(paths, docs):  # a merged input keeps the commands of its own inputs
        merged_from.update(d["config"].get("merged_from", {}))
        merged_from.update({f"{p} ({c})": "" for c in d.get("source_commands", [])})
        merged_from[str(p)] = d["command"]
    config = {
        **first["config"],
        "merged_from": merged_from,
        "bandwidths_per_run": [d["results"]["bandwidths"] for d in docs],
    }
    notes = [n for n in first["notes"] if not n.startswith(NOT_MEASURED)]
    sources = []
    for p, d in zip(paths, docs):
        sources += d.get("sources") or [{"path": str(p), "command": d["command"], "environment": d["environment"]}]
    return save(
        out,
        config,
        first["results"]["bandwidths"],
        list(rows.values()),
        notes,
        environment_of=sources[0]["environment"],
        sources=sources,
    )


def _ctx(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def plot(json_path: str | Path) -> list[Path]:
    """tokens/s vs batch, one panel per context, one line per system (dotted: its roofline
    bound) into ``<json>.png``; and, where rows carry a step-time breakdown, one stacked
    bar per system at its best batch into ``<json>-breakdown.png``. Returns the paths."""
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    rows = [r for r in doc["results"]["rows"] if r["status"] == "ok"]
    if not rows:
        return []
    plt = pyplot()
    contexts = sorted({r["context"] for r in rows})
    systems = list(dict.fromkeys(row_label(r) for r in doc["results"]["rows"]))
    colour = {s: f"C{i}" for i, s in enumerate(systems)}
    fig, axes = plt.subplots(1, len(contexts), figsize=(PANEL[0] * len(contexts), PANEL[1]), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        for s in systems:
            pts = sorted(
                (r["batch"], r["tokens_per_s"], r["roofline"].get("tokens_per_s"))
                for r in rows
                if r["context"] == ctx and row_label(r) == s
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], "o-", color=colour[s], label=s)
            bound = [(x, p[2]) for x, p in zip(xs, pts) if p[2]]
            if bound:
                ax.plot(*zip(*bound), ":", color=colour[s], alpha=0.6)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows if r["context"] == ctx})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_yscale("log")
        ax.set_title(f"context {_ctx(ctx)}")
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s (dotted: roofline bound)")
        ax.grid(True, which="both", alpha=0.3)
    handles = {}  # every system once, whichever panels it appears in
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0][-1].legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"kvdrive bench decode: {doc['config']['model']}", fontsize=9)
    out = [json_path.with_suffix(".png")]
    fig.savefig(out[0], dpi=120, bbox_inches="tight")
    plt.close(fig)
    breakdown = _breakdown(plt, doc, rows, json_path.with_name(json_path.stem + "-breakdown.png"))
    return out + ([breakdown] if breakdown else [])


def _breakdown(plt, doc: dict, rows: list[dict], png: Path) -> Path | None:
    best, _ = best_and_ratios(rows)
    bars = []  # (label, {part: ms per step})
    for ctx, systems in best.items():
        for s, b in systems.items():
            row = next(r for r in rows if str(r["context"]) == ctx and row_label(r) == s and r["batch"] == b["batch"])
            parts = row.get("per_step", {}).get("time_ms_per_step")
            if parts:
                bars.append((f"{s} {_ctx(int(ctx))} x{b['batch']}", parts))
    if not bars:
        return None
    names = list(dict.fromkeys(k for _, parts in bars for k in parts))
    fig, ax = plt.subplots(figsize=(PANEL[0] * 1.6, 0.5 * len(bars) + 1.5))
    left = [0.0] * len(bars)
    for i, name in enumerate(names):
        widths = [parts.get(name, 0.0) for _, parts in bars]
        ax.barh([label for label, _ in bars], widths, left=left, color=f"C{i}", label=name)
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlabel("ms per decode step, by phase (profiled eager steps after the timed ones)")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    ax.set_title(f"step-time breakdown at each system's best batch: {doc['config']['model']}", fontsize=9)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png
