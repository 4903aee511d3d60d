"""Ring attention: each rank keeps its queries while the K/V shards travel round the ring.

At step s rank r holds the K/V shard of rank (r - s) mod W and computes its queries against it while
`batch_isend_irecv` already passes that shard on to rank r + 1 and receives the next one from r - 1.
Only the visible parts of a (query chunk, key chunk) pair are computed: under the band of the causal
mask and window (`fast_attn.causal.visible_band`) a pair is wholly visible, wholly hidden, or cut by
the band, in which case its visible rectangle runs with the band as a window; wholly visible pairs
side by side run as one block, and so does a rank's own shard when there is no window.

Each block's (out, lse) joins the running result with the lse rule, in float32 (float64 for
float64): O = O1 - sigmoid(L2 - L1) (O1 - O2), L = log(exp(L1) + exp(L2)).

The backward works from the final out and lse: with them each block's P = exp(S - lse) is exactly
that block's share of the softmax and delta = rowsum(dO * O), so the kernel's backward op on a block
gives its exact dq, dk, dv. dq stays here; the dK/dV of a K/V shard travel round the ring with it,
each rank adding its share, and arrive back at their owner after W passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.autograd import accumulation_dtype
from .layout import Piece


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows `q` against rows `k` of the K/V shard at hand, where query i
    sees key j iff -left <= j - i - (k.stop - k.start - (q.stop - q.start)) <= right, -1 unbounded."""

    q: slice
    k: slice
    window: tuple[int, int]


def visible_block(q: Piece, kv: Piece, lo: int | None, hi: int | None) -> Block | None:
    """The rectangle of (q chunk, kv chunk) where global positions satisfy lo <= j - i <= hi (None:
    unbounded), with the window that cuts the band out of it; None when nothing is visible."""
    shift = kv.start - q.start
    low = None if lo is None else lo - shift  # the band in the chunks' own rows: low <= j' - i' <= high
    high = None if hi is None else hi - shift
    # Rows that see a key, and the keys some row sees.
    q_lo = 0 if high is None else max(0, -high)
    q_hi = q.length if low is None else min(q.length, kv.length - low)
    if q_lo >= q_hi:
        return None
    k_lo = 0 if low is None else max(0, q_lo + low)
    k_hi = kv.length if high is None else min(kv.length, q_hi + high)
    if k_lo >= k_hi:
        return None
    # A kernel window (left, right) without a causal mask is aligned bottom-right: it bounds
    # j' - i' - diagonal with diagonal = k_hi - q_hi; a side the whole rectangle satisfies is unbounded.
    diagonal = k_hi - q_hi
    left = -1 if low is None or k_lo - (q_hi - 1) >= low else diagonal - low
    right = -1 if high is None or (k_hi - 1) - q_lo <= high else high - diagonal
    return Block(
        q=slice(q.local + q_lo, q.local + q_hi),
        k=slice(kv.local + k_lo, kv.local + k_hi),
        window=(left, right),
    )


WHOLLY_VISIBLE = (-1, -1)


def _joined(a: Block, b: Block) -> Block | None:
    """One block for two wholly visible blocks side by side (fewer kernel calls and merges), else None."""
    if a.window != WHOLLY_VISIBLE or b.window != WHOLLY_VISIBLE:
        return None
    if a.q == b.q and a.k.stop == b.k.start:
        return Block(q=a.q, k=slice(a.k.start, b.k.stop), window=WHOLLY_VISIBLE)
    if a.k == b.k and a.q.stop == b.q.start:
        return Block(q=slice(a.q.start, b.q.stop), k=a.k, window=WHOLLY_VISIBLE)
    return None


def plan_blocks(
    q_pieces: tuple[Piece, ...], kv_pieces: tuple[Piece, ...], lo: int | None, hi: int | None
) -> tuple[Block, ...]:
    """The kernel calls of one ring step: every visible (query chunk, key chunk) rectangle, those side
    by side and wholly visible joined."""
    if q_pieces == kv_pieces and lo is None and hi in (None, 0):
        # A rank's own shard holds its chunks in increasing order, the same for its queries and keys:
        # without a window, the causal mask over the whole shard (or none) is the global one.
        rows = slice(0, sum(piece.length for piece in q_pieces))
        return (Block(q=rows, k=rows, window=WHOLLY_VISIBLE if hi is None else (-1, 0)),)
    blocks: list[Block] = []
    for q in q_pieces:
        for kv in kv_pieces:
            block = visible_block(q, kv, lo, hi)
            if block is None:
                continue
            joined = _joined(blocks[-1], block) if blocks else None
            if joined is None:
                blocks.append(block)
            else:
                blocks[-1] = joined
    return tuple(blocks)


