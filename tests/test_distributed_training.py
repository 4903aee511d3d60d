"""Training across processes on 2 gloo CPU ranks, against one process: a transformers Llama with its
sequences sharded (examples/context_parallel_llama.py: loss and gradients, both modes and layouts), and
refusing a padding mask there.

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

from fast_attn.distributed import run_on_cpu_ranks, shard_model_inputs

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))  # spawned ranks inherit it
import context_parallel_llama  # noqa: E402

TIMEOUT_S = 240.0


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
}


def _run_checks(rank: int, world: int) -> dict[str, str | None]:
    return run_checks(CHECKS)


@pytest.fixture(scope="module")
def outcomes():
    return run_on_cpu_ranks(_run_checks, 2, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", list(CHECKS))
def test_check(outcomes, name):
    assert_passed(outcomes, name)
