"""Check the user's arguments once and normalize them into an AttentionProblem.

Everything a kernel may rely on is established here, before any kernel runs:
ranks, shapes, dtypes, devices, the bias reshaped to 4-D with each dim 1 or
full, the key mask's shape, the causal mode, the window, the softcap, ALiBi's
slopes as (B or 1, Hq) float32, the sinks, the scale. Kernels do not
re-validate user input.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import torch

from .causal import CausalMode, parse_causal

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")


def _size_of(tensor: str, dim: int) -> property:
    """A property of AttentionProblem: the size of dim `dim` of its tensor `tensor`."""
    return property(lambda problem: getattr(problem, tensor).shape[dim], doc=f"{tensor}.shape[{dim}]")


class _OfQuery:
    """What every problem reads from its q."""

    __slots__ = ()

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


# Not frozen: a frozen dataclass's __init__ costs microseconds a call, and the problem is built on
# every call (decoding steps included); nothing assigns to it after build_problem.
@dataclass(slots=True)
class AttentionProblem(_OfQuery):
    """Validated inputs plus the static facts dispatch decides on."""

    q: torch.Tensor  # (B, Hq, Sq, D), stride(-1) == 1
    k: torch.Tensor  # (B, Hkv, Sk, D), stride(-1) == 1
    v: torch.Tensor  # (B, Hkv, Sk, D), stride(-1) == 1
    bias: torch.Tensor | None  # (Bb, Hb, Sqb, Skb), each dim 1 or full; q's dtype or float32
    key_mask: torch.Tensor | None  # bool (B or 1, Sk)
    causal: CausalMode
    window: tuple[int, int] | None  # (left, right), -1 = unbounded on that side; None: no window
    softcap: float | None  # > 0
    alibi_slopes: torch.Tensor | None  # float32 (B or 1, Hq), contiguous
    sinks: torch.Tensor | None  # (Hq,) or, for a dense problem, (B, Hq, Sq); float
    scale: float
    dropout_p: float
    # Packed sequences (fast_attn.varlen_attention): the ops' last arguments
    # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), with q (1, Hq, Tq, D) and
    # k/v (1, Hkv, Tk, D); None when the batch is not packed.
    packed_sequences: tuple | None = None

    batch = _size_of("q", 0)
    heads_q = _size_of("q", 1)
    heads_kv = _size_of("k", 1)
    seqlen_q = _size_of("q", 2)
    seqlen_k = _size_of("k", 2)
    head_dim = _size_of("q", 3)

    @property
    def needs_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.bias, self.sinks)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels read any strides as long as the head dim is contiguous (is_contiguous() answers the
    # common case without building a stride).
    return t if t.is_contiguous() or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if _qkv_look_right(q, k, v):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            layout = "(B, Hq, Sq, D)" if name == "q" else "(B, Hkv, Sk, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if _shape(k) != _shape(v):
        raise ValueError(f"k and v must have the same shape (B, Hkv, Sk, D), got {_shape(k)} and {_shape(v)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {_shape(q)} and k {_shape(k)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got q {_shape(q)} and k {_shape(k)}")
    if q.shape[3] < 1:
        raise ValueError(f"head dim D must be at least 1, got q {_shape(q)}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads "
            f"(Hq % Hkv == 0), got q {_shape(q)} and k {_shape(k)}"
        )


def _qkv_look_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """_check_qkv's rules in one expression: the common case of every call passes here at once."""
    q_shape, k_shape = q.shape, k.shape
    return (
        len(q_shape) == len(k_shape) == 4
        and k_shape == v.shape
        and q.dtype == k.dtype == v.dtype
        and q.dtype in SUPPORTED_DTYPES
        and q.device == k.device == v.device
        and q_shape[0] == k_shape[0]
        and q_shape[3] == k_shape[3] >= 1
        and k_shape[1] >= 1
        and q_shape[1] % k_shape[1] == 0
    )


