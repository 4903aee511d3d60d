"""fast_attn.nn.Attention: multi-head self- or cross-attention on fast_attn's kernels.

Fused projections (one GEMM for q, k, v in self-attention; one for k, v in
cross-attention), grouped-query attention (k/v keep num_kv_heads heads, never
expanded), an optional additive bias, a key mask, causal masking, the score
modifiers of today's models (a sliding window, softcap, ALiBi slopes, learnable
attention sinks), packed variable-length sequences (`cu_seqlens`), and a KV cache
for incremental decoding.

Causal self-attention is aligned bottom-right (query i of Sq new tokens sees
keys j <= i + Sk - Sq): with a cache holding Sk - Sq earlier tokens that is
exactly "every token sees itself and the past", and without a cache (Sk = Sq)
it is the ordinary causal mask.
"""

from __future__ import annotations

import torch
from torch import nn

from ..decode import decode_attention
from ..functional import attention
from ..varlen import varlen_attention
from .kv_cache import KVCache


class Attention(nn.Module):
    """Multi-head attention: (B, Sq, embed_dim) -> (B, Sq, embed_dim).

    embed_dim: width of the input and output. num_heads: query heads.
    num_kv_heads: key/value heads (default num_heads; fewer is GQA/MQA, num_heads % num_kv_heads == 0).
    head_dim: default embed_dim // num_heads.
    cross_attention: keys and values come from `context` (width kv_embed_dim, default embed_dim).
    causal: default causality of self-attention (bottom-right aligned; see module docstring).
    bias: biases of the input projections; out_bias: of the output projection (default: bias).
    dropout: on the attention probabilities, in training mode. scale: default 1 / sqrt(head_dim).
    window_size: (left, right) keys around the diagonal each query sees (-1 = unbounded; causal forces
        right = 0), as fast_attn.attention. softcap: caps each scaled score to softcap * tanh(score / softcap).
    alibi_slopes: float32 (num_heads,) ALiBi slopes (a buffer). sinks: a learnable logit per head that
        joins every row's softmax denominator (parameter `sinks`, initialized to 0).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        cross_attention: bool = False,
        kv_embed_dim: int | None = None,
        causal: bool = False,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        scale: float | None = None,
        window_size: tuple[int, int] | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        sinks: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a positive multiple of num_kv_heads, got {num_heads} and {num_kv_heads}"
            )
        if head_dim is None:
            if embed_dim % num_heads != 0:
                raise ValueError(
                    f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pass head_dim"
                )
            head_dim = embed_dim // num_heads
        if cross_attention and causal:
            raise ValueError("cross-attention cannot be causal")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = (
            embed_dim,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.cross_attention, self.causal, self.dropout, self.scale = cross_attention, causal, dropout, scale
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        if cross_attention:
            self.q_proj = nn.Linear(embed_dim, q_width, bias=bias, **factory)
            self.kv_proj = nn.Linear(kv_embed_dim or embed_dim, 2 * kv_width, bias=bias, **factory)
        else:
            if kv_embed_dim is not None:
                raise ValueError("kv_embed_dim only applies to cross-attention")
            self.qkv_proj = nn.Linear(embed_dim, q_width + 2 * kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(q_width, embed_dim, bias=bias if out_bias is None else out_bias, **factory)
        self.window_size, self.softcap = window_size, softcap
        if alibi_slopes is not None:
            if tuple(alibi_slopes.shape) != (num_heads,):
                raise ValueError(
                    f"alibi_slopes must have shape (num_heads,) = ({num_heads},), got {tuple(alibi_slopes.shape)}"
                )
            alibi_slopes = alibi_slopes.to(device=device, dtype=torch.float32)
        self.register_buffer("alibi_slopes", alibi_slopes)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KVCache for this layer (dtype and device of its weights)."""
        weight = self.out_proj.weight
        return KVCache(
            batch, max_length, self.num_kv_heads, self.head_dim, dtype=weight.dtype, device=weight.device
        )

    def _split_heads(self, projected: torch.Tensor, heads: int) -> torch.Tensor:
        return projected.unflatten(-1, (heads, self.head_dim))  # (B, S, heads, D)

    def _self_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's q (..., S, Hq, D) and k, v (..., S, Hkv, D) from one fused projection of x (..., S, E)."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        k, v = (self._split_heads(t, self.num_kv_heads) for t in (k, v))
        return self._split_heads(q, self.num_heads), k, v

    def _score_options(self) -> dict:
        """The keywords of fast_attn.attention / varlen_attention this layer fixes (dropout in training only)."""
        return dict(
            window_size=self.window_size,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _keys_values(
        self, x: torch.Tensor, context: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D), from the projections and the cache."""
        kv_width = self.num_kv_heads * self.head_dim
        if not self.cross_attention:
            if context is not None:
                raise ValueError("context is only for cross-attention; this layer is self-attention")
            q, k, v = self._self_projections(x)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, Hkv, cached + Sq, D)
            else:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            return q.transpose(1, 2), k, v
        q = self._split_heads(self.q_proj(x), self.num_heads).transpose(1, 2)
        if cache is not None and cache.length > 0:
            # The encoder's keys and values were projected at the first step.
            return (q, *cache.cached())
        if context is None:
            raise ValueError("cross-attention needs `context` (or a filled cache)")
        k, v = (
            self._split_heads(t, self.num_kv_heads) for t in self.kv_proj(context).split(kv_width, dim=-1)
        )
        if cache is not None:
            return (q, *cache.append(k, v))
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Sq, embed_dim); context (B, Sk, kv_embed_dim) for cross-attention.

        bias: broadcastable to (B, num_heads, Sq, Sk), added to the scaled scores.
        key_mask: bool (B, Sk), True = attend; with a cache Sk counts the cached tokens too.
        causal: overrides the layer's default for this call (self-attention only).
        cache: a KVCache (see new_cache); the new keys/values are appended and all of them attended.
        cu_seqlens: int32 (N + 1,) offsets of sequences packed end to end in x (T, embed_dim), each
            attending only to itself (self-attention; fast_attn.varlen_attention); max_seqlen is the
            longest (an int or a 0-d tensor; default: computed from cu_seqlens, without a sync).
        """
        if cu_seqlens is not None:
            return self._packed_forward(x, cu_seqlens, max_seqlen, context, bias, key_mask, causal, cache)
        if max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens")
        if x.dim() != 3:
            raise ValueError(f"x must be (B, S, embed_dim), got shape {tuple(x.shape)}")
        causal = self.causal if causal is None else causal
        if causal and self.cross_attention:
            raise ValueError("cross-attention cannot be causal")
        if self._decodes(x, context, bias, key_mask, cache):
            return self._decode_step(x, causal, cache)
        q, k, v = self._keys_values(x, context, cache)
        out = attention(
            q,
            k,
            v,
            bias=bias,
            key_mask=key_mask,
            causal="bottom_right" if causal else False,
            **self._score_options(),
        )  # (B, Hq, Sq, D)
        out = out.transpose(1, 2).flatten(2)  # (B, Sq, Hq * D)
        return self.out_proj(out)

    def _decodes(self, x, context, bias, key_mask, cache) -> bool:
        """Whether this call is a decoding step that fast_attn.decode_attention runs: self-attention
        with a cache, no bias or key mask, and no gradient or dropout (decoding is forward only)."""
        if cache is None or self.cross_attention or context is not None or bias is not None:
            return False
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return key_mask is None and not training and not (self.training and self.dropout > 0.0)

    def _decode_step(self, x: torch.Tensor, causal: bool, cache: KVCache) -> torch.Tensor:
        """x (B, Sq, embed_dim): its keys and values are written into the cache in place by the kernel."""
        q, k, v = self._self_projections(x)  # (B, Sq, Hq, D), (B, Sq, Hkv, D)
        options = self._score_options()
        del options["dropout_p"]  # 0: _decodes
        out = decode_attention(
            q, cache.keys, cache.values, cache.reserve(k, v), k=k, v=v, causal=causal, **options
        )  # (B, Sq, Hq, D)
        cache.advance(k.shape[1])
        return self.out_proj(out.flatten(2))

    def _packed_forward(
        self, x, cu_seqlens, max_seqlen, context, bias, key_mask, causal, cache
    ) -> torch.Tensor:
        """Self-attention over the sequences packed in x (T, embed_dim) -> (T, embed_dim)."""
        for name, value in (("context", context), ("bias", bias), ("key_mask", key_mask), ("cache", cache)):
            if value is not None:
                raise ValueError(f"{name} is not taken with cu_seqlens (packed self-attention)")
        if self.cross_attention:
            raise ValueError("cu_seqlens is for self-attention; this layer is cross-attention")
        if x.dim() != 2:
            raise ValueError(f"with cu_seqlens, x must be (T, embed_dim), got shape {tuple(x.shape)}")
        if max_seqlen is None:
            max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max() if len(cu_seqlens) > 1 else 0
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        q, k, v = (
            self._split_heads(q, self.num_heads),
            *(self._split_heads(t, self.num_kv_heads) for t in (k, v)),
        )
        causal = self.causal if causal is None else causal
        out = varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            causal="bottom_right" if causal else False,
            **self._score_options(),
        )  # (T, Hq, D)
        return self.out_proj(out.flatten(1))
