"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import fast_attn
from fast_attn.testing import random_qkv


def qkv(**kwargs):
    shape = dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=5, seqlen_k=7, head_dim=8)
    shape.update(kwargs)
    return random_qkv(*shape.values())


BAD_CALLS = [
    # (description, call, exception, words the message must contain)
    ("q not a tensor", lambda q, k, v: fast_attn.attention(q.tolist(), k, v), TypeError, ["q", "Tensor"]),
    ("q 3-D", lambda q, k, v: fast_attn.attention(q[0], k, v), ValueError, ["q", "4-D", "(4, 5, 8)"]),
    ("k 5-D", lambda q, k, v: fast_attn.attention(q, k[None], v), ValueError, ["k", "4-D"]),
    ("integer q", lambda q, k, v: fast_attn.attention(q.long(), k, v), TypeError, ["q", "int64"]),
    ("mixed dtypes", lambda q, k, v: fast_attn.attention(q, k.double(), v), TypeError, ["dtype", "float64"]),
    (
        "k v shapes",
        lambda q, k, v: fast_attn.attention(q, k, v[:, :, :3]),
        ValueError,
        ["k and v", "(2, 2, 3, 8)"],
    ),
    (
        "batch mismatch",
        lambda q, k, v: fast_attn.attention(q[:1], k, v),
        ValueError,
        ["batch", "(1, 4, 5, 8)"],
    ),
    (
        "head dim mismatch",
        lambda q, k, v: fast_attn.attention(q[..., :4], k, v),
        ValueError,
        ["head dim", "(2, 4, 5, 4)"],
    ),
    (
        "Hq % Hkv",
        lambda q, k, v: fast_attn.attention(q[:, :3], k, v),
        ValueError,
        ["Hq % Hkv", "(2, 3, 5, 8)", "(2, 2, 7, 8)"],
    ),
    (
        "bias does not broadcast",
        lambda q, k, v: fast_attn.attention(q, k, v, bias=torch.zeros(2, 4, 5, 6)),
        ValueError,
        ["bias", "(2, 4, 5, 7)", "(2, 4, 5, 6)"],
    ),
    (
        "bias 5-D",
        lambda q, k, v: fast_attn.attention(q, k, v, bias=torch.zeros(1, 2, 4, 5, 7)),
        ValueError,
        ["bias"],
    ),
    (
        "bool bias",
        lambda q, k, v: fast_attn.attention(q, k, v, bias=torch.ones(5, 7, dtype=torch.bool)),
        TypeError,
        ["bias", "bool"],
    ),
    (
        "bias not a tensor",
        lambda q, k, v: fast_attn.attention(q, k, v, bias=1.0),
        TypeError,
        ["bias", "float"],
    ),
    (
        "float key mask",
        lambda q, k, v: fast_attn.attention(q, k, v, key_mask=torch.ones(2, 7)),
        TypeError,
        ["key_mask", "bool", "float32"],
    ),
    (
        "key mask shape",
        lambda q, k, v: fast_attn.attention(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool)),
        ValueError,
        ["key_mask", "(2, 7)", "(2, 5)"],
    ),
    (
        "key mask 3-D",
        lambda q, k, v: fast_attn.attention(q, k, v, key_mask=torch.ones(2, 1, 7, dtype=torch.bool)),
        ValueError,
        ["key_mask"],
    ),
    (
        "causal string",
        lambda q, k, v: fast_attn.attention(q, k, v, causal="upper"),
        ValueError,
        ["causal", "upper"],
    ),
    ("causal int", lambda q, k, v: fast_attn.attention(q, k, v, causal=2), ValueError, ["causal"]),
    (
        "dropout 1",
        lambda q, k, v: fast_attn.attention(q, k, v, dropout_p=1.0),
        ValueError,
        ["dropout_p", "[0, 1)"],
    ),
    (
        "dropout negative",
        lambda q, k, v: fast_attn.attention(q, k, v, dropout_p=-0.1),
        ValueError,
        ["dropout_p"],
    ),
    ("dropout str", lambda q, k, v: fast_attn.attention(q, k, v, dropout_p="0.1"), TypeError, ["dropout_p"]),
    ("scale str", lambda q, k, v: fast_attn.attention(q, k, v, scale="1"), TypeError, ["scale"]),
    ("scale nan", lambda q, k, v: fast_attn.attention(q, k, v, scale=float("nan")), ValueError, ["scale"]),
    (
        "backend name",
        lambda q, k, v: fast_attn.attention(q, k, v, backend="flash"),
        ValueError,
        ["backend", "flash"],
    ),
    ("return_lse", lambda q, k, v: fast_attn.attention(q, k, v, return_lse="yes"), TypeError, ["return_lse"]),
    (
        "zero head dim",
        lambda q, k, v: fast_attn.attention(q[..., :0], k[..., :0], v[..., :0]),
        ValueError,
        ["head dim"],
    ),
]


@pytest.mark.parametrize("description,call,exception,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_problem(description, call, exception, words):
    q, k, v = qkv()
    with pytest.raises(exception) as info:
        call(q, k, v)
    message = str(info.value)
    for word in words:
        assert word in message, f"{description}: {word!r} not in {message!r}"


def test_bias_on_other_device_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bias must be on q's device"):
        fast_attn.attention(q, k, v, bias=torch.zeros(5, 7, device="meta"))


def test_qkv_on_different_devices_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        fast_attn.attention(q, k.to("meta"), v)


def test_named_backend_that_cannot_run_lists_every_reason():
    q, k, v = (t.double() for t in qkv(head_dim=300))
    with pytest.raises(fast_attn.BackendNotSupportedError) as info:
        fast_attn.attention(q, k, v, backend="cuda")
    assert "cuda" in str(info.value)


def test_sdpa_dropin_refuses_what_torch_refuses():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="enable_gqa"):
        fast_attn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="value head dim"):
        fast_attn.scaled_dot_product_attention(q, k, torch.randn(2, 2, 7, 3), enable_gqa=True)
    with pytest.raises(ValueError, match="4-D"):
        fast_attn.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0])
