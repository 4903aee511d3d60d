"""fast_attn.models (GPT, BertEncoder, T5) against transformers' GPT-2, BERT and T5.

Each model loads a random tiny transformers model's weights (from_hf); its
outputs and the gradient of every parameter must be within 3x the error of
transformers' own eager run in the same dtype against an eager float64 run.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    DTYPES_DEVICES,
    assert_output_and_grads_rule,
    build,
    forward_backward,
    padding_mask,
    random_ids,
    transformers,
)

from fast_attn.models import GPT, T5, BertEncoder, BertLayer, GPTBlock, GPTConfig
from fast_attn.models.bert import BertConfig
from fast_attn.models.hf_weights import to_hf_names
from fast_attn.models.t5 import T5Block, T5Config, relative_position_bucket


def compare(ours_model, hf_models: dict, hf_root, call_ours, call_hf, weights, dtype):
    """Assert the error rule on the output and every gradient; hf_root names the parameters (links' root)."""
    ours_out, ours_grads = forward_backward(ours_model, call_ours, weights)
    ours = (ours_out, to_hf_names(ours_grads, hf_root(hf_models["same"]), ours_model.hf_links()))
    results = {}
    for key, hf in hf_models.items():
        out, _ = forward_backward(hf, call_hf, weights)
        results[key] = (out, {name: p.grad for name, p in hf_root(hf).named_parameters()})
    assert_output_and_grads_rule("output", ours, results["same"], results["float64"], weights, dtype)


def eager_pair_and_port(kind: str, model_class, dtype, device, **overrides):
    """transformers' eager model of `kind` in dtype ("same") and in float64 ("float64"), and
    model_class's port of the first (from_hf)."""
    hf = {
        "same": build(kind, "eager", dtype=dtype, device=device, **overrides).train(),
        "float64": build(kind, "eager", dtype=torch.float64, device=device, **overrides).train(),
    }
    return hf, model_class.from_hf(hf["same"])


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_gpt_matches_transformers_gpt2(dtype, device):
    hf, ours = eager_pair_and_port("gpt2", GPT, dtype, device)
    ids = random_ids(3, 11, device)
    mask = padding_mask(3, 11, {1: 4, 2: 1}, left=True, device=device)
    # Left-padded rows see no key at their padding positions: only real tokens are compared.
    weights = torch.randn(3, 11, hf["same"].config.vocab_size, device=device) * mask[..., None]
    compare(
        ours,
        hf,
        lambda m: m.transformer,
        lambda m: m(ids, attention_mask=mask),
        lambda m: m(ids, attention_mask=mask).logits,
        weights,
        dtype,
    )


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_bert_encoder_matches_transformers_bert(dtype, device):
    hf, ours = eager_pair_and_port("bert", BertEncoder, dtype, device)
    ids = random_ids(3, 13, device)
    mask = padding_mask(3, 13, {0: 5, 2: 2}, left=False, device=device)
    weights = torch.randn(3, 13, hf["same"].config.hidden_size, device=device)
    compare(
        ours,
        hf,
        lambda m: m,
        lambda m: m(ids, attention_mask=mask),
        lambda m: m(ids, attention_mask=mask).last_hidden_state,
        weights,
        dtype,
    )


# The original T5's ReLU only in float32: in half precision a pre-activation rounded across 0 moves
# gradients by whole terms, for eager as much as for fast_attn, which no error ratio can bound.
@pytest.mark.parametrize(
    "dtype,device,feed_forward",
    [
        pytest.param(torch.float32, "cpu", "relu", id="float32-cpu-relu"),
        *(
            pytest.param(*p.values, "gated-gelu", marks=p.marks, id=f"{p.id}-gated-gelu")
            for p in DTYPES_DEVICES
        ),
    ],
)
def test_t5_matches_transformers_t5(dtype, device, feed_forward):
    hf, ours = eager_pair_and_port("t5", T5, dtype, device, feed_forward_proj=feed_forward)
    ids, decoder_ids = random_ids(2, 12, device), random_ids(2, 7, device)
    mask = padding_mask(2, 12, {1: 5}, left=False, device=device)
    decoder_mask = padding_mask(2, 7, {0: 2}, left=False, device=device)
    weights = torch.randn(2, 7, hf["same"].config.vocab_size, device=device)
    compare(
        ours,
        hf,
        lambda m: m,
        lambda m: m(ids, decoder_ids, attention_mask=mask, decoder_attention_mask=decoder_mask),
        lambda m: (
            m(
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=decoder_ids,
                decoder_attention_mask=decoder_mask,
            ).logits
        ),
        weights,
        dtype,
    )


def test_t5_with_untied_head_matches_transformers():
    hf, ours = eager_pair_and_port("t5", T5, torch.float32, "cpu", untie_lm_head=True)
    assert not ours.config.tie_word_embeddings
    ids, decoder_ids = random_ids(2, 9), random_ids(2, 4)
    weights = torch.randn(2, 4, hf["same"].config.vocab_size)
    compare(
        ours,
        hf,
        lambda m: m,
        lambda m: m(ids, decoder_ids),
        lambda m: m(input_ids=ids, decoder_input_ids=decoder_ids).logits,
        weights,
        torch.float32,
    )


# Token equality is asserted in float32 on the CPU; in half precision a near-tie of two logits may
# legitimately flip (test_integrations checks KV-cache decoding on a GPU through the logits instead).
def assert_same_greedy_tokens(hf, ours, ids, mask, first_generated: int) -> None:
    """12 greedy tokens of `ours` equal transformers' (generated from column `first_generated`
    of the output on), which must not be degenerate."""
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    tokens = ours.generate(ids, 12, attention_mask=mask)
    assert len(set(expected[:, first_generated:].flatten().tolist())) > 3, (
        "degenerate generation tests nothing"
    )
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_gpt_greedy_generation_matches_transformers():
    hf = build("gpt2", "eager").eval()
    mask = padding_mask(3, 7, {0: 3, 2: 1}, left=True)
    assert_same_greedy_tokens(hf, GPT.from_hf(hf), random_ids(3, 7), mask, first_generated=7)


def test_t5_greedy_generation_matches_transformers():
    hf = build("t5", "eager", untie_lm_head=True).eval()
    mask = padding_mask(3, 10, {1: 4}, left=False)
    # The decoder's output starts with its start token.
    assert_same_greedy_tokens(hf, T5.from_hf(hf), random_ids(3, 10), mask, first_generated=1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 33)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301)[None, :] + torch.arange(0, 3)[:, None]
    ours = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)
    assert int(ours.min()) >= 0 and int(ours.max()) == num_buckets - 1


