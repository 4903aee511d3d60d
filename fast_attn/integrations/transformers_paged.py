"""Continuous batching in transformers (`generate_batch`, a paged KV cache) on fast_attn's kernels.

transformers 5.18's continuous batching runs any attention implementation X as "paged|X": the
function gets the new tokens of every request packed into one row, q (1, Hq, T_new, D), with the
paged cache in `cache` and its read and write indices. It stores the new keys and values in the
cache itself (`cache.update`, which also gathers each request's past and new keys into
(T_k, Hkv, D)), then attends with the requests' offsets cu_seq_lens_q / cu_seq_lens_k: each request
is one problem of fast_attn.varlen_attention, causal bottom-right (its new tokens follow its past),
with the layer's window, softcap and sinks. Later releases accept only eager, sdpa and flash
implementations in continuous batching; transformers refuses fast_attn there itself.
"""

from __future__ import annotations

import torch

from ..varlen import varlen_attention
from .transformers import RESULT_NEUTRAL_KWARGS

PAGED_IMPLEMENTATION_NAME = "paged|fast_attn"

# What continuous batching passes beyond an ordinary forward that does not change the result.
RESULT_NEUTRAL_PAGED_KWARGS = RESULT_NEUTRAL_KWARGS | {"logits_indices", "logits_processor_args"}


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | dict | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    cache=None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | dict | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | dict | None = None,
    read_index: list | None = None,
    write_index: list | None = None,
    block_table: torch.Tensor | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """q (1, Hq, T_new, D), the new k/v (1, Hkv, T_new, D) -> out (1, T_new, Hq, D)."""
    name = type(module).__name__
    if cache is None or cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(
            f"{name}: '{PAGED_IMPLEMENTATION_NAME}' runs only under transformers' continuous batching (it needs "
            "the paged cache and the requests' cu_seq_lens); use attn_implementation='fast_attn' otherwise"
        )
    unimplemented = {
        "attention_mask": attention_mask is not None,
        "block_table": block_table is not None,
        "dropout": bool(dropout),
        "is_causal=False (a bidirectional layer)": is_causal is False,
    }
    for argument, given in unimplemented.items():
        if given:
            raise ValueError(
                f"{name}: fast_attn's continuous batching does not implement {argument}; the requests are "
                "told apart by cu_seq_lens_q / cu_seq_lens_k and attend causally"
            )
    for argument, given in kwargs.items():
        if given is not None and argument not in RESULT_NEUTRAL_PAGED_KWARGS:
            raise ValueError(
                f"{name}: fast_attn's continuous batching does not implement the argument {argument!r}"
            )
    layer_type = "sliding_attention" if sliding_window else "full_attention"
    if isinstance(cu_seq_lens_k, dict):  # one set of key offsets per layer type
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    keys, values = cache.update(
        key_states=key,
        value_states=value,
        layer_idx=module.layer_idx,
        read_index=read_index,
        write_index=write_index,
    )  # (T_k, Hkv, D): each request's past keys, then its new ones
    out = varlen_attention(
        query[0].transpose(0, 1),
        keys,
        values,
        cu_seq_lens_q.to(torch.int32),
        cu_seq_lens_k.to(torch.int32),
        max_seqlen_q,
        max_seqlen_k,
        causal="bottom_right",
        window_size=(sliding_window - 1, 0) if sliding_window else None,
        softcap=softcap,
        sinks=s_aux,
        scale=scaling,
    )  # (T_new, Hq, D)
    return out[None], None
