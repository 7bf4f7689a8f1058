"""``kvdrive serve``: an OpenAI-compatible HTTP server on the online engine.

* ``config``: the settings (file < ``KVDRIVE_*`` environment < flags) as a ``ServeConfig``;
* ``protocol``: the OpenAI request and response bodies (pydantic);
* ``errors``: OpenAI-shaped errors and their status codes;
* ``state``: the model loading behind the server, the ``AsyncEngine``, API keys and tenants;
* ``app``: the FastAPI routes; ``responses``: events to JSON bodies and server-sent events;
* ``metrics``: Prometheus metrics named like vLLM's; ``server``: uvicorn.

Importing this package needs the ``serve`` extra (``pip install kvdrive[serve]``) only for
``app``, ``errors``, ``metrics``, ``responses``, ``state`` and ``server``.
"""

from kvdrive.serve.config import ServeConfig, resolve

__all__ = ["ServeConfig", "resolve"]
