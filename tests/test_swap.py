"""fast_attn.swap_attention: switching existing torch and transformers models in place."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import build, padding_mask, random_ids

import fast_attn
import fast_attn.nn.multihead_attention as fast_mha
from fast_attn.swap import SwapError, SwapReport


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the swapped nn.MultiheadAttention modules called fast_attn.attention."""
    calls = []
    real = fast_mha.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_mha, "attention", spy)
    return calls


def encoder(batch_first=True, num_layers=2, norm_first=False):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    return torch.nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=batch_first and not norm_first)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_training_matches_and_uses_fast_attn(batch_first, kernel_calls):
    original = encoder(batch_first)
    swapped = copy.deepcopy(original)
    report = fast_attn.swap_attention(swapped)
    assert report.multihead_attention == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = padding_mask(3, 7, {1: 3}, left=False) == 0  # torch: True = padding
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    expected = original(x, mask=causal, src_key_padding_mask=padding, is_causal=True)
    out = swapped(x, mask=causal, src_key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert len(kernel_calls) == 2
    out.sum().backward()
    expected.sum().backward()
    for (name, ours), (_, theirs) in zip(swapped.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_transformer_encoder_inference_reaches_fast_attn_instead_of_torch_fast_path(kernel_calls):
    original = encoder().eval()
    swapped = copy.deepcopy(original)
    report = fast_attn.swap_attention(swapped)
    assert set(report.torch_fastpath_disabled) == {"layers.0", "layers.1", ""}
    x = torch.randn(3, 7, 32)
    padding = padding_mask(3, 7, {0: 2}, left=False) == 0
    with torch.no_grad():
        expected = original(x, src_key_padding_mask=padding)  # torch's nested-tensor fast path
        out = swapped(x, src_key_padding_mask=padding)
    assert len(kernel_calls) == 2
    real = ~padding[:, :, None].expand_as(
        out
    )  # torch's fast path zeroes padded rows; fast_attn computes them
    torch.testing.assert_close(out[real], expected[real], atol=2e-5, rtol=2e-5)


def test_keep_torch_fastpath_leaves_torch_inference_path(kernel_calls):
    swapped = encoder().eval()
    report = fast_attn.swap_attention(swapped, keep_torch_fastpath=True)
    assert report.torch_fastpath_disabled == []
    with torch.no_grad():
        swapped(torch.randn(2, 5, 32))
    assert kernel_calls == []  # torch's fused encoder layer ran with the (same) weights
    swapped.train()(torch.randn(2, 5, 32))
    assert len(kernel_calls) == 2  # training goes through self_attn, hence fast_attn


def test_full_transformer_decoder_layers_are_swapped(kernel_calls):
    torch.manual_seed(0)
    original = torch.nn.Transformer(32, 4, 1, 2, 64, dropout=0.0, batch_first=True)
    swapped = copy.deepcopy(original)
    report = fast_attn.swap_attention(swapped)
    assert len(report.multihead_attention) == 1 + 2 * 2  # encoder self, decoder self + cross
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(6)
    memory_padding = padding_mask(2, 9, {1: 4}, left=False) == 0
    args = {
        "tgt_mask": tgt_mask,
        "tgt_is_causal": True,
        "src_key_padding_mask": memory_padding,
        "memory_key_padding_mask": memory_padding,
    }
    torch.testing.assert_close(swapped(src, tgt, **args), original(src, tgt, **args), atol=2e-5, rtol=2e-5)
    assert len(kernel_calls) == 5


def test_swap_keeps_module_objects_so_optimizers_keep_working():
    model = encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attn = model.layers[0].self_attn
    before = {name: p for name, p in model.named_parameters()}
    fast_attn.swap_attention(model)
    assert model.layers[0].self_attn is attn and isinstance(attn, fast_attn.nn.MultiheadAttention)
    assert all(p is before[name] for name, p in model.named_parameters())
    weight_before = attn.in_proj_weight.detach().clone()
    model(torch.randn(2, 5, 32)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(attn.in_proj_weight, weight_before)


def test_swap_is_idempotent():
    model = encoder()
    fast_attn.swap_attention(model)
    report = fast_attn.swap_attention(model)
    assert report.multihead_attention == [] and report.torch_fastpath_disabled == []
    assert report.already_fast_attn == ["layers.0.self_attn", "layers.1.self_attn"]


def test_unknown_multihead_subclass_is_refused_before_anything_changes():
    class CustomAttention(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.ModuleDict({"good": torch.nn.MultiheadAttention(16, 2), "odd": CustomAttention(16, 2)})
    with pytest.raises(SwapError, match="odd.*CustomAttention"):
        fast_attn.swap_attention(model)
    assert type(model["good"]) is torch.nn.MultiheadAttention


def test_nothing_to_swap_is_refused():
    with pytest.raises(SwapError, match="nothing to swap"):
        fast_attn.swap_attention(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_transformers_t5_encoder_and_decoder_are_switched():
    model = build("t5", "eager").eval()
    reference = build("t5", "eager").eval()
    report = fast_attn.swap_attention(model)
    assert isinstance(report, SwapReport)
    assert report.transformers_models == [
        "<model>: eager -> fast_attn",
        "encoder: eager -> fast_attn",
        "decoder: eager -> fast_attn",
    ]
    for stack in (model, model.encoder, model.decoder):
        assert stack.config._attn_implementation == "fast_attn"
    ids, decoder_ids = random_ids(2, 8), random_ids(2, 5)
    mask = padding_mask(2, 8, {1: 3}, left=False)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert "encoder: eager -> fast_attn" in str(report)


def test_transformers_gpt2_is_switched_once():
    model = build("gpt2", "sdpa")
    report = fast_attn.swap_attention(model)
    assert report.transformers_models == [
        "<model>: sdpa -> fast_attn"
    ]  # the inner GPT2Model shares its config
    assert model.transformer.config._attn_implementation == "fast_attn"
    assert fast_attn.swap_attention(model).already_fast_attn == [""]
