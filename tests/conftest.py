"""Shared fixtures: a real Redis server on loopback, the tiny bundled models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.run import LocalRedis

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


@pytest.fixture(scope="session")
def redis_server():
    server = LocalRedis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return os.environ.get("TEST_TINY_MODEL") or str(REPO / "models" / "tiny-target")


@pytest.fixture(scope="session")
def tiny_draft_dir() -> str:
    return str(REPO / "models" / "tiny-draft")
