"""Reliability: bad input never crashes the process, state survives bad calls,
memory stays flat over many calls, threads agree with sequential calls, and
long sequences run without an O(S^2) allocation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import fast_attn
from fast_attn.testing import assert_error_rule, random_qkv, run_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32  # the CUDA kernels take fp16/bf16
TOLERANCE = 3e-2 if HAS_CUDA else 1e-4

# Direct calls of the C++ op with broken invariants (what the Python layer would
# have refused): each must raise a Python exception, never crash the process.
DIRECT_OP_CALLS = {
    "q 3-D": "op(q[0], k, v, None, None, None, 0.5, 0, 0.0)",
    "k v mismatch": "op(q, k, v[:, :, :3], None, None, None, 0.5, 0, 0.0)",
    "Hq % Hkv": "op(q[:, :3], k, v, None, None, None, 0.5, 0, 0.0)",
    "head dim mismatch": "op(q[..., :4], k, v, None, None, None, 0.5, 0, 0.0)",
    "bias shape": "op(q, k, v, torch.zeros(1, 1, 5, 6, device=DEV), None, None, 0.5, 0, 0.0)",
    "bias 2-D": "op(q, k, v, torch.zeros(5, 7, device=DEV), None, None, 0.5, 0, 0.0)",
    "bias int": "op(q, k, v, torch.zeros(1, 1, 5, 7, dtype=torch.int32, device=DEV), None, None, 0.5, 0, 0.0)",
    "mask float": "op(q, k, v, None, torch.ones(2, 7, device=DEV), None, 0.5, 0, 0.0)",
    "mask shape": "op(q, k, v, None, torch.ones(2, 9, dtype=torch.bool, device=DEV), None, 0.5, 0, 0.0)",
    "causal 7": "op(q, k, v, None, None, None, 0.5, 7, 0.0)",
    "dropout without seed": "op(q, k, v, None, None, None, 0.5, 0, 0.5)",
    "seed float": "op(q, k, v, None, None, torch.zeros(1, device=DEV), 0.5, 0, 0.5)",
    "integer q": "op(q.long(), k.long(), v.long(), None, None, None, 0.5, 0, 0.0)",
    "strided last dim": "op(q[..., ::2], k[..., ::2], v[..., ::2], None, None, None, 0.5, 0, 0.0)",
}


def run_python(code: str) -> subprocess.CompletedProcess:
    # faulthandler: a crash prints the Python line it happened on to stderr.
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )


def direct_op_script() -> str:
    """A program that makes every DIRECT_OP_CALLS call (naming each on stderr first,
    so that a crash points at its call), then a good call, and prints the dict of
    exception type names. benchmarks/gpu_check.sh runs it alone too (under a
    debugger if it crashes): `python tests/test_robustness.py`."""
    lines = [
        "import sys, torch, fast_attn",
        "op = torch.ops.fast_attn.attention_forward",
        f"DEV = {DEVICE!r}; DT = {DTYPE}",
        "q = torch.randn(2, 4, 5, 8, device=DEV, dtype=DT); k = torch.randn(2, 2, 7, 8, device=DEV, dtype=DT)",
        "v = torch.randn(2, 2, 7, 8, device=DEV, dtype=DT)",
        "results = {}",
    ]
    for name, call in DIRECT_OP_CALLS.items():
        lines += [
            f"print('calling', {name!r}, file=sys.stderr, flush=True)",
            "try:",
            f"    {call}",
            f"    results[{name!r}] = 'no error'",
            "except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:",
            f"    results[{name!r}] = type(e).__name__",
        ]
    lines += [
        "print('calling the good op', file=sys.stderr, flush=True)",
        "good, _ = op(q, k, v, None, None, None, 0.5, 0, 0.0)",  # state survives the bad calls
        "from fast_attn.reference import reference_attention",
        "ref, _ = reference_attention(q, k, v, scale=0.5)",
        f"assert torch.allclose(good.float(), ref.float(), atol={TOLERANCE}), 'a good call after bad ones is wrong'",
        "print(results, flush=True)",
        "print('exiting', file=sys.stderr, flush=True)",
    ]
    return "\n".join(lines)


def test_direct_op_calls_with_broken_invariants_raise_instead_of_crashing():
    done = run_python(direct_op_script())
    assert done.returncode == 0, f"process died (exit {done.returncode}):\n{done.stderr[-3000:]}"
    results = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 (our own printed dict)
    assert results == {name: "RuntimeError" for name in DIRECT_OP_CALLS}, results


def test_bad_public_calls_raise_in_a_subprocess_and_leave_state_intact():
    code = f"""
    import torch, fast_attn
    q = torch.randn(2, 4, 5, 8, device={DEVICE!r}, dtype={DTYPE})
    k = torch.randn(2, 2, 7, 8, device={DEVICE!r}, dtype={DTYPE})
    v = torch.randn(2, 2, 7, 8, device={DEVICE!r}, dtype={DTYPE})
    bad = [
        lambda: fast_attn.attention(q, k, v[:, :1]),
        lambda: fast_attn.attention(q.double(), k, v),
        lambda: fast_attn.attention(q, k, v, bias=torch.zeros(3, 7, device={DEVICE!r})),
        lambda: fast_attn.attention(q, k, v, key_mask=torch.zeros(2, 7, device={DEVICE!r})),
        lambda: fast_attn.attention(q, k, v, dropout_p=1.5),
        lambda: fast_attn.attention(q.int(), k.int(), v.int()),
        lambda: fast_attn.attention(q, k, v, backend="cuda" if {not HAS_CUDA} else "nope"),
        lambda: fast_attn.attention(q[..., :0], k[..., :0], v[..., :0]),
    ]
    kinds = []
    for call in bad:
        try:
            call()
            kinds.append("no error")
        except (ValueError, TypeError, NotImplementedError) as e:
            kinds.append(type(e).__name__)
    out = fast_attn.attention(q, k, v, causal=True, backend={KERNEL!r})
    from fast_attn.reference import reference_attention
    assert torch.allclose(out.float(), reference_attention(q, k, v, causal=True)[0].float(), atol={TOLERANCE})
    print(kinds)
    """
    done = run_python(code)
    assert done.returncode == 0, f"process died (exit {done.returncode}):\n{done.stderr[-3000:]}"
    kinds = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307
    assert "no error" not in kinds, kinds


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_ten_thousand_forward_backward_calls_keep_memory_flat():
    q, k, v = random_qkv(1, 2, 1, 16, 24, 16, device=DEVICE, dtype=DTYPE, requires_grad=True)
    bias = torch.randn(1, 2, 16, 24, device=DEVICE, dtype=DTYPE, requires_grad=True)
    mask = torch.rand(1, 24, device=DEVICE) < 0.8

    def step():
        out = fast_attn.attention(q, k, v, bias=bias, key_mask=mask, causal=True, backend=KERNEL)
        torch.autograd.grad(out.sum(), (q, k, v, bias))

    for _ in range(500):  # warm-up: allocator pools and caches settle
        step()
    rss_before = _rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if HAS_CUDA else 0
    for _ in range(10_000):
        step()
    growth = _rss_bytes() - rss_before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 10,000 calls"
    if HAS_CUDA:
        assert torch.cuda.memory_allocated() == cuda_before


def test_concurrent_threads_match_sequential_results():
    problems = []
    for _ in range(6):
        q, k, v = random_qkv(2, 4, 2, 33, 47, 32, device=DEVICE, dtype=DTYPE)
        problems.append((q, k, v, torch.randn(1, 4, 33, 47, device=DEVICE, dtype=DTYPE)))
    sequential = [
        fast_attn.attention(q, k, v, bias=b, causal=True, backend=KERNEL) for q, k, v, b in problems
    ]
    results: list[list[torch.Tensor]] = [[] for _ in range(4)]

    def worker(slot: int):
        for _ in range(5):
            results[slot].append(
                [fast_attn.attention(q, k, v, bias=b, causal=True, backend=KERNEL) for q, k, v, b in problems]
            )

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in results:
        assert len(slot) == 5
        for outputs in slot:
            for got, expected in zip(outputs, sequential):
                assert torch.equal(got, expected)


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path's long-sequence check")
def test_cpu_sequence_of_16k_without_quadratic_memory():
    seqlen, head_dim = 16384, 64
    q, k, v = random_qkv(1, 1, 1, seqlen, seqlen, head_dim, requires_grad=True)
    assert _peak_rss_reset(), "this test needs /proc/self/clear_refs (Linux)"
    base = _rss_bytes()
    out = fast_attn.attention(q, k, v, causal=True, backend="cpu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    extra = _peak_rss() - base
    one_score_matrix = seqlen * seqlen * 4
    assert extra < one_score_matrix / 8, f"peak extra memory {extra / 2**20:.0f} MB at S={seqlen}"
    # Spot-check the last query rows against the reference (bottom-right alignment
    # of 4 query rows over all keys is the causal mask of those rows).
    tail = slice(seqlen - 4, seqlen)
    inputs = {"q": q[:, :, tail], "k": k, "v": v}
    exact = run_reference(inputs, compute_dtype=torch.float64, causal="bottom_right")
    same_dtype = run_reference(inputs, compute_dtype=torch.float32, causal="bottom_right")
    assert_error_rule("out[-4:]", out[:, :, tail], exact.out, same_dtype.out, torch.float32)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_more_than_two_to_the_31_elements_uses_64_bit_offsets():
    # q, k, v of (4100, 16, 512, 64) bf16: 2.15e9 elements each (4.3 GB).
    batch, heads, seqlen, head_dim = 4100, 16, 512, 64
    assert batch * heads * seqlen * head_dim > 2**31
    q, k, v = (
        torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    for backend in ("cuda", "triton"):
        out = fast_attn.attention(q, k, v, causal=True, backend=backend)
        for b in (0, batch - 1):
            expected = run_reference(
                {"q": q[b : b + 1, -2:], "k": k[b : b + 1, -2:], "v": v[b : b + 1, -2:]},
                compute_dtype=torch.float64,
                causal=True,
            )
            torch.testing.assert_close(out[b : b + 1, -2:].double(), expected.out, atol=3e-2, rtol=3e-2)
        del out


if __name__ == "__main__":
    print(direct_op_script())
