"""How a sequence is laid out over the ranks of a process group.

The sequence is cut into equal chunks. "contiguous": `world` chunks, rank r holds chunk r.
"zigzag": `2 * world` chunks, rank r holds chunks r and 2 * world - 1 - r, in that order, so that
under a causal mask every rank holds as many visible (query, key) pairs as any other (an early
chunk sees little, its late partner much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def rank_chunks(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """The chunks `rank` holds, in its local order (chunk c covers positions [c * size, (c + 1) * size))."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


@dataclass(frozen=True)
class Piece:
    """One chunk of a rank's shard: `length` rows from local row `local`, global position `start` on."""

    start: int
    local: int
    length: int


def shard_pieces(rank: int, world: int, layout: str, seqlen_local: int) -> tuple[Piece, ...]:
    """The chunks of `rank`'s shard of `seqlen_local` rows (a multiple of chunks_per_rank(layout))."""
    size = seqlen_local // chunks_per_rank(layout)
    chunks = rank_chunks(rank, world, layout)
    return tuple(Piece(start=c * size, local=i * size, length=size) for i, c in enumerate(chunks))


def group_world_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, this process's rank) in `group` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fast_attn.distributed needs torch.distributed initialized (torch.distributed.init_process_group)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`")
    return dist.get_world_size(group), rank


def _check_divisible(x: torch.Tensor, dim: int, world: int, layout: str) -> None:
    parts = world * chunks_per_rank(layout)
    if x.shape[dim] % parts != 0:
        raise ValueError(
            f"layout={layout!r} over {world} ranks cuts the sequence into {parts} equal chunks: its length "
            f"(dim {dim} of shape {tuple(x.shape)}) must be a multiple of {parts}"
        )


def shard_of(x: torch.Tensor, dim: int, rank: int, world: int, layout: str) -> torch.Tensor:
    """`rank`'s shard of the whole sequence x along `dim`: its chunks concatenated in local order."""
    _check_divisible(x, dim, world, layout)
    chunks = x.chunk(world * chunks_per_rank(layout), dim)
    return torch.cat([chunks[c] for c in rank_chunks(rank, world, layout)], dim)


def join_shards(shards: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """The whole sequence from every rank's shard (shards[r] of rank r): the inverse of shard_of."""
    world = len(shards)
    chunks: list[torch.Tensor] = [None] * (world * chunks_per_rank(layout))  # type: ignore[list-item]
    for rank, shard in enumerate(shards):
        for c, piece in zip(rank_chunks(rank, world, layout), shard.chunk(chunks_per_rank(layout), dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim)


def shard_sequence(
    x: torch.Tensor, dim: int, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's part of the whole sequence `x` along `dim` (differentiable).

    x's length along dim must be a multiple of world (contiguous) or 2 * world (zigzag).
    """
    check_layout(layout)
    world, rank = group_world_and_rank(group)
    return shard_of(x, dim, rank, world, layout)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, dim, group, layout):
        world, rank = group_world_and_rank(group)
        shards = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(shards, x_local.contiguous(), group=group)
        ctx.dim, ctx.rank, ctx.world, ctx.layout = dim, rank, world, layout
        return join_shards(shards, dim, layout)

    @staticmethod
    def backward(ctx, grad):
        return shard_of(grad, ctx.dim, ctx.rank, ctx.world, ctx.layout), None, None, None


def gather_sequence(
    x_local: torch.Tensor, dim: int, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """The whole sequence from every rank's shard along `dim`: the inverse of shard_sequence.

    Every rank must pass a shard of the same shape. Differentiable: the whole sequence is the same on
    every rank, and so is taken to be its gradient (a loss computed alike on every rank), of which each
    rank keeps its own part.
    """
    check_layout(layout)
    return _GatherSequence.apply(x_local, dim, group, layout)
