"""Small factories the tests share: a tiny decoder, prompts, a decode loop, disk configs, the
prefix pool's test shape, fresh interpreters that can import these factories, a live server and an in-memory remote store."""

import contextlib
import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import types
from collections import Counter
from pathlib import Path

import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig
from kvdrive.models.decoder import DecoderLM
from kvdrive.models.registry import from_hf_config
from kvdrive.prefix.remote_store import RemoteStore, StoreDown
from kvdrive.tiered.config import TieredConfig

CPU, F32 = torch.device("cpu"), torch.float32
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the checkout


def tiny_model(model_type="llama", **extra):
    """A random 3-layer decoder: 4 query heads, 2 KV heads, head_dim 16, vocabulary 300."""
    from transformers import AutoConfig

    cfg = from_hf_config(
        AutoConfig.for_model(
            model_type,
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            **extra,
        )
    )
    torch.manual_seed(0)
    return DecoderLM(cfg).eval()


def random_prompts(lengths=(150, 77, 203), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lengths]


def decode_steps(model, cache, prompts, steps):
    """Prefill each prompt, then decode the batch ``steps`` times with fixed inputs: (B, steps, V)."""
    for i, p in enumerate(prompts):
        cache.add(i, 400)
        b = cache.plan([i], len(p))
        model(torch.tensor([p], device=model.device), cache, b)
        cache.commit(b)
    out = []
    for t in range(steps):
        b = cache.plan(list(range(len(prompts))), 1)
        out.append(model(torch.full((len(prompts), 1), 7 + t, device=model.device), cache, b))
        cache.commit(b)
    return torch.stack(out, 1) if out else None  # (B, steps, V)


def graphed_decode(model, cache, num_seqs: int, steps: int) -> torch.Tensor:
    """Decode the batch ``steps`` times as one captured graph, inputs as ``decode_steps``': (B, steps, V)."""
    from kvdrive.engine.cuda_graph import GraphedDecodeStep

    graph, out = None, []
    for t in range(steps):
        ids = torch.full((num_seqs, 1), 7 + t, device="cuda")
        if graph is None:
            graph = GraphedDecodeStep(model, cache, list(range(num_seqs)), ids)
        out.append(graph(ids).clone())
        graph.commit()
    return torch.stack(out, 1)


def disk_config(tmp_path, sparse: SparseConfig, host_groups_per_layer: int, **kw) -> TieredConfig:
    """A tiered config over a disk directory with an arena of ``host_groups_per_layer`` groups
    of ``tiny_model`` per layer (2 KV heads, D=16, fp32 at G=8: 4 KiB slots)."""
    from kvdrive.storage.pool import PoolPath

    layers = 3
    return TieredConfig(
        sparse,
        disk=(PoolPath(str(tmp_path), 64 << 20),),
        host_bytes=layers * host_groups_per_layer * 4096,
        direct="off",
        **kw,
    )


class Done:
    """An event that has completed (the arena's held slots are free at once)."""

    def query(self):
        return True

    def synchronize(self):
        pass


# -- the prefix pool's tests: a 3-layer shape without weights, 4-token chunks -------------------

PREFIX_CFG = types.SimpleNamespace(
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=8,
    sliding_windows=(None,) * 3,
    attn_scale=1.0,
    attn_logit_softcap=None,
)
PREFIX_C = 4  # chunk tokens
PREFIX_CHUNK_BYTES = PREFIX_CFG.num_hidden_layers * 4096  # one 4 KiB slot per layer (2*2*4*8*4 B = 512 B rounded up)


def filled_cache(tokens: int, seed=0, seqs=4):
    """A plain cache of ``PREFIX_CFG`` whose sequence 0 holds ``tokens`` tokens of random KV."""
    cache = ContiguousKVCache(PREFIX_CFG, seqs, 64, CPU, F32)
    cache.add(0, 64)
    g = torch.Generator().manual_seed(seed)
    b = cache.plan([0], tokens)
    for layer in range(PREFIX_CFG.num_hidden_layers):
        cache.append(layer, torch.randn(1, 2, tokens, 8, generator=g), torch.randn(1, 2, tokens, 8, generator=g), b)
    cache.commit(b)
    return cache


