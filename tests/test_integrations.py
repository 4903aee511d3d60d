"""The "fast_attn" transformers attention implementation (fast_attn.integrations.transformers).

Models built with attn_implementation="fast_attn" must give eager's logits and
parameter gradients (within 3x eager's own error against float64), in training
mode and in generation with the KV cache; padding must reach the kernel as a
key mask; the mask conventions must mean exactly what transformers' own masks mean.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    DTYPES_DEVICES,
    assert_model_error,
    assert_output_and_grads_rule,
    build,
    forward_backward,
    padding_mask,
    random_ids,
    transformers,
)

import fast_attn.integrations.transformers as integration
import fast_attn.integrations.transformers_paged as transformers_paged
from fast_attn.reference import reference_attention
from fast_attn.varlen import varlen_attention

masking_utils = pytest.importorskip("transformers.masking_utils")


@pytest.fixture
def attention_calls(monkeypatch):
    """Every fast_attn.attention call the integration makes: the arguments it passed."""
    calls = []
    real_attention = integration.attention

    def spy(q, k, v, **kwargs):
        calls.append({"q": q, "k": k, **kwargs})
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "attention", spy)
    return calls


def assert_matches_eager(kind, call, weights, dtype, device, **overrides):
    """fast_attn vs eager (same dtype) vs eager float64 on outputs and every parameter gradient."""
    results = {}
    for key, implementation, run_dtype in (
        ("ours", "fast_attn", dtype),
        ("same", "eager", dtype),
        ("float64", "eager", torch.float64),
    ):
        model = build(kind, implementation, dtype=run_dtype, device=device, **overrides).train()
        results[key] = forward_backward(model, call, weights)
    assert_output_and_grads_rule(
        "logits", results["ours"], results["same"], results["float64"], weights, dtype
    )


def test_register_is_idempotent_and_registers_both_functions():
    assert integration.register() == integration.register() == "fast_attn"
    assert transformers.AttentionInterface._global_mapping["fast_attn"] is integration.attention_forward
    assert (
        masking_utils.AttentionMaskInterface._global_mapping["fast_attn"] is integration.build_attention_mask
    )


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_gpt2_training_matches_eager(dtype, device):
    ids = random_ids(3, 10, device)
    mask = padding_mask(3, 10, {0: 3, 2: 1}, left=True, device=device)
    weights = torch.randn(3, 10, 97, device=device) * mask[..., None]  # padded rows see no key: not compared
    assert_matches_eager("gpt2", lambda m: m(ids, attention_mask=mask).logits, weights, dtype, device)


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_bert_with_padding_training_matches_eager(dtype, device):
    ids = random_ids(3, 12, device)
    mask = padding_mask(3, 12, {1: 5, 2: 2}, left=False, device=device)
    weights = torch.randn(3, 12, 64, device=device)
    assert_matches_eager(
        "bert", lambda m: m(ids, attention_mask=mask).last_hidden_state, weights, dtype, device
    )


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_t5_encoder_decoder_cross_training_matches_eager(dtype, device):
    ids, decoder_ids = random_ids(2, 11, device), random_ids(2, 6, device)
    mask = padding_mask(2, 11, {0: 4}, left=False, device=device)
    decoder_mask = padding_mask(2, 6, {1: 2}, left=False, device=device)
    weights = torch.randn(2, 6, 97, device=device)

    def call(model):
        return model(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=decoder_mask,
        ).logits

    # Includes the gradient of both relative_attention_bias embeddings (through position_bias).
    assert_matches_eager("t5", call, weights, dtype, device)


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_llama_gqa_training_matches_eager(dtype, device):
    ids = random_ids(2, 9, device)
    mask = padding_mask(2, 9, {1: 2}, left=True, device=device)
    weights = torch.randn(2, 9, 97, device=device) * mask[..., None]
    assert_matches_eager("llama", lambda m: m(ids, attention_mask=mask).logits, weights, dtype, device)


def test_llama_passes_kv_heads_unexpanded(attention_calls):
    model = build("llama", "fast_attn")
    model(random_ids(2, 7))
    assert attention_calls and all(c["q"].shape[1] == 4 and c["k"].shape[1] == 2 for c in attention_calls)


def test_bert_padding_reaches_kernel_as_key_mask(attention_calls):
    model = build("bert", "fast_attn")
    mask = padding_mask(2, 8, {1: 3}, left=False)
    model(random_ids(2, 8), attention_mask=mask)
    assert len(attention_calls) == 2
    for call in attention_calls:
        assert call["bias"] is None and call["causal"] is False
        assert torch.equal(call["key_mask"], mask.bool())


def test_gpt2_padding_reaches_kernel_as_key_mask_with_causal(attention_calls):
    model = build("gpt2", "fast_attn")
    mask = padding_mask(2, 8, {0: 3}, left=True)
    model(random_ids(2, 8), attention_mask=mask)
    assert attention_calls
    for call in attention_calls:
        assert call["bias"] is None and call["causal"] == "bottom_right"
        assert torch.equal(call["key_mask"], mask.bool())
    attention_calls.clear()
    model(random_ids(2, 8))  # no padding: no mask at all, the kernel's causal mask only
    assert attention_calls and all(
        c["key_mask"] is None and c["bias"] is None and c["causal"] == "top_left" for c in attention_calls
    )


def test_t5_position_bias_is_a_bias_and_padding_a_key_mask(attention_calls):
    model = build("t5", "fast_attn").train()
    mask = padding_mask(2, 9, {1: 4}, left=False)
    model(input_ids=random_ids(2, 9), attention_mask=mask, decoder_input_ids=random_ids(2, 5))
    encoder_calls, decoder_calls = attention_calls[:2], attention_calls[2:]
    assert len(encoder_calls) == 2 and len(decoder_calls) == 4  # 2 layers each; decoder: self, cross
    for call in encoder_calls:
        assert tuple(call["bias"].shape) == (1, 4, 9, 9) and call["bias"].requires_grad
        assert torch.equal(call["key_mask"], mask.bool()) and call["scale"] == 1.0
    self_calls, cross_calls = decoder_calls[0::2], decoder_calls[1::2]
    assert all(c["causal"] == "top_left" and c["key_mask"] is None for c in self_calls)
    assert all(torch.equal(c["key_mask"], mask.bool()) and c["causal"] is False for c in cross_calls)


def test_gpt2_generate_matches_eager_with_kv_cache(attention_calls):
    ids = random_ids(3, 6)
    mask = padding_mask(3, 6, {0: 2, 1: 1}, left=True)
    expected = build("gpt2", "eager").generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    tokens = build("gpt2", "fast_attn").generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert len(set(expected[:, 6:].flatten().tolist())) > 3, "degenerate generation tests nothing"
    assert torch.equal(tokens, expected)
    decode_steps = [c for c in attention_calls if c["q"].shape[2] == 1]
    assert decode_steps and all(c["k"].shape[2] > 6 and c["key_mask"] is not None for c in decode_steps)


def test_t5_generate_matches_eager_with_kv_cache():
    ids = random_ids(3, 9)
    mask = padding_mask(3, 9, {1: 3}, left=False)
    expected = build("t5", "eager", untie_lm_head=True).generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False
    )
    tokens = build("t5", "fast_attn", untie_lm_head=True).generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False
    )
    assert len(set(expected[:, 1:].flatten().tolist())) > 3, "degenerate generation tests nothing"
    assert torch.equal(tokens, expected)


def decode_logits(model, ids, mask, new_tokens, **kwargs):
    """Greedy generate with the KV cache; the tokens and the logits of every decoding step (B, new, V)."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_gpt2_kv_cache_decoding_logits_match_eager(dtype, device):
    """fast_attn's prefill + cached decode steps against eager's full forward over the same tokens."""
    ids = random_ids(3, 7, device)
    mask = padding_mask(3, 7, {0: 3, 1: 1}, left=True, device=device)
    tokens, step_logits = decode_logits(build("gpt2", "fast_attn", dtype=dtype, device=device), ids, mask, 8)
    full_mask = torch.cat([mask, mask.new_ones(3, 8)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() uses for left padding
    expected = {}
    for key, run_dtype in (("same", dtype), ("float64", torch.float64)):
        model = build("gpt2", "eager", dtype=run_dtype, device=device)
        with torch.no_grad():
            logits = model(tokens, attention_mask=full_mask, position_ids=positions).logits
        expected[key] = logits[:, 6:-1]  # the predictions of the 8 generated tokens
    assert_model_error("decode logits", step_logits, expected["same"], expected["float64"], dtype)


@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_t5_kv_cache_decoding_logits_match_eager(dtype, device):
    ids = random_ids(2, 9, device)
    mask = padding_mask(2, 9, {1: 3}, left=False, device=device)
    model = build("t5", "fast_attn", dtype=dtype, device=device, untie_lm_head=True)
    tokens, step_logits = decode_logits(model, ids, mask, 8)
    expected = {}
    for key, run_dtype in (("same", dtype), ("float64", torch.float64)):
        eager = build("t5", "eager", dtype=run_dtype, device=device, untie_lm_head=True)
        with torch.no_grad():
            expected[key] = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens[:, :-1]).logits
    assert_model_error("decode logits", step_logits, expected["same"], expected["float64"], dtype)


def test_dropout_reaches_the_kernel_in_training_only(attention_calls):
    model = build("bert", "fast_attn", attention_probs_dropout_prob=0.25)
    ids = random_ids(2, 8)
    model.train()(ids)
    assert attention_calls and all(c["dropout_p"] == 0.25 for c in attention_calls)
    attention_calls.clear()
    model.eval()(ids)
    assert attention_calls and all(c["dropout_p"] == 0.0 for c in attention_calls)


class NamedAttention(torch.nn.Module):
    """Stands for a model's attention layer: the refusals name its class."""


def test_an_argument_never_seen_is_refused_naming_model_and_argument():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"NamedAttention.*'never_seen_before'.*1\.5"):
        integration.attention_forward(NamedAttention(), q, q, q, None, never_seen_before=1.5)
    # None means "not given", and the documented result-neutral arguments pass.
    out, _ = integration.attention_forward(
        NamedAttention(),
        q,
        q,
        q,
        None,
        never_seen_before=None,
        position_ids=torch.arange(3)[None],
        use_cache=True,
    )
    expected, _ = reference_attention(q, q, q, causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=2e-5)


