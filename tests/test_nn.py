"""fast_attn.nn: the MultiheadAttention drop-in against torch's module, and
fast_attn.nn.Attention (GQA, bias, key mask, causal, KV cache) against plain
float64 math.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fast_attn
from fast_attn import decode_attention
from fast_attn.nn import Attention, KVCache, MultiheadAttention
from fast_attn.nn import attention as attention_module
from fast_attn.testing import assert_error_rule

EMBED, HEADS = 32, 4
MODULE_ERROR_FACTOR = 3.0  # projections around the kernel add their own rounding
# Half-precision variants run on a GPU only (marker `gpu`); the float32 checks run on the CPU.
GPU_DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bfloat16"),
    pytest.param(torch.float16, marks=pytest.mark.gpu, id="float16"),
]


def torch_and_ours(dtype=torch.float32, device="cpu", **kwargs):
    """torch's module (random weights, nonzero biases) in `dtype` and float64, and ours with the same weights."""
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.3)
    ours = MultiheadAttention(EMBED, HEADS, **kwargs)
    ours.load_state_dict(reference.state_dict())
    exact = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs).double()
    exact.load_state_dict(reference.state_dict())
    return reference.to(device, dtype), ours.to(device, dtype), exact.to(device)


def run(module, inputs: dict, grad_out: torch.Tensor, dtype, device="cpu"):
    """Output and gradients (inputs that require grad, then every parameter) of one forward call."""
    copies = {
        name: (
            t.detach().to(device, dtype if t.is_floating_point() else t.dtype).requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor)
            else t
        )
        for name, t in inputs.items()
    }
    # Keep torch's identity-based self-attention path: query is key is value when the caller shares them.
    for name in ("key", "value"):
        if inputs[name] is inputs["query"]:
            copies[name] = copies["query"]
    if inputs["value"] is inputs["key"]:
        copies["value"] = copies["key"]
    module.zero_grad(set_to_none=True)
    out, _ = module(**copies, need_weights=False)
    wanted = {n: t for n, t in copies.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(out, list(wanted.values()) + list(params.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(list(wanted) + list(params), grads))


def assert_matches_torch(kwargs: dict, inputs: dict, dtype=torch.float32, device="cpu"):
    """Ours in `dtype` against torch's module in float64, allowing 3x torch's own error in `dtype`."""
    reference, ours, exact = torch_and_ours(dtype, device, **kwargs)
    out_shape = (*inputs["query"].shape[:-1], EMBED)  # (L, N, E), (N, L, E) or unbatched (L, E)
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(device)
    ours_out, ours_grads = run(ours, inputs, grad_out, dtype, device)
    same_out, same_grads = run(reference, inputs, grad_out, dtype, device)
    exact_out, exact_grads = run(exact, inputs, grad_out, torch.float64, device)
    assert_error_rule("output", ours_out, exact_out, same_out, dtype, factor=MODULE_ERROR_FACTOR)
    assert set(ours_grads) == set(exact_grads)
    for name in exact_grads:
        assert_error_rule(
            f"grad {name}",
            ours_grads[name],
            exact_grads[name],
            same_grads[name],
            dtype,
            factor=MODULE_ERROR_FACTOR,
        )


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("masks", ["none", "key_padding", "causal_and_padding", "float_attn_mask"])
def test_matches_torch_on_gpu(dtype, masks):
    inputs = make_inputs(True, 40, 40, EMBED, attention="self")
    padding = torch.rand(3, 40) < 0.3
    padding[:, 0] = False
    extra = {
        "none": {},
        "key_padding": {"key_padding_mask": padding},
        "causal_and_padding": {
            "key_padding_mask": padding,
            "is_causal": True,
            "attn_mask": torch.ones(40, 40, dtype=torch.bool).triu(1),
        },
        "float_attn_mask": {"attn_mask": torch.randn(40, 40)},
    }[masks]
    assert_matches_torch({"batch_first": True}, {**inputs, **extra}, dtype=dtype, device="cuda")


def make_inputs(
    batch_first: bool, seqlen_q: int, seqlen_k: int, kdim: int, *, attention: str, batch: int = 3
):
    """query/key/value in torch's layout; attention "self" shares one tensor, "kv" shares key and value."""

    def tensor(seqlen, width):
        t = torch.randn(batch, seqlen, width)
        return (t if batch_first else t.transpose(0, 1).contiguous()).requires_grad_()

    query = tensor(seqlen_q, EMBED)
    if attention == "self":
        return {"query": query, "key": query, "value": query}
    key = tensor(seqlen_k, kdim)
    return {"query": query, "key": key, "value": key if attention == "kv" else tensor(seqlen_k, kdim)}


CONSTRUCTIONS = [
    {},
    {"batch_first": True},
    {"bias": False, "batch_first": True},
    {"kdim": 20, "vdim": 20},
    {"add_bias_kv": True},
    {"add_zero_attn": True, "batch_first": True},
    {"add_bias_kv": True, "add_zero_attn": True, "kdim": 24, "vdim": 24, "batch_first": True},
]


@pytest.mark.parametrize(
    "kwargs", CONSTRUCTIONS, ids=lambda k: ",".join(f"{n}={v}" for n, v in k.items()) or "default"
)
def test_matches_torch_without_masks(kwargs):
    kdim = kwargs.get("kdim", EMBED)
    attention = "self" if kdim == EMBED else "cross"
    inputs = make_inputs(kwargs.get("batch_first", False), 7, 7, kdim, attention=attention)
    assert_matches_torch(kwargs, inputs)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("attention", ["self", "kv", "cross"])
@pytest.mark.parametrize(
    "masks",
    [
        "key_padding_bool",
        "key_padding_float",
        "attn_2d_bool",
        "attn_2d_float",
        "attn_3d_bool",
        "attn_3d_float",
        "causal_hint",
        "causal_hint_and_padding",
        "both_bool",
    ],
)
def test_matches_torch_with_masks(batch_first, attention, masks):
    seqlen_q, seqlen_k = (6, 6) if attention == "self" or masks.startswith("causal") else (5, 9)
    inputs = make_inputs(batch_first, seqlen_q, seqlen_k, EMBED, attention=attention)
    padding = torch.rand(3, seqlen_k) < 0.4
    padding[:, 0] = False  # every row keeps a key
    pattern = torch.rand(seqlen_q, seqlen_k) < 0.3
    pattern[:, 0] = False
    causal = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).triu(1)
    per_head = torch.rand(3 * HEADS, seqlen_q, seqlen_k) < 0.3
    per_head[..., 0] = False
    extra = {
        "key_padding_bool": {"key_padding_mask": padding},
        "key_padding_float": {"key_padding_mask": torch.randn(3, seqlen_k)},
        "attn_2d_bool": {"attn_mask": pattern},
        "attn_2d_float": {"attn_mask": torch.randn(seqlen_q, seqlen_k)},
        "attn_3d_bool": {"attn_mask": per_head},
        "attn_3d_float": {"attn_mask": torch.randn(3 * HEADS, seqlen_q, seqlen_k)},
        "causal_hint": {"attn_mask": causal, "is_causal": True},
        "causal_hint_and_padding": {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding},
        "both_bool": {"attn_mask": pattern, "key_padding_mask": padding},
    }[masks]
    assert_matches_torch({"batch_first": batch_first}, {**inputs, **extra})


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_appended_keys_with_masks_match_torch(add_bias_kv, add_zero_attn):
    inputs = make_inputs(True, 6, 6, EMBED, attention="self")
    padding = torch.rand(3, 6) < 0.4
    padding[:, 0] = False
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    kwargs = {"batch_first": True, "add_bias_kv": add_bias_kv, "add_zero_attn": add_zero_attn}
    assert_matches_torch(kwargs, {**inputs, "key_padding_mask": padding, "attn_mask": torch.randn(6, 6)})
    assert_matches_torch(
        kwargs, {**inputs, "key_padding_mask": padding, "attn_mask": causal, "is_causal": True}
    )
    assert_matches_torch(kwargs, {**inputs, "attn_mask": causal, "is_causal": True})


def test_unbatched_input_matches_torch():
    inputs = {
        "query": torch.randn(5, EMBED, requires_grad=True),
        "key": torch.randn(8, EMBED, requires_grad=True),
    }
    inputs["value"] = inputs["key"]
    padding = torch.tensor([False, True, False, False, True, False, False, False])
    assert_matches_torch({}, {**inputs, "key_padding_mask": padding, "attn_mask": torch.randn(HEADS, 5, 8)})


def test_state_dict_round_trips_both_ways():
    for kwargs in CONSTRUCTIONS:
        theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
        ours = MultiheadAttention(EMBED, HEADS, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        back = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
        back.load_state_dict(ours.state_dict())
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name


def test_same_seed_gives_torch_initialization():
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True)
    torch.manual_seed(3)
    ours = MultiheadAttention(EMBED, HEADS, add_bias_kv=True)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_is_torch_exactly(average):
    reference, ours, _ = torch_and_ours(batch_first=True)
    x = torch.randn(2, 6, EMBED)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    out_t, w_t = reference(x, x, x, key_padding_mask=padding, average_attn_weights=average)
    out_o, w_o = ours(x, x, x, key_padding_mask=padding, average_attn_weights=average)
    assert torch.equal(out_o, out_t) and torch.equal(w_o, w_t)


def test_fused_path_calls_fast_attn_with_a_key_mask(monkeypatch):
    calls = []
    real = fast_attn.nn.multihead_attention.attention

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fast_attn.nn.multihead_attention, "attention", spy)
    _, ours, _ = torch_and_ours(batch_first=True)
    x = torch.randn(2, 6, EMBED)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 3:] = True
    _out, weights = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    assert weights is None and len(calls) == 1
    assert calls[0]["bias"] is None and torch.equal(calls[0]["key_mask"], ~padding)
    ours(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1), is_causal=True, need_weights=False)
    assert calls[1]["bias"] is None and calls[1]["causal"] is True


