"""Tiny transformers models (GPT-2, BERT, T5) built from random configs, and the
error rule the model tests hold fast_attn to.

The rule is fast_attn.testing's error rule with a factor of 3 instead of 2 (a
model stacks many attention calls and other layers): a result's max error
against transformers' eager run in float64 is at most 3x the error of
transformers' own eager run in the same dtype, plus a floor.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fast_attn.testing import ERROR_FLOOR, assert_error_rule, max_abs_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MODEL_ERROR_FACTOR = 3.0

# (dtype, device) of the model checks: float32 and bf16 on the CPU (CI), bf16 and fp16 on a GPU (marker
# `gpu`). float32 stays on the CPU even where a GPU exists: GPU kernels may compute float32 dots in TF32,
# which the float32 error rule (against float32 eager) is not meant for.
DTYPES_DEVICES = [
    pytest.param(torch.float32, "cpu", id="float32-cpu"),
    pytest.param(torch.bfloat16, "cpu", id="bfloat16-cpu"),
    pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu, id="bfloat16-cuda"),
    pytest.param(torch.float16, "cuda", marks=pytest.mark.gpu, id="float16-cuda"),
]

VOCAB = 97


def gpt2_config(**overrides):
    # initializer_range well above GPT-2's 0.02 so that greedy decoding of a random
    # model does not collapse to one repeated token (the generation tests compare tokens).
    defaults = {
        "vocab_size": VOCAB,
        "n_positions": 64,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.2,
        "bos_token_id": 0,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    return transformers.GPT2Config(**(defaults | overrides))


def bert_config(**overrides):
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.2,
        "pad_token_id": 0,
    }
    return transformers.BertConfig(**(defaults | overrides))


def t5_config(**overrides):
    # T5 v1.1's gated GELU by default: the ReLU of the original T5 makes gradients jump wherever a
    # pre-activation crosses 0, so half-precision rounding alone can move them far (see test_models).
    defaults = {
        "vocab_size": VOCAB,
        "d_model": 64,
        "d_kv": 16,
        "num_heads": 4,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20,
        "dropout_rate": 0.0,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    return transformers.T5Config(**(defaults | overrides))


def decoder_config(config_class: str, **overrides):
    """A small decoder of Llama or a Llama-like family (Mistral, Gemma 2, gpt-oss, ...), with
    grouped-query attention: 4 query heads share 2 key/value heads."""
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    return getattr(transformers, config_class)(**(defaults | overrides))


def modernbert_config(**overrides):
    # local_attention 4: a window of 2 keys on each side in the local layers; every other layer global.
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "local_attention": 4,
        "global_attn_every_n_layers": 2,
        "initializer_range": 0.2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "cls_token_id": 1,
        "sep_token_id": 2,
    }
    return transformers.ModernBertConfig(**(defaults | overrides))


def bigbird_pegasus_config(**overrides):
    # Its causal LM is the decoder alone; the encoder's block-sparse attention is not built.
    defaults = {
        "vocab_size": VOCAB,
        "d_model": 64,
        "decoder_layers": 2,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 64,
        "init_std": 0.2,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
    }
    return transformers.BigBirdPegasusConfig(**(defaults | overrides))


def pegasus_x_config(**overrides):
    # The encoder's global-local attention is its own code; the decoder's layers call the attention function.
    defaults = {
        "vocab_size": VOCAB,
        "d_model": 64,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "block_size": 4,
        "num_global_tokens": 2,
        "max_position_embeddings": 64,
        "init_std": 0.2,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
    }
    return transformers.PegasusXConfig(**(defaults | overrides))


def videoprism_text_config(**overrides):
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "initializer_range": 0.2,
    }
    return transformers.VideoPrismTextConfig(**(defaults | overrides))


def bloom_config(**overrides):
    defaults = {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4, "pad_token_id": 0}
    return transformers.BloomConfig(**(defaults | overrides))


AUTO_CLASSES = {
    "gpt2": "AutoModelForCausalLM",
    "bert": "AutoModel",
    "t5": "AutoModelForSeq2SeqLM",
    "llama": "AutoModelForCausalLM",
    "mistral": "AutoModelForCausalLM",
    "gemma2": "AutoModelForCausalLM",
    "gpt_oss": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "gemma3": "AutoModelForCausalLM",
    "starcoder2": "AutoModelForCausalLM",
    "phi3": "AutoModelForCausalLM",
    "modernbert": "AutoModel",
    "bloom": "AutoModelForCausalLM",
    "bigbird_pegasus": "AutoModelForCausalLM",
    "pegasus_x": "AutoModelForSeq2SeqLM",
    "videoprism_text": "VideoPrismTextModel",  # no auto class builds it from its config
}
CONFIGS = {
    "gpt2": gpt2_config,
    "bert": bert_config,
    "t5": t5_config,
    "llama": lambda **o: decoder_config("LlamaConfig", **o),
    "mistral": lambda **o: decoder_config("MistralConfig", **o),
    "gemma2": lambda **o: decoder_config("Gemma2Config", **o),
    "gpt_oss": lambda **o: decoder_config("GptOssConfig", num_local_experts=4, num_experts_per_tok=2, **o),
    "qwen2": lambda **o: decoder_config("Qwen2Config", **o),
    "gemma3": lambda **o: decoder_config("Gemma3TextConfig", **o),
    "starcoder2": lambda **o: decoder_config("Starcoder2Config", **o),
    "phi3": lambda **o: decoder_config("Phi3Config", **o),
    "modernbert": modernbert_config,
    "bloom": bloom_config,
    "bigbird_pegasus": bigbird_pegasus_config,
    "pegasus_x": pegasus_x_config,
    "videoprism_text": videoprism_text_config,
}


_TORCH_SOFTMAX = torch.nn.functional.softmax


def _softmax_keeping_float64(input, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None and input.dtype == torch.float64:
        dtype = torch.float64
    return _TORCH_SOFTMAX(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


def keep_softmax_in_float64(model: torch.nn.Module) -> None:
    """Make a float64 model's forward take its softmax in float64 where its code asks for float32.

    transformers' eager attention in most recent families (Llama and those built like it) takes its
    softmax with dtype=float32. In a float64 model that rounds the -1.8e308 of its masks to -inf, so a
    row that sees no key (a left-padded position) becomes NaN, which reaches the whole batch element
    through the next layer's values (0 * NaN); and it rounds every probability to float32. Either leaves
    the float64 reference without the float64 answer: NaN made every error bound infinite. Patched for
    the model's own forward only (hooks), as `F.softmax` is looked up at each call."""

    def enter(module, args):
        torch.nn.functional.softmax = _softmax_keeping_float64

    def leave(module, args, output):
        torch.nn.functional.softmax = _TORCH_SOFTMAX

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def build(
    kind: str,
    implementation: str,
    *,
    dtype=torch.float32,
    device="cpu",
    seed: int | None = None,
    untie_lm_head: bool = False,
    sharpen: float | None = None,
    **overrides,
):
    """A tiny transformers model of `kind` (a key of CONFIGS) with the given attention implementation.

    The weights depend only on `seed` (default: the seed the test started with, see conftest), so models
    built in one test with different implementations and dtypes hold the same weights (rounded to their
    dtype); building does not advance the test's random stream. untie_lm_head (T5) gives the LM head its
    own random weights: with the head tied to the embedding, a random T5 decoder predicts the token it was
    fed, so greedy decoding repeats one token and a generation test would compare little. sharpen scales
    the q/k projections (and draws the sinks) as sharpen_attention says.
    """
    if implementation == "fast_attn":
        from fast_attn.integrations.transformers import register

        register()
    auto = getattr(transformers, AUTO_CLASSES[kind])
    extra = {"add_pooling_layer": False} if kind == "bert" else {}
    if kind == "gpt_oss":
        extra["experts_implementation"] = "eager"  # the grouped-matmul experts refuse float64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() if seed is None else seed)
        from_config = auto.from_config if hasattr(auto, "from_config") else auto._from_config  # a model class
        model = from_config(CONFIGS[kind](**overrides), attn_implementation=implementation, **extra)
        if untie_lm_head:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        if sharpen is not None:
            sharpen_attention(model, sharpen)
    if dtype == torch.float64:
        keep_softmax_in_float64(model)
    return model.to(device=device, dtype=dtype)


