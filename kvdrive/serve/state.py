"""What a running server holds: the model (loaded on a thread while the server already answers
503), its online engine, the metrics, the API keys and the tokenizer's worker.

Tenancy: with API keys, each key is a prefix pool tenant of its own (named by a digest of
the key, never the key), and an ``X-Tenant`` header divides a key's tenant further; without
keys the ``X-Tenant`` header alone names the tenant. Stored prefixes are keyed by tenant,
so one tenant's prefixes never hit for another.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvdrive.engine.async_engine import AsyncEngine
from kvdrive.serve.config import ServeConfig
from kvdrive.serve.errors import APIError
from kvdrive.serve.metrics import ServeMetrics

log = logging.getLogger("kvdrive.serve")
TENANT_HEADER = "x-tenant"
MAX_TENANT = 256  # characters of an X-Tenant header
TENANT_PATTERN = r"^[!-~]([ -~]*[!-~])?$"  # printable ASCII, no space at either end


class ServerState:
    def __init__(
        self,
        config: ServeConfig,
        load: Callable | None = None,
        on_load_failed: Callable[[BaseException], None] | None = None,
    ):
        """``load()``: returns the ``LLM`` to serve (default: the one ``config`` describes);
        ``on_load_failed(err)``: called on the loading thread when it fails (the CLI stops the server)."""
        self.config = config
        self.name = config.model.name
        self.llm = None
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.metrics = ServeMetrics(self.name, lambda: self.engine.snapshot if self.engine is not None else None)
        self._tenants = {key: "key-" + hashlib.sha256(key.encode()).hexdigest()[:16] for key in config.server.api_key}
        self._load = load or self._load_configured
        self._on_load_failed = on_load_failed
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvdrive-tokenize")
        self._closed = False
        self._loader: threading.Thread | None = None

    # -- lifetime ------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the engine on a thread; the server answers 503 until then."""
        self._loader = threading.Thread(target=self._load_and_start, name="kvdrive-load", daemon=True)
        self._loader.start()

    def _load_configured(self):
        from kvdrive.engine.llm import LLM

        m = self.config.model
        return LLM(
            m.model,
            device=m.device,
            dtype=m.dtype,
            max_model_len=m.max_model_len,
            seed=m.seed,
            prefix_cache=self.config.prefix.config(),
            kv_cache=self.config.kv.tiered(),
            prefill_chunk=self.config.engine.max_num_batched_tokens,  # a step's budget is also its longest chunk
        )

    def _load_and_start(self) -> None:
        try:
            llm = self._load()
            e = self.config.engine
            engine = llm.engine(e.max_num_seqs, step_tokens=e.max_num_batched_tokens)  # LLM's prefill_chunk
            if engine.sched.max_batch < e.max_num_seqs:
                log.warning(
                    "memory holds %d sequences of %d tokens, not max_num_seqs=%d: the rest wait",
                    engine.sched.max_batch,
                    llm.max_model_len,
                    e.max_num_seqs,
                )
            # what the load made lives as long as the server: out of the collector's scans, so a
            # full collection on the engine thread walks only what requests allocate
            gc.collect()
            gc.freeze()
            self.engine = AsyncEngine(engine, max_waiting=e.max_waiting, observer=self.metrics)
            self.llm = llm
            log.info(
                "serving %s (%s) as %r: %d sequences of up to %d tokens",
                llm.loaded.source,
                "tiered cache" if llm.kv_cache is not None else "all KV on the device",
                self.name,
                engine.sched.max_batch,
                llm.max_model_len,
            )
        except BaseException as err:  # noqa: BLE001 - reported through /health and the CLI's exit
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("the model failed to load: %s", self.load_error)
            if self._on_load_failed is not None:
                self._on_load_failed(err)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.llm is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loader is not None:
            self._loader.join()
        if self.engine is not None:
            self.engine.shutdown()
        if self.llm is not None:
            self.llm.close()
        self._tokenize.shutdown(wait=False)

    # -- per request ---------------------------------------------------------------------
    def ready(self):
        """The ``LLM``, or a 503 while it loads (or after it failed to)."""
        if self.llm is not None:
            return self.llm
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is loading; retry shortly", code="model_loading", headers={"Retry-After": "5"})

    def tenant(self, authorization: str | None, x_tenant: str | None) -> str | None:
        """The prefix pool tenant of a request, after checking its API key (401 if wrong)."""
        if x_tenant is not None and not (len(x_tenant) <= MAX_TENANT and re.fullmatch(TENANT_PATTERN, x_tenant)):
            raise APIError(
                400,
                f"the {TENANT_HEADER} header must be 1 to {MAX_TENANT} printable ASCII characters",
                param=TENANT_HEADER,
            )
        if not self._tenants:
            return x_tenant
        scheme, _, key = (authorization or "").partition(" ")
        tenant = (
            next((t for k, t in self._tenants.items() if hmac.compare_digest(k.encode(), key.strip().encode())), None)
            if scheme.lower() == "bearer"
            else None
        )
        if tenant is None:
            raise APIError(
                401,
                "Incorrect API key provided: send Authorization: Bearer KEY with a key the server accepts",
                code="invalid_api_key",
            )
        return tenant if x_tenant is None else f"{tenant}/{x_tenant}"

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                404,
                f"The model {model!r} does not exist: this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    async def tokenize(self, fn, *args):
        """``fn(*args)`` on the tokenizer's worker thread (one at a time, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, *args)
