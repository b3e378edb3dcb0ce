"""Test helpers for the OpenAI-compatible server: a uvicorn server on a free loopback port,
run in a thread and stopped by `close()` (tests/test_serve.py, tests/test_moa.py)."""
from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """`server` (an `ftjax.serve.app.Server`) behind uvicorn on 127.0.0.1; `url` is the root,
    `client` an `openai.OpenAI` for `url/v1`."""

    def __init__(self, server):
        import openai
        import uvicorn

        from ftjax.serve.app import create_app
        self.server = server
        self.port = free_port()
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1",
                                                port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.uv.started:
            if time.time() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)
