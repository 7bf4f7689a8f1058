"""The ``--summaries`` grammar of ``kvdrive eval``, without torch (the CLI parses it at start-up).

``NAME[+dense=L,L,...][/MODE][@BUDGET]``: a summary; optionally global layers it leaves
dense (attended whole, as Quest and ShadowKV leave the first layers), its own selection mode
(``shared`` or ``per_head``) and one budget (a fraction of the context in (0, 1)) instead of
every ``--budgets``. Examples: ``tokenmax``, ``oracle/per_head@0.0625``,
``tokenmax+dense=0,1@0.1875``.
"""

from __future__ import annotations

from typing import NamedTuple

MODES = ("shared", "per_head")


class SummarySpec(NamedTuple):
    name: str
    mode: str | None  # None: the run's --mode
    dense: tuple[int, ...] | None  # None: the run's --dense-layers
    budget: float | None  # None: every --budgets


def parse(value: str, summaries: tuple[str, ...]) -> SummarySpec:
    """The parts of ``value``; ValueError naming the grammar when it does not fit."""
    spec, _, at = value.partition("@")
    head, _, mode = spec.partition("/")
    name, _, extra = head.partition("+")
    dense = None
    try:
        budget = float(at) if at else None
        if extra:
            key, _, layers = extra.partition("=")
            if key != "dense" or not layers:
                raise ValueError(extra)
            dense = tuple(sorted({int(x) for x in layers.split(",")}))
    except ValueError:
        budget, dense, name = None, None, ""  # reported below
    if name not in summaries or mode not in ("", *MODES) or (budget is not None and not 0 < budget < 1):
        raise ValueError(
            f"{value!r}: choose a summary of {', '.join(summaries)}, optionally followed by "
            "+dense=L,L (global layers kept dense), /shared or /per_head, and @FRACTION (one budget, in (0, 1))"
        )
    if dense is not None and any(layer < 0 for layer in dense):
        raise ValueError(f"{value!r}: dense layers are layer indices >= 0")
    return SummarySpec(name, mode or None, dense, budget)
