"""CPU kernel benchmark of packed variable-length sequences: documents of 64..2048 tokens, 8192
in all, H 8, D 64, causal, float32 and bfloat16, forward and forward+backward.

    pytest benchmarks/test_bench_varlen.py --benchmark-only

Compared (the targets in brackets):
- fast_attn_varlen: fast_attn.varlen_attention on the packed batch;
- fast_attn_one_by_one: fast_attn.attention on each document in turn [varlen <= 1.1x its time];
- sdpa_block_mask: SDPA on the packed batch with the equivalent block-diagonal causal bool mask
  [varlen >= 3x faster].
At the end of the module a table of the time ratios and the packed call's peak memory is printed
(an (T, T) fp32 score matrix alone would be 256 MB).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fast_attn
from fast_attn.bench import _peak_memory, step_of
from fast_attn.dispatch import UNAVAILABLE

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

TOTAL, HEADS, HEAD_DIM = 8192, 8, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd_bwd")
IMPLEMENTATIONS = ("fast_attn_varlen", "fast_attn_one_by_one", "sdpa_block_mask")


def document_lengths(total: int = TOTAL, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly from 64..2048 until `total` tokens; the last takes what is left."""
    draw, lengths = random.Random(seed), []
    while sum(lengths) < total:
        left = total - sum(lengths)
        lengths.append(left if left <= 2048 + 64 else min(draw.randint(64, 2048), left - 64))
    return lengths


LENGTHS = document_lengths()
MEDIANS: dict[str, dict[str, float]] = {}
PEAK_MB: dict[str, float] = {}


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """Bool (T, T): query i sees key j of its own document, j <= i."""
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    positions = torch.arange(sum(lengths))
    return (document[:, None] == document[None, :]) & (positions[None, :] <= positions[:, None])


def make_attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A no-argument callable giving the packed output (T, H, D) of one implementation."""
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    longest = max(LENGTHS)
    if impl == "fast_attn_varlen":
        return lambda: fast_attn.varlen_attention(
            q, k, v, offsets, offsets, longest, longest, causal=True, backend="cpu"
        )
    if impl == "fast_attn_one_by_one":
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

        def one_by_one():
            outs = [
                fast_attn.attention(
                    *(t[None, b:e].transpose(1, 2) for t in (q, k, v)), causal=True, backend="cpu"
                )
                for b, e in bounds
            ]
            return torch.cat([o[0].transpose(0, 1) for o in outs])

        return one_by_one
    mask = block_causal_mask(LENGTHS)
    return lambda: F.scaled_dot_product_attention(
        *(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask
    ).transpose(0, 1)


def make_step(impl: str, dtype: torch.dtype, mode: str):
    q, k, v = (
        torch.randn(TOTAL, HEADS, HEAD_DIM, dtype=dtype).requires_grad_(mode == "fwd_bwd") for _ in range(3)
    )
    return step_of(make_attend(impl, q, k, v), mode, (q, k, v))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(benchmark, impl, dtype, mode):
    name = f"varlen {mode} {dtype} T{TOTAL} N{len(LENGTHS)} H{HEADS} D{HEAD_DIM}"
    benchmark.group = name
    step = make_step(impl, DTYPES[dtype], mode)
    step()  # warm-up
    if impl == "fast_attn_varlen":
        with _peak_memory(torch.device("cpu")) as peak:
            step()
        PEAK_MB[name] = peak[0]
        benchmark.extra_info["peak_mb"] = peak[0]
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
    MEDIANS.setdefault(name, {})[impl] = benchmark.stats.stats.median
    benchmark.extra_info.update(implementation=impl, lengths=LENGTHS, threads=torch.get_num_threads())


def ratio_row(name: str, medians: dict[str, float]) -> str | None:
    if "fast_attn_varlen" not in medians:
        return None
    ours = medians["fast_attn_varlen"]
    ratios = " ".join(
        f"/ {impl} {ours / medians[impl]:.3f}" for impl in IMPLEMENTATIONS[1:] if impl in medians
    )
    times = "  ".join(f"{impl} {medians[impl] * 1e3:.1f} ms" for impl in IMPLEMENTATIONS if impl in medians)
    return f"{name:<40} {ratios}   ({times}; varlen peak {PEAK_MB.get(name, float('nan')):.0f} MB)"


def ratio_title() -> str:
    return f"time of varlen_attention / time of the other call, {torch.get_num_threads()} threads, lengths {LENGTHS}"
