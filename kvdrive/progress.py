"""Progress bars on stderr for long work (loading, long prefills, benchmarks)."""

from __future__ import annotations

import sys

from kvdrive.env import progress_enabled


def progress(iterable=None, enabled: bool = True, **kwargs):
    """``tqdm`` over ``iterable``; hidden when ``enabled`` is false, stderr is not a
    terminal, or KVDRIVE_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = not (enabled and progress_enabled() and sys.stderr.isatty())
    return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
