"""A drop-in for torch.nn.MultiheadAttention that runs fast_attn's kernels.

It subclasses torch's module and only replaces `forward`, so everything else is
torch's own: the constructor and its arguments, parameter names and
initialization (a torch state_dict loads into it and the reverse),
`isinstance(m, torch.nn.MultiheadAttention)`, and the attributes that
nn.TransformerEncoderLayer reads.

need_weights=False (what nn.Transformer* layers pass) is the fused path: the
input projections, then one fast_attn.attention call that applies the masks
in-kernel, then the output projection. need_weights=True (torch's default)
is the slow path: torch's own computation runs unchanged, since returning the
(N, L, S) weights needs them materialized anyway.

Masks on the fused path, in torch's meaning:
  key_padding_mask  (N, S) or (S,) unbatched; bool True = ignore this key (passed to the kernel as a
                    key mask, nothing is built), or float added to the scores of that key
  attn_mask         (L, S) or (N * num_heads, L, S); bool True = not allowed (a -inf bias of that
                    shape), or float added
  is_causal         a hint that attn_mask is the causal mask, as in torch: the kernel applies the
                    top-left causal mask itself and skips masked tiles. Unlike torch, is_causal
                    without an attn_mask is accepted.
A query row that sees no key attends to nothing (0 before the output
projection), as torch's SDPA path; torch's need_weights=True and inference
fast paths give NaN there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import attention
from ..masks import bias_from_mask


def _check_mask_dtype(name: str, mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


def _attn_mask_as_bias(
    attn_mask: torch.Tensor,
    batch: int,
    num_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dtype: torch.dtype,
    unbatched: bool,
) -> torch.Tensor:
    """torch's attn_mask (L, S) or (N * H, L, S) as an additive bias (1 or N, 1 or H, L, S)."""
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (seqlen_q, seqlen_k):
            raise ValueError(
                f"2-D attn_mask must have shape (L, S) = ({seqlen_q}, {seqlen_k}), got {tuple(attn_mask.shape)}"
            )
        mask4 = attn_mask[None, None]  # (1, 1, L, S)
    elif attn_mask.dim() == 3:
        expected = (batch * num_heads, seqlen_q, seqlen_k)
        if tuple(attn_mask.shape) != expected:
            what = "(num_heads, L, S)" if unbatched else "(N * num_heads, L, S)"
            raise ValueError(
                f"3-D attn_mask must have shape {what} = {expected}, got {tuple(attn_mask.shape)}"
            )
        # torch flattens (batch, head) as batch * num_heads + head.
        mask4 = attn_mask.view(batch, num_heads, seqlen_q, seqlen_k)
    else:
        raise ValueError(
            f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got {tuple(attn_mask.shape)}"
        )
    if mask4.dtype == torch.bool:
        return bias_from_mask(~mask4, dtype)  # torch's bool attn_mask: True = not allowed
    return mask4


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the attention itself computed by fast_attn (see module docstring)."""

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """A fast_attn module holding `module`'s parameters (the same objects: optimizers keep working)."""
        if type(module) is not torch.nn.MultiheadAttention:
            raise TypeError(
                f"from_torch takes a torch.nn.MultiheadAttention, got {type(module).__module__}."
                f"{type(module).__qualname__} (a subclass may change forward; convert it by hand)"
            )
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = module.out_proj
        return new.train(module.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            # The slow path: torch's computation, which returns the attention weights.
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """Input projections of (N, L, E), (N, S, kdim), (N, S, vdim) -> (N, L, E), (N, S, E), (N, S, E)."""
        embed_dim = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(embed_dim)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        weight = self.in_proj_weight  # (3E, E)
        if query is key and key is value:
            # Self-attention: one GEMM for q, k and v.
            return F.linear(query, weight, bias).split(embed_dim, dim=-1)
        w_q, w_k, w_v = weight.split(embed_dim)
        q = F.linear(query, w_q, b_q)
        if key is value:
            k, v = F.linear(
                key, torch.cat([w_k, w_v]), None if bias is None else torch.cat([b_k, b_v])
            ).split(embed_dim, dim=-1)
            return q, k, v
        return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _fused_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}"
            )
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must all be batched or all unbatched, got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        unbatched = query.dim() == 2
        # Work batch-first: (N, L, E). Transposes are views; `is` identities are kept for the packed GEMM.
        same_kv, same_qkv = key is value, query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if same_kv:
            value = key
        if same_qkv:
            key = value = query

        batch, seqlen_q, _ = query.shape
        seqlen_k = key.shape[1]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seqlen_k):
            expected = f"(S,) = ({seqlen_k},)" if unbatched else f"(N, S) = ({batch}, {seqlen_k})"
            raise ValueError(
                f"key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}"
            )
        if is_causal and attn_mask is not None:
            # Trust the hint as torch does: the kernel applies the causal mask and skips masked tiles.
            # With appended keys (bias_kv / zero attention) and padding torch uses the mask itself; so do we.
            appends_keys = self.bias_k is not None or self.add_zero_attn
            if key_padding_mask is None or not appends_keys:
                attn_mask = None
            else:
                is_causal = False

        bias = None
        if attn_mask is not None:
            bias = _attn_mask_as_bias(
                attn_mask, batch, self.num_heads, seqlen_q, seqlen_k, query.dtype, unbatched
            )  # (1 or N, 1 or H, L, S)

        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)
        appended = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            appended += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[-1])], dim=1)
            appended += 1

        # The masks let every query see the appended keys, as torch pads them (the causal mask still applies).
        if bias is not None and appended:
            bias = F.pad(bias, (0, appended))
        key_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                key_mask = F.pad(~key_padding_mask, (0, appended), value=True)  # (N, S + appended)
            else:
                padding_bias = F.pad(key_padding_mask, (0, appended))  # (N, S + appended)
                padding_bias = padding_bias[:, None, None, :]  # (N, 1, 1, S + appended)
                bias = padding_bias if bias is None else bias + padding_bias

        heads, head_dim = self.num_heads, self.head_dim
        q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (N, H, L, D)
        k = k.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (N, H, S', D)
        v = v.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        out = attention(
            q,
            k,
            v,
            bias=bias,
            key_mask=key_mask,
            causal=bool(is_causal),
            dropout_p=self.dropout if self.training else 0.0,
        )  # (N, H, L, D)
        out = out.transpose(1, 2).reshape(batch, seqlen_q, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # (N, L, E)
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)
