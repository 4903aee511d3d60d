"""A small forward+backward of every GPU backend, run under compute-sanitizer by
benchmarks/gpu_check.sh (memcheck, racecheck, initcheck)."""

from __future__ import annotations

import sys

import torch

import fast_attn


def main(backends: list[str]) -> None:
    torch.manual_seed(0)
    for backend in backends:
        for causal in (False, "bottom_right"):
            q = torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, 2, 93, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, 2, 93, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            bias = torch.randn(1, 4, 77, 93, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            key_mask = torch.rand(2, 93, device="cuda") < 0.8
            out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal=causal, backend=backend)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
            print(f"{backend} causal={causal}: ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["cuda"])
