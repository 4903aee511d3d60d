"""flash-attn 2.8's training and decoding functions over fast_attn's contract, on every device fast_attn runs on.

    from fast_attn.flash_attn_interface import flash_attn_func   # instead of flash_attn's
    out = flash_attn_func(q, k, v, causal=True)                   # q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D)

The same signatures, (B, S, H, D) layout, return values and semantics as flash-attn 2.8's
`flash_attn_func`, `flash_attn_qkvpacked_func` and `flash_attn_kvpacked_func`, and of its packed
variable-length forms `flash_attn_varlen_func`, `flash_attn_varlen_qkvpacked_func` and
`flash_attn_varlen_kvpacked_func` (q (total_q, Hq, D), int32 cu_seqlens, softmax_lse (Hq, total_q);
every rule below holds per sequence), and of its decoding function `flash_attn_with_kvcache`:

* `causal` is aligned bottom-right: query i sees keys j <= i + Sk - Sq. Sq = 2, Sk = 5 gives the rows
  1 1 1 1 0 / 1 1 1 1 1; Sq = 5, Sk = 2 gives three rows that see nothing (their output is 0).
* `window_size=(left, right)`, -1 = unbounded: query i sees keys i + Sk - Sq - left .. i + Sk - Sq + right;
  `causal` forces right = 0.
* `softcap` > 0 caps each scaled score to softcap * tanh(score / softcap); 0.0 = none.
* `alibi_slopes` float32 (H,) or (B, H) adds -slope * |i + Sk - Sq - j| to the scores.
* GQA: query heads h * (Hq // Hkv) .. (h + 1) * (Hq // Hkv) - 1 read key/value head h.
* `return_attn_probs=True` returns (out, softmax_lse, None): softmax_lse is (B, Hq, Sq) float32, the
  natural-log log-sum-exp of each row's scores.

Differences from flash-attn:
* Any device and dtype fast_attn supports (CPU included; float32 and float64 too), any head dim up to
  256 (not only multiples of 8).
* softcap works together with dropout (flash-attn refuses the pair).
* softmax_lse of a row that sees no key is -inf (flash-attn 2 writes +inf).
* softmax_lse with ALiBi is the log-sum-exp of the scores as defined above in every mode; in causal
  mode flash-attn 2 adds slope * j instead of -slope * |i + Sk - Sq - j|, which gives the same output
  but an lse larger by slope * (i + Sk - Sq).
* softmax_lse carries a gradient (flash-attn's does not): using it in a loss differentiates through it.
* `block_table` (a paged KV cache) takes any page size (flash-attn needs multiples of 256). In
  `flash_attn_with_kvcache` the kernels read the pages in place, cache_leftpad alongside. In
  `flash_attn_varlen_func` each sequence's keys and values are first copied out of their pages into
  packed tensors (total_k rows; cu_seqlens_k is read on the host), and gradients flow back into the
  caches (flash-attn's paged varlen form is forward only).
* max_seqlen_q / max_seqlen_k may also be 0-d tensors (fast_attn.varlen_attention reads none under
  torch.compile).
* The third value of return_attn_probs is always None (flash-attn returns a debugging tensor of the
  dropout pattern, "for testing only").
* `deterministic=True`: fast_attn's CPU and Triton backward passes are deterministic by construction; the
  CUDA backend's is when torch.use_deterministic_algorithms(True) is in effect. On a CUDA device
  deterministic=True is therefore refused unless that setting is on (it is then honoured by every backend).
"""

from __future__ import annotations

import torch

from .decode import decode_attention
from .functional import attention
from .paged_sequences import gather_paged_sequences
from .rotary import apply_rotary
from .varlen import varlen_attention


def _check_tensor(name: str, value: object, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(value.shape)}")
    return value


def _window(window_size: object) -> tuple[int, int] | None:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    return None if tuple(window_size) == (-1, -1) else tuple(window_size)


def _softcap(softcap: object) -> float | None:
    if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap == 0:
        return None
    return softcap  # validated by fast_attn.attention (> 0, finite)


