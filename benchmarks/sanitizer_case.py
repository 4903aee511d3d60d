"""A small forward+backward of every GPU backend, run under compute-sanitizer by
benchmarks/gpu_check.sh (memcheck, racecheck, initcheck)."""

from __future__ import annotations

import sys

import torch

import fast_attn

# A bias of full rows and columns (the cuda backend's dbias kernel) and one
# broadcast over heads and queries (dbias reduced inside the dK/dV kernel).
BIAS_SHAPES = ((1, 4, 77, 93), (2, 1, 1, 93))


def main(backends: list[str]) -> None:
    torch.manual_seed(0)
    for backend in backends:
        for causal, bias_shape in (
            (False, BIAS_SHAPES[0]),
            ("bottom_right", BIAS_SHAPES[0]),
            (False, BIAS_SHAPES[1]),
        ):
            q = torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, 2, 93, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, 2, 93, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            bias = torch.randn(bias_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            key_mask = torch.rand(2, 93, device="cuda") < 0.8
            out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal=causal, backend=backend)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
            print(f"{backend} causal={causal} bias {bias_shape}: ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["cuda"])
