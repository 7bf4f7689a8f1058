"""``kvdrive serve``: the app under uvicorn, in this process, until Ctrl-C or SIGTERM.

uvicorn binds the port at once and the model loads behind it (``/health`` answers 503
until it is ready); a model that fails to load stops the server with its error.
"""

from __future__ import annotations

import logging

from kvdrive.errors import KvdriveError
from kvdrive.serve.config import ServeConfig


def serve(config: ServeConfig, load=None) -> None:
    import uvicorn

    from kvdrive.serve.app import create_app
    from kvdrive.serve.state import ServerState

    logging.basicConfig(level=config.server.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def stop(err: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    state = ServerState(config, load=load, on_load_failed=stop)
    uv = uvicorn.Config(
        create_app(state),
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(uv)
    server.run()
    if state.load_error is not None:
        raise KvdriveError(f"the model failed to load: {state.load_error}")
