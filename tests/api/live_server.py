"""A live uvicorn server around the API app, for tests that need their own settings."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from app.api import build_app
from app.settings import Settings

MAX_MODEL_LEN = 512
NUM_KV_BLOCKS = 96
MAX_N = 4


class LiveServer:
    """uvicorn in a background thread; the app's event loop lives there."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def serve(engine, **settings) -> LiveServer:
    return LiveServer(build_app(engine, Settings(max_n=MAX_N, **settings)))
