"""Run a function on a few ranks of a process group on this machine: gloo CPU ranks, or NCCL ranks with
one GPU each. For tests, examples and benchmarks; to train on GPUs, launch with torchrun instead
(docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, device, port, threads, group_timeout_s, results, fn, args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections on the loopback too
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=group_timeout_s),
    )
    try:
        results.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def run_on_local_ranks(
    fn,
    world: int,
    *args,
    device: str = "cpu",
    threads: int = 1,
    timeout_s: float = 300.0,
    group_timeout_s: float = 60.0,
) -> list:
    """fn(rank, world, *args) in `world` spawned processes joined in the default process group over
    127.0.0.1 (a free port), each with `threads` intra-op threads. Returns fn's results by rank.
    device "cpu": a gloo group; "cuda": an NCCL group, rank r on GPU r (NCCL takes one GPU per rank).

    fn and its results must pickle. A rank that raises ends the others and its error is raised here
    (torch.multiprocessing.ProcessRaisedException); past timeout_s every rank is killed and TimeoutError
    raised. A collective that waits for a rank longer than group_timeout_s fails that rank.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and world > torch.cuda.device_count():
        raise ValueError(
            f"world={world} NCCL ranks need a GPU each; this machine has {torch.cuda.device_count()}"
        )
    results = mp.get_context("spawn").SimpleQueue()
    processes = mp.start_processes(
        _rank_main,
        args=(world, device, _free_port(), threads, group_timeout_s, results, fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    by_rank = {}
    try:
        done = False
        while not done:
            done = processes.join(timeout=0.2)
            while not results.empty():  # read as they come, so that no rank blocks on a full pipe
                rank, result = results.get()
                by_rank[rank] = result
            if not done and time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} still ran after {timeout_s} s")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    return [by_rank[rank] for rank in range(world)]
