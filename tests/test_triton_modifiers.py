"""The score modifiers in the Triton kernels: the band (sliding windows and causal masks,
both alignments, Sq != Sk), softcap and ALiBi, forward and every gradient, alone and with
bias (and its gradient, through each of the three ways dbias is written), key padding,
GQA, grad_lse and dropout, against the float64 reference by fast_attn.testing's error rule.

Under the interpreter the kernels run 32 x 32 tiles, so sequences of 40-100 span several
blocks: whole blocks outside the band are skipped and only the band's edge blocks are
masked, which test_blocks_outside_the_band_are_never_read checks by poisoning them.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import fast_attn
from fast_attn.dropout import new_dropout_seed
from fast_attn.ops import triton_ops
from fast_attn.testing import (
    assert_error_rule,
    random_key_mask,
    random_qkv,
    rounded_output_reference,
    run_reference,
)

pytestmark = [
    pytest.mark.triton,
    # numpy warns about the intended uint32 wrap-around of the dropout hash in the interpreter.
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32
TENSOR_ARGUMENTS = ("bias", "key_mask", "alibi_slopes")


def triton_results(inputs: dict, grad_out, grad_lse, dropout_seed=None, **options):
    """(out, lse, {name: gradient}) of the Triton op on `inputs` (q, k, v and tensor arguments),
    run with `dropout_seed`, with the gradients of (out * grad_out).sum() + (lse * grad_lse).sum()."""
    problem = fast_attn.validation.build_problem(
        inputs["q"], inputs["k"], inputs["v"], **{n: inputs.get(n) for n in TENSOR_ARGUMENTS}, **options
    )
    out, lse = triton_ops.attention_forward(problem, dropout_seed)
    wanted = [name for name, t in inputs.items() if t.is_floating_point() and t.requires_grad]
    grads = torch.autograd.grad([out, lse], [inputs[n] for n in wanted], [grad_out, grad_lse])
    return out, lse, dict(zip(wanted, grads))


def assert_matches_reference(dtype, results, inputs: dict, grad_out, grad_lse, **options) -> None:
    """The error rule for out, lse and every gradient of `results` against the reference on `inputs`."""
    out, lse, grads = results
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, grad_lse=grad_lse, **options)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, **options)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    assert_error_rule("lse", lse, exact.lse, same_dtype.lse, dtype)
    rounded = rounded_output_reference(
        inputs, out_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, fed_out=out, **options
    )
    assert grads.keys() == exact.grads.keys()
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape, name
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype, rounded_output=rounded.grads[name]
        )


def check(dtype, q, k, v, *, dropout_p: float = 0.0, **arguments) -> None:
    """Forward, lse and every gradient of the Triton op vs float64; with dropout, the op runs
    with a seed drawn here, which the reference replays."""
    inputs = {"q": q, "k": k, "v": v, **{n: arguments.pop(n) for n in TENSOR_ARGUMENTS if n in arguments}}
    options = dict(arguments, dropout_p=dropout_p)
    seed = new_dropout_seed(q.device) if dropout_p > 0.0 else None
    grad_out = torch.randn(q.shape[:3] + (v.shape[3],), device=q.device).to(dtype)
    grad_lse = torch.randn(q.shape[:3], device=q.device)
    results = triton_results(inputs, grad_out, grad_lse, seed, **options)
    assert_matches_reference(dtype, results, inputs, grad_out, grad_lse, dropout_seed=seed, **options)


# ---------------------------------------------------------------- the band


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 29), (33, 9), (70, 90), (90, 40)])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 3), (5, 5), (40, 7)])
def test_window(seqlen_q, seqlen_k, causal, window):
    q, k, v = random_qkv(1, 2, 1, seqlen_q, seqlen_k, 16, device=DEVICE, requires_grad=True)
    check(F32, q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("causal,window", [(False, (2, 0)), ("top_left", (4, -1)), (False, (-1, 0))])
def test_window_leaving_rows_empty(causal, window):
    # Sq > Sk: the first 50 rows of the bottom-right windows (diagonal i - 50) and the rows past
    # 23 of the top-left one see no key; key padding empties a batch row on top.
    q, k, v = random_qkv(2, 2, 2, 70, 20, 16, device=DEVICE, requires_grad=True)
    key_mask = random_key_mask(2, 20, device=DEVICE, empty_rows=(1,))
    check(F32, q, k, v, causal=causal, window_size=window, key_mask=key_mask)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_window_with_bias_gradient_key_mask_and_gqa(dtype):
    q, k, v = random_qkv(2, 4, 2, 45, 70, 24, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(2, 4, 45, 70, device=DEVICE).to(dtype).requires_grad_(True)  # dS written by dQ
    check(dtype, q, k, v, causal="bottom_right", window_size=(20, -1), bias=bias,
          key_mask=random_key_mask(2, 70, device=DEVICE))


@pytest.mark.parametrize(
    "bias_shape", [(1, 2, 70, 75), (1, 1, 1, 75), (2, 2, 70, 1)], ids=["heads-rows-keys", "keys", "rows"]
)
def test_window_with_broadcast_bias_gradient(bias_shape):
    # Each shape takes another branch of the dbias kernel, with both edges of the band.
    q, k, v = random_qkv(2, 2, 1, 70, 75, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(bias_shape, device=DEVICE, requires_grad=True)
    check(F32, q, k, v, window_size=(9, 12), bias=bias)


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal,window,poisoned_keys",
    [
        (30, 100, "top_left", (10, -1), slice(32, 100)),  # right of every row's band (left edge on)
        (30, 100, "bottom_right", (5, 0), slice(0, 64)),  # left of every row's band
        (40, 128, False, (3, 3), slice(0, 64)),  # bottom-right window: left of every band
    ],
)
def test_blocks_outside_the_band_are_never_read(seqlen_q, seqlen_k, causal, window, poisoned_keys):
    # Keys in whole 32-key blocks that no query sees hold NaN in K, V and the bias: a kernel
    # that loads such a block (forward, dK/dV, dQ or the dbias reduction) turns NaN.
    q, k, v = random_qkv(2, 2, 1, seqlen_q, seqlen_k, 16, device=DEVICE)
    bias = torch.randn(1, 2, seqlen_q, seqlen_k, device=DEVICE)  # broadcast: the dbias kernel
    clean = {"q": q, "k": k, "v": v, "bias": bias}
    poisoned = {name: t.clone() for name, t in clean.items()}
    poisoned["k"][:, :, poisoned_keys] = math.nan
    poisoned["v"][:, :, poisoned_keys] = math.nan
    poisoned["bias"][..., poisoned_keys] = math.nan
    for inputs in (clean, poisoned):
        for t in inputs.values():
            t.requires_grad_(True)
    options = {"causal": causal, "window_size": window, "dropout_p": 0.0}
    grad_out, grad_lse = torch.randn_like(q), torch.randn(q.shape[:3], device=DEVICE)
    results = triton_results(poisoned, grad_out, grad_lse, **options)
    assert_matches_reference(F32, results, clean, grad_out, grad_lse, **options)


# ---------------------------------------------------------------- softcap and ALiBi


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_softcap(dtype, causal):
    # Sharpened q: scaled scores up to ~10, so a cap of 2 saturates tanh for many of them.
    q, k, v = random_qkv(1, 2, 2, 40, 50, 16, dtype=dtype, device=DEVICE)
    q = (q * 4).requires_grad_(True)
    check(dtype, q, k.requires_grad_(True), v.requires_grad_(True), causal=causal, softcap=2.0)


@pytest.mark.parametrize("bias_shape", [(2, 2, 40, 35), (1, 2, 40, 35)], ids=["full", "broadcast"])
def test_softcap_keeps_the_bias_gradient_uncapped(bias_shape):
    q, k, v = random_qkv(2, 2, 2, 40, 35, 16, device=DEVICE)
    q = (q * 3).requires_grad_(True)
    bias = torch.randn(bias_shape, device=DEVICE, requires_grad=True)
    check(F32, q, k.requires_grad_(True), v.requires_grad_(True), softcap=1.5, bias=bias)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)], ids=["heads", "batch-heads"])
def test_alibi(dtype, slopes_shape):
    q, k, v = random_qkv(2, 4, 2, 33, 45, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    check(dtype, q, k, v, causal="top_left", alibi_slopes=torch.rand(slopes_shape, device=DEVICE))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_every_modifier_with_bias_key_mask_gqa_and_dropout(dtype):
    q, k, v = random_qkv(2, 4, 2, 50, 66, 16, dtype=dtype, device=DEVICE)
    q = (q * 2).requires_grad_(True)
    check(
        dtype, q, k.requires_grad_(True), v.requires_grad_(True), dropout_p=0.2, causal="bottom_right",
        window_size=(24, 0), softcap=1.5, alibi_slopes=torch.rand(2, 4, device=DEVICE),
        bias=torch.randn(1, 4, 50, 66, device=DEVICE).to(dtype).requires_grad_(True),
        key_mask=random_key_mask(2, 66, device=DEVICE),
    )


def test_softcap_and_alibi_with_dropout_and_no_window():
    q, k, v = random_qkv(1, 2, 1, 20, 30, 16, device=DEVICE)
    q = (q * 3).requires_grad_(True)
    check(F32, q, k.requires_grad_(True), v.requires_grad_(True), dropout_p=0.3, softcap=1.0,
          alibi_slopes=torch.rand(2, device=DEVICE))
