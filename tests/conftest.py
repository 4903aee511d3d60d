"""Shared test configuration: markers, seeds, the Triton interpreter on CPU, torch's
threads per pytest-xdist worker, and the kernel backends under test."""

from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter,
# which must be switched on before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (`-n auto`, the README's test command) each worker process takes its share of
# the cores for torch's intra-op threads, two at least so that the kernels' multi-threaded paths
# stay under test (tests that need a thread count set their own).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(2, torch.get_num_threads() // _WORKERS))

from fast_attn import dispatch  # noqa: E402  (after TRITON_INTERPRET: it imports the Triton kernels)

# Every backend but the reference, which is the oracle. This machine must run the CPU kernels, the
# CUDA ones when it has a GPU, and Triton when it has a GPU or triton is installed (the interpreter):
# a missing one fails its tests instead of skipping them.
KERNEL_BACKENDS = [name for name in dispatch.BACKENDS if name != "reference"]
REQUIRED_BACKENDS = {"cpu"} | ({"cuda", "triton"} if HAS_CUDA else set())
if importlib.util.find_spec("triton") is not None:
    REQUIRED_BACKENDS.add("triton")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=0,
        help="random examples per backend for tests/test_fuzz.py (default: a fixed CI set)",
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow; pass --run-slow")
    # numpy warns about the intended uint32 wrap-around of the dropout hash in the interpreter.
    hash_wraps_around = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(hash_wraps_around)
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


def _usable_backend(name: str) -> str:
    """`name`, skipped (or failed, if required here) where it cannot run."""
    reason = dispatch.UNAVAILABLE[name]
    if reason is not None:
        if name in REQUIRED_BACKENDS:
            pytest.fail(f"backend {name} should be available here: {reason}")
        pytest.skip(f"backend {name}: {reason}")
    return name


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    """Each kernel backend's name."""
    return _usable_backend(request.param)


# The backends that decode against a KV cache (the reference among them: its paging is tested too).
DECODE_BACKENDS = [name for name, backend in dispatch.BACKENDS.items() if "kv_cache" in backend.features]


@pytest.fixture(params=DECODE_BACKENDS)
def decode_backend(request) -> str:
    """Each backend that decodes against a KV cache."""
    return _usable_backend(request.param)