def test_causal_hint_without_mask_is_accepted():
    reference, ours, _ = torch_and_ours(batch_first=True)
    x = torch.randn(2, 5, EMBED)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected, _ = reference(x, x, x, attn_mask=causal, need_weights=False)
    out, _ = ours(x, x, x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_row_without_visible_key_is_zero_not_nan():
    _, ours, _ = torch_and_ours(batch_first=True, bias=False)
    x = torch.randn(2, 4, EMBED)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[1] = True
    out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    assert not out.isnan().any() and torch.all(out[1] == 0)


def test_bad_masks_are_refused_with_their_names():
    _, ours, _ = torch_and_ours(batch_first=True)
    x = torch.randn(2, 4, EMBED)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(4, 3, dtype=torch.bool), need_weights=False)
    with pytest.raises(TypeError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64), need_weights=False)


def test_from_torch_shares_parameters():
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert a is b, name
    x = torch.randn(2, 5, EMBED)
    torch.testing.assert_close(
        ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(TypeError, match="subclass"):
        MultiheadAttention.from_torch(ours)


# ---- fast_attn.nn.Attention ------------------------------------------------------------------------


def attention_math(
    module: Attention, x, context=None, bias=None, key_mask=None, causal=False, dtype=torch.float64
):
    """Plain PyTorch math of Attention.forward (no cache) in `dtype`, with k/v heads expanded."""
    m = {n: p.detach().to(dtype) for n, p in module.named_parameters()}
    x = x.to(dtype)
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    if module.cross_attention:
        q = F.linear(x, m["q_proj.weight"], m.get("q_proj.bias"))
        k, v = F.linear(context.to(dtype), m["kv_proj.weight"], m.get("kv_proj.bias")).chunk(2, dim=-1)
    else:
        q, k, v = F.linear(x, m["qkv_proj.weight"], m.get("qkv_proj.bias")).split(
            [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1
        )
    q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)
    k = k.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = v.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scale = module.scale if module.scale is not None else 1 / math.sqrt(head_dim)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    seqlen_q, seqlen_k = scores.shape[-2:]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=scores.device)
    if causal:
        visible = visible.tril(seqlen_k - seqlen_q)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    out = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v
    return F.linear(out.transpose(1, 2).flatten(2), m["out_proj.weight"], m.get("out_proj.bias"))


