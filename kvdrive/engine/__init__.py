"""The engine: ``LLM`` (the Python API), the online engine (add / abort / step, and its
asyncio front), the scheduler, sampling, micro-batched decode and CUDA-graph decode steps.

* ``llm``: ``LLM``, ``RequestOutput``; ``sampling``: ``SamplingParams``;
* ``request``: ``Request``, ``TokenEvent``, the incremental detokenizer;
* ``scheduler``: waiting / prefilling / running queues, admission, the step's token budget;
* ``core``: ``Engine`` (one step: batched decode, then chunked prefill under the budget);
* ``async_engine``: ``AsyncEngine`` (the engine on its own thread, a stream per request);
* ``generation``: a fixed list of requests through an ``Engine``;
* ``micro_batch``: a decode step in parts on their own streams; ``cuda_graph``: the captured step.
"""

from kvdrive.engine.llm import LLM, RequestOutput
from kvdrive.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