# Models whose attention carries a window, softcap or sinks (small configs, window 4 < sequence length),
# with the overrides that make each layer type appear.
MODERN_MODELS = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 1},
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 1.0, "query_pre_attn_scalar": 16},
    "gemma3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "gpt_oss": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "starcoder2": {"sliding_window": 4},
    "phi3": {"sliding_window": 4},
}
SHARPEN = 3.0  # q/k scale: softcap and sinks change the logits (test_the_modifiers_matter)


@pytest.mark.parametrize("kind", list(MODERN_MODELS))
def test_modern_models_training_match_eager(kind):
    ids = random_ids(2, 12)
    mask = padding_mask(2, 12, {1: 3}, left=True)
    weights = torch.randn(2, 12, 97) * mask[..., None]
    assert_matches_eager(
        kind,
        lambda m: m(ids, attention_mask=mask).logits,
        weights,
        torch.float32,
        "cpu",
        sharpen=SHARPEN,
        **MODERN_MODELS[kind],
    )


def test_modernbert_local_attention_training_matches_eager():
    ids = random_ids(2, 13)
    mask = padding_mask(2, 13, {0: 4}, left=False)
    # The last padded rows' windows hold padding alone: rows that see no key are not compared.
    weights = torch.randn(2, 13, 64) * mask[..., None]
    assert_matches_eager(
        "modernbert", lambda m: m(ids, attention_mask=mask).last_hidden_state, weights, torch.float32, "cpu"
    )


