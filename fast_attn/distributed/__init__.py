"""Attention over a sequence sharded across the ranks of a torch.distributed process group.

    from fast_attn.distributed import shard_sequence, gather_sequence, context_parallel_attention
    q_local = shard_sequence(q, 2)                            # this rank's part of (B, H, S, D)
    out_local = context_parallel_attention(q_local, k_local, v_local, causal=True)

Modes: "ring" (K/V passed round the ranks, zigzag-balanced for causal masks, ring.py) and
"all_to_all" (heads split over the ranks, all_to_all.py); layouts in layout.py; transformers
models through shard_model_inputs (model_inputs.py); run_on_local_ranks (launch.py) runs a function
on a few local ranks. Only torch.distributed's collectives and P2P ops move data: NCCL on GPUs,
gloo on CPUs. docs/DISTRIBUTED.md says when to use which mode and what each costs.
"""

from .attention import context_parallel_attention
from .launch import run_on_local_ranks
from .layout import gather_sequence, shard_sequence
from .model_inputs import ContextParallel, shard_model_inputs

__all__ = [
    "ContextParallel",
    "context_parallel_attention",
    "gather_sequence",
    "run_on_local_ranks",
    "shard_model_inputs",
    "shard_sequence",
]
