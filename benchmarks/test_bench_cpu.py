"""CPU kernel benchmarks: fast_attn's fused C++ kernels vs PyTorch SDPA's CPU
kernels (flash and math, each forced with sdpa_kernel), same shapes, same run.

    pytest benchmarks/test_bench_cpu.py --benchmark-only
    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-json=benchmarks/results/cpu-<machine>-<date>.json

Each benchmark group is one (mode, dtype, shape, masking) and holds the
implementations run on it; extra_info carries GFLOP/s (the field's FLOP count,
fast_attn.testing.attention_flops), the CPU's name and thread count. At the end
of the module a table of fast_attn / SDPA speed ratios is printed.

Cases: the four shapes of benchmarks/CPU_NOTES.md, causal and not, float32
and bfloat16, forward and forward+backward; a T5-style case (a (1, H, S, S)
float bias that requires grad: SDPA's flash kernel refuses it, only its math
path runs); a key-padding case (SDPA keeps its flash kernel for a bool mask);
and the peak memory of the fused path at S = 4096.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fast_attn
from fast_attn.bench import step_of
from fast_attn.dispatch import UNAVAILABLE
from fast_attn.testing import attention_flops

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

SHAPES = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 1024, 128), (2, 8, 4096, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd_bwd")
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}

# Median seconds per (group, implementation), for the ratio table.
MEDIANS: dict[str, dict[str, float]] = {}


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    dtype: str
    causal: bool = False
    t5_bias: bool = False  # (1, H, S, S) float bias that requires grad, scale 1.0
    key_padding: bool = False  # bool key mask, a quarter of the keys padded in half the batch

    @property
    def group_suffix(self) -> str:
        kind = (
            "t5-bias"
            if self.t5_bias
            else "key-padding"
            if self.key_padding
            else ("causal" if self.causal else "full")
        )
        return f"{self.dtype} B{self.batch} H{self.heads} S{self.seqlen} D{self.head_dim} {kind}"

    def flops(self, mode: str) -> float:
        return attention_flops(
            self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal, mode
        )


def make_inputs(case: Case, requires_grad: bool):
    dtype = DTYPES[case.dtype]
    shape = (case.batch, case.heads, case.seqlen, case.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))
    bias = key_mask = None
    if case.t5_bias:
        bias = torch.randn(1, case.heads, case.seqlen, case.seqlen, dtype=dtype).requires_grad_(requires_grad)
    if case.key_padding:
        key_mask = torch.ones(case.batch, case.seqlen, dtype=torch.bool)
        key_mask[::2, case.seqlen * 3 // 4 :] = False
    return q, k, v, bias, key_mask


def make_step(impl: str, case: Case, mode: str):
    """A no-argument callable running one forward (or forward + backward)."""
    q, k, v, bias, key_mask = make_inputs(case, requires_grad=mode == "fwd_bwd")
    scale = 1.0 if case.t5_bias else None
    if impl == "fast_attn":

        def attend():
            return fast_attn.attention(
                q, k, v, bias=bias, key_mask=key_mask, causal=case.causal, scale=scale, backend="cpu"
            )

    else:
        attn_mask = (
            bias if bias is not None else (key_mask[:, None, None, :] if key_mask is not None else None)
        )

        def attend():
            with sdpa_kernel(SDPA_BACKENDS[impl]):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=case.causal, scale=scale
                )

    return step_of(attend, mode, [t for t in (q, k, v, bias) if t is not None])


def estimated_seconds(case: Case, mode: str, impl: str) -> float:
    # ~100 GFLOP/s for the fused kernels, ~30 for the math path.
    return case.flops(mode) / (30e9 if impl == "sdpa_math" else 100e9)


def rounds_for(case: Case, mode: str, impl: str) -> int:
    # About 2 s of measured work per benchmark.
    return max(2, min(20, int(2.0 / max(estimated_seconds(case, mode, impl), 1e-3))))


def warmup_rounds_for(case: Case, mode: str, impl: str) -> int:
    # About 1 s of warm-up for every implementation: a fresh process pays for
    # its first large buffers (page zeroing, huge-page compaction) for a while;
    # e.g. the fp32 T5 fwd+bwd takes ~54 ms for its first ~20 calls, then ~45 ms.
    return max(1, min(20, int(1.0 / max(estimated_seconds(case, mode, impl), 1e-3))))


def run_case(benchmark, impl: str, case: Case, mode: str) -> None:
    group = f"{mode} {case.group_suffix}"
    benchmark.group = group
    step = make_step(impl, case, mode)
    benchmark.pedantic(
        step, rounds=rounds_for(case, mode, impl), warmup_rounds=warmup_rounds_for(case, mode, impl)
    )
    median = benchmark.stats.stats.median
    MEDIANS.setdefault(group, {})[impl] = median
    benchmark.extra_info.update(
        implementation=impl,
        gflops=case.flops(mode) / median / 1e9,
        device=cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        # The record fields of fast_attn.bench_report, for `python -m fast_attn.bench --compare`.
        card=f"CPU {cpu_name()} x{torch.get_num_threads()} threads",
        device_type="cpu",
        mode=mode,
        dtype=case.dtype,
        bias="t5" if case.t5_bias else "key-padding" if case.key_padding else "none",
        head_dim=case.head_dim,
        causal=case.causal,
        batch=case.batch,
        heads=case.heads,
        seqlen=case.seqlen,
        flops=case.flops(mode),
    )


SHAPE_CASES = [
    Case(b, h, s, d, dtype, causal) for dtype in DTYPES for (b, h, s, d) in SHAPES for causal in (False, True)
]
EXTRA_CASES = [
    Case(1, 8, 1024, 64, "fp32", t5_bias=True),
    Case(1, 8, 1024, 64, "bf16", t5_bias=True),
    Case(4, 8, 1024, 64, "fp32", key_padding=True),
    Case(4, 8, 1024, 64, "bf16", key_padding=True),
]


def case_id(case: Case) -> str:
    return case.group_suffix.replace(" ", "-")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fast_attn", *SDPA_BACKENDS])
@pytest.mark.parametrize("case", SHAPE_CASES + EXTRA_CASES, ids=case_id)
def test_attention(benchmark, case, impl, mode):
    if impl == "sdpa_flash" and case.t5_bias and mode == "fwd_bwd":
        pytest.skip("SDPA's CPU flash kernel refuses a float attn_mask that requires grad (only math runs)")
    run_case(benchmark, impl, case, mode)


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, fast_attn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    impl, s = sys.argv[1], int(sys.argv[2])
    q, k, v = (torch.randn(1, 8, s, 64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 8, s, 64)

    def rss_peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    def step():
        if impl == "fast_attn":
            out = fast_attn.attention(q, k, v, causal=True, backend="cpu")
        else:
            backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}[impl]
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad_out)

    step()  # first call: library set-up, thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = rss_peak()
    step()
    print(rss_peak() - before)
    """
)


