"""Every rule of the contract (fast_attn.attention's docstring; docs/ARCHITECTURE.md),
checked on every kernel backend this machine can run (conftest.kernel_backend),
against the float64 reference by the error rule of fast_attn.testing.

Backend-specific suites (test_cpu_kernels, test_triton, test_cuda) sweep the
shape grid; this file holds the rules all backends share.
"""

from __future__ import annotations

import math

import pytest
import torch

import fast_attn
from fast_attn.dropout import new_dropout_seed
from fast_attn.testing import (
    Case,
    assert_error_rule,
    attention_runner,
    backend_device,
    check_against_reference,
    max_abs_error,
    random_qkv,
    rounded_output_reference,
    run_reference,
)

LOW_PRECISION = {"cuda": torch.bfloat16, "triton": torch.float16, "cpu": torch.bfloat16}


def supported_float(backend: str) -> torch.dtype:
    return torch.float32 if torch.float32 in fast_attn.dispatch.BACKENDS[backend].dtypes else torch.bfloat16


def check(backend: str, case: Case) -> fast_attn.testing.Checked:
    """Forward, lse and every gradient of `backend` vs float64, by the error rule (with the
    rounded-output baseline for gradients)."""
    run = attention_runner(backend)
    return check_against_reference(run, case, backend_device(backend), rounded_output="exact")


def rounding_baselines(inputs: dict, dtype: torch.dtype, grad_out: torch.Tensor, **kwargs):
    """The float64, the unfused `dtype` and the rounded-output references (ReferenceResults, with the
    gradients of grad_out) of the problem `inputs` and `kwargs` pose, as run_reference takes them."""
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    unfused = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    rounded = rounded_output_reference(inputs, out_dtype=dtype, grad_out=grad_out, **kwargs)
    return exact, unfused, rounded


def assert_grads_by_rounding_rule(names, grads, exact, unfused, rounded, dtype) -> None:
    """The error rule, with the rounded-output baseline, for the gradient of each input in `names`."""
    for name, grad in zip(names, grads):
        assert_error_rule(
            f"d{name}",
            grad,
            exact.grads[name],
            unfused.grads[name],
            dtype,
            rounded_output=rounded.grads[name],
        )


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_gqa_bias_mask_causal_all_gradients(kernel_backend, causal):
    dtype = supported_float(kernel_backend)
    case = Case(2, 4, 2, 37, 45, 32, dtype, causal, scale=0.3, bias_shape=(1, 4, 37, 45), key_mask=True)
    check(kernel_backend, case)


def test_low_precision_transposed_inputs(kernel_backend):
    dtype = LOW_PRECISION[kernel_backend]
    check(kernel_backend, Case(2, 2, 1, 33, 20, 64, dtype, causal=True, layout="bshd"))


@pytest.mark.parametrize("bias_shape", [(20, 24), (2, 1, 1, 24), (1, 1, 1, 24), (1, 3, 20, 1)])
def test_broadcast_bias_gradient_in_its_own_shape(kernel_backend, bias_shape):
    check(kernel_backend, Case(2, 3, 3, 20, 24, 16, supported_float(kernel_backend), bias_shape=bias_shape))


@pytest.mark.parametrize("grad_lse", [False, True])
def test_rows_without_keys_give_zero_and_no_nan(kernel_backend, grad_lse):
    # Sq > Sk bottom-right: the first Sq - Sk rows see no key; batch 1 has every key masked.
    case = Case(
        2,
        2,
        2,
        12,
        5,
        16,
        supported_float(kernel_backend),
        "bottom_right",
        bias_shape=(1, 2, 12, 5),
        key_mask=True,
        empty_key_rows=(1,),
        grad_lse=grad_lse,
    )
    checked = check(kernel_backend, case)
    out, lse, grads = checked.out, checked.lse, checked.grads
    assert torch.all(out[1] == 0) and torch.all(out[0, :, :7] == 0)
    assert torch.all(lse[1] == -math.inf) and torch.all(lse[0, :, :7] == -math.inf)
    assert torch.isfinite(lse[0, :, 7:]).all()
    for grad in grads.values():
        assert torch.isfinite(grad).all()
    assert torch.all(grads["q"][1] == 0) and torch.all(grads["bias"][:, :, :7] == 0)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 19), (19, 1), (3, 70)])
def test_tiny_and_ragged_lengths(kernel_backend, sq, sk):
    dtype = supported_float(kernel_backend)
    check(kernel_backend, Case(1, 2, 1, sq, sk, 24, dtype, "bottom_right"))


