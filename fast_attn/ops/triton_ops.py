"""The Triton backend as torch ops: fast_attn::triton_attention_forward and
fast_attn::triton_attention_backward, with the argument lists of the C++ ops
(fast_attn/ops/autograd.py), registered with torch.library.triton_op so that
torch.compile sees the kernels, and with autograd from the shared formula.

Each op allocates its outputs, fills the kernels' arguments by name (the *_arguments
functions, also used by tests/test_triton_compile.py to compile the kernels for
GPU targets without a GPU) and launches the autotuned kernels of fast_attn/triton
by keyword (_launch), so a kernel parameter renamed or reordered cannot silently
receive another argument's value.
Everything is deterministic: every output element is written by one program,
and dbias partial sums are added in a fixed order.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from ..causal import CausalMode, visible_band
from ..dropout import dropout_threshold
from ..triton.backward_dbias import attention_backward_dbias_kernel
from ..triton.backward_dkdv import attention_backward_dkdv_kernel
from ..triton.backward_dq import attention_backward_dq_kernel
from ..triton.backward_preprocess import attention_backward_preprocess_kernel
from ..triton.forward import attention_forward_kernel
from . import autograd
from .autograd import empty_bshd_like
from .triton_configs import autotuned, cdiv, dbias_splits, head_dim_block, interpreting, launch_configs

FORWARD_OP = "fast_attn::triton_attention_forward"
BACKWARD_OP = "fast_attn::triton_attention_backward"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
# Rows of out / grad_out per preprocess program: 8192 elements keep it at ~64 registers of data per thread.
PREPROCESS_TILE_ELEMENTS = 8192


class KernelProblem(NamedTuple):
    """The ops' inputs that every attention kernel reads: the tensors, then the scalars."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    key_mask: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    dropout_seed: torch.Tensor | None
    scale: float
    causal: int
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    # Packed sequences: int32 (N + 1,) row offsets into q (1, Hq, Tq, D) and k, v
    # (1, Hkv, Tk, D), and bounds on the sequences' lengths (resolved, never -1).
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        """The grid's batch: the number of sequences when packed, else q's batch."""
        return self.cu_seqlens_q.shape[0] - 1 if self.is_varlen else self.q.shape[0]

    @property
    def seqlens(self) -> tuple[int, int]:
        """(Sq, Sk), or for packed sequences the bounds on their lengths: what the grid covers."""
        if self.is_varlen:
            return self.max_seqlen_q, self.max_seqlen_k
        return self.q.shape[2], self.k.shape[2]


def _check_inputs(q: torch.Tensor, dropout_p: float, dropout_seed: torch.Tensor | None) -> None:
    # What the kernels cannot survive when the op is called directly (fast_attn.attention
    # validates everything else before dispatching here).
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fast_attn triton ops support float16, bfloat16 and float32 inputs, got {q.dtype}")
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("fast_attn triton ops: dropout_p > 0 needs a dropout_seed tensor")


