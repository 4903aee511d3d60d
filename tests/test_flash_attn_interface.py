"""fast_attn.flash_attn_interface: flash-attn 2.8's training functions, (B, S, H, D) layout,
bottom-right causal, window, softcap, ALiBi, packed forms, return_attn_probs, bad input."""

from __future__ import annotations

import pytest
import torch

from fast_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from fast_attn.reference import reference_attention, reference_varlen_attention


def bshd(batch, seqlen, heads, head_dim, dtype=torch.float32, requires_grad=False):
    return torch.randn(batch, seqlen, heads, head_dim, dtype=dtype, requires_grad=requires_grad)


def expected(q, k, v, **kwargs):
    """The reference in flash-attn's layout: out (B, Sq, Hq, D), lse (B, Hq, Sq)."""
    out, lse = reference_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), **kwargs
    )
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(7, 7), (5, 11), (11, 5)])
def test_causal_is_bottom_right_with_gqa_and_lse(seqlen_q, seqlen_k):
    q, k, v = bshd(2, seqlen_q, 4, 16), bshd(2, seqlen_k, 2, 16), bshd(2, seqlen_k, 2, 16)
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    exact_out, exact_lse = expected(q, k, v, causal="bottom_right")
    assert out.shape == (2, seqlen_q, 4, 16) and out.is_contiguous() and probs is None
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exact_lse, atol=1e-5, rtol=1e-5)


def test_flash_attention_mask_pictures():
    # flash-attn's docstring: Sq = 2, Sk = 5 -> 1 1 1 1 0 / 1 1 1 1 1; Sq = 5, Sk = 2 -> three empty rows.
    for seqlen_q, seqlen_k, rows in (
        (2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]),
    ):
        q, k = bshd(1, seqlen_q, 1, seqlen_k), bshd(1, seqlen_k, 1, seqlen_k)
        v = torch.eye(seqlen_k)[None, :, None, :]  # (1, Sk, 1, Sk): out reads the probabilities back
        out = flash_attn_func(q, k, v, causal=True)
        assert (out[0, :, 0] > 0).int().tolist() == rows


@pytest.mark.parametrize(
    "arguments,reference_arguments",
    [
        ({"window_size": (3, 1)}, {"window_size": (3, 1)}),
        ({"window_size": (2, 5), "causal": True}, {"window_size": (2, 5), "causal": "bottom_right"}),
        ({"softcap": 0.7}, {"softcap": 0.7}),
        ({"softcap": 0.0, "softmax_scale": 0.3}, {"scale": 0.3}),
        ({"alibi_slopes": torch.rand(4)}, {"alibi_slopes": torch.rand(4)}),
    ],
)
def test_modifiers_mean_what_the_contract_says(arguments, reference_arguments):
    if "alibi_slopes" in arguments:
        reference_arguments["alibi_slopes"] = arguments["alibi_slopes"]
    q, k, v = bshd(2, 9, 4, 8) * 2, bshd(2, 13, 4, 8) * 2, bshd(2, 13, 4, 8)
    out = flash_attn_func(q, k, v, **arguments)
    torch.testing.assert_close(
        out.double(), expected(q, k, v, **reference_arguments)[0], atol=1e-5, rtol=1e-5
    )