@pytest.mark.parametrize("kind,change", [("gemma2", {"attn_logit_softcapping": None}), ("gpt_oss", "sinks")])
def test_the_modifiers_matter(kind, change):
    """Without the softcap (or with sinks at -inf) eager's logits move: the tests above would see a dropped one."""
    ids = random_ids(2, 12)
    overrides = dict(MODERN_MODELS[kind])
    with torch.no_grad():
        reference = build(kind, "eager", sharpen=SHARPEN, **overrides)(ids).logits
        if change == "sinks":
            model = build(kind, "eager", sharpen=SHARPEN, **overrides)
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-torch.inf)
        else:
            model = build(kind, "eager", sharpen=SHARPEN, **{**overrides, **change})
        changed = model(ids).logits
    assert (changed - reference).abs().max() > 0.05 * reference.abs().max()


def run_continuous_batching(model, prompts: list[list[int]], new_tokens: int, monkeypatch) -> list[list[int]]:
    """Greedy transformers.generate_batch (continuous batching, a paged cache of 16-token pages) on the CPU:
    each prompt's generated tokens. transformers sizes the paged cache from the GPU's free memory, which
    a CPU reports as 0: the cache is given a budget instead."""
    continuous_batching = pytest.importorskip("transformers.generation.continuous_batching.cache")
    if "paged|sdpa" not in transformers.AttentionInterface._global_mapping:
        pytest.skip(
            "this transformers accepts only eager, sdpa and flash implementations in continuous batching"
        )
    monkeypatch.setattr(
        continuous_batching.PagedAttentionMemoryHandler, "get_available_memory", lambda self: 1 << 30
    )
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    batching = transformers.ContinuousBatchingConfig(
        page_size=16, num_blocks=16, max_batch_tokens=64, use_cuda_graph=False
    )
    with torch.random.fork_rng(devices=[]):  # generate_batch seeds the global generator
        outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
    return [outputs[f"req_{i}"].generated_tokens for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_continuous_batching_generates_like_eager(kind, monkeypatch):
    # Requests of different lengths share each forward (chunks of prefill and decoding steps packed
    # in one row): "paged|fast_attn" stores their keys in the paged cache and attends per request.
    config = {**MODERN_MODELS[kind], "tie_word_embeddings": False}
    eager = build(kind, "eager", sharpen=SHARPEN, **config)
    model = build(kind, "fast_attn", sharpen=SHARPEN, **config)
    prompts = [random_ids(1, length)[0].tolist() for length in (5, 9, 3)]
    expected = [
        eager.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()
        for prompt in prompts
    ]
    assert len({token for tokens in expected for token in tokens}) > 3, "degenerate generation tests nothing"
    calls = []

    def counted_varlen_attention(*args, **kwargs):
        calls.append(kwargs["causal"])
        return varlen_attention(*args, **kwargs)

    monkeypatch.setattr(transformers_paged, "varlen_attention", counted_varlen_attention)
    assert run_continuous_batching(model, prompts, 6, monkeypatch) == expected
    assert calls and set(calls) == {"bottom_right"}


def test_paged_fast_attn_outside_continuous_batching():
    ids = random_ids(1, 4)
    model = build("mistral", "fast_attn")
    with torch.no_grad():
        expected = model(ids).logits
    model.set_attn_implementation("paged|fast_attn")
    if model.config._attn_implementation == "fast_attn":
        # Later releases drop the "paged|" prefix of a requested implementation (5.23 warns that it is
        # no longer needed): the model then runs the ordinary "fast_attn" function, with its results.
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
        return
    with pytest.raises(
        ValueError, match="'paged\\|fast_attn' runs only under transformers' continuous batching"
    ):
        model(ids)


def test_static_cache_generation_compiled_matches_eager():
    # transformers' StaticCache (keys of the preallocated length, unfilled ones masked) with the
    # model's forward compiled whole: prefill and decoding steps run fast_attn's ops in the graph.
    ids = random_ids(2, 7)
    mask = padding_mask(2, 7, {0: 2}, left=True)
    arguments = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    config = {**MODERN_MODELS["mistral"], "tie_word_embeddings": False}
    expected = build("mistral", "eager", **config).generate(ids, **arguments)
    model = build("mistral", "fast_attn", **config)
    model.forward = torch.compile(model.forward, fullgraph=True)
    tokens = model.generate(ids, **arguments, cache_implementation="static")
    assert len(set(expected[:, 7:].flatten().tolist())) > 3, "degenerate generation tests nothing"
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss", "qwen2", "gemma3"])
def test_modern_models_generate_like_eager(kind, attention_calls):
    ids = random_ids(3, 7)
    mask = padding_mask(3, 7, {0: 2, 1: 1}, left=True)
    arguments = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False}
    # An LM head of its own: tied to the embedding, a random model predicts the token it was fed.
    config = {**MODERN_MODELS[kind], "tie_word_embeddings": False}
    expected = build(kind, "eager", sharpen=SHARPEN, **config).generate(ids, **arguments)
    tokens = build(kind, "fast_attn", sharpen=SHARPEN, **config).generate(ids, **arguments)
    assert len(set(expected[:, 7:].flatten().tolist())) > 3, "degenerate generation tests nothing"
    assert torch.equal(tokens, expected)
    # The window reaches the kernel as window_size: no (Sq, Sk) mask is built, in prefill or decoding.
    windowed = [c for c in attention_calls if c["window_size"] is not None]
    assert windowed and all(c["bias"] is None for c in attention_calls)
    assert any(c["q"].shape[2] == 1 for c in windowed)


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss", "modernbert"])
def test_modifiers_reach_the_kernel_without_a_mask_tensor(kind, attention_calls):
    model = build(kind, "fast_attn", **MODERN_MODELS.get(kind, {}))
    length = 12
    mask = padding_mask(2, length, {1: 3}, left=kind != "modernbert")
    model(random_ids(2, length), attention_mask=mask)
    assert attention_calls and all(c["bias"] is None for c in attention_calls)
    assert all(torch.equal(c["key_mask"], mask.bool()) for c in attention_calls)
    windows = {c["window_size"] for c in attention_calls}
    # ModernBERT's local layers see |i - j| <= local_attention // 2 = 2.
    assert windows == {None, (2, 2) if kind == "modernbert" else (3, 3)}
    if kind == "gemma2":
        assert all(c["softcap"] == 1.0 for c in attention_calls)
    if kind == "gpt_oss":
        assert all(
            c["sinks"] is layer.self_attn.sinks for c, layer in zip(attention_calls, model.model.layers)
        )