def _check_packed_sequences(
    q: torch.Tensor,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    # What the kernels index with packed sequences (check_varlen_inputs in
    # csrc/attention_launch.cpp): offsets n and n + 1 of both tensors for n < N, rows of
    # batch-1 tensors, ALiBi row n. Offsets' values need no check: the kernels clamp them.
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("fast_attn triton ops: cu_seqlens_q and cu_seqlens_k go together")
    if cu_seqlens_q is None:
        return
    for name, offsets in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not (
            offsets.dtype == torch.int32
            and offsets.dim() == 1
            and offsets.numel() >= 1
            and offsets.is_contiguous()
            and offsets.device == q.device
        ):
            raise ValueError(
                f"fast_attn triton ops: {name} must be a contiguous 1-D int32 tensor of N + 1 offsets "
                f"on q's device, got {offsets.dtype} of shape {tuple(offsets.shape)} on {offsets.device}"
            )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            "fast_attn triton ops: cu_seqlens_q and cu_seqlens_k must have the same length, "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    if q.shape[0] != 1:
        raise ValueError(
            f"fast_attn triton ops: packed sequences have batch 1, got q of shape {tuple(q.shape)}"
        )
    if bias is not None or key_mask is not None:
        raise ValueError("fast_attn triton ops: packed sequences take no bias and no key_mask")
    if max_seqlen_q < -1 or max_seqlen_k < -1:
        raise ValueError(
            "fast_attn triton ops: max_seqlen_q and max_seqlen_k must be >= -1 (-1 = derived), "
            f"got {max_seqlen_q} and {max_seqlen_k}"
        )
    if alibi_slopes is not None and alibi_slopes.shape[0] not in (1, cu_seqlens_q.numel() - 1):
        raise ValueError(
            f"fast_attn triton ops: alibi_slopes must have shape (N or 1, Hq), got {tuple(alibi_slopes.shape)}"
        )


def _max_seqlen(cu_seqlens: torch.Tensor, given: int, num_rows: int) -> int:
    """The bound on packed sequences' lengths that sizes the grid: `given`, or when -1 the
    offsets' largest step (a device sync on a GPU), at most the packed rows. Traced (torch.compile
    on a GPU) the offsets have no values: -1 takes the packed rows, a bound on every sequence."""
    if given < 0:
        if is_fake(cu_seqlens):
            return num_rows
        given = int(torch.diff(cu_seqlens.long()).max()) if cu_seqlens.numel() > 1 else 0
    return max(0, min(given, num_rows))


def _packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> tuple:
    """KernelProblem's packed-sequence fields, the bounds resolved."""
    if cu_seqlens_q is None:
        return ()
    return (
        cu_seqlens_q,
        cu_seqlens_k,
        _max_seqlen(cu_seqlens_q, max_seqlen_q, q.shape[2]),
        _max_seqlen(cu_seqlens_k, max_seqlen_k, k.shape[2]),
    )


def _kernel_problem(
    q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
    dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
) -> KernelProblem:  # fmt: skip
    """The attention ops' inputs as a KernelProblem, checked for what the kernels cannot
    survive (_check_inputs, _check_packed_sequences), the packed sequences' bounds resolved."""
    _check_inputs(q, dropout_p, dropout_seed)
    _check_packed_sequences(
        q, bias, key_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    return KernelProblem(
        q, k, v, bias, key_mask, alibi_slopes, dropout_seed,
        scale, causal, window_left, window_right, softcap, dropout_p,
        *_packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
    )  # fmt: skip


def _shapes_only(q: torch.Tensor) -> bool:
    """Tracing with fake tensors under the interpreter: wrap_triton cannot capture an
    interpreted kernel (it would run it on tensors without data), so the op returns
    its allocated outputs, which is all fake-tensor propagation needs. On a GPU the
    kernels are captured and this is never taken."""
    return interpreting() and is_fake(q)


def _dtype_of(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _broadcast_stride(t: torch.Tensor, dim: int) -> int:
    # A broadcast dim (size 1) is read with stride 0, so every index lands on its one element.
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _named_strides(name: str, strides, dims: tuple[str, ...] = ("batch", "head", "row")) -> dict[str, int]:
    """Strides as the kernels name their parameters: {"<name>_<dim>_stride": stride}."""
    return {f"{name}_{dim}_stride": stride for dim, stride in zip(dims, strides, strict=True)}


def _batch_fastest(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the forward, dK/dV and dQ grids put the batch first (fast_attn/triton/grid.py):
    for a bias that several batches read."""
    return bias is not None and bias.shape[0] == 1 and q.shape[0] > 1


def _block_grid(block: str, seqlen: int, heads: int, batch: int, batch_fastest: bool):
    """The grid of a kernel whose programs are (block, head, batch) (fast_attn/triton/grid.py),
    with blocks of `seqlen` rows of the tuned size `block` ("BLOCK_M" or "BLOCK_N")."""

    def grid(meta: dict) -> tuple[int, int, int]:
        blocks = cdiv(seqlen, meta[block])
        return (batch, blocks, heads) if batch_fastest else (blocks, heads, batch)

    return grid


def _band_offsets(causal: int, window_left: int, window_right: int, seqlen_q: int, seqlen_k: int):
    """(first_key_offset, last_key_offset) of the kernels' bounds (fast_attn/triton/__init__.py):
    the band of the causal mode and the window, each None when that side hides no key of
    these sequences (which also keeps the offsets within int32)."""
    band = visible_band(CausalMode(causal), (window_left, window_right), seqlen_q, seqlen_k)
    if band is None:
        return None, None
    first_key_offset = band.offset - band.left if band.left >= 0 else None
    last_key_offset = band.offset + band.right if band.right >= 0 else None
    if first_key_offset is not None and seqlen_q - 1 + first_key_offset <= 0:
        first_key_offset = None  # even the last row's first key is key 0
    if last_key_offset is not None and last_key_offset >= seqlen_k - 1:
        last_key_offset = None  # even the first row sees the last key
    return first_key_offset, last_key_offset


def _packed_band_offsets(causal: int, window_left: int, window_right: int):
    """_band_offsets for packed sequences, whose lengths the host does not know: relative to
    the diagonal j = i, which the kernels move to each sequence's bottom-right diagonal
    unless causal is top-left (BAND_PER_SEQUENCE)."""
    band = visible_band(CausalMode(causal), (window_left, window_right), 0, 0)  # offset 0
    if band is None:
        return None, None
    return (-band.left if band.left >= 0 else None, band.right if band.right >= 0 else None)


def _shared_arguments(problem: KernelProblem):
    """Arguments every attention kernel takes, by name, and its shared constexprs.

    Absent optional tensors are replaced by q as a never-read placeholder pointer
    (the HAS_* constexprs compile their reads out), with zero strides. The arguments
    of absent score modifiers are None instead (fast_attn/triton/__init__.py), except
    last_key_offset, which every kernel's signature keeps (0 without a right edge), and so
    are those of packed sequences when the batch is not packed.
    """
    q, k, v, bias, key_mask, alibi_slopes, dropout_seed = problem[:7]
    scale, causal, window_left, window_right, softcap, dropout_p = problem[7:13]
    varlen = problem.is_varlen
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if varlen:
        first_key_offset, last_key_offset = _packed_band_offsets(causal, window_left, window_right)
    else:
        first_key_offset, last_key_offset = _band_offsets(
            causal, window_left, window_right, seqlen_q, seqlen_k
        )
    bounded = first_key_offset is not None or last_key_offset is not None
    has_dropout = dropout_p > 0.0
    bias_strides = (0, 0, 0, 0) if bias is None else [_broadcast_stride(bias, d) for d in range(4)]
    key_mask_strides = (0, 0) if key_mask is None else (_broadcast_stride(key_mask, 0), key_mask.stride(1))
    args = dict(
        q_ptr=q,
        k_ptr=k,
        v_ptr=v,
        bias_ptr=q if bias is None else bias,
        key_mask_ptr=q if key_mask is None else key_mask,
        dropout_seed_ptr=q if dropout_seed is None else dropout_seed,
        **_named_strides("q", q.stride()[:3]),
        **_named_strides("k", k.stride()[:3]),
        **_named_strides("v", v.stride()[:3]),
        **_named_strides("bias", bias_strides, ("batch", "head", "row", "col")),
        **_named_strides("key_mask", key_mask_strides, ("batch", "col")),
        heads_q=heads_q,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        kv_group_size=heads_q // heads_kv,
        scale_log2=scale * LOG2E,
        first_key_offset=first_key_offset,
        last_key_offset=0 if last_key_offset is None else last_key_offset,
        dropout_keep_threshold=dropout_threshold(dropout_p) if has_dropout else 0,
        dropout_keep_scale=1.0 / (1.0 - dropout_p),
        softcap=softcap if softcap > 0.0 else None,
        alibi_slopes_ptr=alibi_slopes,
        alibi_batch_stride=None if alibi_slopes is None else _broadcast_stride(alibi_slopes, 0),
        cu_seqlens_q_ptr=problem.cu_seqlens_q,
        cu_seqlens_k_ptr=problem.cu_seqlens_k,
        max_seqlen_q=problem.max_seqlen_q if varlen else None,
        max_seqlen_k=problem.max_seqlen_k if varlen else None,
    )
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        LEFT_BOUNDED=first_key_offset is not None,
        RIGHT_BOUNDED=last_key_offset is not None,
        HAS_BIAS=bias is not None,
        HAS_KEY_MASK=key_mask is not None,
        HAS_DROPOUT=has_dropout,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi_slopes is not None,
        IS_VARLEN=varlen,
        BAND_PER_SEQUENCE=varlen and bounded and causal != CausalMode.TOP_LEFT,
        BATCH_FASTEST=_batch_fastest(q, bias),
        UPCAST_OPERANDS=interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return args, constexprs


def _backward_arguments(problem: KernelProblem, grad_out, lse, delta):
    """_shared_arguments plus what every backward kernel but the preprocess reads."""
    args, constexprs = _shared_arguments(problem)
    grad_out_strides = _named_strides("grad_out", grad_out.stride()[:3])
    args.update(grad_out_ptr=grad_out, lse_ptr=lse, delta_ptr=delta, **grad_out_strides)
    return args, constexprs


def forward_arguments(problem: KernelProblem, out, lse):
    """(arguments by name, constexprs) of attention_forward_kernel, without the tuned blocks."""
    args, constexprs = _shared_arguments(problem)
    args.update(out_ptr=out, lse_ptr=lse, **_named_strides("out", out.stride()[:3]))
    return args, constexprs


def preprocess_arguments(out, grad_out, grad_lse, delta):
    """(arguments by name, constexprs) of attention_backward_preprocess_kernel, blocks included."""
    head_dim = out.shape[3]
    block_d = head_dim_block(head_dim)
    args = dict(
        out_ptr=out,
        grad_out_ptr=grad_out,
        grad_lse_ptr=out if grad_lse is None else grad_lse,
        delta_ptr=delta,
        **_named_strides("out", out.stride()[:3]),
        **_named_strides("grad_out", grad_out.stride()[:3]),
        **_named_strides("grad_lse", (0, 0, 0) if grad_lse is None else grad_lse.stride()),
        heads_q=out.shape[1],
        seqlen_q=out.shape[2],
    )
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        HAS_GRAD_LSE=grad_lse is not None,
        BLOCK_M=max(16, min(128, PREPROCESS_TILE_ELEMENTS // block_d)),
    )
    return args, constexprs


def dkdv_arguments(problem: KernelProblem, grad_out, lse, delta, dk, dv):
    """(arguments by name, constexprs) of attention_backward_dkdv_kernel, without the tuned blocks."""
    args, constexprs = _backward_arguments(problem, grad_out, lse, delta)
    args.update(
        dk_ptr=dk,
        dv_ptr=dv,
        **_named_strides("dk", dk.stride()[:3]),
        **_named_strides("dv", dv.stride()[:3]),
        scale=problem.scale,
    )
    return args, constexprs


def dq_arguments(problem: KernelProblem, grad_out, lse, delta, dq, full_dbias):
    """(arguments by name, constexprs) of attention_backward_dq_kernel, without the tuned blocks.
    full_dbias: None, or the (B, Hq, Sq, Sk) contiguous zeroed dbias the kernel writes."""
    args, constexprs = _backward_arguments(problem, grad_out, lse, delta)
    args.update(
        dq_ptr=dq,
        dbias_ptr=problem.q if full_dbias is None else full_dbias,
        **_named_strides("dq", dq.stride()[:3]),
        scale=problem.scale,
    )
    return args, dict(constexprs, STORE_DBIAS=full_dbias is not None)


def dbias_slices(bias: torch.Tensor, batch: int, heads_q: int) -> tuple[int, int]:
    """(heads_per_slice, pairs_per_slice): how many query heads, and (batch, head)
    pairs, read each (batch, head) slice of the bias."""
    heads_per_slice = heads_q if bias.shape[1] == 1 else 1
    return heads_per_slice, (batch if bias.shape[0] == 1 else 1) * heads_per_slice


def dbias_arguments(problem: KernelProblem, grad_out, lse, delta, partials):
    """(arguments by name, constexprs) of attention_backward_dbias_kernel, without the tuned
    blocks. partials: (num_splits, *bias.shape), fully written by the kernel: float32 sums,
    or with one split dbias itself in the bias's dtype."""
    args, constexprs = _backward_arguments(problem, grad_out, lse, delta)
    q, k, bias = problem.q, problem.k, problem.bias
    heads_per_slice, pairs_per_slice = dbias_slices(bias, q.shape[0], q.shape[1])
    args.update(
        dbias_partials_ptr=partials,
        **_named_strides("partials", partials.stride()[:4], ("split", "batch", "head", "row")),
        heads_per_slice=heads_per_slice,
        pairs_per_slice=pairs_per_slice,
        pairs_per_split=cdiv(pairs_per_slice, partials.shape[0]),
    )
    # A bias comes without packed sequences: the dbias kernel takes none of their arguments.
    for name in ("cu_seqlens_q_ptr", "cu_seqlens_k_ptr", "max_seqlen_q", "max_seqlen_k"):
        del args[name]
    for name in ("HAS_BIAS", "BATCH_FASTEST", "IS_VARLEN", "BAND_PER_SEQUENCE"):
        del constexprs[name]
    constexprs.update(ROWS_FULL=bias.shape[2] == q.shape[2], COLS_FULL=bias.shape[3] == k.shape[2])
    return args, constexprs


def _launch(kernel, grid, args: dict, constexprs: dict) -> None:
    """Launch `kernel` (a JITFunction or its Autotuner) with every argument by name: a kernel
    parameter that is renamed or has no value fails here, and none can receive another's."""
    wrap_triton(kernel)[grid](**args, **constexprs)


@triton_op(FORWARD_OP, mutates_args=())
def triton_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    key_mask: Optional[torch.Tensor],
    dropout_seed: Optional[torch.Tensor],
    scale: float,
    causal: int,
    dropout_p: float,
    alibi_slopes: Optional[torch.Tensor] = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = -1,
    max_seqlen_k: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, D) stored (B, Sq, Hq, D)-contiguous and lse (B, Hq, Sq) float32."""
    problem = _kernel_problem(
        q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
        dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )  # fmt: skip
    heads_q, head_dim = q.shape[1], q.shape[3]
    out = empty_bshd_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    if out.numel() == 0 or _shapes_only(q):
        return out, lse
    seqlen_q, seqlen_k = problem.seqlens
    if seqlen_k == 0 or problem.is_varlen:
        # Rows that see no key: all of them without keys, and the packed rows that no
        # sequence covers (the kernels write only the sequences' rows).
        out.zero_()
        lse.fill_(-math.inf)
    if problem.batch == 0 or seqlen_q == 0 or seqlen_k == 0:
        return out, lse
    args, constexprs = forward_arguments(problem, out, lse)
    forward_kernel = autotuned(
        attention_forward_kernel,
        launch_configs(
            "forward", q.device, head_dim, q.dtype, seqlen_q, seqlen_k, _dtype_of(bias), dropout_p
        ),
    )
    grid = _block_grid("BLOCK_M", seqlen_q, heads_q, problem.batch, constexprs["BATCH_FASTEST"])
    _launch(forward_kernel, grid, args, constexprs)
    return out, lse


def _sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # In split order, one element-wise add per split: the same bits every run.
    total = partials[0].clone()
    for split in range(1, partials.shape[0]):
        total += partials[split]
    return total.to(dtype)


@triton_op(BACKWARD_OP, mutates_args=())
def triton_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    key_mask: Optional[torch.Tensor],
    dropout_seed: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: int,
    dropout_p: float,
    compute_dbias: bool,
    deterministic: bool,
    alibi_slopes: Optional[torch.Tensor] = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = -1,
    max_seqlen_k: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv like q, k, v (stored (B, S, H, D)-contiguous) and dbias in the bias's
    shape and dtype (an empty tensor without compute_dbias). Always deterministic."""
    problem = _kernel_problem(
        q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
        dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )  # fmt: skip
    heads_q, head_dim = q.shape[1], q.shape[3]
    heads_kv = k.shape[1]
    dq, dk, dv = empty_bshd_like(q), empty_bshd_like(k), empty_bshd_like(v)
    want_dbias = compute_dbias and bias is not None
    dbias = q.new_empty((0,))
    if _shapes_only(q):
        if want_dbias:
            dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
        return dq, dk, dv, dbias
    if dq.numel() == 0 or dk.numel() == 0:
        # No score exists: every gradient is zero (or empty).
        dq.zero_()
        dk.zero_()
        dv.zero_()
        if want_dbias:
            dbias = torch.zeros_like(bias, memory_format=torch.contiguous_format)
        return dq, dk, dv, dbias
    seqlen_q, seqlen_k = problem.seqlens
    if problem.is_varlen:
        # The kernels write only the sequences' rows: the packed rows that no sequence
        # covers take part in no score.
        dq.zero_()
        dk.zero_()
        dv.zero_()
        if problem.batch == 0 or seqlen_q == 0 or seqlen_k == 0:
            return dq, dk, dv, dbias

    lse = lse.contiguous()  # the kernels index (B, Hq, Sq) rows directly
    delta = q.new_empty(q.shape[:3], dtype=torch.float32)  # over the packed rows when packed
    args, constexprs = preprocess_arguments(out, grad_out, grad_lse, delta)
    grid = (cdiv(q.shape[2], constexprs["BLOCK_M"]), heads_q, q.shape[0])
    _launch(attention_backward_preprocess_kernel, grid, args, constexprs)

    backward_inputs = (problem, grad_out, lse, delta)
    args, constexprs = dkdv_arguments(*backward_inputs, dk, dv)
    dkdv_kernel = autotuned(
        attention_backward_dkdv_kernel,
        launch_configs("dkdv", q.device, head_dim, q.dtype, seqlen_q, seqlen_k, _dtype_of(bias), dropout_p),
    )
    grid = _block_grid("BLOCK_N", seqlen_k, heads_kv, problem.batch, constexprs["BATCH_FASTEST"])
    _launch(dkdv_kernel, grid, args, constexprs)

    # A bias of the problem's full shape gets dS itself, written by the dQ programs;
    # a broadcast one is reduced by the dbias kernel.
    full_dbias = None
    if want_dbias and tuple(bias.shape) == (*q.shape[:3], seqlen_k):
        full_dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
    args, constexprs = dq_arguments(*backward_inputs, dq, full_dbias)
    dq_kernel = autotuned(
        attention_backward_dq_kernel,
        launch_configs(
            "dq",
            q.device,
            head_dim,
            q.dtype,
            seqlen_q,
            seqlen_k,
            _dtype_of(bias),
            dropout_p,
            full_dbias is not None,
        ),
    )
    grid = _block_grid("BLOCK_M", seqlen_q, heads_q, problem.batch, constexprs["BATCH_FASTEST"])
    _launch(dq_kernel, grid, args, constexprs)

    if full_dbias is not None:
        dbias = full_dbias
    elif want_dbias:
        dbias = _reduce_dbias(backward_inputs, bias, dropout_p)
    return dq, dk, dv, dbias


# Tile size assumed when choosing the number of dbias splits: the split count must
# not depend on the tuned tile, which the autotuner picks after the split is fixed.
_DBIAS_NOMINAL_TILE = 64


def _reduce_dbias(backward_inputs, bias: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """dbias of a broadcast bias through attention_backward_dbias_kernel; backward_inputs:
    dbias_arguments' arguments but partials."""
    problem = backward_inputs[0]
    q, k = problem.q, problem.k
    batch, heads_q, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    bias_batch, bias_heads, bias_rows, bias_cols = bias.shape
    rows_full, cols_full = bias_rows == seqlen_q, bias_cols == seqlen_k
    nominal_tiles = (cdiv(seqlen_q, _DBIAS_NOMINAL_TILE) if rows_full else 1) * (
        cdiv(seqlen_k, _DBIAS_NOMINAL_TILE) if cols_full else 1
    )
    pairs_per_slice = dbias_slices(bias, batch, heads_q)[1]
    num_splits = dbias_splits(nominal_tiles * bias_heads * bias_batch, pairs_per_slice, q.device)
    num_splits = cdiv(pairs_per_slice, cdiv(pairs_per_slice, num_splits))  # no empty split
    # One split writes dbias itself, rounded once from its float32 sums; several write
    # float32 partial sums, added afterwards.
    partials_dtype = bias.dtype if num_splits == 1 else torch.float32
    partials = q.new_empty((num_splits, *bias.shape), dtype=partials_dtype)
    args, constexprs = dbias_arguments(*backward_inputs, partials)

    def grid(meta):
        row_tiles = cdiv(seqlen_q, meta["BLOCK_M"]) if rows_full else 1
        col_tiles = cdiv(seqlen_k, meta["BLOCK_N"]) if cols_full else 1
        return (row_tiles * col_tiles * num_splits, bias_heads, bias_batch)

    dbias_kernel = autotuned(
        attention_backward_dbias_kernel,
        launch_configs("dbias", q.device, head_dim, q.dtype, seqlen_q, seqlen_k, bias.dtype, dropout_p),
    )
    _launch(dbias_kernel, grid, args, constexprs)
    return partials[0] if num_splits == 1 else _sum_splits(partials, bias.dtype)


torch.library.register_autograd(
    FORWARD_OP,
    autograd.make_backward(torch.ops.fast_attn.triton_attention_backward),
    setup_context=autograd.setup_context,
)


def _keep_op_whole(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


if interpreting():
    # On a GPU, AOTDispatcher (torch.compile, opcheck) decomposes a triton_op into its kernels.
    # Interpreted kernels cannot be captured (_shapes_only), so that decomposition would hold
    # only the outputs' allocations: each op stays one node of the graph instead, run by the
    # op itself.
    for _op in (FORWARD_OP, BACKWARD_OP):
        torch.library.register_torch_dispatch(_op, FunctionalTensorMode, _keep_op_whole)


def attention_forward(problem, dropout_seed):
    """Run the Triton forward op on a validated AttentionProblem; returns (out, lse)."""
    return torch.ops.fast_attn.triton_attention_forward(*autograd.forward_op_arguments(problem, dropout_seed))


# The decode op (fast_attn/ops/triton_decode.py) registers with the attention ops: dispatch imports
# this module to make the Triton backend available.
from . import triton_decode  # noqa: E402,F401
