"""The plot of a ``kvdrive bench serve`` result: latency percentiles and throughput per phase, and
(``--interference``) the streams' inter-token gaps while the long prompt is prefilled."""

from __future__ import annotations

from kvdrive.plotting import pyplot


def plot(results: dict, path: str) -> str:
    rows = [
        (f"{kind}\n{name}", s)
        for kind, res in results.items()
        if isinstance(res, dict)
        for name, s in res.items()
        if isinstance(s, dict) and "ttft_p50_s" in s
    ]
    gaps = {
        kind: res["interference"]
        for kind, res in results.items()
        if isinstance(res, dict) and (res.get("interference") or {}).get("gaps_after_long_prompt")
    }
    if not rows and gaps:
        return _plot_interference(gaps, path)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.9 * len(rows) + 2), sharey=True)
    y = range(len(rows))
    labels = [r[0] for r in rows]
    for ax, (key, title) in zip(axes, (("ttft", "time to first token (s)"), ("itl", "inter-token latency (s)"))):
        p50 = [s[f"{key}_p50_s"] or 0 for _, s in rows]
        p99 = [s[f"{key}_p99_s"] or 0 for _, s in rows]
        ax.barh([i + 0.2 for i in y], p50, 0.4, label="p50")
        ax.barh([i - 0.2 for i in y], p99, 0.4, label="p99")
        ax.set_title(title)
        ax.legend()
    axes[2].barh(list(y), [s["output_tok_per_s"] or 0 for _, s in rows], 0.6)
    axes[2].set_title("output tokens/s")
    axes[0].set_yticks(list(y), labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_interference(runs: dict, path: str) -> str:
    """Each stream token's gap against when it came, from the long prompt's arrival; lines at
    the median before it and at twice the median during its prefill."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (kind, r) in enumerate(runs.items()):
        t, g = zip(*r["gaps_after_long_prompt"])
        ax.scatter(t, [x * 1e3 for x in g], s=3, color=f"C{i}", label=f"{kind}: gaps of {r['streams']} streams")
        if r.get("itl_p50_before_s"):
            ax.axhline(r["itl_p50_before_s"] * 1e3, color=f"C{i}", ls=":", lw=1, label="median before")
        if r.get("itl_p50_during_s"):
            ax.axhline(2e3 * r["itl_p50_during_s"], color=f"C{i}", ls="--", lw=1, label="2x median during")
        if r.get("prefill_s"):
            ax.axvline(
                r["prefill_s"], color="grey", lw=1, label=f"first token of the {r['long_prompt_tokens']}-token prompt"
            )
    ax.set_xlabel("seconds since the long prompt arrived")
    ax.set_ylabel("inter-token gap (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
