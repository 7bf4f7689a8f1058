"""The tiered sparse cache: KV in host memory (and on disk), a GPU selection cache per layer."""
