"""Every rule of the contract (DESIGN.md section 1), checked on every kernel
backend this machine can run, against the float64 reference.

Backend-specific suites (test_cpu_kernels, test_triton, test_cuda) sweep the
shape grid; this file holds the rules all backends share.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import fast_attn
from fast_attn.dropout import new_dropout_seed
from fast_attn.reference import reference_attention
from fast_attn.testing import (
    assert_error_rule,
    max_abs_error,
    random_key_mask,
    random_qkv,
    rounded_output_reference,
    run_reference,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_BACKENDS = ["cuda", "triton"] if HAS_CUDA else ["cpu"]
if not HAS_CUDA and importlib.util.find_spec("triton") is not None:
    KERNEL_BACKENDS.append("triton")  # through TRITON_INTERPRET=1 (tests/conftest.py)

LOW_PRECISION = {"cuda": torch.bfloat16, "triton": torch.float16, "cpu": torch.bfloat16}


def require(backend: str, dtype: torch.dtype = torch.float32) -> None:
    """Fail (not skip) when a backend that this machine must have is missing."""
    reason = fast_attn.dispatch.UNAVAILABLE[backend]  # CPU tensors: triton through its interpreter
    assert reason is None, f"backend {backend} should be available here: {reason}"
    if dtype not in fast_attn.dispatch.BACKENDS[backend].dtypes:
        pytest.skip(f"{backend} does not declare {dtype}")


def supported_float(backend: str) -> torch.dtype:
    return torch.float32 if torch.float32 in fast_attn.dispatch.BACKENDS[backend].dtypes else torch.bfloat16


def check_against_reference(backend, dtype, q, k, v, bias=None, key_mask=None, **kwargs):
    """Forward, lse and every gradient of `backend` vs float64, by the error rule."""
    out, lse = fast_attn.attention(
        q, k, v, bias=bias, key_mask=key_mask, return_lse=True, backend=backend, **kwargs
    )
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask}
    grad_out = torch.randn_like(out)
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    assert_error_rule("lse", lse, exact.lse, same_dtype.lse, dtype)
    wanted = [name for name in ("q", "k", "v", "bias") if inputs[name] is not None and inputs[name].requires_grad]
    if wanted:
        rounded = rounded_output_reference(inputs, out_dtype=dtype, grad_out=grad_out, **kwargs)
        grads = torch.autograd.grad(out, [inputs[n] for n in wanted], grad_out)
        for name, grad in zip(wanted, grads):
            assert grad.shape == inputs[name].shape
            assert_error_rule(
                f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype, rounded_output=rounded.grads[name]
            )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_gqa_bias_mask_causal_all_gradients(backend, causal):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(2, 4, 2, 37, 45, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, 4, 37, 45, device=DEVICE, dtype=dtype, requires_grad=True)
    key_mask = random_key_mask(2, 45, device=DEVICE)
    check_against_reference(backend, dtype, q, k, v, bias=bias, key_mask=key_mask, causal=causal, scale=0.3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_low_precision_transposed_inputs(backend):
    dtype = LOW_PRECISION[backend]
    require(backend, dtype)
    q, k, v = random_qkv(2, 2, 1, 33, 20, 64, dtype=dtype, device=DEVICE, requires_grad=True, layout="bshd")
    check_against_reference(backend, dtype, q, k, v, causal=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bias_shape", [(20, 24), (2, 1, 1, 24), (1, 1, 1, 24), (1, 3, 20, 1)])
def test_broadcast_bias_gradient_in_its_own_shape(backend, bias_shape):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(2, 3, 3, 20, 24, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(bias_shape, device=DEVICE, dtype=dtype, requires_grad=True)
    check_against_reference(backend, dtype, q, k, v, bias=bias)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_without_keys_give_zero_and_no_nan(backend):
    dtype = supported_float(backend)
    require(backend, dtype)
    # Sq > Sk bottom-right: the first Sq - Sk rows see no key; batch 1 has every key masked.
    q, k, v = random_qkv(2, 2, 2, 12, 5, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, 2, 12, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    key_mask = random_key_mask(2, 5, device=DEVICE, empty_rows=(1,))
    out, lse = fast_attn.attention(
        q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right", return_lse=True, backend=backend
    )
    assert torch.all(out[1] == 0) and torch.all(out[0, :, :7] == 0)
    assert torch.all(lse[1] == -math.inf) and torch.all(lse[0, :, :7] == -math.inf)
    assert torch.isfinite(lse[0, :, 7:]).all()
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse[0, :, 7:].sum(), (q, k, v, bias))
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert torch.all(grads[0][1] == 0) and torch.all(grads[3][:, :, :7] == 0)
    check_against_reference(backend, dtype, q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 19), (19, 1), (3, 70)])
def test_tiny_and_ragged_lengths(backend, sq, sk):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(1, 2, 1, sq, sk, 24, dtype=dtype, device=DEVICE, requires_grad=True)
    check_against_reference(backend, dtype, q, k, v, causal="bottom_right")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_peaked_softmax_gradients_in_16_bits(backend):
    # Found by tests/test_fuzz.py (--fuzz-examples 150, the CPU kernels in bf16): scale 1
    # at D 40 gives logits of std ~6, a nearly one-hot softmax. A fused backward takes
    # delta_i = dO_i . O_i from the 16-bit output, and here that rounding alone costs dK
    # and dbias several times what unfused 16-bit math loses (0.031 vs 0.0026 in bf16 for
    # these inputs). The error rule measures it with rounded_output_reference.
    dtype = LOW_PRECISION[backend]
    require(backend, dtype)
    generator = torch.Generator().manual_seed(28)  # drawn on the CPU: the same inputs on every machine

    def draw(*shape):
        return torch.randn(shape, generator=generator).to(DEVICE, dtype)

    q = draw(1, 4, 2, 40)
    k, v, bias = draw(1, 2, 3, 40).requires_grad_(), draw(1, 2, 3, 40).requires_grad_(), draw(1, 4, 2, 3)
    bias.requires_grad_()
    grad_out = draw(1, 4, 2, 40)
    kwargs = dict(causal="top_left", scale=1.0)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": None}
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    unfused = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    rounded = rounded_output_reference(inputs, out_dtype=dtype, grad_out=grad_out, **kwargs)
    # The case is one where the output's rounding, not unfused 16-bit math, sets the baseline.
    rounding_error = max_abs_error(rounded.grads["k"], exact.grads["k"])
    assert rounding_error > 2 * max_abs_error(unfused.grads["k"], exact.grads["k"])

    out = fast_attn.attention(q, k, v, bias=bias, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, (k, v, bias), grad_out)
    for name, grad in zip(("k", "v", "bias"), grads):
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], unfused.grads[name], dtype, rounded_output=rounded.grads[name]
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_of_rows_with_one_visible_key(backend):
    # Found by tests/test_fuzz.py (--fuzz-examples 600, the CPU kernels in fp32): with one
    # visible key per row the softmax is exactly one-hot, unfused math cancels dS exactly
    # (zero error), and a fused backward's dP_ij - delta_i leaves its summation rounding:
    # dK erred by 2-10e-5 against a 2e-5 floor. rounded_output_reference models it.
    dtype = supported_float(backend)
    require(backend, dtype)
    generator = torch.Generator().manual_seed(5)  # drawn on the CPU: the same inputs on every machine

    def draw(*shape):
        return torch.randn(shape, generator=generator).to(DEVICE, dtype).requires_grad_()

    q, k, v = draw(1, 3, 97, 72), draw(1, 1, 3, 72), draw(1, 1, 3, 72)
    key_mask = torch.tensor([[False, True, False]], device=DEVICE)
    grad_out = torch.randn(1, 3, 97, 72, generator=generator).to(DEVICE, dtype)
    kwargs = dict(scale=1.0)
    inputs = {"q": q, "k": k, "v": v, "bias": None, "key_mask": key_mask}
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    unfused = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    rounded = rounded_output_reference(inputs, out_dtype=dtype, grad_out=grad_out, **kwargs)
    assert max_abs_error(unfused.grads["k"], exact.grads["k"]) == 0.0  # the exact cancellation
    assert max_abs_error(rounded.grads["k"], exact.grads["k"]) > 0.0  # what the rule measures instead

    out = fast_attn.attention(q, k, v, key_mask=key_mask, backend=backend, **kwargs)
    for name, grad in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out)):
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], unfused.grads[name], dtype, rounded_output=rounded.grads[name]
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5), (1, 2, 2, 0, 5), (1, 2, 2, 5, 0)])
def test_empty_problems(backend, shape):
    dtype = supported_float(backend)
    require(backend, dtype)
    batch, heads_q, heads_kv, sq, sk = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, sq, sk, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    out, lse = fast_attn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for grad, t in zip(grads, (q, k, v)):
        assert grad is None or (grad.shape == t.shape and torch.all(grad == 0))


def _lse_loss_grads(q, k, v, weights, compute_dtype):
    """Gradients of sum(lse * weights) + sum(out) through the reference in compute_dtype."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=True, compute_dtype=compute_dtype)
    loss = (lse * weights.to(lse.dtype)).sum() + out.to(compute_dtype).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_through_lse(backend):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    out, lse = fast_attn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    weights = torch.randn_like(lse)
    grads = torch.autograd.grad((lse * weights).sum() + out.float().sum(), (q, k, v))
    exact = _lse_loss_grads(q, k, v, weights, torch.float64)
    same_dtype = _lse_loss_grads(q, k, v, weights, dtype)
    for name, grad, expected, baseline in zip("qkv", grads, exact, same_dtype):
        assert_error_rule(f"d{name}", grad, expected, baseline, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_matches_reference_with_the_same_seed(backend):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(2, 2, 1, 24, 40, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    torch.manual_seed(1234)
    out = fast_attn.attention(q, k, v, dropout_p=0.3, causal=True, backend=backend)
    torch.manual_seed(1234)
    seed = new_dropout_seed(torch.device(DEVICE))
    grad_out = torch.randn_like(out)
    kwargs = dict(causal=True, dropout_p=0.3, dropout_seed=seed)
    inputs = {"q": q, "k": k, "v": v}
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    for name, grad in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out)):
        assert_error_rule(f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_deterministic(backend):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(2, 4, 2, 40, 40, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, 4, 40, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=dtype)

    def grads():
        out = fast_attn.attention(q, k, v, bias=bias, causal=True, backend=backend)
        return torch.autograd.grad(out, (q, k, v, bias), grad_out)

    first = grads()
    torch.use_deterministic_algorithms(True)
    try:
        second, third = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(second, third):
        assert torch.equal(a, b)
    for a, b in zip(first[1:], second[1:]):  # dk, dv, dbias never use atomics
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates_like_the_reference(backend):
    dtype = supported_float(backend)
    require(backend, dtype)
    q, k, v = random_qkv(1, 1, 1, 6, 6, 16, dtype=dtype, device=DEVICE)
    q[0, 0, 2, 3] = float("nan")
    k[0, 0, 4, 0] = float("nan")
    out = fast_attn.attention(q, k, v, causal=True, backend=backend)
    expected = run_reference({"q": q, "k": k, "v": v}, compute_dtype=torch.float64, causal=True).out
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