def _normalize_bias(bias: torch.Tensor, q: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    target = (q.shape[0], q.shape[1], q.shape[2], seqlen_k)
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on q's device {q.device}, got {bias.device}")
    if bias.dim() > 4:
        raise ValueError(f"bias must broadcast to (B, Hq, Sq, Sk) = {target}, got shape {_shape(bias)}")
    bias4 = bias[(None,) * (4 - bias.dim())] if bias.dim() < 4 else bias
    for size, full in zip(bias4.shape, target):
        if size not in (1, full):
            raise ValueError(f"bias must broadcast to (B, Hq, Sq, Sk) = {target}, got shape {_shape(bias)}")
    if q.dtype == torch.float64:
        return bias4.to(torch.float64)
    return bias4 if bias4.dtype in (q.dtype, torch.float32) else bias4.to(torch.float32)


def _normalize_key_mask(key_mask: torch.Tensor, q: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = attend), got {key_mask.dtype}")
    if key_mask.device != q.device:
        raise ValueError(f"key_mask must be on q's device {q.device}, got {key_mask.device}")
    if key_mask.dim() != 2 or key_mask.shape[0] not in (1, q.shape[0]) or key_mask.shape[1] != seqlen_k:
        raise ValueError(
            f"key_mask must have shape (B, Sk) = ({q.shape[0]}, {seqlen_k}), got {_shape(key_mask)}"
        )
    return key_mask


def _normalize_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _normalize_dropout(dropout_p: object) -> float:
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the common case, before the ABC checks
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _normalize_window(window_size: object) -> tuple[int, int] | None:
    if window_size is None:
        return None
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be None or two ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size values must be >= -1 (-1 = unbounded), got {window_size!r}")
    return None if left == right == -1 else (left, right)


def _normalize_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap}")
    return softcap


def _normalize_alibi_slopes(
    slopes: torch.Tensor, q: torch.Tensor, batch: int | None = None, batch_name: str = "B"
) -> torch.Tensor:
    """(Hq,) or (batch, Hq) float32 slopes as (batch or 1, Hq); batch is q's (B) unless given."""
    heads_q = q.shape[1]
    batch = q.shape[0] if batch is None else batch
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {slopes.device}")
    if _shape(slopes) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(
            f"alibi_slopes must have shape (Hq,) = ({heads_q},) or ({batch_name}, Hq) = ({batch}, {heads_q}), "
            f"got {_shape(slopes)}"
        )
    return (slopes if slopes.dim() == 2 else slopes[None]).contiguous()


def _normalize_sinks(sinks: torch.Tensor, q: torch.Tensor, per_row: bool) -> torch.Tensor:
    """sinks (Hq,): one logit per head; with per_row also (B, Hq, Sq): one per query row (Inkling 2)."""
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    batch, heads_q, seqlen_q = q.shape[:3]
    if _shape(sinks) == (heads_q,) or (per_row and _shape(sinks) == (batch, heads_q, seqlen_q)):
        return sinks
    shapes = f"(Hq,) = ({heads_q},)"
    if per_row:
        shapes += f" or (B, Hq, Sq) = ({batch}, {heads_q}, {seqlen_q})"
    raise ValueError(f"sinks must have shape {shapes}, got {_shape(sinks)}")


def validate_backend_name(backend: object) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend  # type: ignore[return-value]