def test_packed_forms_match_the_unpacked_one_with_gradients():
    qkv = bshd(2, 10, 3 * 4, 16).unflatten(2, (3, 4)).requires_grad_(True)  # (B, S, 3, H, D)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    grad = torch.randn_like(out)
    (packed_grad,) = torch.autograd.grad(out, qkv, grad)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in qkv.unbind(2))
    unpacked = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, unpacked)
    torch.testing.assert_close(
        packed_grad, torch.stack(torch.autograd.grad(unpacked, (q, k, v), grad), dim=2)
    )

    q = bshd(2, 6, 4, 16, requires_grad=True)
    kv = bshd(2, 10, 2 * 2, 16).unflatten(2, (2, 2)).requires_grad_(True)  # (B, Sk, 2, Hkv, D)
    out = flash_attn_kvpacked_func(q, kv, causal=True)
    torch.testing.assert_close(out, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True))
    dq, dkv = torch.autograd.grad(out, (q, kv), torch.randn_like(out))
    assert dq.shape == q.shape and dkv.shape == kv.shape


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q: flash_attn_func(q[0], q, q), ValueError, r"q must be 4-D \(B, Sq, Hq, D\)"),
        (lambda q: flash_attn_func(q, q, q, causal="yes"), TypeError, "causal must be a bool"),
        (lambda q: flash_attn_func(q, q, q, window_size=4), TypeError, "window_size must be a pair"),
        (
            lambda q: flash_attn_func(q, q, q, window_size=(4, -3)),
            ValueError,
            "window_size values must be >= -1",
        ),
        (lambda q: flash_attn_func(q, q, q, softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
        (lambda q: flash_attn_func(q, q, q, deterministic=1), TypeError, "deterministic must be a bool"),
        (lambda q: flash_attn_qkvpacked_func(q), ValueError, r"qkv must be 5-D \(B, S, 3, H, D\)"),
        (lambda q: flash_attn_qkvpacked_func(torch.stack([q, q], 2)), ValueError, r"qkv must have shape"),
        (lambda q: flash_attn_kvpacked_func(q, torch.stack([q] * 3, 2)), ValueError, r"kv must have shape"),
    ],
)
def test_bad_input_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call(bshd(1, 5, 2, 8))


def test_deterministic_is_honoured_on_the_cpu():
    q, k, v = (bshd(1, 9, 2, 8, requires_grad=True) for _ in range(3))
    grads = [
        torch.autograd.grad(flash_attn_func(q, k, v, deterministic=True).sum(), (q, k, v)) for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def packed_offsets(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_varlen_is_bottom_right_per_sequence_with_gqa_window_softcap_alibi_and_lse():
    cu_q, cu_k = packed_offsets(3, 9, 0, 5), packed_offsets(6, 4, 2, 5)
    q, k, v = torch.randn(17, 4, 16), torch.randn(17, 2, 16), torch.randn(17, 2, 16)
    slopes = torch.rand(4, 4)
    options = dict(window_size=(3, 1), softcap=2.0, alibi_slopes=slopes)
    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 9, 6, causal=True, return_attn_probs=True, **options
    )
    exact_out, exact_lse = reference_varlen_attention(
        q.double(), k.double(), v.double(), cu_q, cu_k, causal="bottom_right", **options
    )
    assert out.shape == (17, 4, 16) and lse.shape == (4, 17) and probs is None
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exact_lse, atol=1e-5, rtol=1e-5)


def test_varlen_packed_forms_equal_the_unpacked_function_and_their_gradients_come_back_packed():
    cu = packed_offsets(4, 1, 7)
    qkv = torch.randn(12, 3, 2, 8, requires_grad=True)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True)
    q, k, v = qkv.unbind(1)
    torch.testing.assert_close(out, flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    kv = torch.randn(12, 2, 2, 8)
    torch.testing.assert_close(
        flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7),
        flash_attn_varlen_func(q, *kv.unbind(1), cu, cu, 7, 7),
    )


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda q, cu: flash_attn_varlen_func(q[None], q, q, cu, cu, 4, 4), ValueError, "(total_q, Hq, D)"),
        (lambda q, cu: flash_attn_varlen_qkvpacked_func(q, cu, 4), ValueError, "(total, 3, H, D)"),
        (
            lambda q, cu: flash_attn_varlen_kvpacked_func(q, q, cu, cu, 4, 4),
            ValueError,
            "(total_k, 2, Hkv, D)",
        ),
        (
            lambda q, cu: flash_attn_varlen_func(q, q, q, cu.long(), cu, 4, 4),
            TypeError,
            "cu_seqlens_q must be an int32",
        ),
    ],
)
def test_varlen_bad_input(call, error, words):
    with pytest.raises(error) as raised:
        call(torch.randn(6, 2, 8), packed_offsets(2, 4))
    assert words in str(raised.value)


