"""Shared fixtures: a real Redis server on loopback, the tiny bundled models."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from services.run import redis_server_binary

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")   # inherited by the servers tests start
if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run only in Triton's interpreter: tests of the GPU path's
    # host side (CUDA-graph inputs) use it. Set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The tiny model's ops are small: on a 2-core runner shared with Ray replicas and servers,
    # one intra-op thread is faster than two fighting over the cores.
    import torch  # noqa: PLC0415
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server process on a free loopback port; stop()/start() for fault tests."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", "--appendonly", "no", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return os.environ.get("TEST_TINY_MODEL") or str(REPO / "models" / "tiny-target")


@pytest.fixture(scope="session")
def tiny_draft_dir() -> str:
    return str(REPO / "models" / "tiny-draft")
