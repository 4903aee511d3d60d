"""Context parallelism on CPU ranks: causal forward+backward of one sequence split over 2 gloo
processes with 1 thread each, against one process with 1 thread running the whole sequence.

    python benchmarks/context_parallel.py [--seqlen 8192 --heads 8 --head-dim 64 --repeats 3]

Each configuration runs in its own spawn (fast_attn.distributed.run_on_cpu_ranks); a rank times
forward+backward between two barriers, after one warm-up call. Reported: the wall time of the best of
--repeats (work of others on the machine only adds time), and the CPU time of the busiest rank's own
thread (its kernels and merges; gloo moves the data on threads of its own), which shows the balance
even when the machine is shared. Ratios: ring against one process (ideal 0.5: half the work each, the
K/V passes hidden behind compute; a ring of one rank shows what its blocks and merges cost), and
contiguous against zigzag (with contiguous shards the last rank holds 3/4 of the causal pairs; zigzag
gives each rank half).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import fast_attn
from fast_attn.distributed import context_parallel_attention, run_on_cpu_ranks, shard_sequence


def time_rank(rank: int, world: int, config: dict, shape: tuple, repeats: int) -> list[tuple[float, float]]:
    """(wall, this thread's CPU) seconds of each timed forward+backward on this rank (after one warm-up)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(*shape, generator=generator) for _ in range(4))  # the whole sequence

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t if config["mode"] is None else shard_sequence(t, 2, layout=config["layout"])

    q, k, v = (mine(t).requires_grad_() for t in (q, k, v))
    grad_out = mine(grad_out)

    def step() -> None:
        if config["mode"] is None:
            out = fast_attn.attention(q, k, v, causal=True)
        else:
            out = context_parallel_attention(
                q, k, v, causal=True, mode=config["mode"], layout=config["layout"]
            )
        out.backward(grad_out)

    step()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.thread_time()
        step()
        cpu = time.thread_time() - start_cpu
        dist.barrier()
        seconds.append((time.perf_counter() - start, cpu))
    return seconds


CONFIGS = {
    "one process": {"world": 1, "mode": None, "layout": None},
    "ring of one": {"world": 1, "mode": "ring", "layout": "zigzag"},  # the ring's own cost
    "ring zigzag": {"world": 2, "mode": "ring", "layout": "zigzag"},
    "ring contiguous": {"world": 2, "mode": "ring", "layout": "contiguous"},
    "all_to_all": {"world": 2, "mode": "all_to_all", "layout": "contiguous"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (1, args.heads, args.seqlen, args.head_dim)
    print(
        f"causal forward+backward, float32, (B, H, S, D) = {shape}, 1 thread per rank, {args.repeats} repeats"
    )
    wall, cpu = {}, {}
    for name, config in CONFIGS.items():
        per_rank = run_on_cpu_ranks(time_rank, config["world"], config, shape, args.repeats, timeout_s=3600)
        wall[name] = min(max(rank_wall for rank_wall, _ in repeat) for repeat in zip(*per_rank))
        cpu[name] = max(min(rank_cpu for _, rank_cpu in times) for times in per_rank)
        print(
            f"{name:16} {config['world']} rank(s): wall {wall[name]:7.3f} s ({wall[name] / wall['one process']:.2f}x "
            f"one process), busiest rank's CPU {cpu[name]:7.3f} s ({cpu[name] / cpu['one process']:.2f}x)"
        )
    for kind, seconds in (("wall", wall), ("busiest rank's CPU", cpu)):
        print(
            f"zigzag is {seconds['ring contiguous'] / seconds['ring zigzag']:.2f}x faster than contiguous ({kind})"
        )


if __name__ == "__main__":
    main()
