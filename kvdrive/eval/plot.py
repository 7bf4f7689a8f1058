"""Accuracy and top-1 agreement against the KV budget: one panel per context length.

One colour per summary type; solid lines are task accuracy, dashed lines top-1
agreement with full attention; full attention's task accuracy is a grey reference line
(its top-1 agreement is 1 by definition, the top of the axis). matplotlib (the ``plot``
extra) is imported only when a plot is drawn, with the Agg backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvdrive.errors import KvdriveError
from kvdrive.plotting import pyplot

FULL = "full"  # the label of full attention in an eval result
PANEL_SIZE = (4.2, 3.6)  # inches per panel
DPI = 120
PERCENT = 100.0


@dataclass(frozen=True)
class Curve:
    summary: str  # e.g. "minmax", or "minmax/per_head" when modes differ
    metric: str  # "tasks" or "top-1"
    budgets: tuple[float, ...]  # fractions of the context, increasing
    values: tuple[float, ...]


@dataclass(frozen=True)
class Panel:
    title: str
    curves: tuple[Curve, ...]
    full_accuracy: float | None  # full attention's task accuracy, when tasks ran


def _parse_label(label: str) -> tuple[str, float, str]:
    """``summary@budget/mode`` -> (summary, budget, mode)."""
    summary, rest = label.split("@")
    budget, _, mode = rest.partition("/")
    return summary, float(budget), mode


def _task_accuracy(entry: dict, label: str) -> float | None:
    """Mean over retrieval families of the accuracy of ``label`` (families weigh equally; the
    first decoding mode, ``prefilled`` when it ran)."""
    accs = []
    for fam in (entry.get("retrieval") or {}).values():
        by_mode = fam["settings"].get(label)
        if by_mode:
            accs.append((by_mode.get("prefilled") or next(iter(by_mode.values())))["accuracy"])
    return sum(accs) / len(accs) if accs else None


def panels_from_result(doc: dict) -> list[Panel]:
    """Panels from a ``kvdrive eval`` JSON document (``results``: one entry per length)."""
    panels = []
    for entry in doc["results"]:
        labels = [lab for lab in entry.get("text", {}) if lab != FULL]
        labels += [
            lab
            for fam in (entry.get("retrieval") or {}).values()
            for lab in fam["settings"]
            if lab != FULL and lab not in labels
        ]
        parsed = {lab: _parse_label(lab) for lab in labels}
        several_modes = len({mode for _, _, mode in parsed.values()}) > 1
        points: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for lab, (summary, budget, mode) in parsed.items():
            name = f"{summary}/{mode}" if several_modes else summary
            top1 = entry.get("text", {}).get(lab, {}).get("top1_agreement")
            if top1 is not None:
                points.setdefault((name, "top-1"), []).append((budget, top1))
            acc = _task_accuracy(entry, lab)
            if acc is not None:
                points.setdefault((name, "tasks"), []).append((budget, acc))
        curves = tuple(
            Curve(name, metric, tuple(b for b, _ in sorted(pts)), tuple(v for _, v in sorted(pts)))
            for (name, metric), pts in sorted(points.items())
        )
        panels.append(Panel(f"{entry['length']} tokens", curves, _task_accuracy(entry, FULL)))
    return panels


def plot_panels(panels: list[Panel], png: str | Path, title: str = "") -> Path:
    """Draw ``panels`` side by side into ``png``; returns the path."""
    plt = pyplot()
    if not panels:
        raise KvdriveError("nothing to plot: the result has no entries")
    summaries = sorted({c.summary for p in panels for c in p.curves})
    colour = {s: f"C{i}" for i, s in enumerate(summaries)}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes[0], panels):
        for c in panel.curves:
            tasks = c.metric == "tasks"
            ax.plot(
                [b * PERCENT for b in c.budgets],
                c.values,
                "-" if tasks else "--",
                marker="s" if tasks else "o",
                ms=3,
                color=colour[c.summary],
                label=f"{c.summary} {c.metric}",
            )
        if panel.full_accuracy is not None:
            ax.axhline(panel.full_accuracy, color="grey", lw=1.2, label="full attention tasks")
        ax.set_xscale("log", base=2)
        ticks = sorted({b * PERCENT for c in panel.curves for b in c.budgets})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("KV budget (% of context)")
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task accuracy / top-1 agreement")
    handles, names = axes[0][0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # One legend for all panels, right of them (the curves are the same in every panel);
    # bbox_inches="tight" grows the canvas to hold it, however many panels there are.
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.savefig(png, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(png)


def plot_eval(result_path: str | Path, png: str | Path) -> Path:
    """Plot a ``kvdrive eval`` JSON result into ``png``."""
    doc = json.loads(Path(result_path).read_text())
    model = Path(str(doc.get("config", {}).get("model", "model"))).name  # a file name, not its folder
    return plot_panels(panels_from_result(doc), png, f"{model}: sparse vs full attention")
