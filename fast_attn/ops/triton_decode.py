"""The Triton decode kernels as a torch op: fast_attn::triton_decode_forward, with the schema of
fast_attn::decode_forward (csrc/schema.cpp, the contract), registered with torch.library.triton_op.

The op writes k_new / v_new into the caches (decode_append_kernel), attends with
decode_split_kernel over num_splits key ranges, and with several splits merges their float32
partials (decode_merge_kernel); fast_attn/triton/decode.py says why three kernels. Arguments are
filled by name (the *_arguments functions, also used by tests/test_triton_compile.py) and
launched by keyword through triton_ops._launch. Registered when fast_attn.ops.triton_ops is
imported (the last line there).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

from ..triton.decode import decode_append_kernel, decode_merge_kernel, decode_split_kernel
from .triton_configs import (
    MAX_DECODE_SPLITS,
    cdiv,
    decode_config,
    decode_splits,
    device_arch,
    head_dim_block,
    interpreting,
    next_power_of_2,
)
from .triton_ops import (
    LOG2E,
    SUPPORTED_DTYPES,
    _broadcast_stride,
    _keep_op_whole,
    _launch,
    _named_strides,
    _shapes_only,
)

DECODE_OP = "fast_attn::triton_decode_forward"


class DecodeKernelProblem(NamedTuple):
    """The op's inputs, named as in its schema (validation.DecodeProblem is the public function's)."""

    q: torch.Tensor  # (B, Sq, Hq, D)
    k_cache: torch.Tensor  # (Bc, S_cache, Hkv, D) or pages (num_pages, page_size, Hkv, D)
    v_cache: torch.Tensor
    k_new: torch.Tensor | None  # (B, S_new, Hkv, D)
    v_new: torch.Tensor | None
    cache_seqlens: torch.Tensor  # int32 (B,)
    cache_leftpad: torch.Tensor | None  # int32 (B,)
    block_table: torch.Tensor | None  # int32 (B, max_pages)
    cache_batch_idx: torch.Tensor | None  # int32 (B,)
    scale: float
    causal: bool
    alibi_slopes: torch.Tensor | None  # float32 (B or 1, Hq)
    window_left: int
    window_right: int
    softcap: float

    @property
    def new_rows(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[1]

    @property
    def capacity(self) -> int:
        """Key positions one sequence's cache can hold."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[1]


def _fits(t: torch.Tensor, dtype: torch.dtype, device: torch.device, shape: tuple[int, ...]) -> bool:
    """Whether t has this dtype, device and shape (-1: any size) and a contiguous last dim."""
    sizes_fit = t.dim() == len(shape) and all(n in (-1, size) for n, size in zip(shape, t.shape))
    return t.dtype == dtype and t.device == device and sizes_fit and (t.numel() == 0 or t.stride(-1) == 1)