def validate_call_options(backend: object, return_lse: object) -> None:
    """The options every public attention function takes besides the problem's."""
    validate_backend_name(backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")


def build_problem(
    q: object,
    k: object,
    v: object,
    *,
    bias: object = None,
    key_mask: object = None,
    causal: object = False,
    window_size: object = None,
    softcap: object = None,
    alibi_slopes: object = None,
    sinks: object = None,
    scale: object = None,
    dropout_p: object = 0.0,
    per_row_sinks: bool = True,
) -> AttentionProblem:
    """Validate every argument of fast_attn.attention; raise naming the bad one. per_row_sinks=False
    takes sinks of one logit per head only (packed sequences, context parallelism)."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    _check_qkv(q, k, v)
    bias4 = mask = None
    if bias is not None:
        bias4 = _normalize_bias(_check_tensor("bias", bias), q, k.shape[2])
    if key_mask is not None:
        mask = _normalize_key_mask(_check_tensor("key_mask", key_mask), q, k.shape[2])
    window, softcap, slopes, sinks, scale = _score_modifiers(
        q, window_size, softcap, alibi_slopes, sinks, scale, per_row_sinks
    )
    # Positional, in the order of AttentionProblem's fields: twelve keywords cost ~0.6 us more a call.
    return AttentionProblem(
        _last_dim_contiguous(q),
        _last_dim_contiguous(k),
        _last_dim_contiguous(v),
        bias4,
        mask,
        parse_causal(causal),
        window,
        softcap,
        slopes,
        sinks,
        scale,
        _normalize_dropout(dropout_p),
    )


def _score_modifiers(
    q: torch.Tensor,
    window_size=None,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
    scale=None,
    per_row_sinks=False,
) -> tuple:
    """The problems' (window, softcap, alibi_slopes, sinks, scale), for q (B, Hq, Sq, D); sinks of one
    logit per query row only with per_row_sinks (dense problems: packed and decoding ones take (Hq,))."""
    if window_size is None and softcap is None and alibi_slopes is None and sinks is None:
        return None, None, None, None, _normalize_scale(scale, q.shape[3])
    slopes = None
    if alibi_slopes is not None:
        slopes = _normalize_alibi_slopes(_check_tensor("alibi_slopes", alibi_slopes), q)
    return (
        _normalize_window(window_size),
        _normalize_softcap(softcap),
        slopes,
        None if sinks is None else _normalize_sinks(_check_tensor("sinks", sinks), q, per_row_sinks),
        _normalize_scale(scale, q.shape[3]),
    )


def _check_packed(name: str, t: torch.Tensor, layout: str) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D {layout} (sequences laid end to end), got shape {_shape(t)}")


def _check_cu_seqlens(name: str, cu: torch.Tensor, q: torch.Tensor) -> None:
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (N + 1,) with at least one offset, got shape {_shape(cu)}")
    if cu.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")


def _check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, total_name: str) -> int:
    """The offsets' values (a device-to-host copy on a GPU); returns the longest sequence."""
    offsets = cu.tolist()
    steps = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if offsets[0] != 0 or any(step < 0 for step in steps) or offsets[-1] != total:
        shown = offsets if len(offsets) <= 12 else [*offsets[:6], "...", *offsets[-5:]]
        raise ValueError(
            f"{name} must start at 0, never decrease and end at {total_name} = {total}, got {shown}"
        )
    return max(steps, default=0)


def _normalize_max_seqlen(name: str, value: object, longest: int | None) -> int:
    """max_seqlen as the ops take it: an int bound, or -1 for a 0-d tensor (the op derives it)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an int or a 0-d integer tensor, got {value.dtype} of shape {_shape(value)}"
            )
        if longest is not None and int(value) < longest:
            raise ValueError(f"{name} = {int(value)} is smaller than the longest sequence, {longest}")
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(value).__name__}")
    if longest is not None and value < longest:
        raise ValueError(f"{name} = {value} is smaller than the longest sequence, {longest}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def build_varlen_problem(
    q: object,
    k: object,
    v: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    *,
    alibi_slopes: object = None,
    **options: object,
) -> AttentionProblem:
    """Validate fast_attn.varlen_attention's arguments; the problem's q, k, v are the (1, H, T, D)
    views of the packed (T, H, D) tensors and its packed_sequences are the ops' varlen arguments.

    The offsets' values are checked outside torch.compile (on a GPU that is one device-to-host
    copy per call); under torch.compile they are taken as given, and the kernels clamp them so
    that bad values never read out of bounds. `options` are build_problem's keywords."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    _check_packed("q", q, "(Tq, Hq, D)")
    _check_packed("k", k, "(Tk, Hkv, D)")
    _check_packed("v", v, "(Tk, Hkv, D)")
    if _shape(k) != _shape(v):
        raise ValueError(f"k and v must have the same shape (Tk, Hkv, D), got {_shape(k)} and {_shape(v)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim D, got q {_shape(q)} and k {_shape(k)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads "
            f"(Hq % Hkv == 0), got q {_shape(q)} and k {_shape(k)}"
        )
    cu_q = _check_tensor("cu_seqlens_q", cu_seqlens_q)
    cu_k = _check_tensor("cu_seqlens_k", cu_seqlens_k)
    _check_cu_seqlens("cu_seqlens_q", cu_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_k, q)
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both have N + 1 offsets, got shapes {_shape(cu_q)} and {_shape(cu_k)}"
        )
    longest_q = longest_k = None
    if not torch.compiler.is_compiling():
        longest_q = _check_cu_seqlens_values("cu_seqlens_q", cu_q, q.shape[0], "Tq")
        longest_k = _check_cu_seqlens_values("cu_seqlens_k", cu_k, k.shape[0], "Tk")
    bound_q = _normalize_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q)
    bound_k = _normalize_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k)
    problem = build_problem(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        **options,
        per_row_sinks=False,
    )
    slopes = None
    if alibi_slopes is not None:
        slopes = _check_tensor("alibi_slopes", alibi_slopes)
        slopes = _normalize_alibi_slopes(slopes, problem.q, batch=cu_q.shape[0] - 1, batch_name="N")
    return dataclasses.replace(problem, alibi_slopes=slopes, packed_sequences=(cu_q, cu_k, bound_q, bound_k))