def same_kv(cache, a, b, n):
    """Whether sequences ``a`` and ``b`` of ``cache`` hold the same KV in their first ``n`` tokens."""
    return all(
        torch.equal(x, y)
        for layer in range(PREFIX_CFG.num_hidden_layers)
        for x, y in zip(cache.export_kv(a, layer, 0, n), cache.export_kv(b, layer, 0, n))
    )


def prefix_pool(path, budget=1 << 20, extent_chunks=16, dtype=F32, **kw):
    """A prefix pool of ``PREFIX_CFG`` on one disk directory, chunks admitted at once."""
    from kvdrive.prefix.pool import PrefixConfig, PrefixPool
    from kvdrive.storage.pool import PoolPath

    kw.setdefault("admit_after", 1)
    return PrefixPool(
        PREFIX_CFG,
        dtype,
        PrefixConfig(
            model="m",
            disks=(PoolPath(str(path), budget),),
            chunk_tokens=PREFIX_C,
            extent_bytes=extent_chunks * PREFIX_CHUNK_BYTES,
            **kw,
        ),
    )


# -- fresh interpreters ------------------------------------------------------------------------


def child_env(**extra) -> dict:
    """The environment of a child interpreter that imports kvdrive from this checkout and these factories."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", **extra}


def run_python(code: str, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh interpreter from the checkout; its output as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
        env=child_env(),
        **kw,
    )


# -- a live server ---------------------------------------------------------------------------


@contextlib.contextmanager
def live_server(state, timeout: float = 180.0):
    """A real uvicorn server of ``state`` (a ``ServerState``) on 127.0.0.1 at a free port, in a
    thread; yields its base URL once the model is loaded, stops it after."""
    import socket
    import threading
    import time

    import uvicorn

    from kvdrive.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start"
        assert state.wait_loaded(max(0.0, deadline - time.monotonic())), state.load_error
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def vocab_sized_tiny_model(vocab_size: int):
    """``tiny_model``'s shape with a real tokenizer's vocabulary: fast enough to fuzz a server."""
    from transformers import AutoConfig

    cfg = from_hf_config(
        AutoConfig.for_model(
            "llama",
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(0)
    return DecoderLM(cfg).eval()


# -- the remote tier's tests: a store in this process's memory ----------------------------------


class MemoryStore(RemoteStore):
    """A ``RemoteStore`` in a dict, shared by the pools given it: ``objects`` (name -> bytes) can
    be edited to corrupt a value; while ``hang`` is set every call blocks until ``release``;
    ``down`` makes every call raise ``StoreDown``; ``calls`` counts calls by method."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.hang, self.release = threading.Event(), threading.Event()
        self.down = False
        self.calls: Counter = Counter()

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.hang.is_set():
            self.release.wait(30)
        if self.down:
            raise StoreDown("the test store is down")

    def connect(self):
        self._enter("connect")

    def register(self, ptr, nbytes):
        self._enter("register")

    def unregister(self, ptr):
        pass

    def exists(self, names):
        self._enter("exists")
        return [n in self.objects for n in names]

    def get_into(self, names, ptrs, size):
        self._enter("get_into")
        out = []
        for n, p in zip(names, ptrs):
            v = self.objects.get(n)
            if v is None or len(v) != size:
                out.append("absent" if v is None else "size")
            else:
                ctypes.memmove(p, v, size)
                out.append(None)
        return out

    def put_from(self, names, ptrs, size, replace):
        self._enter("put_from")
        for n, p in zip(names, ptrs):
            if replace or n not in self.objects:
                self.objects[n] = ctypes.string_at(p, size)
        return [None] * len(names)

    def mark(self, names):
        self._enter("mark")
        for n in names:
            self.objects.setdefault(n, b"1")

    def close(self):
        self.calls["close"] += 1
