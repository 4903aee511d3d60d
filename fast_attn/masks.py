"""The one conversion of a bool attention mask into an additive bias."""

from __future__ import annotations

import torch


def bias_from_mask(
    visible: torch.Tensor, dtype: torch.dtype, visible_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A bool mask (True = attend) as a bias: `visible_bias` (default 0) where True, -inf where False.

    The result has the broadcast shape of `visible` and `visible_bias`, in `dtype`.
    """
    if visible_bias is None:
        visible_bias = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, visible_bias.to(dtype), float("-inf"))
