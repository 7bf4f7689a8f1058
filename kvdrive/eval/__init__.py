"""The accuracy harness of ``kvdrive eval``: sparse attention against exact attention on real
text and on a RULER-style task suite, GPU-cache hit rates on prose, and next-layer recall.

Its modules (imported by name; ``kvdrive.commands.eval`` runs them): ``run`` (the command),
``harness`` (prefill once, decode each setting), ``sweep``, ``metrics``, ``corpus`` (text
sources, shipped in ``data/``), ``tasks``, ``calibrate``, ``recall``, ``hits``, ``plot``.
"""

__all__ = ["calibrate", "corpus", "harness", "hits", "metrics", "plot", "recall", "run", "sweep", "tasks"]
