"""Context parallelism on CPU ranks: causal forward+backward of one sequence split over 2 gloo
processes with 1 thread each, against one process with 1 thread running the whole sequence.

    python benchmarks/context_parallel.py [--seqlen 8192 --heads 8 --head-dim 64 --repeats 3]
    python benchmarks/context_parallel.py --device cuda [--json ring_of_one.json]

With --device cuda (bfloat16, NCCL): one GPU cannot show scaling, so it times what the ring and the
all-to-all cost around the kernels, each mode on a group of one rank against plain attention.

Each configuration runs in its own spawn (fast_attn.distributed.run_on_local_ranks); a rank times
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
import json
import time

import torch
import torch.distributed as dist

import fast_attn
from fast_attn.distributed import context_parallel_attention, run_on_local_ranks, shard_sequence


def time_rank(
    rank: int, world: int, config: dict, shape: tuple, repeats: int, device: str
) -> list[tuple[float, float]]:
    """(wall, this thread's CPU) seconds of each timed forward+backward on this rank (after one warm-up)."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, grad_out = (
        torch.randn(*shape, generator=generator).to(device, dtype) for _ in range(4)
    )  # the whole sequence

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
        if device == "cuda":
            torch.cuda.synchronize()

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
GPU_CONFIGS = {
    "one process": {"world": 1, "mode": None, "layout": None},
    "ring of one": {"world": 1, "mode": "ring", "layout": "zigzag"},
    "all_to_all of one": {"world": 1, "mode": "all_to_all", "layout": "zigzag"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", help="also write the wall times and ratios to this file")
    args = parser.parse_args()
    shape = (1, args.heads, args.seqlen, args.head_dim)
    on_gpu = args.device == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else "1 thread per rank"
    print(
        f"causal forward+backward, {'bfloat16' if on_gpu else 'float32'}, (B, H, S, D) = {shape}, {where}, "
        f"{args.repeats} repeats"
    )
    wall, cpu = {}, {}
    for name, config in (GPU_CONFIGS if on_gpu else CONFIGS).items():
        per_rank = run_on_local_ranks(
            time_rank, config["world"], config, shape, args.repeats, args.device, device=args.device,
            timeout_s=3600,
        )  # fmt: skip
        wall[name] = min(max(rank_wall for rank_wall, _ in repeat) for repeat in zip(*per_rank))
        cpu[name] = max(min(rank_cpu for _, rank_cpu in times) for times in per_rank)
        print(
            f"{name:17} {config['world']} rank(s): wall {wall[name]:7.3f} s ({wall[name] / wall['one process']:.2f}x "
            f"one process), busiest rank's CPU {cpu[name]:7.3f} s ({cpu[name] / cpu['one process']:.2f}x)"
        )
    if not on_gpu:
        for kind, seconds in (("wall", wall), ("busiest rank's CPU", cpu)):
            print(
                f"zigzag is {seconds['ring contiguous'] / seconds['ring zigzag']:.2f}x faster than contiguous "
                f"({kind})"
            )
    if args.json:
        ratios = {name: seconds / wall["one process"] for name, seconds in wall.items()}
        report = {"device": where, "shape": shape, "wall_s": wall, "ratio_to_one_process": ratios}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
