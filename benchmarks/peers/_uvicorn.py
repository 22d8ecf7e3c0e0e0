"""Run a FastAPI app under uvicorn on 127.0.0.1 (the plain and fastinfer stacks share this)."""

from __future__ import annotations

from typing import Any

import common


def serve(app: Any, port: int) -> None:
    """One uvicorn process, one event loop, as both FastAPI's and uvicorn's docs start an app
    (``uvicorn main:app``); access logs off, like any server under load."""
    import uvicorn

    sock = common.listening_socket(port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
