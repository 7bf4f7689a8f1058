"""The plot of a ``kvdrive bench serve`` result: latency percentiles and throughput per phase."""

from __future__ import annotations

from kvdrive.plotting import pyplot


def plot(results: dict, path: str) -> str:
    plt = pyplot()
    rows = [
        (f"{kind}\n{name}", s)
        for kind, res in results.items()
        if isinstance(res, dict)
        for name, s in res.items()
        if isinstance(s, dict) and "ttft_p50_s" in s
    ]
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
