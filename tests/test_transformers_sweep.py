"""Every causal LM family of the installed transformers, tiny and random, with attn_implementation="fast_attn":
the logits of eager attention, or fast_attn's ValueError naming the model or layer class and what it
refuses. Never a different answer in silence.

Slow (--run-slow; under a minute here for the ~180 families of transformers 5.18). It found
BigBirdPegasus, DeepSeek-V4, PhiMoE and TrOCR wrong; those four run on every run. A family that cannot
be built this small from its default config, or whose eager forward fails in float32 on CPU, is skipped
with the reason: it says nothing about fast_attn.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import fast_attn.integrations.transformers as integration

# Sizes under every name the families use for them; a config takes those it has. A sliding window of 5
# keys and 12 tokens make windowed layers differ from full ones.
TINY = {
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "decoder_layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "n_head": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "decoder_ffn_dim": 96,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "sliding_window": 5,
    "initializer_range": 0.2,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
}
BATCH, LENGTH, LEFT_PADDING = 2, 12, 3
MAX_PARAMETERS = 20_000_000  # a family with sizes TINY does not name stays large: not built


def tiny_config(model_type: str):
    config = transformers.AutoConfig.for_model(model_type)
    for name, value in TINY.items():
        attribute = getattr(type(config), name, None)
        read_only = isinstance(attribute, property) and attribute.fset is None  # derived from others
        if hasattr(config, name) and not read_only:
            setattr(config, name, value)
    layer_types = getattr(type(config), "layer_types", None)
    settable = not (isinstance(layer_types, property) and layer_types.fset is None)
    if settable and getattr(config, "layer_types", None) is not None:  # one layer of each kind the family has
        kinds = sorted(set(config.layer_types))
        config.layer_types = [kinds[i % len(kinds)] for i in range(config.num_hidden_layers)]
    return config


# What the sweep found silently wrong, fixed since: checked on every run.
FOUND_WRONG = ["bigbird_pegasus", "deepseek_v4", "phimoe", "trocr"]


@pytest.mark.parametrize("model_type", FOUND_WRONG)
def test_the_families_the_sweep_found_wrong(model_type):
    check_family(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_fast_attn_gives_eager_logits_or_refuses_naming_the_model(model_type):
    check_family(model_type)


def check_family(model_type: str) -> None:
    """A tiny random model of the family with fast_attn against eager: the same logits where a token is
    real, or a ValueError naming the model; skipped when the family cannot be built here."""
    integration.register()
    ids = torch.randint(3, 120, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, :LEFT_PADDING] = 0
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            shapes = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))
        parameters = sum(p.numel() for p in shapes.parameters())
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"{parameters} parameters: its config has sizes TINY does not name")
        torch.manual_seed(0)
        eager = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation="eager"
        )
        with torch.no_grad():
            expected = eager.eval()(input_ids=ids, attention_mask=mask).logits
    except Exception as error:  # a family this sweep cannot build: not fast_attn's
        pytest.skip(f"no tiny eager {model_type} here: {type(error).__name__}: {str(error)[:160]}")
    try:
        ours = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation="fast_attn"
        )
    except KeyError as error:  # a family that keys its own attention classes by implementation name
        pytest.skip(f"{model_type} cannot be built with a registered implementation: KeyError {error}")
    ours.load_state_dict(eager.state_dict())
    try:
        with torch.no_grad():
            logits = ours.eval()(input_ids=ids, attention_mask=mask).logits
    except ValueError as error:
        assert "fast_attn" in str(error), (
            f"{model_type}: a ValueError that is not fast_attn's refusal: {error}"
        )
        return
    real = mask.bool()  # padded positions see no key: eager's rows there are not defined alike
    scale = float(expected[real].abs().max())
    error = float((logits - expected)[real].abs().max())
    assert error <= 2e-4 * max(1.0, scale), (
        f"{model_type}: logits differ from eager's by {error:.3e} (scale {scale:.2e})"
    )