def test_a_model_computing_attention_itself_is_refused():
    # Bloom adds the mask it is given to its scores itself: fast_attn's compact masks would lose causality.
    model = build("bloom", "fast_attn")
    with pytest.raises(ValueError, match="BloomModel computes attention in its own code"):
        model(random_ids(2, 6))


# Models whose layers say is_causal=False while they attend through causal masks, and how to call them.
# transformers runs BigBirdPegasus only eagerly (no SDPA, no flash path); it runs PegasusX's decoder and
# VideoPrism's text model on flash attention, which reads their wrong is_causal, but not on SDPA.
MODELS_CAUSAL_BY_MASK_ALONE = {
    "bigbird_pegasus": lambda ids, mask: lambda m: m(ids, attention_mask=mask).logits,
    "pegasus_x": lambda ids, mask: (
        lambda m: m(ids.flip(1), decoder_input_ids=ids, decoder_attention_mask=mask).logits
    ),
    "videoprism_text": lambda ids, mask: lambda m: m(ids, attention_mask=mask).last_hidden_state,
}


@pytest.mark.parametrize("padding", [{}, {1: 2}], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("kind", sorted(MODELS_CAUSAL_BY_MASK_ALONE))
@pytest.mark.parametrize("dtype,device", DTYPES_DEVICES)
def test_a_model_whose_layers_are_not_declared_causal_gets_its_causality_from_the_mask(
    dtype, device, kind, padding
):
    ids = random_ids(2, 9, device)
    mask = padding_mask(2, 9, padding, left=True, device=device)
    call = MODELS_CAUSAL_BY_MASK_ALONE[kind](ids, mask)
    rows, width = call(build(kind, "eager", device=device)).shape[1:]  # VideoPrism appends a class token
    real = torch.nn.functional.pad(mask, (0, rows - 9), value=1)  # padded rows see no key: not compared
    weights = torch.randn(2, rows, width, device=device) * real[..., None]
    assert_matches_eager(kind, call, weights, dtype, device)


def test_a_decoder_family_without_a_base_model_computing_attention_itself_is_refused():
    # TrOCR is a decoder alone (no base model class to look up) that adds its mask to its scores itself.
    integration.register()
    config = transformers.TrOCRConfig(
        vocab_size=97, d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fast_attn")
    with pytest.raises(ValueError, match="TrOCRPreTrainedModel computes attention in its own code"):
        model(random_ids(2, 6))


def test_per_row_sinks_are_the_sinks_of_their_rows():
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    sinks = torch.randn(2, 4, 5, 1)
    out, _ = integration.attention_forward(module, q, k, v, None, sinks=sinks)
    expected, _ = reference_attention(q, k, v, causal=True, sinks=sinks[..., 0])
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=2e-5)
    with pytest.raises(
        ValueError, match=r"Module: fast_attn takes sinks of one logit per query row.*\(2, 4, 5\)"
    ):
        integration.attention_forward(module, q, k, v, None, sinks=sinks[..., 0])
    with pytest.raises(ValueError, match="and not with s_aux"):
        integration.attention_forward(module, q, k, v, None, sinks=sinks, s_aux=torch.zeros(4))


def test_output_attentions_warns():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 8)
    with pytest.warns(UserWarning, match="attention weights"):
        out, weights = integration.attention_forward(module, q, q, q, None, output_attentions=True)
    assert weights is None and out.shape == (1, 3, 2, 8)


