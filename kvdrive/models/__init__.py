"""Models: one plain-torch decoder for every supported family, and its loaders.

* ``loader``: ``load_model`` / ``load_config`` from an embedded name, ``random:PRESET``, a
  ``.gguf`` file or a Hugging Face directory; ``gguf_loader``, ``embedded``, ``presets``;
* ``registry``: Hugging Face ``model_type`` -> ``ModelConfig``;
* ``decoder``: ``DecoderLM``; ``layers`` (RMSNorm, gated MLP), ``rope``; their CUDA kernels:
  ``norm_triton``, ``act_triton``, ``rope_triton``.
"""

from kvdrive.models.decoder import DecoderLM
from kvdrive.models.loader import LoadedModel, load_config, load_model

__all__ = ["DecoderLM", "LoadedModel", "load_config", "load_model"]