def paged(k: torch.Tensor, v: torch.Tensor, lengths: list[int], page_size: int, generator: torch.Generator):
    """Packed keys and values (total_k, Hkv, D) scattered into paged caches of random pages, every
    other slot random: (k_cache, v_cache (num_pages, page_size, Hkv, D), int32 block_table (N, max_pages),
    the (page, slot) of each packed row)."""
    max_pages = max(-(-n // page_size) for n in lengths) + 1
    num_pages = len(lengths) * max_pages + 2
    k_cache = torch.randn(num_pages, page_size, *k.shape[1:], generator=generator, dtype=k.dtype)
    v_cache = torch.randn(k_cache.shape, generator=generator, dtype=v.dtype)
    table = torch.randperm(num_pages, generator=generator)[: len(lengths) * max_pages].reshape(
        len(lengths), -1
    )
    places = [
        (int(table[n, p // page_size]), p % page_size)
        for n, length in enumerate(lengths)
        for p in range(length)
    ]
    for row, (page, slot) in enumerate(places):
        k_cache[page, slot], v_cache[page, slot] = k[row], v[row]
    return k_cache, v_cache, table.to(torch.int32), places


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_varlen_block_table_reads_each_sequence_from_its_pages_with_gradients_into_the_caches(page_size):
    # Chunked prefill: each sequence's new queries attend its keys in the paged cache, causal bottom-right.
    generator = torch.Generator().manual_seed(page_size)
    lengths_q, lengths_k = [2, 0, 4, 1], [5, 0, 13, 1]
    q = torch.randn(sum(lengths_q), 4, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k_cache, v_cache, table, places = paged(k.detach(), v.detach(), lengths_k, page_size, generator)
    k_cache.requires_grad_(True)
    v_cache.requires_grad_(True)
    cu_q, cu_k = packed_offsets(*lengths_q), packed_offsets(*lengths_k)
    options = dict(causal=True, window_size=(3, -1), softcap=2.0, return_attn_probs=True)
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 4, 13, block_table=table, **options)
    packed_out, packed_lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 13, **options)
    torch.testing.assert_close(out, packed_out)
    torch.testing.assert_close(lse, packed_lse)
    grad = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    dk_cache, dv_cache = torch.autograd.grad(out, (k_cache, v_cache), grad)
    dk, dv = torch.autograd.grad(packed_out, (k, v), grad)
    assert dk.abs().sum() > 0 and dv.abs().sum() > 0
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for row, (page, slot) in enumerate(places):
        torch.testing.assert_close(dk_cache[page, slot], dk[row])
        torch.testing.assert_close(dv_cache[page, slot], dv[row])
        used[page, slot] = True
    assert not dk_cache[~used].any() and not dv_cache[~used].any()


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(block_table=torch.tensor([[0, 9]], dtype=torch.int32)), ValueError, "pages outside 0..3"),
        (dict(block_table=torch.tensor([[0]], dtype=torch.int32)), ValueError, "max_pages * page_size = 4"),
        (dict(block_table=torch.tensor([[0, 1]])), ValueError, "block_table must be an int32"),
        (dict(k=torch.randn(16, 2, 8)), ValueError, "k must be a 4-D paged cache"),
        (dict(v=torch.randn(4, 4, 1, 8)), ValueError, "k and v must be paged caches of one shape"),
        (dict(cu_k=packed_offsets(3, 3)), ValueError, "cu_seqlens_k must have N + 1 = 2 entries"),
        (dict(cu_k=torch.tensor([1, 6], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
    ],
)
def test_varlen_block_table_bad_input(change, error, words):
    arguments = dict(
        q=torch.randn(3, 2, 8),
        k=torch.randn(4, 4, 2, 8),
        v=torch.randn(4, 4, 2, 8),
        cu_q=packed_offsets(3),
        cu_k=packed_offsets(6),
        block_table=torch.tensor([[2, 1]], dtype=torch.int32),
    )
    arguments.update(change)
    a = arguments
    with pytest.raises(error) as raised:
        flash_attn_varlen_func(
            a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], 3, 6, block_table=a["block_table"]
        )
    assert words in str(raised.value)