def test_peaked_softmax_gradients_in_16_bits(kernel_backend):
    # Found by tests/test_fuzz.py (--fuzz-examples 150, the CPU kernels in bf16): scale 1
    # at D 40 gives logits of std ~6, a nearly one-hot softmax. A fused backward takes
    # delta_i = dO_i . O_i from the 16-bit output, and here that rounding alone costs dK
    # and dbias several times what unfused 16-bit math loses (0.031 vs 0.0026 in bf16 for
    # these inputs). The error rule measures it with rounded_output_reference.
    dtype = LOW_PRECISION[kernel_backend]
    device = backend_device(kernel_backend)
    generator = torch.Generator().manual_seed(28)  # drawn on the CPU: the same inputs on every machine

    def draw(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    q = draw(1, 4, 2, 40)
    k, v, bias = draw(1, 2, 3, 40).requires_grad_(), draw(1, 2, 3, 40).requires_grad_(), draw(1, 4, 2, 3)
    bias.requires_grad_()
    grad_out = draw(1, 4, 2, 40)
    kwargs = dict(causal="top_left", scale=1.0)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": None}
    exact, unfused, rounded = rounding_baselines(inputs, dtype, grad_out, **kwargs)
    # The case is one where the output's rounding, not unfused 16-bit math, sets the baseline.
    rounding_error = max_abs_error(rounded.grads["k"], exact.grads["k"])
    assert rounding_error > 2 * max_abs_error(unfused.grads["k"], exact.grads["k"])

    out = fast_attn.attention(q, k, v, bias=bias, backend=kernel_backend, **kwargs)
    grads = torch.autograd.grad(out, (k, v, bias), grad_out)
    assert_grads_by_rounding_rule(("k", "v", "bias"), grads, exact, unfused, rounded, dtype)


def test_gradients_of_rows_with_one_visible_key(kernel_backend):
    # Found by tests/test_fuzz.py (--fuzz-examples 600, the CPU kernels in fp32): with one
    # visible key per row the softmax is exactly one-hot, unfused math cancels dS exactly
    # (zero error), and a fused backward's dP_ij - delta_i leaves its summation rounding:
    # dK erred by 2-10e-5 against a 2e-5 floor. rounded_output_reference models it.
    dtype = supported_float(kernel_backend)
    device = backend_device(kernel_backend)
    generator = torch.Generator().manual_seed(5)  # drawn on the CPU: the same inputs on every machine

    def draw(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()

    q, k, v = draw(1, 3, 97, 72), draw(1, 1, 3, 72), draw(1, 1, 3, 72)
    key_mask = torch.tensor([[False, True, False]], device=device)
    grad_out = torch.randn(1, 3, 97, 72, generator=generator).to(device, dtype)
    kwargs = dict(scale=1.0)
    inputs = {"q": q, "k": k, "v": v, "bias": None, "key_mask": key_mask}
    exact, unfused, rounded = rounding_baselines(inputs, dtype, grad_out, **kwargs)
    assert max_abs_error(unfused.grads["k"], exact.grads["k"]) == 0.0  # the exact cancellation
    assert max_abs_error(rounded.grads["k"], exact.grads["k"]) > 0.0  # what the rule measures instead

    out = fast_attn.attention(q, k, v, key_mask=key_mask, backend=kernel_backend, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert_grads_by_rounding_rule("qkv", grads, exact, unfused, rounded, dtype)


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5), (1, 2, 2, 0, 5), (1, 2, 2, 5, 0)])
def test_empty_problems(kernel_backend, shape):
    dtype = supported_float(kernel_backend)
    device = backend_device(kernel_backend)
    batch, heads_q, heads_kv, sq, sk = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, sq, sk, 16, dtype=dtype, device=device, requires_grad=True)
    out, lse = fast_attn.attention(q, k, v, return_lse=True, backend=kernel_backend)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for grad, t in zip(grads, (q, k, v)):
        assert grad is None or (grad.shape == t.shape and torch.all(grad == 0))


def test_gradient_through_lse(kernel_backend):
    dtype = supported_float(kernel_backend)
    case = Case(1, 2, 2, 16, 16, 16, dtype, causal=True, grad_lse=True)
    check_against_reference(attention_runner(kernel_backend), case, backend_device(kernel_backend))


def test_dropout_matches_reference_with_the_same_seed(kernel_backend):
    dtype = supported_float(kernel_backend)
    device = backend_device(kernel_backend)
    q, k, v = random_qkv(2, 2, 1, 24, 40, 16, dtype=dtype, device=device, requires_grad=True)
    torch.manual_seed(1234)
    out = fast_attn.attention(q, k, v, dropout_p=0.3, causal=True, backend=kernel_backend)
    torch.manual_seed(1234)
    seed = new_dropout_seed(torch.device(device))
    grad_out = torch.randn_like(out)
    kwargs = dict(causal=True, dropout_p=0.3, dropout_seed=seed)
    inputs = {"q": q, "k": k, "v": v}
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    for name, grad in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out)):
        assert_error_rule(f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype)


def test_backward_is_deterministic(kernel_backend):
    dtype = supported_float(kernel_backend)
    device = backend_device(kernel_backend)
    q, k, v = random_qkv(2, 4, 2, 40, 40, 32, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(1, 4, 40, 40, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(q.shape, device=device, dtype=dtype)

    def grads():
        out = fast_attn.attention(q, k, v, bias=bias, causal=True, backend=kernel_backend)
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


def test_nan_propagates_like_the_reference(kernel_backend):
    dtype = supported_float(kernel_backend)
    device = backend_device(kernel_backend)
    q, k, v = random_qkv(1, 1, 1, 6, 6, 16, dtype=dtype, device=device)
    q[0, 0, 2, 3] = float("nan")
    k[0, 0, 4, 0] = float("nan")
    out = fast_attn.attention(q, k, v, causal=True, backend=kernel_backend)
    expected = run_reference({"q": q, "k": k, "v": v}, compute_dtype=torch.float64, causal=True).out
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