def _check_decode_inputs(p: DecodeKernelProblem, num_splits: int) -> None:
    # What the kernels index (fast_attn/decode.py validates the public function's arguments):
    # dtypes, devices and shapes. Index values (lengths, page ids) are clamped in the kernels.
    q, k_cache = p.q, p.k_cache
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fast_attn triton decode supports float16, bfloat16 and float32, got {q.dtype}")
    batch, _, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2] if k_cache.dim() == 4 else 0
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"fast_attn triton decode: k_cache {tuple(k_cache.shape)} needs Hkv dividing Hq = {heads_q}"
        )
    if (p.k_new is None) != (p.v_new is None):
        raise ValueError("fast_attn triton decode: k_new and v_new go together")
    cache_shape = (-1, -1, heads_kv, head_dim)
    new_shape = (batch, p.new_rows, heads_kv, head_dim)
    expected = {
        "q": (q, q.dtype, (-1, -1, -1, -1)),
        "k_cache": (k_cache, q.dtype, cache_shape),
        "v_cache": (p.v_cache, q.dtype, tuple(k_cache.shape)),
        "k_new": (p.k_new, q.dtype, new_shape),
        "v_new": (p.v_new, q.dtype, new_shape),
        "cache_seqlens": (p.cache_seqlens, torch.int32, (batch,)),
        "cache_leftpad": (p.cache_leftpad, torch.int32, (batch,)),
        "block_table": (p.block_table, torch.int32, (batch, -1)),
        "cache_batch_idx": (p.cache_batch_idx, torch.int32, (batch,)),
        "alibi_slopes": (p.alibi_slopes, torch.float32, (-1, heads_q)),
    }
    for name, (t, dtype, shape) in expected.items():
        if t is not None and not _fits(t, dtype, q.device, shape):
            raise ValueError(
                f"fast_attn triton decode: {name} must be {dtype} of shape {shape} (-1: any size) on "
                f"{q.device} with a contiguous last dim, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if p.alibi_slopes is not None and p.alibi_slopes.shape[0] not in (1, batch):
        raise ValueError(
            f"fast_attn triton decode: alibi_slopes must be (B or 1, Hq), got {tuple(p.alibi_slopes.shape)}"
        )
    if num_splits < 0:
        raise ValueError(f"fast_attn triton decode: num_splits must be >= 0, got {num_splits}")


def _cache_arguments(p: DecodeKernelProblem) -> tuple[dict, dict]:
    """Arguments of the caches and their indirections shared by the append and split kernels."""
    k_cache = p.k_cache
    paged = p.block_table is not None
    args = dict(
        k_cache_ptr=k_cache,
        v_cache_ptr=p.v_cache,
        cache_seqlens_ptr=p.cache_seqlens,
        block_table_ptr=p.block_table if paged else p.cache_seqlens,  # a never-read placeholder
        cache_batch_idx_ptr=p.cache_batch_idx if p.cache_batch_idx is not None else p.cache_seqlens,
        **_named_strides("k_cache", k_cache.stride()[:3], ("row", "slot", "head")),
        **_named_strides("v_cache", p.v_cache.stride()[:3], ("row", "slot", "head")),
        block_table_batch_stride=p.block_table.stride(0) if paged else 0,
        cache_rows=k_cache.shape[0],
        page_size=k_cache.shape[1],
        capacity=p.capacity,
    )
    head_dim = p.q.shape[3]
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        PAGED=paged,
        HAS_BATCH_IDX=p.cache_batch_idx is not None and not paged,
    )
    return args, constexprs


def append_arguments(p: DecodeKernelProblem) -> tuple[dict, dict]:
    """(arguments by name, constexprs) of decode_append_kernel."""
    args, constexprs = _cache_arguments(p)
    args.update(
        k_new_ptr=p.k_new,
        v_new_ptr=p.v_new,
        **_named_strides("k_new", p.k_new.stride()[:3], ("batch", "row", "head")),
        **_named_strides("v_new", p.v_new.stride()[:3], ("batch", "row", "head")),
    )
    return args, constexprs