@pytest.mark.parametrize(
    "module_causal,call_causal", [(True, None), (False, None), (True, False), (False, True)]
)
def test_causality_without_mask_follows_the_call_then_the_module(module_causal, call_causal):
    module = torch.nn.Module()
    module.is_causal = module_causal
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _ = integration.attention_forward(module, q, k, v, None, is_causal=call_causal)
    causal = module_causal if call_causal is None else call_causal
    expected, _ = reference_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=2e-5)


def test_custom_float_mask_is_added_like_eager():
    module = torch.nn.Module()
    module.is_causal = True  # a given mask replaces the module's causality, as in eager and SDPA
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.randn(2, 1, 5, 7)
    out, _ = integration.attention_forward(module, q, k, v, mask, scaling=0.3)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + mask, dim=-1) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-6, rtol=2e-5)


MASK_CASES = {
    # name: (causal, q_length, kv_length, q_offset, left padding per row)
    "causal-prefill": (True, 6, 6, 0, (0, 2)),
    "causal-prefill-no-padding": (True, 6, 6, 0, (0, 0)),
    "causal-decode-step": (True, 1, 9, 8, (3, 0)),
    "causal-chunked-prefill": (True, 3, 9, 6, (0, 4)),
    "causal-chunked-no-padding": (True, 3, 9, 6, (0, 0)),
    "causal-static-cache-prefill": (True, 4, 10, 0, (1, 0)),
    "bidirectional": (False, 5, 5, 0, (0, 2)),
    "bidirectional-no-padding": (False, 5, 5, 0, (0, 0)),
}


