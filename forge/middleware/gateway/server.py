"""Run the gateway's app with uvicorn on 127.0.0.1, in a background thread of this process.

`forge serve` runs one in the foreground process; a black-box agent rollout worker runs one
inside its Ray actor, next to its generator, so the agents' HTTP calls never leave the machine.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
from typing import Any

import uvicorn


class GatewayServer:
    """Serve `app` on `host:port` (port 0: a free one) until `stop()`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_keep_alive=30, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="forge-gateway-http", daemon=True)

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as `base_url`."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> "GatewayServer":
        # A full garbage collection walks every object the process holds (torch, the model, the
        # app: about 120 ms on a 2-core machine) and stalls the requests in flight; objects that
        # exist before serving starts live until the end, so they leave the collector's view.
        gc.collect()
        gc.freeze()
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the gateway could not listen on {self.host}:{self.port} (is the port taken? "
                                   "pass another with --port)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