@dataclass(frozen=True)
class Ring:
    """What a ring attention call needs beyond its tensors."""

    group: dist.ProcessGroup | None
    next_rank: int  # global ranks of the neighbours
    previous_rank: int
    steps: tuple[tuple[Block, ...], ...]  # the blocks of each step: steps[s] against rank r - s's shard
    scale: float
    softcap: float
    forward_op: object  # the kernel backend's forward and backward ops (fast_attn/ops/autograd.py schemas)
    backward_op: object

    def pass_on(self, t: torch.Tensor):
        """Send t to the next rank and receive the previous rank's tensor of t's shape. Returns what
        `arrived` takes, holding t until then (it must outlive the send)."""
        received = torch.empty_like(t)
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, t, self.next_rank, self.group),
                dist.P2POp(dist.irecv, received, self.previous_rank, self.group),
            ]
        )
        return requests, received, t


def arrived(pending) -> torch.Tensor:
    """Wait for a pass_on; the tensor received."""
    requests, received, _ = pending
    for request in requests:
        request.wait()
    return received


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Join a block's result into the running one, in place: out (B, H, n, D) and lse (B, H, n) in the
    accumulation dtype, block_out in q's dtype. A row of lse = -inf (nothing yet) takes the block's."""
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.sub_(weight * (out - block_out.to(out.dtype)))
    # log(exp(L1) + exp(L2)) = L1 - logsigmoid(L1 - L2), and right where L1 = -inf
    lse.copy_(torch.logaddexp(lse, block_lse))


class RingAttention(torch.autograd.Function):
    """(q (B, Hq, S, D), k, v (B, Hkv, S, D), ring) -> (out (B, Hq, S, D), lse (B, Hq, S)) of this rank's rows."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
        kv = torch.stack((k, v))  # (2, B, Hkv, S, D): one message per step
        for step, blocks in enumerate(ring.steps):
            incoming = ring.pass_on(kv) if step + 1 < len(ring.steps) else None
            for block in blocks:
                block_out, block_lse = ring.forward_op(
                    q[:, :, block.q], kv[0, :, :, block.k], kv[1, :, :, block.k], None, None, None,
                    ring.scale, 0, 0.0, None, *block.window, ring.softcap,
                )  # fmt: skip
                merge(out[:, :, block.q], lse[:, :, block.q], block_out, block_lse)
            if incoming is not None:
                kv = arrived(incoming)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        ring: Ring = ctx.ring
        acc = accumulation_dtype(q.dtype)
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        deterministic = torch.are_deterministic_algorithms_enabled()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack((k, v))
        dkv_pending = None
        for step, blocks in enumerate(ring.steps):
            incoming = ring.pass_on(kv) if step + 1 < len(ring.steps) else None
            # This rank's share of the gradient of the shard at hand.
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            for block in blocks:
                # The ops read lse without strides: the rows of a block are copied out contiguous.
                block_dq, block_dk, block_dv, _ = ring.backward_op(
                    grad_out[:, :, block.q], grad_lse[:, :, block.q].contiguous(),
                    q[:, :, block.q], kv[0, :, :, block.k], kv[1, :, :, block.k], None, None, None,
                    out[:, :, block.q], lse[:, :, block.q].contiguous(),
                    ring.scale, 0, 0.0, False, deterministic, None, *block.window, ring.softcap,
                )  # fmt: skip
                dq[:, :, block.q] += block_dq
                dkv[0, :, :, block.k] += block_dk
                dkv[1, :, :, block.k] += block_dv
            if dkv_pending is not None:
                dkv += arrived(dkv_pending)  # the shares of the ranks this shard has visited
            if len(ring.steps) > 1:
                dkv_pending = ring.pass_on(dkv)
            if incoming is not None:
                kv = arrived(incoming)
        if dkv_pending is not None:
            dkv = arrived(dkv_pending)  # this rank's own shard, back from its last visit
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
