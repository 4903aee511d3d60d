"""Context parallelism on a transformers Llama: its sequences sharded over 2 CPU processes, one training
step's loss and gradients checked against one process running the whole sequences.

    python examples/context_parallel_llama.py [--seqlen 64] [--dtype float64]   # spawns 2 gloo ranks
    torchrun --nproc-per-node 2 examples/context_parallel_llama.py

Every rank builds the same small random Llama (attn_implementation="fast_attn", grouped-query
attention) and batch. The reference is one process's loss and gradients on the whole sequences. Then
each rank feeds the model its part of the batch, `fast_attn.distributed.shard_model_inputs`: its tokens,
their positions in the whole sequence (rotary embeddings stay right), the labels shifted over the whole
sequence, and the `context_parallel` keyword that makes every attention layer run
`context_parallel_attention`. The ranks' losses and gradients, summed over the ranks (as DDP/FSDP sum
gradients), must equal the reference: ring and all-to-all, zigzag and contiguous layouts. float64 by
default, where the gradients agree to rounding (1e-15); in float32 the sums of the two runs round
differently (about 1e-6). The loss is float32 either way (transformers computes it so).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import transformers
from random_models import llama_config, random_model

from fast_attn.distributed import run_on_local_ranks, shard_model_inputs
from fast_attn.integrations.transformers import register

VOCAB = 101
# Largest relative differences (to the largest value compared) allowed: for the gradients in the model's
# dtype, and for the loss, which transformers computes in float32 whatever the model's dtype.
GRADIENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
LOSS_TOLERANCE = 1e-6


def small_llama(dtype: torch.dtype):
    register()
    model = random_model(transformers.AutoModelForCausalLM, llama_config(VOCAB), "fast_attn")
    return model.to(dtype)


def loss_and_gradients(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def check_rank(rank: int, world: int, seqlen: int, dtype_name: str) -> list[str]:
    """One rank's part of the check (run on every rank of the default group): returns its report lines
    and raises AssertionError when a loss or a gradient differs from one process's beyond the tolerances."""
    dtype = getattr(torch, dtype_name)
    model = small_llama(dtype)
    input_ids = torch.randint(0, VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(1))
    expected_loss, expected_grads = loss_and_gradients(model, {"input_ids": input_ids, "labels": input_ids})
    report = [f"one process: loss {float(expected_loss):.12f}"]
    for mode in ("ring", "all_to_all"):
        for layout in ("zigzag", "contiguous"):
            inputs = shard_model_inputs(input_ids, input_ids, mode=mode, layout=layout)
            loss, grads = loss_and_gradients(model, inputs)  # this rank's share of both
            for t in (loss, *grads.values()):
                dist.all_reduce(t)
            loss_difference = relative_difference(loss, expected_loss)
            grad_difference = max(relative_difference(g, expected_grads[name]) for name, g in grads.items())
            report.append(
                f"{world} ranks, {mode:10} {layout:10}: loss {float(loss):.12f} (relative difference "
                f"{loss_difference:.1e}), largest relative gradient difference {grad_difference:.1e}"
            )
            assert loss_difference <= LOSS_TOLERANCE and grad_difference <= GRADIENT_TOLERANCE[dtype], report[
                -1
            ]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=64, help="tokens per sequence (a multiple of 4)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args()
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        report = check_rank(dist.get_rank(), dist.get_world_size(), args.seqlen, args.dtype)
        dist.destroy_process_group()
    else:
        report = run_on_local_ranks(check_rank, 2, args.seqlen, args.dtype)[0]
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(report + ["loss and gradients equal one process's"]))


if __name__ == "__main__":
    main()