def peak_memory_bytes(impl: str, seqlen: int) -> int:
    """Growth of the peak resident set during one causal forward + backward at
    (1, 8, seqlen, 64) float32, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, impl, str(seqlen)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_memory_s4096(benchmark):
    seqlen = 4096
    score_matrix_bytes = seqlen * seqlen * 4  # one (S, S) float32 matrix: 64 MiB
    peaks = {}
    benchmark.group = "peak memory fwd_bwd fp32 B1 H8 S4096 D64 causal"
    benchmark.pedantic(lambda: peaks.update(fast_attn=peak_memory_bytes("fast_attn", seqlen)), rounds=1)
    for impl in SDPA_BACKENDS:
        peaks[impl] = peak_memory_bytes(impl, seqlen)
    benchmark.extra_info.update(
        peak_bytes=peaks,
        one_score_matrix_bytes=score_matrix_bytes,
        device=cpu_name(),
        threads=torch.get_num_threads(),
    )
    # Inputs' gradients (3 x 8 MiB) and outputs are the floor; no (S, S) matrix may appear.
    assert peaks["fast_attn"] < score_matrix_bytes, peaks


def ratio_row(group: str, medians: dict[str, float]) -> str | None:
    if "fast_attn" not in medians:
        return None
    ratios = [
        f"{impl} x{medians[impl] / medians['fast_attn']:.2f}" for impl in SDPA_BACKENDS if impl in medians
    ]
    return f"{group:<48} " + "  ".join(ratios)


def ratio_title() -> str:
    return f"fast_attn speed / SDPA speed (>1: fast_attn faster), {cpu_name()}, {torch.get_num_threads()} threads"
