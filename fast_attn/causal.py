"""The two causal alignments of the contract, as one integer every kernel reads."""

from __future__ import annotations

import enum


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
    raise ValueError(
        f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}"
    )


def causal_offset(mode: CausalMode, seqlen_q: int, seqlen_k: int) -> int:
    """Query i may attend key j iff j <= i + offset."""
    return seqlen_k - seqlen_q if mode == CausalMode.BOTTOM_RIGHT else 0
