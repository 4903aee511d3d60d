"""Every causal LM, sequence-to-sequence LM and masked LM family of the installed transformers, tiny and
random, with attn_implementation="fast_attn": eager attention's logits and parameter gradients of a
training step, and for causal LMs each greedy generation step's logits, or fast_attn's ValueError naming
the model or layer class and what it refuses. Never a different answer in silence.

Slow (--run-slow; about five minutes here on two workers for the ~260 families of transformers 5.18).
It found BigBirdPegasus, DeepSeek-V4, PhiMoE, TrOCR and PegasusX wrong; those run on every run. A family
that cannot be built this small from its default config, or whose eager run fails in float32 on CPU, is
skipped with the reason: it says nothing about fast_attn.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

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
    "encoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "n_head": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "decoder_ffn_dim": 96,
    "encoder_ffn_dim": 96,
    "d_ff": 96,
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
BATCH, LENGTH, PADDING, DECODER_LENGTH, NEW_TOKENS = 2, 12, 3, 7, 5
MAX_PARAMETERS = 20_000_000  # a family with sizes TINY does not name stays large: not built
RANDOM_IN_TRAINING = ("dropout", "pdrop", "layerdrop", "drop_path", "jitter")  # config names of random parts


def tiny_config(model_type: str):
    config = transformers.AutoConfig.for_model(model_type)
    for name, value in TINY.items():
        attribute = getattr(type(config), name, None)
        read_only = isinstance(attribute, property) and attribute.fset is None  # derived from others
        if hasattr(config, name) and not read_only:
            setattr(config, name, value)
    for name, value in list(vars(config).items()):  # training runs alike: no dropout, no router jitter
        if isinstance(value, float) and any(word in name for word in RANDOM_IN_TRAINING):
            setattr(config, name, 0.0)
    layer_types = getattr(type(config), "layer_types", None)
    settable = not (isinstance(layer_types, property) and layer_types.fset is None)
    if settable and getattr(config, "layer_types", None) is not None:  # one layer of each kind the family has
        kinds = sorted(set(config.layer_types))
        config.layer_types = [kinds[i % len(kinds)] for i in range(config.num_hidden_layers)]
    return config


# The auto class of each task, and the families it builds.
TASKS = {
    "causal": (transformers.AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "seq2seq": (transformers.AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    "masked": (transformers.AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES),
}
# What the sweep found silently wrong, fixed since: checked on every run.
FOUND_WRONG = [
    ("causal", "bigbird_pegasus"),
    ("causal", "deepseek_v4"),
    ("causal", "phimoe"),
    ("causal", "trocr"),
    ("seq2seq", "pegasus_x"),
]


@pytest.mark.parametrize("task,model_type", FOUND_WRONG)
def test_the_families_the_sweep_found_wrong(task, model_type):
    check_family(task, model_type)


@pytest.mark.skipif(
    "inkling2_text" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    reason=f"transformers {transformers.__version__} has no Inkling 2 (5.25 has; CI runs it there)",
)
def test_per_row_sinks_of_inkling2_reach_the_kernel(monkeypatch):
    """Inkling 2 hands its attention one sink logit per query row, (B, Hq, Sq, 1); it reaches
    fast_attn.attention as sinks (B, Hq, Sq), and the logits and gradients are eager's."""
    row_sinks = []
    real_attention = integration.attention

    def spy(q, k, v, **kwargs):
        sinks = kwargs.get("sinks")
        row_sinks.append(sinks is not None and tuple(sinks.shape) == tuple(q.shape[:3]))
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "attention", spy)
    check_family("causal", "inkling2_text")
    assert any(row_sinks), "no attention call of Inkling 2 took per-row sinks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,model_type", [(task, name) for task, (_, names) in TASKS.items() for name in sorted(names)]
)
def test_fast_attn_gives_eager_logits_and_gradients_or_refuses_naming_the_model(task, model_type):
    check_family(task, model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_fast_attn_generates_like_eager_or_refuses_naming_the_model(model_type):
    check_family("causal", model_type, greedy_steps)


def task_inputs(task: str) -> tuple[dict, torch.Tensor]:
    """The model's inputs, and where its logits are compared (B, S): a causal LM's prompts are padded on
    the left, an encoder's on the right, and a sequence-to-sequence model's decoder reads all its tokens."""
    ids = torch.randint(3, 120, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if task == "causal":
        mask[1, :PADDING] = 0
    else:
        mask[1, LENGTH - PADDING :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task != "seq2seq":
        return inputs, mask.bool()  # padded positions see no key: eager's rows there are not defined alike
    decoder_ids = torch.randint(3, 120, (BATCH, DECODER_LENGTH), generator=torch.Generator().manual_seed(1))
    return inputs | {"decoder_input_ids": decoder_ids}, torch.ones(BATCH, DECODER_LENGTH, dtype=torch.bool)


def training_step(task: str, model) -> list[tuple[str, torch.Tensor, None]]:
    """One training-mode forward and backward of sum(logits * weights) over the real tokens: the logits
    (N, V) and every parameter's gradient, flattened end to end in name order."""
    inputs, compared = task_inputs(task)
    logits = model.train()(**inputs).logits[compared]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    named = sorted((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
    gradients = torch.cat([grad.flatten() for _, grad in named])
    return [("logits", logits.detach(), None), ("parameter gradients", gradients, None)]


def greedy_steps(task: str, model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Greedy generation of NEW_TOKENS from the left-padded prompts, through the KV cache: each step's
    logits (B, V) and chosen tokens (B,)."""
    inputs, _ = task_inputs(task)
    with torch.no_grad():
        out = model.eval().generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    steps = zip(out.logits, out.sequences[:, LENGTH:].T)
    return [(f"step {step}'s logits", logits, tokens) for step, (logits, tokens) in enumerate(steps)]


def check_family(task: str, model_type: str, run=training_step) -> None:
    """A tiny random model of the family with fast_attn against eager: run's results alike, or a ValueError
    naming the model; skipped when the family cannot be built and run eagerly here. Generation steps are
    compared up to the first whose chosen tokens differ (a near tie; the steps after it read other tokens)."""
    integration.register()
    auto = TASKS[task][0]
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            shapes = auto.from_config(copy.deepcopy(config))
        parameters = sum(p.numel() for p in shapes.parameters())
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"{parameters} parameters: its config has sizes TINY does not name")
        torch.manual_seed(0)
        eager = auto.from_config(copy.deepcopy(config), attn_implementation="eager")
        expected = run(task, eager)
    except Exception as error:  # a family this sweep cannot build: not fast_attn's
        pytest.skip(f"no tiny eager {model_type} here: {type(error).__name__}: {str(error)[:160]}")
    try:
        ours = auto.from_config(copy.deepcopy(config), attn_implementation="fast_attn")
    except KeyError as error:  # a family that keys its own attention classes by implementation name
        pytest.skip(f"{model_type} cannot be built with a registered implementation: KeyError {error}")
    ours.load_state_dict(eager.state_dict())
    try:
        actual = run(task, ours)
    except ValueError as error:
        assert "fast_attn" in str(error), (
            f"{model_type}: a ValueError that is not fast_attn's refusal: {error}"
        )
        return
    assert len(actual) == len(expected)
    for (name, value, tokens), (_, eager_value, eager_tokens) in zip(actual, expected):
        scale = float(eager_value.abs().max())
        error = float((value - eager_value).abs().max())
        assert math.isfinite(scale), f"{model_type}: eager's {name} are not finite"
        assert error <= 2e-4 * max(1.0, scale), (
            f"{model_type}: {name} differ from eager's by {error:.3e} (scale {scale:.2e})"
        )
        if tokens is not None and not torch.equal(tokens, eager_tokens):
            break
