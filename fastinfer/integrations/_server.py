"""``run_server``: uvicorn in a background thread, for notebooks and tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastinfer._optional import require

__all__ = ["run_server"]


@contextmanager
def run_server(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL; stops it on exit.

    Binds to localhost by default (nothing listens beyond it unless you pass ``host``). ``port=0``
    picks a free port. Handy in notebooks and tests; production runs ``uvicorn module:app``.
    """
    import threading

    uvicorn = require("uvicorn", purpose="run_server")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fastinfer-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start (see its log above)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
