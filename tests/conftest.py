"""Shared test configuration: markers, seeds, and the Triton interpreter on CPU."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter,
# which must be switched on before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--fuzz-examples", type=int, default=0,
        help="random examples per backend for tests/test_fuzz.py (default: a fixed CI set)",
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow; pass --run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test: inputs are fresh but a failure replays.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
