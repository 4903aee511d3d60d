"""Greedy generation with a small GPT-2 on fast_attn gives eager attention's tokens.

    python examples/gpt2_generate.py [--new-tokens 48]

A random GPT-2 (no download) generates from a left-padded batch three ways:
transformers with attn_implementation="eager", the same model switched in
place with fast_attn.swap_attention (prefill and every KV-cache step run on
fast_attn, padding passed as a key mask), and fast_attn.models.GPT loaded from
its weights (its own KV cache). All three must produce the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import fast_attn
from fast_attn.models import GPT


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    config = transformers.GPT2Config(
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
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    swapped = copy.deepcopy(eager)
    print(fast_attn.swap_attention(swapped))
    ours = GPT.from_hf(eager).eval()

    prompts = torch.randint(1, config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(prompts)
    attention_mask[0, :5] = 0  # left padding, as batched generation uses
    attention_mask[2, :2] = 0
    prompts = prompts * attention_mask

    greedy = {"attention_mask": attention_mask, "max_new_tokens": args.new_tokens, "do_sample": False}
    with torch.no_grad():
        expected, eager_s = timed(lambda: eager.generate(prompts, **greedy))
        tokens, swapped_s = timed(lambda: swapped.generate(prompts, **greedy))
    own, own_s = timed(lambda: ours.generate(prompts, args.new_tokens, attention_mask=attention_mask))

    new = slice(prompts.shape[1], None)
    for row in range(prompts.shape[0]):
        print(f"row {row}: {expected[row, new].tolist()}")
    print(f"transformers eager           {eager_s:6.2f} s")
    print(f"transformers + swap (fast_attn) {swapped_s:6.2f} s  same tokens: {torch.equal(tokens, expected)}")
    print(f"fast_attn.models.GPT         {own_s:6.2f} s  same tokens: {torch.equal(own, expected)}")
    if not (torch.equal(tokens, expected) and torch.equal(own, expected)):
        raise SystemExit("generated tokens differ from eager attention")


if __name__ == "__main__":
    main()