def sharpen_attention(model, factor: float) -> None:
    """Scale every q and k projection by `factor` and draw the attention sinks (gpt-oss) from N(0, 2^2):
    random init keeps scores so small that softcap (tanh near 0 is the identity) and sinks (next to
    many keys of similar weight) barely change the result; this makes them matter."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_proj.", "k_proj.")):
                parameter.mul_(factor)
            elif name.endswith(".sinks"):
                parameter.copy_(torch.randn_like(parameter) * 2)


def random_ids(batch: int, length: int, device="cpu", generator=None) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=generator).to(device)


def padding_mask(batch: int, length: int, pads: dict[int, int], *, left: bool, device="cpu") -> torch.Tensor:
    """(B, S) int mask, 1 = real token; row b has pads[b] padding tokens on the left or the right."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, count in pads.items():
        if count:
            if left:
                mask[row, :count] = 0
            else:
                mask[row, length - count :] = 0
    return mask.to(device)


def assert_model_error(name: str, actual, eager_same_dtype, eager_float64, dtype) -> None:
    """The model error rule for one tensor (see module docstring)."""
    assert_error_rule(name, actual, eager_float64, eager_same_dtype, dtype, factor=MODEL_ERROR_FACTOR)


def assert_grads_rule(actual: dict, eager_same_dtype: dict, eager_float64: dict, dtype) -> None:
    """The rule for every parameter gradient, by transformers' parameter name."""
    assert set(actual) == set(eager_float64), sorted(set(actual) ^ set(eager_float64))
    grad_scale = max(float(g.abs().max()) for g in eager_float64.values())
    for name, exact in eager_float64.items():
        if float(exact.abs().max()) <= 1e-9 * grad_scale:
            # Identically zero: a key bias adds q.b to all of a query's scores, which softmax cancels. What
            # gets computed is the rounding noise of terms as large as the other gradients, so the floor
            # scales with those (the kernels' delta = rowsum(dO * O) uses the rounded output: more noise).
            ours_error = max_abs_error(actual[name], exact)
            bound = MODEL_ERROR_FACTOR * max(
                max_abs_error(eager_same_dtype[name], exact), ERROR_FLOOR[dtype] * grad_scale
            )
            assert math.isfinite(bound), f"grad {name} (exactly 0): eager's {dtype} gradient is not finite"
            assert ours_error <= bound, f"grad {name} (exactly 0): error {ours_error:.3e} > {bound:.3e}"
        else:
            assert_model_error(f"grad {name}", actual[name], eager_same_dtype[name], exact, dtype)


def forward_backward(model: torch.nn.Module, call, weights: torch.Tensor):
    """Output of call(model) and the gradient of sum(output * weights) for every parameter it reaches,
    by name (a parameter the call does not use, such as a decoder's cross-attention without an
    encoder, has none)."""
    model.zero_grad(set_to_none=True)
    out = call(model)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_output_and_grads_rule(name: str, ours: tuple, same: tuple, exact: tuple, weights, dtype) -> None:
    """The model error rule on the output `name` where `weights` (forward_backward's) are nonzero, and on
    every parameter gradient. ours, same (eager in dtype) and exact (eager in float64) are each
    (output, gradients by transformers' parameter name)."""
    visible = weights != 0
    assert_model_error(name, ours[0][visible], same[0][visible], exact[0][visible], dtype)
    assert_grads_rule(ours[1], same[1], exact[1], dtype)
