"""The public attention functions: validate once, then dispatch."""

from __future__ import annotations

import torch

from . import dispatch
from .masks import bias_from_mask
from .validation import build_problem, validate_call_options


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """softmax(q k^T * scale + bias) v with causal and key-padding masks and score modifiers.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA).
    bias: float, broadcastable to (B, Hq, Sq, Sk); its gradient comes back in its own shape.
    key_mask: bool (B, Sk), True = this key may be attended.
    causal: False, True / "top_left" (j <= i), or "bottom_right" (j <= i + Sk - Sq).
    window_size: (left, right), -1 = unbounded: query i sees key j iff d - left <= j <= d + right,
        with the diagonal d = i under a top-left causal mask and i + Sk - Sq otherwise; a causal
        mask forces right = 0.
    softcap: each scaled score becomes softcap * tanh(score / softcap), before bias and ALiBi.
    alibi_slopes: float32 (Hq,) or (B, Hq): adds -slope * |i + Sk - Sq - j| to the scores.
    sinks: (Hq,) one logit per head, or (B, Hq, Sq) one per query row, that joins the row's softmax
        denominator (differentiable).
    scale: default 1 / sqrt(D). dropout_p: dropout on the attention probabilities.
    Returns out (B, Hq, Sq, D) in q's dtype, and with return_lse=True also
    lse (B, Hq, Sq), the float32 (float64 for float64 inputs) log-sum-exp of the scores (sink included).
    A query row with no visible key gives 0 and lse = -inf (the sink's logit with sinks).
    """
    validate_call_options(backend, return_lse)
    problem = build_problem(
        q,
        k,
        v,
        bias=bias,
        key_mask=key_mask,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        scale=scale,
        dropout_p=dropout_p,
    )
    out, lse = dispatch.run_problem(problem, backend)
    return (out, lse) if return_lse else out


def _sdpa_mask_keywords(attn_mask: torch.Tensor, query: torch.Tensor, seqlen_k: int) -> dict:
    """Map SDPA's attn_mask onto attention's keywords: a bool mask that only varies
    along batch and keys becomes the in-kernel key_mask; any other bool mask
    becomes a -inf bias; a float mask is the bias."""
    if attn_mask.dtype != torch.bool:
        return {"bias": attn_mask}
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to (B, H, L, S), got shape {tuple(attn_mask.shape)}")
    mask4 = attn_mask[(None,) * (4 - attn_mask.dim())] if attn_mask.dim() < 4 else attn_mask
    if mask4.shape[1] == 1 and mask4.shape[2] == 1 and mask4.shape[3] == seqlen_k:
        if mask4.shape[0] in (1, query.shape[0]):
            return {"key_mask": mask4[:, 0, 0, :]}
    return {"bias": bias_from_mask(attn_mask, query.dtype)}


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, on fast_attn's kernels.

    Same arguments and results: bool attn_mask True = attend, float attn_mask
    added to the scores, is_causal top-left aligned, enable_gqa for Hq != Hkv.
    Inputs are (B, H, L, E) or (B, L, E); the value head dim must equal E.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (query.dim() == key.dim() == value.dim()) or query.dim() not in (3, 4):
        raise ValueError(
            "query, key and value must all be 4-D (B, H, L, E) or all 3-D (B, L, E), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    unbatched_heads = query.dim() == 3
    if unbatched_heads:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"value head dim must equal query head dim E, got {value.shape[-1]} and {query.shape[-1]}"
        )
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} heads but key has {key.shape[1]}; pass enable_gqa=True for GQA"
        )
    masks = {}
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if unbatched_heads and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        masks = _sdpa_mask_keywords(attn_mask, query, key.shape[2])
    out = attention(query, key, value, **masks, causal=bool(is_causal), scale=scale, dropout_p=dropout_p)
    return out.squeeze(1) if unbatched_heads else out
