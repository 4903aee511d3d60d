"""Rotary position embeddings as flash-attn's flash_attn_with_kvcache applies them to q and the new k."""

from __future__ import annotations

import torch


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x (B, S, H, D) with its first rotary_dim = 2 * cos.shape[1] dims rotated at `positions`.

    cos, sin: (seqlen_ro, rotary_dim / 2); positions: int (B, S), each row's index into them.
    interleaved=True rotates the pairs of dims (0, 1), (2, 3), ... (GPT-J); False the pairs
    (i, i + rotary_dim / 2) (GPT-NeoX). The rotation runs in float32 (float64 for float64 x).
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[1]
    cos_at = cos.to(compute_dtype)[positions.long()][:, :, None, :]  # (B, S, 1, rotary_dim / 2)
    sin_at = sin.to(compute_dtype)[positions.long()][:, :, None, :]
    rotary = x[..., : 2 * half].to(compute_dtype)
    if interleaved:
        first, second = rotary[..., 0::2], rotary[..., 1::2]
    else:
        first, second = rotary[..., :half], rotary[..., half:]
    rotated_first = first * cos_at - second * sin_at
    rotated_second = first * sin_at + second * cos_at
    if interleaved:
        rotated = torch.stack((rotated_first, rotated_second), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((rotated_first, rotated_second), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)
