"""Greedy generation with a small T5 on fast_attn gives eager attention's tokens.

    python examples/t5_generate.py [--new-tokens 32]

T5 is where swapping attention has traps: its relative position bias reaches
the attention function as a separate `position_bias` argument (fast_attn takes
it as a bias, with its gradient), attention is not scaled, and the encoder and
decoder stacks carry their own configs, which
`model.set_attn_implementation(...)` does not reach. fast_attn.swap_attention
switches all three. A random T5 (no download) then generates from a padded
batch three ways: eager, swapped to fast_attn (encoder, causal decoder with
its KV cache, cross-attention), and fast_attn.models.T5 loaded from its
weights. All three must produce the same tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from greedy_generation import check_same_tokens, parse_new_tokens
from random_models import random_model, t5_config

from fast_attn.models import T5


def main() -> None:
    new_tokens = parse_new_tokens(__doc__, default=32)

    config = t5_config()
    eager = random_model(transformers.AutoModelForSeq2SeqLM, config, "eager").eval()
    # A random LM head of its own: tied to the embedding, a random decoder tends to repeat its input token.
    eager.lm_head.weight = torch.nn.Parameter(torch.randn_like(eager.lm_head.weight))
    ours = T5.from_hf(eager).eval()

    inputs = torch.randint(1, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(inputs)
    attention_mask[1, 13:] = 0  # right padding on the encoder side
    inputs = inputs * attention_mask

    # Each output starts with the decoder start token.
    check_same_tokens(eager, ours, "fast_attn.models.T5", inputs, attention_mask, new_tokens, 1)


if __name__ == "__main__":
    main()
