"""Benchmarks of the score modifiers at (B 1, H 8, S 4096, D 64), forward and
forward+backward: on the CPU kernels in float32 and bfloat16, or on a GPU machine
with backend "auto" in bfloat16 (gpu_check.sh, step bench_modifiers).

    pytest benchmarks/test_bench_modifiers.py --benchmark-only

Groups and what each compares (the targets in brackets):
- window: a sliding window (256, 0) on the fused kernels (tiles outside the
  band are skipped) vs our own full causal attention [<= 0.25x its time] and
  vs SDPA given the equivalent bool mask [>= 4x faster];
- softcap: softcap 30 vs the same call without it [<= 1.3x];
- alibi: ALiBi slopes vs the same call without them [<= 1.1x];
- sinks: attention sinks (a logit per head) vs the same call without them [<= 1.1x].
At the end of the module a table of the time ratios is printed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fast_attn
from fast_attn.bench import step_of
from fast_attn.dispatch import UNAVAILABLE

ON_GPU = torch.cuda.is_available()
DEVICE, BACKEND = ("cuda", "auto") if ON_GPU else ("cpu", "cpu")
pytestmark = pytest.mark.skipif(
    not ON_GPU and UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}"
)

BATCH, HEADS, SEQLEN, HEAD_DIM = 1, 8, 4096, 64
WINDOW = (256, 0)
SOFTCAP = 30.0
DTYPES = {"bf16": torch.bfloat16} if ON_GPU else {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd_bwd")
# (group, implementation): the implementations each group compares, the first the modifier's.
IMPLEMENTATIONS = {
    "window": ("fast_attn_window", "fast_attn_causal", "sdpa_bool_mask"),
    "softcap": ("fast_attn_softcap", "fast_attn_plain"),
    "alibi": ("fast_attn_alibi", "fast_attn_plain"),
    "sinks": ("fast_attn_sinks", "fast_attn_plain"),
}

# Median seconds per (group, implementation), for the ratio table.
MEDIANS: dict[str, dict[str, float]] = {}


def band_mask(seqlen: int, left: int, right: int) -> torch.Tensor:
    """Bool (S, S), True where query i sees key j: j in [i - left, i + right]."""
    rows = torch.arange(seqlen)[:, None]
    cols = torch.arange(seqlen)[None, :]
    return (cols >= rows - left) & (cols <= rows + right)


def make_step(impl: str, dtype: torch.dtype, mode: str):
    """A no-argument callable running one forward (or forward + backward)."""
    requires_grad = mode == "fwd_bwd"
    shape = (BATCH, HEADS, SEQLEN, HEAD_DIM)
    q, k, v = (torch.randn(shape, dtype=dtype, device=DEVICE).requires_grad_(requires_grad) for _ in range(3))
    # ALiBi's geometric slopes
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / HEADS) for h in range(HEADS)], device=DEVICE)
    sinks = torch.randn(HEADS, device=DEVICE, requires_grad=requires_grad)
    arguments = {
        "fast_attn_window": {"window_size": WINDOW},
        "fast_attn_causal": {"causal": True},
        "fast_attn_softcap": {"softcap": SOFTCAP},
        "fast_attn_alibi": {"alibi_slopes": slopes},
        "fast_attn_sinks": {"sinks": sinks},
        "fast_attn_plain": {},
    }
    if impl in arguments:

        def attend():
            return fast_attn.attention(q, k, v, backend=BACKEND, **arguments[impl])

    else:
        mask = band_mask(SEQLEN, *WINDOW).to(DEVICE)

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    differentiated = (q, k, v, sinks) if impl == "fast_attn_sinks" else (q, k, v)
    step = step_of(attend, mode, differentiated)
    if not ON_GPU:
        return step

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    return synchronized_step


CASES = [
    (group, impl, dtype, mode)
    for group, impls in IMPLEMENTATIONS.items()
    for impl in impls
    for dtype in DTYPES
    for mode in MODES
]


@pytest.mark.parametrize("group,impl,dtype,mode", CASES, ids=lambda x: str(x))
def test_modifier(benchmark, group, impl, dtype, mode):
    name = f"{group} {mode} {dtype} B{BATCH} H{HEADS} S{SEQLEN} D{HEAD_DIM}"
    benchmark.group = name
    step = make_step(impl, DTYPES[dtype], mode)
    benchmark.pedantic(step, rounds=3 if impl == "sdpa_bool_mask" else 5, iterations=10 if ON_GPU else 1,
                       warmup_rounds=1)  # fmt: skip
    MEDIANS.setdefault(name, {})[impl] = benchmark.stats.stats.median
    where = torch.cuda.get_device_name() if ON_GPU else f"{torch.get_num_threads()} threads"
    benchmark.extra_info.update(implementation=impl, device=where, torch=torch.__version__)


def ratio_row(name: str, medians: dict[str, float]) -> str | None:
    impls = IMPLEMENTATIONS[name.split()[0]]
    if impls[0] not in medians:
        return None
    ratios = [f"/ {impl} {medians[impls[0]] / medians[impl]:.3f}" for impl in impls[1:] if impl in medians]
    times = "  ".join(f"{impl} {medians[impl] * 1e3:.1f} ms" for impl in impls if impl in medians)
    return f"{name:<36} {' '.join(ratios)}   ({times})"


def ratio_title() -> str:
    where = torch.cuda.get_device_name() if ON_GPU else f"{torch.get_num_threads()} threads"
    return f"time of the modifier's call / time of the other call, {where}"
