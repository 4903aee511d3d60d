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

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import fast_attn
from fast_attn.models import T5


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    config = transformers.T5Config(
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
    torch.manual_seed(0)
    eager = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()
    # A random LM head of its own: tied to the embedding, a random decoder tends to repeat its input token.
    eager.lm_head.weight = torch.nn.Parameter(torch.randn_like(eager.lm_head.weight))
    swapped = copy.deepcopy(eager)
    print(fast_attn.swap_attention(swapped))
    ours = T5.from_hf(eager).eval()

    inputs = torch.randint(1, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(inputs)
    attention_mask[1, 13:] = 0  # right padding on the encoder side
    inputs = inputs * attention_mask

    greedy = {"attention_mask": attention_mask, "max_new_tokens": args.new_tokens, "do_sample": False}
    with torch.no_grad():
        expected, eager_s = timed(lambda: eager.generate(inputs, **greedy))
        tokens, swapped_s = timed(lambda: swapped.generate(inputs, **greedy))
    own, own_s = timed(lambda: ours.generate(inputs, args.new_tokens, attention_mask=attention_mask))

    for row in range(inputs.shape[0]):
        print(f"row {row}: {expected[row, 1:].tolist()}")
    print(f"transformers eager              {eager_s:6.2f} s")
    print(f"transformers + swap (fast_attn) {swapped_s:6.2f} s  same tokens: {torch.equal(tokens, expected)}")
    print(f"fast_attn.models.T5             {own_s:6.2f} s  same tokens: {torch.equal(own, expected)}")
    if not (torch.equal(tokens, expected) and torch.equal(own, expected)):
        raise SystemExit("generated tokens differ from eager attention")


if __name__ == "__main__":
    main()