@pytest.mark.parametrize("case", list(MASK_CASES), ids=list(MASK_CASES))
@pytest.mark.parametrize("allow_skip", [True, False])
def test_mask_conventions_mean_what_transformers_masks_mean(case, allow_skip):
    """attention_forward with our mask == plain attention with the full mask transformers' sdpa_mask builds."""
    causal, q_length, kv_length, q_offset, pads = MASK_CASES[case]
    batch = len(pads)
    padding = padding_mask(batch, q_offset + q_length, dict(enumerate(pads)), left=True)
    mask_function = (
        masking_utils.causal_mask_function if causal else masking_utils.bidirectional_mask_function
    )
    arguments = {
        "batch_size": batch,
        "q_length": q_length,
        "kv_length": kv_length,
        "q_offset": q_offset,
        "kv_offset": 0,
        "mask_function": mask_function,
        "attention_mask": padding.bool() if any(pads) else None,
    }
    skip = {"allow_is_causal_skip": allow_skip, "allow_is_bidirectional_skip": allow_skip}
    ours_mask = integration.build_attention_mask(**arguments, **skip)
    full_mask = masking_utils.sdpa_mask(
        **arguments, allow_is_causal_skip=False
    )  # (B, 1, Sq, Sk), True = attend

    module = torch.nn.Module()
    module.is_causal = causal
    q = torch.randn(batch, 4, q_length, 8, dtype=torch.float64)
    k, v = (
        torch.randn(batch, 2, kv_length, 8, dtype=torch.float64),
        torch.randn(batch, 2, kv_length, 8, dtype=torch.float64),
    )
    out, _ = integration.attention_forward(module, q, k, v, ours_mask)
    expected, _ = reference_attention(
        q, k, v, key_mask=None, bias=torch.zeros(()).double().masked_fill(~full_mask, float("-inf"))
    )
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_mask_function_returns_key_padding_views_not_patterns():
    padding = padding_mask(2, 9, {1: 3}, left=True).bool()
    causal = integration.build_attention_mask(
        batch_size=2,
        q_length=3,
        kv_length=9,
        q_offset=6,
        mask_function=masking_utils.causal_mask_function,
        attention_mask=padding,
    )
    assert tuple(causal.shape) == (2, 1, 1, 9)
    bidirectional = integration.build_attention_mask(
        batch_size=2,
        q_length=5,
        kv_length=9,
        mask_function=masking_utils.bidirectional_mask_function,
        attention_mask=padding,
        allow_is_bidirectional_skip=True,
    )
    assert tuple(bidirectional.shape) == (2, 1, 5, 9) and bidirectional.stride(2) == 0


