"""The whole attention contract in plain PyTorch: the oracle of every test and
the last fallback backend.

Differentiable with ordinary autograd and exact in float64. Memory is
O(B * H * Sq * Sk): it is a reference, not a kernel.
"""

from __future__ import annotations

import math

import torch

from .causal import CausalMode, causal_offset, parse_causal
from .dropout import dropout_keep_mask


def _visible_mask(
    seqlen_q: int, seqlen_k: int, mode: CausalMode, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool, broadcastable to (B, H, Sq, Sk): True where query i may attend key j."""
    visible = None
    if mode != CausalMode.NONE:
        rows = torch.arange(seqlen_q, device=device)[:, None]
        cols = torch.arange(seqlen_k, device=device)[None, :]
        visible = cols <= rows + causal_offset(mode, seqlen_q, seqlen_k)  # (Sq, Sk)
    if key_mask is not None:
        keys = key_mask[:, None, None, :]  # (B, 1, 1, Sk)
        visible = keys if visible is None else visible & keys
    return visible


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    causal: object = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out, lse) for q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D).

    The math runs in `compute_dtype` (default: float64 for float64 inputs, else
    float32); out has q's dtype, lse has the compute dtype. Rows with no
    visible key give out 0 and lse -inf with zero, NaN-free gradients.
    """
    mode = parse_causal(causal)
    out_dtype = q.dtype
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    group = heads_q // heads_kv
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, Sk, D)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if bias is not None:
        scores = scores + bias.to(compute_dtype)

    visible = _visible_mask(seqlen_q, seqlen_k, mode, key_mask, q.device)
    # A score of -inf (from a bias or float mask) is a masked score too.
    finite_or_nan = scores != float("-inf")
    visible = finite_or_nan if visible is None else visible & finite_or_nan
    visible = visible.expand(scores.shape)
    row_has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)

    # Fully masked rows get finite placeholder scores so that nothing in the
    # graph produces NaN; their probabilities are zeroed below.
    scores = torch.where(visible, scores, float("-inf"))
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=compute_dtype, device=q.device))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * row_has_key
    lse = torch.where(row_has_key, lse, float("-inf")).squeeze(-1)

    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("reference_attention: dropout_p > 0 needs a dropout_seed tensor")
        keep = dropout_keep_mask(dropout_seed, dropout_p, batch, heads_q, seqlen_q, seqlen_k, q.device)
        probs = probs * keep / (1.0 - dropout_p)

    out = torch.matmul(probs, vc).to(out_dtype)
    return out, lse