# Decoding against a KV cache (fast_attn.decode_attention). On CPU tensors the integer inputs'
# values are always checked (cheap); on a GPU that needs a device-to-host copy and a sync per
# step, so it is done only with FAST_ATTN_CHECK_CACHE=1 (the kernels clamp what they read).
CHECK_CACHE_VALUES_ON_GPU = os.environ.get("FAST_ATTN_CHECK_CACHE") == "1"
MAX_DECODE_SPLITS = 128  # flash-attn's bound; the kernels may use fewer


@dataclass(slots=True)
class DecodeProblem(_OfQuery):
    """Validated inputs of one decoding step, in flash-attn's (B, S, H, D) layout."""

    q: torch.Tensor  # (B, Sq, Hq, D), stride(-1) == 1
    k_cache: torch.Tensor  # (Bc, S_cache, Hkv, D) or pages (num_pages, page_size, Hkv, D), stride(-1) == 1
    v_cache: torch.Tensor  # like k_cache
    k_new: torch.Tensor | None  # (B, S_new, Hkv, D), written into the caches in place
    v_new: torch.Tensor | None
    cache_seqlens: torch.Tensor  # int32 (B,): where each sequence's keys end before the write
    cache_leftpad: torch.Tensor | None  # int32 (B,): where they start
    block_table: torch.Tensor | None  # int32 (B, max_pages): a paged cache's page ids
    cache_batch_idx: torch.Tensor | None  # int32 (B,): a contiguous cache's row of each sequence
    causal: bool  # bottom-right per sequence
    window: tuple[int, int] | None
    softcap: float | None
    alibi_slopes: torch.Tensor | None  # float32 (B or 1, Hq)
    sinks: torch.Tensor | None  # (Hq,)
    scale: float
    num_splits: int  # 0: the kernel chooses
    # What dispatch asks of every problem: decoding has no bias, no dropout and no packed sequences.
    bias = None
    dropout_p = 0.0
    packed_sequences = None

    batch = _size_of("q", 0)
    heads_q = _size_of("q", 2)
    heads_kv = _size_of("k_cache", 2)
    head_dim = _size_of("q", 3)

    @property
    def new_rows(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[1]

    def op_arguments(self) -> tuple:
        """The positional arguments of the decode_forward ops (csrc/schema.cpp)."""
        window_left, window_right = self.window or (-1, -1)
        return (
            self.q, self.k_cache, self.v_cache, self.k_new, self.v_new, self.cache_seqlens,
            self.cache_leftpad, self.block_table, self.cache_batch_idx, self.scale, self.causal,
            self.alibi_slopes, window_left, window_right, self.softcap or 0.0, self.num_splits,
        )  # fmt: skip


def _check_int32_vector(name: str, value: object, batch: int, device: torch.device) -> torch.Tensor:
    t = _check_tensor(name, value)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t


def _check_decode_tensors(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new, v_new
) -> None:
    if _decode_tensors_look_right(q, k_cache, v_cache, k_new, v_new):
        return
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k_new), ("v", v_new)):
        if t is None:
            continue
        if t.dim() != 4:
            layout = "(B, Sq, Hq, D)" if name == "q" else "(B, S_new, Hkv, D)"
            if name.endswith("cache"):
                layout = "(B_cache, S_cache, Hkv, D) or paged (num_pages, page_size, Hkv, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {_shape(t)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if _shape(k_cache) != _shape(v_cache):
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {_shape(k_cache)} and {_shape(v_cache)}"
        )
    if (k_new is None) != (v_new is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    heads_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.shape[3] != head_dim or q.shape[3] < 1:
        raise ValueError(
            f"q and k_cache must have the same head dim D >= 1, got q {_shape(q)} and k_cache {_shape(k_cache)}"
        )
    if heads_kv < 1 or q.shape[2] % heads_kv != 0:
        raise ValueError(
            "the number of query heads must be a multiple of the number of key/value heads "
            f"(Hq % Hkv == 0), got q {_shape(q)} and k_cache {_shape(k_cache)}"
        )
    if k_new is not None:
        expected = (q.shape[0], k_new.shape[1], heads_kv, head_dim)
        for name, t in (("k", k_new), ("v", v_new)):
            if _shape(t) != expected:
                raise ValueError(f"{name} must have shape (B, S_new, Hkv, D) = {expected}, got {_shape(t)}")


def _decode_tensors_look_right(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new, v_new
) -> bool:
    """_check_decode_tensors' rules in one expression: the common case of every step passes here at once."""
    q_shape, cache_shape = q.shape, k_cache.shape
    dtype, device = q.dtype, q.device
    looks_right = (
        len(q_shape) == len(cache_shape) == 4
        and v_cache.shape == cache_shape
        and dtype in SUPPORTED_DTYPES
        and k_cache.dtype == dtype == v_cache.dtype
        and k_cache.device == device == v_cache.device
        and q_shape[3] == cache_shape[3] >= 1
        and cache_shape[2] >= 1
        and q_shape[2] % cache_shape[2] == 0
    )
    if not looks_right or k_new is None or v_new is None:
        return looks_right and k_new is None and v_new is None
    new_shape = k_new.shape
    return (
        len(new_shape) == 4
        and new_shape == v_new.shape
        and new_shape[0] == q_shape[0]
        and new_shape[2:] == cache_shape[2:]
        and k_new.dtype == dtype == v_new.dtype
        and k_new.device == device == v_new.device
    )


def _check_cache_values(problem: DecodeProblem) -> None:
    """The integer inputs against the cache's capacity (reads their values)."""
    ends = problem.cache_seqlens.tolist()
    new_rows = problem.new_rows
    if ends and min(ends) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {ends}")
    if problem.cache_leftpad is not None:
        starts = problem.cache_leftpad.tolist()
        if any(start < 0 or start > end for start, end in zip(starts, ends)):
            raise ValueError(f"cache_leftpad must be in 0..cache_seqlens = {ends}, got {starts}")
    if problem.block_table is not None:
        num_pages, page_size = problem.k_cache.shape[:2]
        capacity, capacity_text = problem.block_table.shape[1] * page_size, "max_pages * page_size"
        used = [-(-(end + new_rows) // page_size) for end in ends]
        for b, pages in enumerate(used):
            ids = problem.block_table[b, :pages].tolist()
            if any(not 0 <= page < num_pages for page in ids):
                raise ValueError(
                    f"block_table[{b}] names pages outside 0..{num_pages - 1} (k_cache has {num_pages}): {ids}"
                )
    else:
        rows, capacity, capacity_text = problem.k_cache.shape[0], problem.k_cache.shape[1], "S_cache"
        if problem.cache_batch_idx is not None:
            indices = problem.cache_batch_idx.tolist()
            if any(not 0 <= row < rows for row in indices):
                raise ValueError(f"cache_batch_idx must index the cache's {rows} rows, got {indices}")
    if ends and max(ends) + new_rows > capacity:
        raise ValueError(
            f"the cache is too short: cache_seqlens {ends} + {new_rows} new keys exceed "
            f"{capacity_text} = {capacity}"
        )


def build_decode_problem(
    q: object,
    k_cache: object,
    v_cache: object,
    cache_seqlens: object,
    *,
    k: object = None,
    v: object = None,
    cache_leftpad: object = None,
    block_table: object = None,
    cache_batch_idx: object = None,
    causal: object = False,
    window_size: object = None,
    softcap: object = None,
    alibi_slopes: object = None,
    sinks: object = None,
    scale: object = None,
    num_splits: object = 0,
) -> DecodeProblem:
    """Validate every argument of fast_attn.decode_attention; raise naming the bad one. window_size,
    softcap, alibi_slopes, sinks and scale as build_problem's."""
    q = _check_tensor("q", q)
    k_cache = _check_tensor("k_cache", k_cache)
    v_cache = _check_tensor("v_cache", v_cache)
    k_new = None if k is None else _check_tensor("k", k)
    v_new = None if v is None else _check_tensor("v", v)
    _check_decode_tensors(q, k_cache, v_cache, k_new, v_new)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous() and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(
                f"{name} must have a contiguous last dim (it is written in place), got strides {t.stride()}"
            )
    if torch.is_grad_enabled() and (
        q.requires_grad
        or (k_new is not None and k_new.requires_grad)
        or (v_new is not None and v_new.requires_grad)
    ):
        raise ValueError(
            "decode_attention is forward only (no gradient flows into q, k or v): call it under torch.no_grad(), "
            "or use fast_attn.attention to train"
        )
    batch, device = q.shape[0], q.device
    seqlens = _check_int32_vector("cache_seqlens", cache_seqlens, batch, device)
    leftpad = (
        None if cache_leftpad is None else _check_int32_vector("cache_leftpad", cache_leftpad, batch, device)
    )
    batch_idx = None
    if cache_batch_idx is not None:
        if block_table is not None:
            raise ValueError("cache_batch_idx cannot be combined with a paged cache (block_table)")
        batch_idx = _check_int32_vector("cache_batch_idx", cache_batch_idx, batch, device)
    elif block_table is None and k_cache.shape[0] < batch:
        raise ValueError(
            f"k_cache has {k_cache.shape[0]} rows for B = {batch} sequences: give each sequence a row, "
            "or name them with cache_batch_idx"
        )
    table = None
    if block_table is not None:
        table = _check_tensor("block_table", block_table)
        if (
            table.dtype != torch.int32
            or table.dim() != 2
            or table.shape[0] != batch
            or table.device != device
        ):
            raise ValueError(
                f"block_table must be an int32 (B, max_pages) tensor on {device} with B = {batch}, "
                f"got {table.dtype} of shape {_shape(table)} on {table.device}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (decoding is causal bottom-right), got {causal!r}")
    if type(num_splits) is not int and (
        isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
    ):
        raise TypeError(f"num_splits must be an int, got {num_splits!r}")
    if not 0 <= num_splits <= MAX_DECODE_SPLITS:
        raise ValueError(
            f"num_splits must be in 0..{MAX_DECODE_SPLITS} (0 = chosen per call), got {num_splits}"
        )
    # The modifiers are named for q (B, Hq, Sq, D); the transposed view costs an op call, so it is
    # made only for those that read q's heads (its head dim is the last either way).
    reads_heads = alibi_slopes is not None or sinks is not None
    window, softcap, slopes, sinks, scale = _score_modifiers(
        q.transpose(1, 2) if reads_heads else q, window_size, softcap, alibi_slopes, sinks, scale
    )
    # Positional, in the order of DecodeProblem's fields (as build_problem's).
    problem = DecodeProblem(
        _last_dim_contiguous(q),
        k_cache,
        v_cache,
        None if k_new is None else _last_dim_contiguous(k_new),
        None if v_new is None else _last_dim_contiguous(v_new),
        seqlens,
        leftpad,
        table,
        batch_idx,
        causal,
        window,
        softcap,
        slopes,
        sinks,
        scale,
        int(num_splits),
    )
    if not torch.compiler.is_compiling() and (device.type == "cpu" or CHECK_CACHE_VALUES_ON_GPU):
        _check_cache_values(problem)
    return problem