def check_self_attention(
    heads, kv_heads, causal, with_bias, with_mask, seqlen=7, dtype=torch.float32, device="cpu"
):
    module = Attention(EMBED, heads, kv_heads, causal=causal)
    x = torch.randn(2, seqlen, EMBED)
    bias = torch.randn(1, heads, seqlen, seqlen) if with_bias else None
    key_mask = torch.ones(2, seqlen, dtype=torch.bool)
    key_mask[1, seqlen // 2 + 1 :] = False
    key_mask = key_mask if with_mask else None
    exact = attention_math(module, x, bias=bias, key_mask=key_mask, causal=causal)  # before the cast
    module, x = module.to(device, dtype), x.to(device, dtype)
    bias = None if bias is None else bias.to(device, dtype)
    key_mask = None if key_mask is None else key_mask.to(device)
    out = module(x, bias=bias, key_mask=key_mask)
    same = attention_math(module, x, bias=bias, key_mask=key_mask, causal=causal, dtype=dtype)
    assert_error_rule("output", out, exact.to(device), same, dtype, factor=MODULE_ERROR_FACTOR)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias,with_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_self_attention_matches_float64_math(heads, kv_heads, causal, with_bias, with_mask):
    check_self_attention(heads, kv_heads, causal, with_bias, with_mask)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_self_attention_on_gpu_matches_float64_math(dtype, heads, kv_heads):
    check_self_attention(heads, kv_heads, True, True, True, seqlen=70, dtype=dtype, device="cuda")


def test_cross_attention_with_gqa_matches_float64_math():
    module = Attention(EMBED, 4, 2, cross_attention=True, kv_embed_dim=12, head_dim=6, bias=False)
    x, context = torch.randn(2, 5, EMBED), torch.randn(2, 9, 12)
    key_mask = torch.rand(2, 9) < 0.7
    key_mask[:, 0] = True
    out = module(x, context, key_mask=key_mask)
    exact = attention_math(module, x, context, key_mask=key_mask)
    same = attention_math(module, x, context, key_mask=key_mask, dtype=torch.float32)
    assert_error_rule("output", out, exact, same, torch.float32, factor=MODULE_ERROR_FACTOR)


def test_gradients_flow_to_every_parameter_and_the_bias():
    module = Attention(EMBED, 4, 2, causal=True)
    x = torch.randn(2, 6, EMBED, requires_grad=True)
    bias = torch.randn(1, 4, 6, 6, requires_grad=True)
    module(x, bias=bias).square().sum().backward()
    for name, param in itertools.chain(module.named_parameters(), [("x", x), ("bias", bias)]):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_kv_cache_decoding_equals_full_causal_forward(heads, kv_heads):
    module = Attention(EMBED, heads, kv_heads, causal=True).eval()
    x = torch.randn(2, 11, EMBED)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    full = module(x, key_mask=key_mask)
    cache = module.new_cache(2, 16)
    steps = [module(x[:, :5], key_mask=key_mask[:, :5], cache=cache)]
    steps += [module(x[:, i : i + 1], key_mask=key_mask[:, : i + 1], cache=cache) for i in range(5, 9)]
    steps.append(module(x[:, 9:], key_mask=key_mask, cache=cache))  # a chunk of two after single steps
    decoded = torch.cat(steps, dim=1)
    assert cache.length == 11
    real = key_mask[:, :, None].expand_as(full)  # padded queries see no key: 0 in both
    torch.testing.assert_close(decoded[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options", [{}, dict(window_size=(3, 0), softcap=2.0, sinks=True), dict(alibi_slopes=torch.rand(4) / 2)]
)
def test_kv_cache_decoding_without_grad_writes_the_cache_through_decode_attention(options, monkeypatch):
    module = Attention(EMBED, 4, 2, causal=True, **options).eval()
    if module.sinks is not None:
        with torch.no_grad():
            module.sinks.copy_(torch.randn(4))
    x = torch.randn(2, 10, EMBED)
    full = module(x)
    calls = []

    def counted_decode_attention(*args, **kwargs):
        calls.append(args[3].tolist())  # cache_seqlens before the step
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "decode_attention", counted_decode_attention)
    cache = module.new_cache(2, 12)
    with torch.no_grad():
        steps = [module(x[:, :4], cache=cache)] + [module(x[:, i : i + 1], cache=cache) for i in range(4, 10)]
        _, keys, values = module._self_projections(x)
    assert calls == [[0, 0]] + [[i, i] for i in range(4, 10)]
    assert cache.length == 10 and cache.seqlens.tolist() == [10, 10]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.keys[:, :10], keys)
    torch.testing.assert_close(cache.values[:, :10], values)


