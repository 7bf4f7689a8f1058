"""``kvdrive bench serve``: an open-loop HTTP load against kvdrive's server and a peer's.

* ``workloads``: shared-prefix documents and questions, random prompts, Poisson arrivals;
* ``client``: streamed requests sent on schedule, and their statistics;
* ``servers``: kvdrive's and ``transformers serve``, started here or already running;
* ``args``: the command line; ``run``: the benchmark (phases, the result); ``plot``: its figure.
"""

__all__ = ["args", "client", "plot", "run", "servers", "workloads"]
