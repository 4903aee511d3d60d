"""What the generation examples share: their command line, and the check that eager
transformers, the same model swapped to fast_attn and a fast_attn.models port of it
generate the same greedy tokens. The examples set HF_HUB_OFFLINE before importing it."""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import fast_attn


def parse_new_tokens(doc: str, default: int) -> int:
    """The --new-tokens of an example whose module docstring is `doc`; quiets transformers."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=default)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    return args.new_tokens


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def check_same_tokens(eager, ours, ours_name: str, inputs, attention_mask, new_tokens: int, first_new: int):
    """Generate greedily with `eager`, a copy of it swapped to fast_attn, and `ours` (its
    fast_attn.models port, printed as `ours_name`); print the tokens (each row's from column
    `first_new` of the output) and timings, and exit with an error unless all three agree."""
    swapped = copy.deepcopy(eager)
    print(fast_attn.swap_attention(swapped))
    greedy = {"attention_mask": attention_mask, "max_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        expected, eager_s = timed(lambda: eager.generate(inputs, **greedy))
        tokens, swapped_s = timed(lambda: swapped.generate(inputs, **greedy))
    own, own_s = timed(lambda: ours.generate(inputs, new_tokens, attention_mask=attention_mask))

    for row in range(inputs.shape[0]):
        print(f"row {row}: {expected[row, first_new:].tolist()}")
    print(f"{'transformers eager':<31} {eager_s:6.2f} s")
    print(
        f"{'transformers + swap (fast_attn)':<31} {swapped_s:6.2f} s  same tokens: {torch.equal(tokens, expected)}"
    )
    print(f"{ours_name:<31} {own_s:6.2f} s  same tokens: {torch.equal(own, expected)}")
    if not (torch.equal(tokens, expected) and torch.equal(own, expected)):
        raise SystemExit("generated tokens differ from eager attention")