def test_cross_attention_cache_projects_the_context_once():
    module = Attention(EMBED, 4, cross_attention=True).eval()
    x, context = torch.randn(2, 6, EMBED), torch.randn(2, 8, EMBED)
    cache = module.new_cache(2, 8)
    first = module(x[:, :2], context, cache=cache)
    rest = module(x[:, 2:], cache=cache)  # no context needed once cached
    torch.testing.assert_close(torch.cat([first, rest], dim=1), module(x, context), atol=1e-6, rtol=1e-5)


def test_kv_cache_refuses_overflow_and_wrong_shapes():
    cache = KVCache(2, 4, 2, 8)
    cache.append(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))
    with pytest.raises(ValueError, match="full"):
        cache.append(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8))
    with pytest.raises(ValueError, match="shape"):
        cache.append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))


def test_attention_refuses_inconsistent_arguments():
    with pytest.raises(ValueError, match="multiple"):
        Attention(EMBED, 4, 3)
    with pytest.raises(ValueError, match="causal"):
        Attention(EMBED, 4, cross_attention=True, causal=True)
    module = Attention(EMBED, 4)
    with pytest.raises(ValueError, match="context"):
        module(torch.randn(1, 3, EMBED), torch.randn(1, 3, EMBED))
    with pytest.raises(ValueError, match="context"):
        Attention(EMBED, 4, cross_attention=True)(torch.randn(1, 3, EMBED))


