"""CPU benchmark of one decoding step against a KV cache: the decode_forward op (csrc/cpu/decode_kernel.h)
at B 1, Hq 32, Hkv 8, D 128, 32768 cached keys, one query row (one new key appended in place),
float32 and bfloat16.

    pytest benchmarks/test_bench_decode.py --benchmark-only -s

(-s lets the ratio table printed at the end of the module through pytest's output capture.)

Compared (the targets in brackets), each the best of several rounds (the machine is shared):
- fast_attn_2_threads: the op on a contiguous cache, 2 threads, num_splits chosen by the kernel;
- fast_attn_1_thread: the same on 1 thread [2 threads >= 1.7x faster];
- sdpa: torch.nn.functional.scaled_dot_product_attention, q (1, 32, 1, 128), k/v (1, 8, 32768, 128)
  contiguous, enable_gqa=True, 2 threads [the op >= 1.5x faster];
- fast_attn_paged_256, fast_attn_paged_16: the op on pages of 256 and 16 keys in shuffled order,
  2 threads [<= 1.1x the contiguous cache's time].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fast_attn.bench_report import write_ratio_table
from fast_attn.dispatch import UNAVAILABLE

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

HEADS_Q, HEADS_KV, HEAD_DIM, CACHED = 32, 8, 128, 32768
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# implementation: (threads, page size or None)
IMPLEMENTATIONS = {
    "fast_attn_2_threads": (2, None),
    "fast_attn_1_thread": (1, None),
    "sdpa": (2, None),
    "fast_attn_paged_256": (2, 256),
    "fast_attn_paged_16": (2, 16),
}
BEST: dict[str, dict[str, float]] = {}


def paged(cache: torch.Tensor, page_size: int, order: torch.Tensor) -> torch.Tensor:
    """cache (1, S, Hkv, D) as pages (S / page_size, page_size, Hkv, D): page p of the sequence is page order[p]."""
    pages = cache.reshape(-1, page_size, HEADS_KV, HEAD_DIM)
    stored = torch.empty_like(pages)
    stored[order] = pages
    return stored


def make_step(impl: str, dtype: torch.dtype):
    """A no-argument callable running one decoding step of `impl`."""
    q = torch.randn(1, 1, HEADS_Q, HEAD_DIM, dtype=dtype)
    k_cache, v_cache = (torch.randn(1, CACHED, HEADS_KV, HEAD_DIM, dtype=dtype) for _ in range(2))
    k_new, v_new = k_cache[:, -1:].clone(), v_cache[:, -1:].clone()
    if impl == "sdpa":
        k, v = (c.transpose(1, 2).contiguous() for c in (k_cache, v_cache))  # (1, 8, 32768, 128)
        q_heads = q.transpose(1, 2)  # (1, 32, 1, 128)
        return lambda: F.scaled_dot_product_attention(q_heads, k, v, enable_gqa=True)
    page_size = IMPLEMENTATIONS[impl][1]
    block_table = None
    if page_size is not None:
        order = torch.randperm(CACHED // page_size)
        k_cache, v_cache = paged(k_cache, page_size, order), paged(v_cache, page_size, order)
        block_table = order[None].to(torch.int32)
    seqlens = torch.tensor([CACHED - 1], dtype=torch.int32)
    scale = 1 / math.sqrt(HEAD_DIM)
    arguments = (q, k_cache, v_cache, k_new, v_new, seqlens, None, block_table, None)
    options = (scale, False, None, -1, -1, 0.0, 0)
    return lambda: torch.ops.fast_attn.decode_forward(*arguments, *options)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(benchmark, impl, dtype):
    name = f"decode {dtype} B1 Hq{HEADS_Q} Hkv{HEADS_KV} D{HEAD_DIM} cache {CACHED}"
    benchmark.group = name
    threads = torch.get_num_threads()
    torch.set_num_threads(IMPLEMENTATIONS[impl][0])
    try:
        step = make_step(impl, DTYPES[dtype])
        with torch.no_grad():
            benchmark.pedantic(step, rounds=3 if impl == "sdpa" else 10, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    BEST.setdefault(name, {})[impl] = benchmark.stats.stats.min
    benchmark.extra_info.update(
        implementation=impl, threads=IMPLEMENTATIONS[impl][0], torch=torch.__version__
    )


# (numerator, denominator, what the ratio says): each a time ratio, > 1 where the first is slower.
RATIOS = (
    ("fast_attn_1_thread", "fast_attn_2_threads", "2 threads' speedup"),
    ("sdpa", "fast_attn_2_threads", "faster than SDPA"),
    ("fast_attn_paged_256", "fast_attn_2_threads", "paged 256 / contiguous"),
    ("fast_attn_paged_16", "fast_attn_2_threads", "paged 16 / contiguous"),
)


def _ratio_row(name: str, best: dict[str, float]) -> str | None:
    ratios = [f"{what} {best[a] / best[b]:.2f}" for a, b, what in RATIOS if a in best and b in best]
    times = "  ".join(f"{impl} {seconds * 1e3:.2f} ms" for impl, seconds in best.items())
    return f"{name}: {', '.join(ratios)}   ({times})" if ratios else None


@pytest.fixture(scope="module", autouse=True)
def _print_ratio_table(request):
    yield
    write_ratio_table(request.config, "decode_forward, best of the rounds", BEST, _ratio_row)
