"""context_parallel_attention: exact attention over a sequence sharded across a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import dispatch
from ..causal import visible_band
from ..functional import attention
from ..ops.sinks import apply_sinks
from ..validation import SUPPORTED_DTYPES, AttentionProblem, build_problem, validate_backend_name
from .all_to_all import HeadExchange, to_heads, to_sequence
from .layout import check_layout, chunks_per_rank, group_world_and_rank, shard_pieces
from .ring import Ring, RingAttention, plan_blocks

MODES = ("ring", "all_to_all")

# The forward and backward ops each kernel backend runs a ring's blocks with (fast_attn/ops/autograd.py).
BLOCK_OPS = {
    "cpu": ("attention_forward", "attention_backward"),
    "cuda": ("attention_forward", "attention_backward"),
    "triton": ("triton_attention_forward", "triton_attention_backward"),
}


def _agree_on_shapes(tensors: dict[str, torch.Tensor], group, world: int) -> None:
    """Raise on every rank alike unless every rank passes tensors of the same shapes and dtypes."""

    def facts(t: torch.Tensor) -> list[int]:  # the shape (up to 4 dims, -1 for a missing one) and dtype
        dtype = SUPPORTED_DTYPES.index(t.dtype) if t.dtype in SUPPORTED_DTYPES else -1
        return [*t.shape[:4], *(-1,) * (4 - t.dim()), dtype]

    device = next(iter(tensors.values())).device
    mine = torch.tensor([f for t in tensors.values() for f in facts(t)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if all(torch.equal(other, mine) for other in every):
        return
    described = []
    for rank, other in enumerate(every):
        per_tensor = other.view(len(tensors), 5).tolist()
        shapes = (f"{name} {tuple(d for d in f[:4] if d >= 0)}" for name, f in zip(tensors, per_tensor))
        described.append(f"rank {rank}: " + ", ".join(shapes))
    raise ValueError("every rank must pass shards of the same shapes and dtype, got " + "; ".join(described))


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _ring_attention(problem: AttentionProblem, group, world: int, rank: int, layout: str, backend: str):
    chosen = dispatch.select_backend(problem, backend)
    if chosen.name not in BLOCK_OPS:
        raise dispatch.BackendNotSupportedError(
            "mode='ring' runs each block through a kernel backend's forward and backward ops, which the "
            f"reference backend lacks (named, or the only one for {problem.dtype}, head dim {problem.head_dim} "
            f"on {problem.device.type}); use mode='all_to_all', which runs fast_attn.attention on any backend"
        )
    band = visible_band(problem.causal, problem.window, problem.seqlen_q, problem.seqlen_k)
    lo = None if band is None or band.left < 0 else -band.left  # query i sees key j iff lo <= j - i <= hi
    hi = None if band is None or band.right < 0 else band.right
    seqlen_local = problem.seqlen_q
    mine = shard_pieces(rank, world, layout, seqlen_local)
    steps = tuple(
        plan_blocks(mine, shard_pieces((rank - step) % world, world, layout, seqlen_local), lo, hi)
        for step in range(world)
    )
    forward_name, backward_name = BLOCK_OPS[chosen.name]
    ring = Ring(
        group=group,
        next_rank=_global_rank(group, (rank + 1) % world),
        previous_rank=_global_rank(group, (rank - 1) % world),
        steps=steps,
        scale=problem.scale,
        softcap=problem.softcap or 0.0,
        forward_op=getattr(torch.ops.fast_attn, forward_name),
        backward_op=getattr(torch.ops.fast_attn, backward_name),
    )
    out, lse = RingAttention.apply(problem.q, problem.k, problem.v, ring)
    return (out, lse) if problem.sinks is None else apply_sinks(out, lse, problem.sinks)


def _all_to_all_attention(
    problem: AttentionProblem, group, world: int, rank: int, layout: str, backend: str, return_lse: bool
):
    heads_q, heads_kv = problem.heads_q, problem.heads_kv
    if heads_q % world != 0:
        raise ValueError(
            f"mode='all_to_all' splits the heads over the ranks: it needs Hq % world == 0, got Hq = {heads_q} "
            f"over {world} ranks; use mode='ring'"
        )
    k, v = problem.k, problem.v
    if heads_kv % world != 0:
        if world % heads_kv != 0:
            raise ValueError(
                f"mode='all_to_all' needs the key/value heads to split over the ranks (Hkv % world == 0) or "
                f"each to serve whole ranks (world % Hkv == 0), got Hkv = {heads_kv} over {world} ranks; "
                f"use mode='ring'"
            )
        # Each rank's query heads read one key/value head: send each to the world / Hkv ranks that read it.
        k, v = (t.repeat_interleave(world // heads_kv, dim=1) for t in (k, v))
    exchange = HeadExchange(group, world, rank, layout)
    heads_here = slice(rank * heads_q // world, (rank + 1) * heads_q // world)
    out, lse = attention(
        to_heads(problem.q, exchange),
        to_heads(k, exchange),
        to_heads(v, exchange),
        causal=problem.causal,
        window_size=problem.window,
        softcap=problem.softcap,
        sinks=None if problem.sinks is None else problem.sinks[heads_here],
        scale=problem.scale,
        return_lse=True,
        backend=backend,
    )  # (B, Hq / W, S, D), (B, Hq / W, S)
    out = to_sequence(out, exchange)
    return out, (to_sequence(lse.unsqueeze(-1), exchange).squeeze(-1) if return_lse else None)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "ring",
    layout: str = "zigzag",
    causal: bool | str = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """fast_attn.attention of one sequence sharded over the ranks of `group` (default: the world).

    q (B, Hq, S_local, D), k, v (B, Hkv, S_local, D): this rank's shards of the sequence, laid out as
    `layout` says (fast_attn.distributed.shard_sequence cuts them); every rank passes the same shapes.
    Returns this rank's shard of out (B, Hq, S_local, D), and with return_lse=True of lse (B, Hq,
    S_local), exactly as fast_attn.attention on the whole sequence would give them; differentiable.
    The gradient of `sinks` on each rank is that rank's share: their sum over the ranks (as data
    parallelism all-reduces parameter gradients) is the whole one.

    mode="ring": K/V shards travel round the ring, overlapped with the compute (every kernel backend;
    not the reference, which has no backward op). mode="all_to_all" (Ulysses): heads split over the
    ranks, attention on the whole sequence per head; needs Hq % world == 0, and Hkv % world == 0 or
    world % Hkv == 0 (each key/value head then goes to the ranks that read it).
    causal (any alignment: the sequence is one self-attention, Sq = Sk), window_size, softcap, sinks (one
    logit per head, (Hq,)) and scale mean what they mean in fast_attn.attention.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_layout(layout)
    validate_backend_name(backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    world, rank = group_world_and_rank(group)
    if world > 1:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _agree_on_shapes({"q": q, "k": k, "v": v}, group, world)
    problem = build_problem(q, k, v, causal=causal, window_size=window_size, softcap=softcap, sinks=sinks,
                            scale=scale, per_row_sinks=False)  # fmt: skip
    if problem.seqlen_q != problem.seqlen_k:
        raise ValueError(
            f"q and k/v must be shards of one sequence (self-attention), got S_local {problem.seqlen_q} for q "
            f"and {problem.seqlen_k} for k/v"
        )
    if problem.seqlen_q % chunks_per_rank(layout) != 0:
        raise ValueError(
            f"layout={layout!r} holds 2 equal chunks per rank: S_local must be even (the sequence a multiple "
            f"of 2 * world), got S_local = {problem.seqlen_q}"
        )
    if mode == "ring":
        out, lse = _ring_attention(problem, group, world, rank, layout, backend)
    else:
        out, lse = _all_to_all_attention(problem, group, world, rank, layout, backend, return_lse)
    return (out, lse) if return_lse else out
