"""The two causal alignments and the sliding window of the contract: which keys a query row sees."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CausalMode(enum.IntEnum):
    """How a causal mask is aligned when Sq != Sk (the value kernels receive)."""

    NONE = 0
    TOP_LEFT = 1  # query i sees keys j <= i (SDPA's is_causal)
    BOTTOM_RIGHT = 2  # query i sees keys j <= i + Sk - Sq (FlashAttention, KV-cache decoding)


_BY_NAME = {"top_left": CausalMode.TOP_LEFT, "bottom_right": CausalMode.BOTTOM_RIGHT}


def parse_causal(causal: object) -> CausalMode:
    """Map the user's `causal` argument (False, True, "top_left", "bottom_right") to a mode."""
    if causal is None or causal is False:
        return CausalMode.NONE
    if causal is True:
        return CausalMode.TOP_LEFT
    if isinstance(causal, CausalMode):
        return causal
    if isinstance(causal, str) and causal in _BY_NAME:
        return _BY_NAME[causal]
    raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def causal_offset(mode: CausalMode, seqlen_q: int, seqlen_k: int) -> int:
    """Query i may attend key j iff j <= i + offset."""
    return seqlen_k - seqlen_q if mode == CausalMode.BOTTOM_RIGHT else 0


@dataclass(frozen=True)
class Band:
    """The keys a query row may see: query i sees key j iff
    (left < 0 or j >= d - left) and (right < 0 or j <= d + right), with the diagonal d = i + offset.
    -1 is unbounded on that side."""

    offset: int
    left: int
    right: int


def visible_band(
    mode: CausalMode, window: tuple[int, int] | None, seqlen_q: int, seqlen_k: int
) -> Band | None:
    """The band of a causal mode and a (left, right) window, None when every key is in it.

    A causal mask is the band right = 0 (it forces a window's right side to 0); its diagonal is i for
    TOP_LEFT and i + Sk - Sq for BOTTOM_RIGHT, and a window without a causal mask is aligned bottom-right
    (FlashAttention's rule). The C++ twin is band_of in csrc/attention_launch.cpp.
    """
    left, right = window if window is not None else (-1, -1)
    if mode != CausalMode.NONE:
        right = 0
    if left < 0 and right < 0:
        return None
    return Band(offset=0 if mode == CausalMode.TOP_LEFT else seqlen_k - seqlen_q, left=left, right=right)
