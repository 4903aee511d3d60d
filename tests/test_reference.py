"""The float64 reference is the oracle: check it against independent formulations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fast_attn.dropout import dropout_hash, dropout_keep_mask, dropout_threshold
from fast_attn.reference import reference_attention
from fast_attn.testing import random_key_mask, random_qkv, rounded_output_reference

F64 = torch.float64


def naive_attention(q, k, v, allowed, bias=None, scale=None):
    """Row-by-row softmax in float64 with an explicit (B, H, Sq, Sk) bool mask."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -math.inf, dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                cols = allowed[b, h, i].nonzero().flatten()
                if len(cols) == 0:
                    continue
                row = scores[b, h, i, cols]
                lse[b, h, i] = torch.logsumexp(row, 0)
                out[b, h, i] = torch.softmax(row, 0) @ v[b, h, cols]
    return out, lse


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("sq,sk", [(5, 5), (3, 8), (8, 3), (1, 6)])
def test_reference_matches_naive_masks(causal, sq, sk):
    q, k, v = random_qkv(2, 4, 2, sq, sk, 8, dtype=F64)
    key_mask = random_key_mask(2, sk, empty_rows=(1,))
    bias = torch.randn(1, 4, sq, sk, dtype=F64)
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(sk)[None, :]
    offset = sk - sq if causal == "bottom_right" else 0
    allowed = torch.ones(sq, sk, dtype=torch.bool) if not causal else cols <= rows + offset
    allowed = (allowed[None, None] & key_mask[:, None, None, :]).expand(2, 4, sq, sk)
    out, lse = reference_attention(q, k, v, bias=bias, key_mask=key_mask, causal=causal, scale=0.7)
    expected_out, expected_lse = naive_attention(q, k, v, allowed, bias=bias, scale=0.7)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)


def test_reference_matches_torch_sdpa_gqa_causal():
    q, k, v = random_qkv(2, 8, 2, 33, 33, 16, dtype=F64)
    out, _ = reference_attention(q, k, v, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected)


def test_fully_masked_rows_are_zero_with_zero_nan_free_gradients():
    q, k, v = random_qkv(1, 2, 2, 6, 4, 8, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 2, 6, 4, dtype=F64, requires_grad=True)
    out, lse = reference_attention(q, k, v, bias=bias, causal="bottom_right")
    assert torch.all(out[:, :, :2] == 0) and torch.all(lse[:, :, :2] == -math.inf)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :2] == 0) and torch.all(bias.grad[:, :, :2] == 0)


def test_minus_inf_bias_counts_as_masked():
    q, k, v = random_qkv(1, 1, 1, 3, 4, 8, dtype=F64)
    bias = torch.zeros(1, 1, 3, 4, dtype=F64)
    bias[..., 1, :] = -math.inf
    bias[..., 0, 2] = -math.inf
    out, lse = reference_attention(q, k, v, bias=bias)
    assert torch.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == -math.inf
    keep = torch.tensor([True, True, False, True])
    expected, _ = reference_attention(q[:, :, :1], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(out[:, :, :1], expected)


def test_gradients_of_reference_pass_gradcheck():
    q, k, v = random_qkv(1, 2, 1, 5, 6, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 2, 1, 6, dtype=F64, requires_grad=True)
    key_mask = random_key_mask(1, 6)

    def f(q, k, v, bias):
        out, lse = reference_attention(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_lse_gradient_is_softmax():
    q, k, v = random_qkv(1, 1, 1, 4, 5, 8, dtype=F64, requires_grad=True)
    _, lse = reference_attention(q, k, v)
    (grad_q,) = torch.autograd.grad(lse.sum(), q)
    scale = 1 / math.sqrt(8)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)
    torch.testing.assert_close(grad_q, probs @ k * scale)


def test_dropout_hash_known_values():
    # Values computed by hand from the lowbias32 definition (csrc/attention_params.h).
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    for seed, index in [(0, 0), (123456789, 42), (2**61 + 5, 2**33 + 7), (2**62 - 1, 2**40 - 1)]:
        expected = mix(mix((seed & 0xFFFFFFFF) ^ (index & 0xFFFFFFFF)) ^ (index >> 32) ^ (seed >> 32))
        got = int(dropout_hash(seed, torch.tensor([index]))[0])
        assert got == expected


def test_dropout_mask_keeps_about_one_minus_p_and_scales():
    seed = torch.tensor([987654321])
    keep = dropout_keep_mask(seed, 0.25, 2, 3, 64, 64, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert dropout_threshold(0.0) == 0
    q, k, v = random_qkv(2, 3, 3, 64, 64, 8, dtype=F64)
    dropped, lse = reference_attention(q, k, v, dropout_p=0.25, dropout_seed=seed)
    full, full_lse = reference_attention(q, k, v)
    torch.testing.assert_close(lse, full_lse)
    assert not torch.allclose(dropped, full)
    # Same seed, same mask: dropout is a function of the seed alone.
    again, _ = reference_attention(q, k, v, dropout_p=0.25, dropout_seed=seed)
    assert torch.equal(dropped, again)


def test_rounded_output_reference_is_the_flash_backward_with_a_rounded_output():
    # Written out: P exact, delta summed in float32 from O rounded to bf16, dS = P (dP - delta).
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) * 3 for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    grad_out = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    scale = 0.7
    p = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
    out = p @ v
    delta = (grad_out.float() * out.to(torch.bfloat16).float()).sum(-1, keepdim=True).double()
    ds = p * (grad_out @ v.transpose(-1, -2) - delta)
    expected = {
        "q": ds @ k * scale,
        "k": ds.transpose(-1, -2) @ q * scale,
        "v": p.transpose(-1, -2) @ grad_out,
        "bias": ds,
    }
    inputs = {name: t.clone().requires_grad_() for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias))}
    inputs["key_mask"] = None
    model = rounded_output_reference(inputs, out_dtype=torch.bfloat16, grad_out=grad_out, scale=scale)
    for name, grad in expected.items():
        torch.testing.assert_close(model.grads[name], grad, rtol=1e-10, atol=1e-10)
    exact_ds = p * (grad_out @ v.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    assert (model.grads["bias"] - exact_ds).abs().max() > 1e-4  # the rounding does show