def split_arguments(p: DecodeKernelProblem, out: torch.Tensor, lse: torch.Tensor, num_splits: int):
    """(arguments by name, constexprs with the blocks, (num_warps, num_stages)) of
    decode_split_kernel. out (splits, B, Sq, Hq, D) and lse (splits, B, Hq, Sq), contiguous but
    the split dim: the float32 partials, or with one split the op's out and lse unsqueezed."""
    q = p.q
    heads_q, head_dim = q.shape[2], q.shape[3]
    group = heads_q // p.k_cache.shape[2]
    block_m, block_n, num_warps, num_stages = decode_config(
        device_arch(q.device), head_dim, q.dtype, group * q.shape[1]
    )
    # The band relative to the diagonal j = i, moved by the kernel to each sequence's bottom-right one.
    left = p.window_left
    right = 0 if p.causal else p.window_right
    args, constexprs = _cache_arguments(p)
    args.update(
        q_ptr=q,
        out_ptr=out,
        lse_ptr=lse,
        cache_leftpad_ptr=p.cache_leftpad if p.cache_leftpad is not None else p.cache_seqlens,
        **_named_strides("q", q.stride()[:3], ("batch", "row", "head")),
        **_named_strides("out", out.stride()[:4], ("split", "batch", "row", "head")),
        **_named_strides("lse", lse.stride()[:3], ("split", "batch", "head")),
        seqlen_q=q.shape[1],
        new_rows=p.new_rows,
        kv_group_size=group,
        num_splits=num_splits,
        scale_log2=p.scale * LOG2E,
        first_key_offset=-left if left >= 0 else None,
        last_key_offset=right if right >= 0 else 0,
        softcap=p.softcap if p.softcap > 0.0 else None,
        alibi_slopes_ptr=p.alibi_slopes,
        alibi_batch_stride=None if p.alibi_slopes is None else _broadcast_stride(p.alibi_slopes, 0),
    )
    constexprs.update(
        HAS_LEFTPAD=p.cache_leftpad is not None,
        LEFT_BOUNDED=left >= 0,
        RIGHT_BOUNDED=right >= 0,
        HAS_SOFTCAP=p.softcap > 0.0,
        HAS_ALIBI=p.alibi_slopes is not None,
        UPCAST_OPERANDS=interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return args, constexprs, (num_warps, num_stages)


def split_outputs(out: torch.Tensor, lse: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where decode_split_kernel writes: with one split out and lse themselves (as split 0), with
    several float32 partials (splits, B, Sq, Hq, D) and (splits, B, Hq, Sq) for the merge."""
    if splits == 1:
        return out.unsqueeze(0), lse.unsqueeze(0)
    return (
        out.new_empty((splits, *out.shape), dtype=torch.float32),
        lse.new_empty((splits, *lse.shape), dtype=torch.float32),
    )


def merge_arguments(partial_out, partial_lse, out, lse) -> tuple[dict, dict]:
    """(arguments by name, constexprs) of decode_merge_kernel."""
    num_splits, _, seqlen_q, heads_q, head_dim = partial_out.shape
    args = dict(
        partial_out_ptr=partial_out,
        partial_lse_ptr=partial_lse,
        out_ptr=out,
        lse_ptr=lse,
        partial_out_split_stride=partial_out.stride(0),
        partial_lse_split_stride=partial_lse.stride(0),
        heads_q=heads_q,
        seqlen_q=seqlen_q,
        num_splits=num_splits,
    )
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_SPLITS=next_power_of_2(num_splits)
    )
    return args, constexprs


def choose_splits(p: DecodeKernelProblem, num_splits: int) -> int:
    """The splits of a launch: num_splits, or with 0 decode_splits' heuristic; never more than
    the key blocks the cache can hold nor MAX_DECODE_SPLITS (empty splits would only add work).
    The host knows shapes, not lengths (reading cache_seqlens would synchronize): a cache much
    longer than its sequences may get more splits than they need, each cheap when empty."""
    q = p.q
    group = q.shape[2] // p.k_cache.shape[2]
    block_m, block_n, _, _ = decode_config(device_arch(q.device), q.shape[3], q.dtype, group * q.shape[1])
    key_blocks = cdiv(p.capacity, block_n)
    if num_splits == 0:
        work_units = q.shape[0] * p.k_cache.shape[2] * cdiv(group * q.shape[1], block_m)
        num_splits = decode_splits(work_units, key_blocks, q.device)
    return max(1, min(num_splits, key_blocks, MAX_DECODE_SPLITS))


@triton_op(DECODE_OP, mutates_args=("k_cache", "v_cache"))
def triton_decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    cache_seqlens: torch.Tensor,
    cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    alibi_slopes: Optional[torch.Tensor],
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D) contiguous in q's dtype and lse (B, Hq, Sq) float32; k_new and v_new
    written into the caches first."""
    p = DecodeKernelProblem(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table, cache_batch_idx,
        scale, causal, alibi_slopes, window_left, window_right, softcap,
    )  # fmt: skip
    _check_decode_inputs(p, num_splits)
    batch, seqlen_q, heads_q, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    if _shapes_only(q) or batch == 0 or head_dim == 0:
        return out, lse
    heads_kv = k_cache.shape[2]
    if p.new_rows > 0:
        args, constexprs = append_arguments(p)
        _launch(decode_append_kernel, (p.new_rows, heads_kv, batch), args, constexprs)
    if out.numel() == 0:
        return out, lse
    splits = choose_splits(p, num_splits)
    targets = split_outputs(out, lse, splits)
    args, constexprs, (num_warps, num_stages) = split_arguments(p, *targets, splits)
    row_blocks = cdiv(q.shape[2] // heads_kv * seqlen_q, constexprs["BLOCK_M"])
    grid = (splits, row_blocks * heads_kv, batch)
    _launch(decode_split_kernel, grid, args, dict(constexprs, num_warps=num_warps, num_stages=num_stages))
    if splits > 1:
        args, constexprs = merge_arguments(*targets, out, lse)
        _launch(decode_merge_kernel, (heads_q, seqlen_q, batch), args, constexprs)
    return out, lse


if interpreting():
    # As for the attention ops (triton_ops.py): interpreted kernels cannot be captured, so the op
    # stays one node of a traced graph.
    torch.library.register_torch_dispatch(DECODE_OP, FunctionalTensorMode, _keep_op_whole)


def decode_forward(problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton decode op on a validated fast_attn.validation.DecodeProblem: (out (B, Sq, Hq, D),
    lse (B, Hq, Sq)) without the sinks, which dispatch.run_decode_problem applies."""
    return torch.ops.fast_attn.triton_decode_forward(*problem.op_arguments())
