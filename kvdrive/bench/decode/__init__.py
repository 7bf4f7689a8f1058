"""``kvdrive bench decode``: decode throughput of every KV placement side by side (``sweep.py``),
its command line (``args.py``), the systems compared (``systems.py``) and what each holds and
moves (``memory.py``), the contexts' fill (``fill.py``) and the report (``report.py``)."""

from kvdrive.bench.decode.args import add_arguments
from kvdrive.bench.decode.sweep import run

__all__ = ["add_arguments", "run"]
