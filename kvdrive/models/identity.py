"""What names a model's weights for caches that outlive the process (the prefix pool's keys).

``weights_digest`` is a SHA-256 over every tensor of the state dict, in name order: its
name, shape and dtype, then its content. On the CPU the content is an xxh3_128 of all its
bytes (~17 GB/s: 30 ms for SmolLM2-135M); on a GPU, where copying the weights out would
cost more than the load, an exact integer sum of all its words (viewed as int16/int32/
int64: every value counts, in any order) and 64 of its values at fixed positions. Two
processes that load the same weights on the same kind of device get the same digest; a
fine-tune, another seed of random weights or another checkpoint of the same shape gets
another.
"""

from __future__ import annotations

import hashlib

import torch
import xxhash

SAMPLES = 64  # values per tensor hashed as they are (GPU)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_digest(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` of the weights of ``model`` (see the module doc)."""
    h = hashlib.sha256(b"kvdrive-weights-v1\0")
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}\0".encode())
            flat = t.detach().contiguous().reshape(-1)
            if flat.numel():
                h.update(_content(flat))
    return "sha256:" + h.hexdigest()


def _content(flat: torch.Tensor) -> bytes:
    words = flat.view(_WORD[flat.element_size()])
    if flat.device.type == "cpu":
        return xxhash.xxh3_128_digest(words.view(torch.uint8).numpy())
    k = min(SAMPLES, flat.numel())
    at = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(1, k - 1)
    total = int(words.sum(dtype=torch.int64))
    return total.to_bytes(8, "little", signed=True) + words[at.to(flat.device)].cpu().numpy().tobytes()
