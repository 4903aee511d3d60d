"""Training across processes on 2 gloo CPU ranks, against one process: a transformers Llama with its
sequences sharded (examples/context_parallel_llama.py: loss and gradients, both modes and layouts, and
a padding mask refused there), and a fast_attn GPT (fast_attn.models) trained a few AdamW steps with DDP
and with FSDP2 (`fully_shard`), whose losses, gradients and weights must be one process's on the whole
batch at every step.

One spawn runs every check (tests/distributed_cases.py); float64 throughout, so that the differences
left are rounding.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from distributed_cases import assert_passed, run_checks
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fast_attn.distributed import run_on_local_ranks, shard_model_inputs
from fast_attn.models import GPT, GPTConfig

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))  # spawned ranks inherit it
import context_parallel_llama  # noqa: E402

TIMEOUT_S = 240.0
VOCAB, SEQLEN, BATCH, STEPS = 64, 17, 4, 3  # SEQLEN - 1 tokens in, each predicting the next
LEARNING_RATE = 1e-2
# float64 rounding of sums taken in another order (a batch split over ranks, gradients averaged by the
# collectives). AdamW moves a weight by about lr * m / sqrt(v) a step, so gradients equal to rtol leave the
# weights equal to about lr * rtol: a weight whose gradient is near 0 keeps that absolute error, not atol.
TOLERANCES = {"grads": {"rtol": 1e-9, "atol": 1e-12}, "weights": {"rtol": 1e-9, "atol": LEARNING_RATE * 1e-9}}


def _small_gpt() -> GPT:
    torch.manual_seed(0)  # the same weights on every rank
    config = GPTConfig(vocab_size=VOCAB, max_positions=SEQLEN, hidden_size=32, num_layers=2, num_heads=4,
                       embedding_dropout=0.0, residual_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return GPT(config).to(torch.float64)


def _train(
    model: torch.nn.Module, batches: list[torch.Tensor], ranks: int = 1, whole=torch.clone
) -> list[dict]:
    """AdamW steps, one per batch (B, SEQLEN) of this rank's sequences: per step the loss (averaged over
    `ranks`), and each parameter's gradient and its value after the step as whole tensors (`whole`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    history = []
    for tokens in batches:
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])  # (B, SEQLEN - 1, VOCAB)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads = [whole(p.grad) for p in model.parameters()]
        optimizer.step()
        loss = loss.detach()
        if ranks > 1:
            dist.all_reduce(loss)
        weights = [whole(p.detach()) for p in model.parameters()]
        history.append({"loss": loss / ranks, "grads": grads, "weights": weights})
    return history


def _check_data_parallel(wrap, whole=torch.clone) -> None:
    """`wrap(model)` trained on this rank's half of each batch gives one process's history on the whole batches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=generator) for _ in range(STEPS)]
    expected = _train(_small_gpt(), batches)
    mine = [tokens.chunk(world)[rank] for tokens in batches]
    actual = _train(wrap(_small_gpt()), mine, ranks=world, whole=whole)
    for step, (got, wanted) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            got["loss"], wanted["loss"], rtol=1e-12, atol=0, msg=f"loss at step {step}"
        )
        for kind, tolerance in TOLERANCES.items():
            for i, (a, b) in enumerate(zip(got[kind], wanted[kind])):
                where = f"{kind}[{i}] at step {step}"
                torch.testing.assert_close(a, b, **tolerance, msg=lambda m, where=where: f"{where}: {m}")


def _fully_shard(model: GPT) -> GPT:
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _check_llama_example() -> None:
    context_parallel_llama.check_rank(dist.get_rank(), dist.get_world_size(), 32, "float64")


def _check_llama_refuses_padding() -> None:
    """A padding mask is refused under context parallelism, by every rank alike, naming it."""
    model = context_parallel_llama.small_llama(torch.float64)
    input_ids = torch.randint(0, context_parallel_llama.VOCAB, (2, 16))
    inputs = shard_model_inputs(input_ids)
    inputs["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="does not implement attention_mask"):
        model(**inputs)


CHECKS = {
    "llama-context-parallel": _check_llama_example,
    "llama-refuses-padding": _check_llama_refuses_padding,
    "gpt-ddp": lambda: _check_data_parallel(DistributedDataParallel),
    "gpt-fsdp2": lambda: _check_data_parallel(_fully_shard, whole=lambda t: t.full_tensor()),
}


def _run_checks(rank: int, world: int) -> dict[str, str | None]:
    return run_checks(CHECKS)


@pytest.fixture(scope="module")
def outcomes():
    return run_on_local_ranks(_run_checks, 2, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", list(CHECKS))
def test_check(outcomes, name):
    assert_passed(outcomes, name)
