"""Check the user's arguments once and normalize them into an AttentionProblem.

Everything a kernel may rely on is established here, before any kernel runs:
ranks, shapes, dtypes, devices, the bias reshaped to 4-D with each dim 1 or
full, the key mask's shape, the causal mode, the scale. Kernels do not
re-validate user input.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .causal import CausalMode, parse_causal

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")


@dataclass(frozen=True)
class AttentionProblem:
    """Validated inputs plus the static facts dispatch decides on."""

    q: torch.Tensor  # (B, Hq, Sq, D), stride(-1) == 1
    k: torch.Tensor  # (B, Hkv, Sk, D), stride(-1) == 1
    v: torch.Tensor  # (B, Hkv, Sk, D), stride(-1) == 1
    bias: torch.Tensor | None  # (Bb, Hb, Sqb, Skb), each dim 1 or full; q's dtype or float32
    key_mask: torch.Tensor | None  # bool (B or 1, Sk)
    causal: CausalMode
    scale: float
    dropout_p: float

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def needs_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels read any strides as long as the head dim is contiguous.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            layout = "(B, Hq, Sq, D)" if name == "q" else "(B, Hkv, Sk, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
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
            raise ValueError(
                f"bias must broadcast to (B, Hq, Sq, Sk) = {target}, got shape {_shape(bias)}"
            )
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
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def validate_backend_name(backend: object) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend  # type: ignore[return-value]


def build_problem(
    q: object,
    k: object,
    v: object,
    *,
    bias: object = None,
    key_mask: object = None,
    causal: object = False,
    scale: object = None,
    dropout_p: object = 0.0,
) -> AttentionProblem:
    """Validate every argument of fast_attn.attention; raise naming the bad one."""
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    _check_qkv(q, k, v)
    seqlen_k = k.shape[2]
    bias4 = None if bias is None else _normalize_bias(_check_tensor("bias", bias), q, seqlen_k)
    mask = None if key_mask is None else _normalize_key_mask(_check_tensor("key_mask", key_mask), q, seqlen_k)
    return AttentionProblem(
        q=_last_dim_contiguous(q),
        k=_last_dim_contiguous(k),
        v=_last_dim_contiguous(v),
        bias=bias4,
        key_mask=mask,
        causal=parse_causal(causal),
        scale=_normalize_scale(scale, q.shape[3]),
        dropout_p=_normalize_dropout(dropout_p),
    )
