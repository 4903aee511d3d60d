"""All-to-all (Ulysses) context parallelism: trade the sequence split for a head split and back.

One `all_to_all_single` turns each rank's (B, H, S / W, D) shard of every head into the whole
(B, H / W, S, D) sequence of its own H / W heads; attention runs there as on one device; another
all_to_all turns the output back. Both exchanges are differentiable (each one's backward is the other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import join_shards, shard_of


@dataclass(frozen=True)
class HeadExchange:
    group: dist.ProcessGroup | None
    world: int
    rank: int
    layout: str

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, S_local, D) shard of every head -> (B, H / W, S, D) whole sequence of this rank's heads."""
        batch, heads, seqlen_local, dim = x.shape
        # (W, B, H / W, S_local, D): block w holds rank w's heads.
        send = x.reshape(batch, self.world, heads // self.world, seqlen_local, dim).transpose(0, 1)
        send = send.contiguous()
        received = torch.empty_like(send)  # block w: rank w's shard of this rank's heads
        dist.all_to_all_single(received, send, group=self.group)
        return join_shards(list(received.unbind(0)), 2, self.layout)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H / W, S, D) whole sequence of this rank's heads -> (B, H, S_local, D) shard of every head."""
        batch, heads_here, _, dim = x.shape
        # (W, B, H / W, S_local, D): block w holds rank w's shard.
        send = torch.stack([shard_of(x, 2, w, self.world, self.layout) for w in range(self.world)])
        received = torch.empty_like(send)  # block w: this rank's shard of rank w's heads
        dist.all_to_all_single(received, send, group=self.group)
        return received.transpose(0, 1).reshape(batch, self.world * heads_here, -1, dim)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange: HeadExchange, to_heads: bool):
        ctx.exchange, ctx.to_heads = exchange, to_heads
        return exchange.to_heads(x) if to_heads else exchange.to_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        grad = exchange.to_sequence(grad) if ctx.to_heads else exchange.to_heads(grad)
        return grad, None, None


def to_heads(x: torch.Tensor, exchange: HeadExchange) -> torch.Tensor:
    return _Exchange.apply(x, exchange, True)


def to_sequence(x: torch.Tensor, exchange: HeadExchange) -> torch.Tensor:
    return _Exchange.apply(x, exchange, False)
