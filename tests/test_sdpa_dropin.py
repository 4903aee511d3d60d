"""fast_attn.scaled_dot_product_attention gives torch's results for torch's arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fast_attn
from fast_attn.testing import random_qkv


def both(*args, **kwargs):
    return fast_attn.scaled_dot_product_attention(*args, **kwargs), F.scaled_dot_product_attention(
        *args, **kwargs
    )


def assert_same(ours, theirs):
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(9, 9), (4, 11), (1, 6)])
def test_plain_and_causal(is_causal, sq, sk):
    q, k, v = random_qkv(2, 3, 3, sq, sk, 16)
    assert_same(*both(q, k, v, is_causal=is_causal))


def test_scale_and_gqa():
    q, k, v = random_qkv(2, 8, 2, 7, 7, 16)
    assert_same(*both(q, k, v, scale=0.3, enable_gqa=True))


@pytest.mark.parametrize(
    "mask_shape",
    [(2, 1, 1, 10), (1, 1, 1, 10), (2, 3, 5, 10), (5, 10), (1, 3, 1, 10)],
    ids=["key-padding", "shared-keys", "full", "2-D", "per-head"],
)
def test_bool_mask_true_means_attend(mask_shape):
    q, k, v = random_qkv(2, 3, 3, 5, 10, 8)
    mask = torch.rand(mask_shape) < 0.7
    mask[..., 0] = True
    assert_same(*both(q, k, v, attn_mask=mask))


def test_bool_mask_fully_masked_rows_are_zero_like_torch():
    q, k, v = random_qkv(2, 3, 3, 5, 10, 8)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1] = False
    ours, theirs = both(q, k, v, attn_mask=mask)
    assert torch.all(ours[1] == 0)
    assert_same(ours, theirs)


def test_float_mask_is_added_with_its_gradient():
    q, k, v = random_qkv(2, 3, 3, 5, 10, 8, requires_grad=True)
    mask = torch.randn(1, 3, 5, 10, requires_grad=True)
    ours = fast_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v, mask), grad)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v, mask), grad)
    assert_same(ours, theirs)
    for a, b in zip(ours_grads, theirs_grads):
        assert_same(a, b)


def test_three_dimensional_inputs():
    q, k, v = (t[:, 0] for t in random_qkv(2, 1, 1, 6, 9, 8))
    mask = torch.rand(2, 6, 9) < 0.8
    mask[..., 0] = True
    assert_same(*both(q, k, v, attn_mask=mask))
