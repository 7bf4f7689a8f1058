"""Content addresses of prefix chunks: a chained SHA-256 over fixed-size token chunks.

Chunk ``i`` of a prompt is tokens ``[i*C, (i+1)*C)``. Its key is

    key[i] = sha256(key[i-1] || tokens of chunk i as little-endian uint32)[:KEY_BYTES]
    key[-1] = sha256(canonical JSON of the namespace)[:KEY_BYTES]

so a key names the whole prefix up to the end of its chunk, not the chunk alone, and
two prompts share chunk ``i`` only if they agree on every token before it. The
namespace (model, dtype, KV layout, chunk size, tenant salt) is folded into the root,
so different models, dtypes or tenants can never meet on a key. Only stable encodings
are hashed (no Python ``hash()``, no pickles): keys are the same in every process and
on every machine, which the persistent index relies on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from kvdrive.errors import KvdriveError

KEY_BYTES = 16  # 128 bits: collisions need ~2^64 chunks
_TOKEN_DTYPE = np.dtype("<u4")  # canonical token encoding; vocabularies stay below 2^32


@dataclass(frozen=True)
class PrefixNamespace:
    """What a chunk's KV depends on besides its tokens. ``tenant`` salts the keys so that
    tenants never hit each other's prefixes (empty: shared)."""

    model: str  # e.g. "llama-3.1-8b" or a weights digest; same name must mean same weights
    dtype: str  # "bfloat16"
    layout: str  # GroupLayout.name of the chunk slots (heads, chunk tokens, head dim, dtype)
    num_layers: int
    chunk_tokens: int
    tenant: str = ""

    def __post_init__(self):
        if not self.model:
            raise KvdriveError("prefix namespace: model must name the weights (e.g. the model spec)")
        if self.chunk_tokens < 1 or self.num_layers < 1:
            raise KvdriveError("prefix namespace: chunk_tokens and num_layers must be >= 1")

    def root(self) -> bytes:
        canon = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"kvdrive-prefix-v1\0" + canon).digest()[:KEY_BYTES]


def chunk_keys(tokens, namespace: PrefixNamespace, max_chunks: int | None = None) -> list[bytes]:
    """Keys of the full chunks of ``tokens`` (a partial tail chunk has none), at most ``max_chunks``."""
    c = namespace.chunk_tokens
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise KvdriveError("prefix keys: token ids must be in 0..2^32-1")
    n = len(ids) // c if max_chunks is None else min(len(ids) // c, max_chunks)
    data = ids[: n * c].astype(_TOKEN_DTYPE).tobytes()
    step = c * _TOKEN_DTYPE.itemsize
    keys, prev = [], namespace.root()
    for i in range(n):
        prev = hashlib.sha256(prev + data[i * step : (i + 1) * step]).digest()[:KEY_BYTES]
        keys.append(prev)
    return keys


def bind_sums(key: bytes, sums: list[int]) -> list[int]:
    """The checksums of a chunk's slots (one xxh3_64 of its data per layer) bound to its key:
    each XORed with a 64-bit digest of (key, layer). The index stores bound sums, so a slot
    that holds another chunk's bytes fails the check even when those bytes are intact.
    Its own inverse: ``bind_sums(key, bind_sums(key, s)) == s``."""
    return [bind_sum(key, layer, s) for layer, s in enumerate(sums)]


def bind_sum(key: bytes, layer: int, s: int) -> int:
    """One layer's checksum bound to its chunk's key (``bind_sums`` of one element)."""
    return int(s) ^ _key_mix(key, layer)


def _key_mix(key: bytes, layer: int) -> int:
    return int.from_bytes(hashlib.blake2b(key + layer.to_bytes(4, "little"), digest_size=8).digest(), "little")
