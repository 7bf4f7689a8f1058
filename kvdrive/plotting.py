"""Matplotlib for the result plots: headless (Agg), and an error naming the extra when absent."""

from __future__ import annotations

from kvdrive.errors import KvdriveError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a ``KvdriveError`` naming ``kvdrive[plot]`` if
    matplotlib is not installed (the JSON a plot is drawn from is written before)."""
    try:
        import matplotlib
    except ImportError:
        raise KvdriveError("plots need matplotlib: pip install 'kvdrive[plot]' (the JSON is written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