@pytest.mark.slow
def test_modules_compile_without_graph_breaks():
    mha = MultiheadAttention(EMBED, HEADS, batch_first=True)
    attn = Attention(EMBED, 4, 2, causal=True)
    x = torch.randn(2, 9, EMBED, requires_grad=True)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True

    def mha_call(t):
        return mha(t, t, t, key_padding_mask=padding, need_weights=False)[0]

    for eager, args in ((mha_call, (x,)), (attn, (x,))):
        compiled = torch.compile(eager, fullgraph=True)
        out = compiled(*args)
        expected = eager(*args)
        torch.testing.assert_close(out, expected)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(grad, expected_grad)


def test_score_modifiers_match_the_reference_and_train_the_sinks():
    slopes = torch.rand(4)
    module = Attention(
        EMBED, 4, 2, causal=True, window_size=(2, -1), softcap=0.8, alibi_slopes=slopes, sinks=True
    )
    with torch.no_grad():
        module.sinks.copy_(torch.randn(4))
    x = torch.randn(2, 9, EMBED)
    out = module(x)
    q, k, v = module._keys_values(x, None, None)
    expected, _ = fast_attn.reference.reference_attention(
        q,
        k,
        v,
        causal="bottom_right",
        window_size=(2, -1),
        softcap=0.8,
        alibi_slopes=slopes,
        sinks=module.sinks,
    )
    torch.testing.assert_close(
        out, module.out_proj(expected.transpose(1, 2).flatten(2)), atol=1e-5, rtol=1e-5
    )
    out.square().sum().backward()
    assert module.sinks.grad is not None and module.sinks.grad.abs().sum() > 0
    assert "alibi_slopes" in dict(module.named_buffers())


def test_windowed_kv_cache_decoding_equals_full_forward():
    module = Attention(EMBED, 4, 2, causal=True, window_size=(3, 0), sinks=True).eval()
    x = torch.randn(2, 10, EMBED)
    full = module(x)
    cache = module.new_cache(2, 10)
    steps = [module(x[:, :4], cache=cache)] + [module(x[:, i : i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_seqlen", [None, 7, "tensor"])
def test_packed_sequences_equal_each_sequence_alone(max_seqlen):
    module = Attention(EMBED, 4, 2, causal=True, window_size=(3, -1), softcap=1.5, sinks=True)
    with torch.no_grad():
        module.sinks.copy_(torch.randn(4))
    lengths = [4, 0, 7, 1]
    cu_seqlens = torch.tensor([0, 4, 4, 11, 12], dtype=torch.int32)
    x = torch.randn(12, EMBED, requires_grad=True)
    bound = torch.tensor(7) if max_seqlen == "tensor" else max_seqlen
    out = module(x, cu_seqlens=cu_seqlens, max_seqlen=bound)
    assert out.shape == (12, EMBED)
    begin = 0
    for length in lengths:
        alone = module(x[None, begin : begin + length].detach())[0]
        torch.testing.assert_close(out[begin : begin + length], alone, atol=1e-5, rtol=1e-5)
        begin += length
    out.square().sum().backward()
    assert x.grad is not None and module.sinks.grad is not None


def test_packed_sequences_refuse_what_they_do_not_take():
    module = Attention(EMBED, 4)
    cu_seqlens = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="x must be \\(T, embed_dim\\)"):
        module(torch.randn(1, 5, EMBED), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="key_mask is not taken with cu_seqlens"):
        module(torch.randn(5, EMBED), cu_seqlens=cu_seqlens, key_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seqlen goes with cu_seqlens"):
        module(torch.randn(1, 5, EMBED), max_seqlen=3)
