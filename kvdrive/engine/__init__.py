"""The engine: ``LLM`` (the Python API), the generation loop with continuous batching,
sampling, micro-batched decode and CUDA-graph decode steps.

* ``llm``: ``LLM``, ``RequestOutput``; ``sampling``: ``SamplingParams``;
* ``generation``: the loop (admit, prefill in chunks, batched decode, detokenize);
* ``micro_batch``: a decode step in parts on their own streams; ``cuda_graph``: the captured step.
"""

from kvdrive.engine.llm import LLM, RequestOutput
from kvdrive.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