@pytest.mark.parametrize(
    "kind,model_class,root",
    [
        ("gpt2", GPT, lambda m: m.transformer),
        ("bert", BertEncoder, lambda m: m),
        ("t5", T5, lambda m: m),
    ],
)
def test_weight_links_round_trip(kind, model_class, root):
    hf = build(kind, "eager")
    ours = model_class.from_hf(hf)
    back = to_hf_names(dict(ours.named_parameters()), root(hf), ours.hf_links())
    theirs = dict(root(hf).named_parameters())
    assert set(back) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(back[name], tensor), name


def test_from_hf_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="cross-attention"):
        GPT.from_hf(build("gpt2", "eager", add_cross_attention=True))
    with pytest.raises(ValueError, match="decoder"):
        BertEncoder.from_hf(build("bert", "eager", is_decoder=True))


def test_gpt_block_is_causal():
    block = GPTBlock(GPTConfig(hidden_size=32, num_heads=4, num_layers=1, attention_dropout=0.0)).eval()
    x = torch.randn(2, 9, 32)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 3, 32)
    torch.testing.assert_close(block(changed)[:, :6], block(x)[:, :6])
    assert not torch.allclose(block(changed)[:, 6:], block(x)[:, 6:])


def test_bert_layer_ignores_padded_keys():
    layer = BertLayer(BertConfig(hidden_size=32, num_heads=4, intermediate_size=64)).eval()
    x = torch.randn(2, 8, 32)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[1, 5:] = False
    changed = x.clone()
    changed[1, 5:] = torch.randn(3, 32)
    torch.testing.assert_close(layer(changed, key_mask)[1, :5], layer(x, key_mask)[1, :5])


def test_t5_decoder_block_cross_attention_uses_encoder_mask():
    config = T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1, dropout=0.0)
    block = T5Block(config, is_decoder=True).eval()
    x, encoder_states = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    position_bias = torch.randn(1, 4, 5, 5)
    encoder_key_mask = torch.ones(2, 7, dtype=torch.bool)
    encoder_key_mask[0, 4:] = False
    changed = encoder_states.clone()
    changed[:, 4:] = torch.randn(2, 3, 32)
    out = block(x, position_bias, encoder_states=encoder_states, encoder_key_mask=encoder_key_mask)
    out_changed = block(x, position_bias, encoder_states=changed, encoder_key_mask=encoder_key_mask)
    torch.testing.assert_close(out_changed[0], out[0])  # masked encoder positions
    assert not torch.allclose(out_changed[1], out[1])  # row 1 attends to them
