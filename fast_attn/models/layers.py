"""The non-attention pieces the model blocks share: activations, MLPs, RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's "gelu_new": the tanh approximation of GELU.
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), BERT's
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    """The activation function called `name` (transformers' names)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """x -> fc_out(act(fc_in(x))): the feed-forward of a GPT block."""

    def __init__(self, width: int, hidden: int, act: str, *, bias: bool = True) -> None:
        super().__init__()
        self.fc_in = nn.Linear(width, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, width, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction, no bias.

    The mean of squares is taken in float32 whatever the input dtype (half
    precision would overflow or lose the small terms); the result is cast to
    the weight's dtype when that is half precision, as T5 does.
    """

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x
