"""Dropout keep-mask of the contract, in plain PyTorch.

Every kernel decides "keep score (b, h, i, j)" with the same 32-bit hash of the
seed and the score's linear index (csrc/attention_params.h, dropout_hash), so
the reference reproduces a kernel's dropout bit for bit and tests can compare
them exactly. The hash is two rounds of the "lowbias32" multiply-xorshift mix.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def new_dropout_seed(device: torch.device) -> torch.Tensor:
    """One int64 seed drawn from torch's generator for `device` (shape (1,))."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    # (x * constant) mod 2^32 for int64 x in [0, 2^32) without int64 overflow.
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_hash(seed: int, linear_index: torch.Tensor) -> torch.Tensor:
    """32-bit hash (as int64 in [0, 2^32)) of a non-negative seed and int64 indices."""
    seed_low, seed_high = seed & _MASK32, (seed >> 32) & _MASK32
    h = _mix32((linear_index & _MASK32) ^ seed_low)
    return _mix32(h ^ ((linear_index >> 32) & _MASK32) ^ seed_high)


def dropout_threshold(dropout_p: float) -> int:
    """Scores whose hash is >= this are kept (p * 2^32, computed as the kernels do)."""
    threshold = float(dropout_p) * 4294967296.0
    return 0xFFFFFFFF if threshold >= 4294967295.0 else int(threshold)


def dropout_keep_mask(
    seed: torch.Tensor,
    dropout_p: float,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
    rows: range | None = None,
    cols: range | None = None,
) -> torch.Tensor:
    """Bool (B, H, Sq, Sk): True where the probability is kept.

    With `rows` / `cols`, only that block of the query rows / keys: (B, H, len(rows), len(cols)).
    A packed sequence's scores are such a block of the packed (1, H, Tq, Tk) problem.
    """
    rows = range(seqlen_q) if rows is None else rows
    cols = range(seqlen_k) if cols is None else cols

    def indices(r: range) -> torch.Tensor:
        return torch.arange(r.start, r.stop, device=device, dtype=torch.int64)

    heads_of = torch.arange(batch * heads, device=device, dtype=torch.int64)[:, None, None]
    linear_index = (heads_of * seqlen_q + indices(rows)[:, None]) * seqlen_k + indices(cols)[None, :]
    keep = dropout_hash(int(seed.reshape(-1)[0].item()), linear_index) >= dropout_threshold(dropout_p)
    return keep.reshape(batch, heads, len(rows), len(cols))
