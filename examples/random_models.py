"""The small random transformers models the examples run (nothing to download): the config of
each, and the model built from seed 0, so that every run (and every rank) starts from the same
weights. The examples set HF_HUB_OFFLINE before importing it."""

from __future__ import annotations

import torch
import transformers


def random_model(auto_class, config, attn_implementation: str):
    """`auto_class`'s model of `config`, initialized from seed 0."""
    torch.manual_seed(0)
    return auto_class.from_config(config, attn_implementation=attn_implementation)


def bert_classifier_config(vocab_size: int, max_positions: int, pad_token_id: int):
    """A 2-layer BERT with a 2-label classification head, without dropout."""
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=pad_token_id,
    )


def llama_config(vocab_size: int):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), without dropout."""
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )


def gpt2_config():
    """A 4-layer GPT-2 with no end-of-sequence token: greedy generation runs every new token."""
    return transformers.GPT2Config(
        vocab_size=500,
        n_positions=256,
        n_embd=128,
        n_layer=4,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )


def t5_config():
    """A T5 v1.1 (gated GELU) of 3 + 3 layers with no end-of-sequence token."""
    return transformers.T5Config(
        vocab_size=500,
        d_model=128,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=3,
        num_decoder_layers=3,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=None,
    )
