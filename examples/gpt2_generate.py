"""Greedy generation with a small GPT-2 on fast_attn gives eager attention's tokens.

    python examples/gpt2_generate.py [--new-tokens 48]

A random GPT-2 (no download) generates from a left-padded batch three ways:
transformers with attn_implementation="eager", the same model switched in
place with fast_attn.swap_attention (prefill and every KV-cache step run on
fast_attn, padding passed as a key mask), and fast_attn.models.GPT loaded from
its weights (its own KV cache). All three must produce the same tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from greedy_generation import check_same_tokens, parse_new_tokens
from random_models import gpt2_config, random_model

from fast_attn.models import GPT


def main() -> None:
    new_tokens = parse_new_tokens(__doc__, default=48)

    config = gpt2_config()
    eager = random_model(transformers.AutoModelForCausalLM, config, "eager").eval()
    ours = GPT.from_hf(eager).eval()

    prompts = torch.randint(1, config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(prompts)
    attention_mask[0, :5] = 0  # left padding, as batched generation uses
    attention_mask[2, :2] = 0
    prompts = prompts * attention_mask

    check_same_tokens(
        eager, ours, "fast_attn.models.GPT", prompts, attention_mask, new_tokens, prompts.shape[1]
    )


if __name__ == "__main__":
    main()
