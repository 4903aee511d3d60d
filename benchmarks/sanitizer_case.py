"""Small forwards+backwards of every GPU backend, run under compute-sanitizer by
benchmarks/gpu_check.sh (memcheck, racecheck, initcheck): the general, fast and causal kernel paths."""

from __future__ import annotations

import sys

import torch

import fast_attn

# A bias of full rows and columns (the cuda backend's dbias kernel) and one
# broadcast over heads and queries (dbias reduced inside the dK/dV kernel): the general kernels.
BIAS_SHAPES = ((1, 4, 77, 93), (2, 1, 1, 93))
# No bias or mask: the fast and causal kernels, at D 32 to 128 the staged dK/dV kernel (several query
# steps per head, a partial key block, GQA), by default and deterministic (per-split dq partials).
PLAIN_CASES = (
    (False, 64, False),
    ("bottom_right", 64, True),
    (True, 128, False),
    (False, 128, True),
    (True, 32, False),
    ("bottom_right", 96, True),
)


def _qkv(seqlen_q: int, seqlen_k: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    shapes = ((2, 4, seqlen_q, head_dim), (2, 2, seqlen_k, head_dim), (2, 2, seqlen_k, head_dim))
    return tuple(
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for shape in shapes
    )


def main(backends: list[str]) -> None:
    torch.manual_seed(0)
    for backend in backends:
        for causal, bias_shape in (
            (False, BIAS_SHAPES[0]),
            ("bottom_right", BIAS_SHAPES[0]),
            (False, BIAS_SHAPES[1]),
        ):
            q, k, v = _qkv(77, 93, 64)
            bias = torch.randn(bias_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            key_mask = torch.rand(2, 93, device="cuda") < 0.8
            out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal=causal, backend=backend)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
            print(f"{backend} causal={causal} bias {bias_shape}: ok", flush=True)
        for causal, head_dim, deterministic in PLAIN_CASES:
            q, k, v = _qkv(200, 300, head_dim)
            torch.use_deterministic_algorithms(deterministic)
            try:
                out = fast_attn.attention(q, k, v, causal=causal, backend=backend)
                out.float().square().sum().backward()
                torch.cuda.synchronize()
            finally:
                torch.use_deterministic_algorithms(False)
            print(f"{backend} causal={causal} D {head_dim} deterministic={deterministic}: ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["cuda"])
