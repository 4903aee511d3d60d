"""Host time per call: what one attention call costs the CPU before the GPU has work.

On a problem so small that the GPU finishes each kernel at once, back-to-back calls
run at the speed of the Python and C++ launch path; the wall time per call is that
cost. It bounds how short a sequence can be before a model becomes CPU-bound, and
it is what a synchronizing timer adds to every call. Prints one line per
implementation and mode, then the time per call of a decoding step (one query
against a KV cache, where the host path competes with the kernel), then where the
host time of the Triton forward and forward+backward goes (cProfile). Without a GPU it times the CPU backend on
one thread against SDPA's CPU kernel, the kernels' own work being tiny there too, and first
the two decoding-sized calls of issue 17's host-cost target as ratios to SDPA on the same tensors
(fast_attn.attention and fast_attn.decode_attention; target <= 1.2x).

    python benchmarks/launch_overhead.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import fast_attn
from fast_attn import dispatch
from fast_attn.dispatch import UNAVAILABLE

CALLS = 300


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _per_call_us(fn) -> float:
    for _ in range(20):
        fn()
    _synchronize()
    begin = time.perf_counter()
    for _ in range(CALLS):
        fn()
    _synchronize()
    return (time.perf_counter() - begin) / CALLS * 1e6


def _interleaved_us(impls: dict, rounds: int = 300, calls: int = 50) -> dict[str, tuple[float, float]]:
    """(median, min) us per call of each implementation over `rounds` short rounds, the implementations
    taking turns: on a shared machine a preemption spoils a few rounds of each, not one implementation."""
    for fn in impls.values():
        for _ in range(200):
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - begin) / calls * 1e6)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _print_cpu_host_cost() -> None:
    """Issue 17's host-cost target on one thread, float32: one decoding-sized call, q (1, 12, 1, 64)
    against 64 keys of 12 heads, D 64, through fast_attn.attention and through fast_attn.decode_attention
    (a (1, 1, 12, 64) query against the first 64 positions of a (1, 128, 12, 64) cache), each against SDPA
    on the same tensors in the same run, no grad."""
    q = torch.randn(1, 12, 1, 64)
    k, v = (torch.randn(1, 12, 64, 64) for _ in range(2))
    q_step = q.transpose(1, 2).contiguous()  # (1, 1, 12, 64)
    k_cache, v_cache = (torch.zeros(1, 128, 12, 64) for _ in range(2))
    k_cache[:, :64], v_cache[:, :64] = k.transpose(1, 2), v.transpose(1, 2)
    seqlens = torch.tensor([64], dtype=torch.int32)
    cases = {
        "attention": lambda: fast_attn.attention(q, k, v),
        "decode_attention": lambda: fast_attn.decode_attention(q_step, k_cache, v_cache, seqlens),
    }
    print(
        "host cost, CPU, one thread, fp32, q (1, 12, 1, 64), 64 keys, D 64, no grad, us per call (median / min):"
    )
    with torch.no_grad():
        times = _interleaved_us({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), **cases})
    sdpa = times["sdpa"][0]
    print(f"{'sdpa':<18} {sdpa:8.1f} / {times['sdpa'][1]:6.1f}")
    for name in cases:
        median, least = times[name]
        print(f"{name:<18} {median:8.1f} / {least:6.1f}   {median / sdpa:5.2f}x sdpa", flush=True)


def main() -> None:
    if torch.cuda.is_available():
        device, dtype, backends = "cuda", torch.bfloat16, ("cuda", "triton")
    else:
        device, dtype, backends = "cpu", torch.float32, ("cpu",)
        torch.set_num_threads(1)
        _print_cpu_host_cost()
    q, k, v = (torch.randn(1, 2, 64, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    impls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for backend in backends:
        if UNAVAILABLE[backend] is None:
            impls[f"fast_attn:{backend}"] = lambda backend=backend: fast_attn.attention(
                q, k, v, causal=True, backend=backend
            )
    print(f"{'implementation':<18} {'fwd us':>8} {'fwd+bwd us':>11}")
    for name, fn in impls.items():
        with torch.no_grad():
            forward = _per_call_us(fn)
        both = _per_call_us(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad))
        print(f"{name:<18} {forward:8.1f} {both:11.1f}", flush=True)
    _print_decode_step(device, dtype, backends)
    if device == "cpu":
        _print_cpu_decoding_route()
    if "fast_attn:triton" in impls:
        triton_forward = impls["fast_attn:triton"]
        with torch.no_grad():
            _print_profile("triton forward", triton_forward)
        _print_profile(
            "triton forward+backward", lambda: torch.autograd.grad(triton_forward(), (q, k, v), grad)
        )


def _print_decode_step(device: str, dtype: torch.dtype, backends: tuple[str, ...]) -> None:
    """Time per call of one decoding step: one new query per sequence against a KV cache
    (batch 4, 16 heads, head dim 128), at cache lengths where the host path or the
    kernel may dominate. This is what generation pays per layer and token."""
    print(f"decoding step (B 4, H 16, Sq 1, D 128), us per call:\n{'implementation':<18}", end="")
    cache_lengths = (128, 1024, 8192)
    print("".join(f" {'Sk ' + str(n):>9}" for n in cache_lengths))
    rows: dict[str, list[float]] = {}
    for cache_length in cache_lengths:
        q = torch.randn(4, 16, 1, 128, device=device, dtype=dtype)
        k, v = (torch.randn(4, 16, cache_length, 128, device=device, dtype=dtype) for _ in range(2))
        impls = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        for backend in backends:
            if UNAVAILABLE[backend] is None:
                impls[f"fast_attn:{backend}"] = lambda backend=backend, q=q, k=k, v=v: fast_attn.attention(
                    q, k, v, causal="bottom_right", backend=backend
                )
        with torch.no_grad():
            for name, fn in impls.items():
                rows.setdefault(name, []).append(_per_call_us(fn))
    for name, times in rows.items():
        print(f"{name:<18}" + "".join(f" {t:9.1f}" for t in times), flush=True)


def _print_cpu_decoding_route() -> None:
    """fast_attn.attention on few query rows with the CPU backend: always as a decoding step, never
    (the forward kernel), and SDPA; dispatch picks between the two (dispatch.MAX_DECODING_ROWS)."""
    print(
        f"CPU, one thread, float32, D 64, us per call:\n{'H q/kv Sq Sk':<18} {'sdpa':>9} {'decode':>9} {'forward':>9}"
    )
    for heads_q, heads_kv, seqlen_q, seqlen_k in ((12, 12, 1, 64), (12, 12, 1, 512), (12, 12, 1, 4096),
                                                 (32, 8, 1, 64), (32, 8, 1, 512), (32, 4, 4, 1024)):  # fmt: skip
        q = torch.randn(1, heads_q, seqlen_q, 64)
        k, v = (torch.randn(1, heads_kv, seqlen_k, 64) for _ in range(2))
        times = [_per_call_us(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))]
        saved = dispatch.MAX_DECODING_ROWS, dispatch.DECODING_KEYS
        for setting in ((saved[0], 0), (0, saved[1])):  # every few-row problem as a decoding step; none
            dispatch.MAX_DECODING_ROWS, dispatch.DECODING_KEYS = setting
            try:
                times.append(
                    _per_call_us(
                        lambda q=q, k=k, v=v: fast_attn.attention(
                            q, k, v, causal="bottom_right", backend="cpu"
                        )
                    )
                )
            finally:
                dispatch.MAX_DECODING_ROWS, dispatch.DECODING_KEYS = saved
        name = f"{heads_q}/{heads_kv} {seqlen_q} {seqlen_k}"
        print(f"{name:<18}" + "".join(f" {t:9.1f}" for t in times), flush=True)


def _print_profile(title: str, fn) -> None:
    """Where the host time of CALLS calls goes, by own time (cProfile)."""
    profile = cProfile.Profile()
    profile.runcall(lambda: [fn() for _ in range(CALLS)])
    report = io.StringIO()
    pstats.Stats(profile, stream=report).sort_stats("tottime").print_stats(14)
    print(f"--- {title}\n{report.getvalue()}")


if __name__ == "__main__":
    main()