def _check_deterministic(deterministic: object, q: torch.Tensor) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if deterministic and q.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        raise ValueError(
            "deterministic=True on a CUDA device needs torch.use_deterministic_algorithms(True): the cuda "
            "backend chooses its deterministic backward from that setting"
        )


def _check_flags(q: torch.Tensor, causal: object, deterministic: object, return_attn_probs: object) -> None:
    """The boolean options every function takes (deterministic: see _check_deterministic)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got {type(return_attn_probs).__name__}")
    _check_deterministic(deterministic, q)


def _attention_keywords(causal: bool, window_size, softcap, alibi_slopes, softmax_scale, dropout_p) -> dict:
    """flash-attn's options as the keywords of fast_attn.attention and varlen_attention (lse included)."""
    return dict(
        causal="bottom_right" if causal else False,
        window_size=_window(window_size),
        softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes,
        scale=softmax_scale,
        dropout_p=dropout_p,
        return_lse=True,
    )


def _unbind_packed(name: str, packed: object, rank: int, layout: str, dim: int, count: int) -> tuple:
    """The `count` tensors packed along `dim` of a `rank`-D tensor of shape `layout`."""
    packed = _check_tensor(name, packed, rank, layout)
    if packed.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=dim)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) (see the module docstring)."""
    q = _check_tensor("q", q, 4, "(B, Sq, Hq, D)")
    k = _check_tensor("k", k, 4, "(B, Sk, Hkv, D)")
    v = _check_tensor("v", v, 4, "(B, Sk, Hkv, D)")
    _check_flags(q, causal, deterministic, return_attn_probs)
    options = _attention_keywords(causal, window_size, softcap, alibi_slopes, softmax_scale, dropout_p)
    out, lse = attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **options
    )  # (B, Hq, Sq, D) views of (B, Sq, Hq, D) memory, lse (B, Hq, Sq)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (B, S, 3, H, D) -> out (B, S, H, D); gradients come back as one (B, S, 3, H, D) tensor."""
    q, k, v = _unbind_packed("qkv", qkv, 5, "(B, S, 3, H, D)", dim=2, count=3)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> out (B, Sq, Hq, D)."""
    k, v = _unbind_packed("kv", kv, 5, "(B, Sk, 2, Hkv, D)", dim=2, count=2)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q (total_q, Hq, D), k and v (total_k, Hkv, D), sequences laid end to end at the int32 offsets
    cu_seqlens_q / cu_seqlens_k (N + 1,) -> out (total_q, Hq, D) (see the module docstring). With
    block_table (N, max_pages), k and v are paged caches (num_pages, page_size, Hkv, D) holding each
    sequence's cu_seqlens_k[n + 1] - cu_seqlens_k[n] keys (fast_attn.paged_sequences)."""
    q = _check_tensor("q", q, 3, "(total_q, Hq, D)")
    if block_table is not None:
        k, v = gather_paged_sequences(k, v, block_table, cu_seqlens_k)  # (total_k, Hkv, D) each
    _check_flags(q, causal, deterministic, return_attn_probs)
    options = _attention_keywords(causal, window_size, softcap, alibi_slopes, softmax_scale, dropout_p)
    out, lse = varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options
    )  # (total_q, Hq, D), lse (Hq, total_q)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (total, 3, H, D) -> out (total, H, D); gradients come back as one (total, 3, H, D) tensor."""
    q, k, v = _unbind_packed("qkv", qkv, 4, "(total, 3, H, D)", dim=1, count=3)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D) -> out (total_q, Hq, D)."""
    k, v = _unbind_packed("kv", kv, 4, "(total_k, 2, Hkv, D)", dim=1, count=2)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def _rotated(
    name: str, x: torch.Tensor, rotary_cos, rotary_sin, starts: torch.Tensor, each_row: bool, interleaved
) -> torch.Tensor:
    """x (B, S, H, D) rotated at positions starts[b] + i (each_row) or starts[b] (every row)."""
    if not isinstance(rotary_cos, torch.Tensor) or not isinstance(rotary_sin, torch.Tensor):
        raise TypeError("rotary_cos and rotary_sin must both be tensors (seqlen_ro, rotary_dim / 2)")
    if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape:
        raise ValueError(
            "rotary_cos and rotary_sin must have one shape (seqlen_ro, rotary_dim / 2), got "
            f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
        )
    if 2 * rotary_cos.shape[1] > x.shape[-1]:
        raise ValueError(
            f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} exceeds the head dim {x.shape[-1]}"
        )
    if rotary_cos.device != x.device:
        raise ValueError(f"rotary_cos must be on {name}'s device {x.device}, got {rotary_cos.device}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    rows = torch.arange(x.shape[1], device=x.device) if each_row else torch.zeros(x.shape[1], device=x.device)
    positions = starts.long()[:, None] + rows.long()[None, :]  # (B, S)
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and positions.numel():
        if int(positions.max()) >= rotary_cos.shape[0]:
            raise ValueError(
                f"rotary_cos has {rotary_cos.shape[0]} positions, but {name} is rotated up to position "
                f"{int(positions.max())}"
            )
    return apply_rotary(x, rotary_cos, rotary_sin, positions, interleaved)


def _cache_seqlens(
    cache_seqlens: object, q: torch.Tensor, k_cache: torch.Tensor, block_table
) -> torch.Tensor:
    """flash-attn's cache_seqlens (None: the whole cache; an int: every sequence) as int32 (B,)."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    if cache_seqlens is None:
        pages = 1 if block_table is None else block_table.shape[1]
        cache_seqlens = pages * k_cache.shape[1]
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
        raise TypeError(f"cache_seqlens must be an int, an int32 tensor (B,) or None, got {cache_seqlens!r}")
    return torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q (B, Sq, Hq, D) against a KV cache, the new k/v (B, S_new, Hkv, D) appended in place first
    -> out (B, Sq, Hq, D), or (out, softmax_lse (B, Hq, Sq)) with return_softmax_lse.

    fast_attn.decode_attention under flash-attn 2.8's signature (forward only). k_cache/v_cache are
    (B_cache, S_cache, Hkv, D), or pages (num_pages, page_size, Hkv, D) with block_table (B, max_pages)
    int32; cache_seqlens is an int32 (B,) tensor, an int, or None (the whole cache). With rotary_cos and
    rotary_sin (seqlen_ro, rotary_dim / 2), the new keys are rotated at positions cache_seqlens[b] + i
    before they are written, and q at the same positions when causal or windowed, else every row of q
    at cache_seqlens[b]; rotary_interleaved as flash-attn's. Differences from flash-attn: any page
    size (flash-attn needs multiples of 256), any device and dtype fast_attn supports, paged caches
    with cache_leftpad, and a row that sees no key gives lse -inf.
    """
    q = _check_tensor("q", q, 4, "(B, Sq, Hq, D)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse must be a bool, got {type(return_softmax_lse).__name__}")
    k_cache = _check_tensor("k_cache", k_cache, 4, "(B_cache, S_cache, Hkv, D)")
    seqlens = _cache_seqlens(cache_seqlens, q, k_cache, block_table)
    window = _window(window_size)
    if rotary_cos is not None or rotary_sin is not None:
        if k is None:
            raise ValueError("rotary_cos and rotary_sin rotate the new keys: pass k and v with them")
        k = _check_tensor("k", k, 4, "(B, S_new, Hkv, D)")
        k = _rotated("k", k, rotary_cos, rotary_sin, seqlens, True, rotary_interleaved)
        q = _rotated(
            "q", q, rotary_cos, rotary_sin, seqlens, causal or window is not None, rotary_interleaved
        )
    out, lse = decode_attention(
        q,
        k_cache,
        v_cache,
        seqlens,
        k=k,
        v=v,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        causal=causal,
        window_size=window,
        softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes,
        scale=softmax_scale,
        num_splits=num_splits,
        return_lse=True,
    )
    return (out, lse) if return_softmax_lse else out


__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