def test_sliding_windows_become_key_padding_and_other_patterns_fall_back_to_transformers_masks():
    padding = padding_mask(2, 8, {0: 2}, left=True).bool()
    arguments = {"batch_size": 2, "q_length": 8, "kv_length": 8, "attention_mask": padding}
    window = masking_utils.sliding_window_causal_mask_function(3)
    ours = integration.build_attention_mask(mask_function=window, local_size=3, **arguments)
    assert torch.equal(ours, padding[:, None, None, :])  # the attention function applies the window
    # A window combined with another pattern (here: documents of a packed sequence) is not a plain window.
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    packed = masking_utils.and_masks(window, masking_utils.packed_sequence_mask_function(documents))
    ours = integration.build_attention_mask(mask_function=packed, local_size=3, **arguments)
    theirs = masking_utils.sdpa_mask(mask_function=packed, local_size=3, **arguments)
    assert torch.equal(ours, theirs) and tuple(ours.shape) == (2, 1, 8, 8)
    # A window of another size than the layer's is not the layer's window either.
    other = masking_utils.sliding_window_causal_mask_function(4)
    ours = integration.build_attention_mask(mask_function=other, local_size=3, **arguments)
    assert tuple(ours.shape) == (2, 1, 8, 8)


# Packed batches: documents laid end to end in one row, position_ids restarting at each.
PACKED_LENGTHS = (5, 1, 9, 4)
PACKED_MODELS = {"llama": {}, "qwen2": MODERN_MODELS["qwen2"], "mistral": MODERN_MODELS["mistral"]}


def packed_batch(lengths=PACKED_LENGTHS):
    ids = random_ids(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, position_ids, offsets


def per_document_with_grads(model, ids, offsets, weights):
    """Each document through `model` alone: its logits laid end to end, and the parameter gradients
    of the summed weighted losses."""
    model.zero_grad(set_to_none=True)
    logits = []
    for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        out = model(ids[:, begin:end]).logits
        (out * weights[:, begin:end].to(out.dtype)).sum().backward()
        logits.append(out.detach())
    return torch.cat(logits, dim=1), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("route", ["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("kind", list(PACKED_MODELS))
def test_packed_documents_get_what_they_get_alone(kind, route, monkeypatch):
    """A packed batch gives each document the logits and gradients eager gives it alone, through
    varlen_attention, without any (T, T) mask."""
    ids, position_ids, offsets = packed_batch()
    kwargs = {"position_ids": position_ids}
    if route == "flash_kwargs":  # what DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds
        longest = max(PACKED_LENGTHS)
        kwargs |= dict(
            cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest
        )
    weights = torch.randn(1, ids.shape[1], 97)
    overrides = PACKED_MODELS[kind]
    varlen_calls = []
    real_varlen = integration.varlen_attention
    monkeypatch.setattr(
        integration, "varlen_attention", lambda *a, **k: varlen_calls.append(1) or real_varlen(*a, **k)
    )
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: pytest.fail("a (T, T) mask was built"))

    model = build(kind, "fast_attn", **overrides).train()
    ours = forward_backward(model, lambda m: m(ids, **kwargs).logits, weights)
    assert varlen_calls, "the packed batch did not reach varlen_attention"
    monkeypatch.undo()
    same = per_document_with_grads(build(kind, "eager", **overrides).train(), ids, offsets, weights)
    exact = per_document_with_grads(
        build(kind, "eager", dtype=torch.float64, **overrides).train(), ids, offsets, weights
    )
    assert_output_and_grads_rule("logits", ours, same, exact, weights, torch.float32)
