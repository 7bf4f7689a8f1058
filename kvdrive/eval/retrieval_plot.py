"""The retrieval suite's picture: accuracy vs budget, and accuracy vs depth, per family and length.

Top row: one panel per (length, family); x the budget (% of the context, log scale), one
colour per summary, solid lines for the ``prefilled`` mode and dashed for ``sparse-question``,
full attention's accuracy and its 95% interval in grey. Bottom row: the same panels against
the depth of the asked fact, one line per budget of ``tokenmax`` (or the first summary), prefilled.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvdrive.plotting import pyplot

PANEL = (3.4, 3.0)
DPI = 120
LINE = {"prefilled": "-", "sparse-question": "--"}
DEPTH_SUMMARY = "tokenmax"  # the summary whose budgets the depth panels draw, when it ran


def _parse(label: str) -> tuple[str, float]:
    summary, _, rest = label.partition("@")
    return summary, float(rest.split("/")[0])


def plot_retrieval(result_path: str | Path, png: str | Path) -> Path:
    doc = json.loads(Path(result_path).read_text())
    panels = [
        (e["length"], fam, body["settings"]) for e in doc["results"] for fam, body in (e.get("retrieval") or {}).items()
    ]
    plt = pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(PANEL[0] * len(panels), PANEL[1] * 2), squeeze=False)
    summaries = sorted({_parse(lab)[0] for _, _, s in panels for lab in s if lab != "full"})
    colour = {s: f"C{i}" for i, s in enumerate(summaries)}
    for col, (length, fam, settings) in enumerate(panels):
        ax, dax = axes[0][col], axes[1][col]
        full = settings["full"]
        for mode, row in full.items():
            ax.axhline(row["accuracy"], color="grey", ls=LINE[mode], lw=1)
            ax.axhspan(*row["interval"], color="grey", alpha=0.12)
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for label, by_mode in settings.items():
            if label == "full":
                continue
            summary, budget = _parse(label)
            for mode, row in by_mode.items():
                curves.setdefault((summary, mode), []).append((budget * 100, row["accuracy"]))
        for (summary, mode), pts in sorted(curves.items()):
            pts.sort()
            ax.plot(*zip(*pts), LINE[mode], marker="o", ms=3, color=colour[summary], label=f"{summary} {mode}")
        ax.set_xscale("log", base=2)
        ticks = sorted({b for pts in curves.values() for b, _ in pts})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{fam}, {length} tokens", fontsize=9)
        ax.set_xlabel("budget (% of context)", fontsize=8)
        ax.grid(alpha=0.3)
        first = DEPTH_SUMMARY if DEPTH_SUMMARY in summaries else (summaries[0] if summaries else None)
        for label, by_mode in settings.items():
            row = by_mode.get("prefilled") or next(iter(by_mode.values()))
            bins = list(row["by_depth"])
            xs = [float(b.split("-")[0]) + 0.1 for b in bins]
            if label == "full":
                dax.plot(xs, list(row["by_depth"].values()), color="grey", lw=2, label="full")
            elif _parse(label)[0] == first:
                dax.plot(xs, list(row["by_depth"].values()), marker="o", ms=3, label=f"{label}")
        dax.set_ylim(-0.02, 1.02)
        dax.set_xlabel("depth of the asked fact", fontsize=8)
        dax.grid(alpha=0.3)
        dax.legend(fontsize=6)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[1][0].set_ylabel(f"accuracy by depth ({first})")
    handles, names = axes[0][0].get_legend_handles_labels()
    model = Path(str(doc.get("config", {}).get("model", "model"))).name
    fig.suptitle(f"{model}: retrieval, sparse vs full attention (grey)", fontsize=10)
    fig.tight_layout()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.75), fontsize=8, frameon=False)
    fig.savefig(png, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(png)
