"""``kvdrive bench serve``: an open-loop HTTP load against kvdrive's server and a peer's.

* ``workloads``: shared-prefix documents and questions, random prompts, Poisson arrivals;
* ``client``: streamed requests sent on schedule, and their statistics;
* ``servers``: kvdrive's and ``transformers serve``, started here or already running;
* ``run``: the benchmark (arguments, phases, the result); ``plot``: its figure.
"""

__all__ = ["client", "plot", "run", "servers", "workloads"]
