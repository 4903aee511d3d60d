"""The longest sequence each GPU backend takes: causal forward+backward of one
sequence (B = 1, H = 16, D = 128, bf16) at growing lengths, with time and peak
memory, checked against the float64 reference on a slice of query rows.

Fused kernels keep memory linear in S, so the limit is the card's memory, long
after the time has become impractical; the script runs lengths up to --max-seqlen
and prints the measured bytes per token, from which the memory limit follows.

    python benchmarks/longest_sequence.py --out longest.json   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fast_attn
from fast_attn.dispatch import UNAVAILABLE
from fast_attn.reference import reference_attention

HEADS, HEAD_DIM = 16, 128
CHECKED_ROWS = 16  # last query rows, compared with the float64 reference


def run_length(backend: str, seqlen: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q, k, v = (
        torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        .transpose(1, 2)
        .requires_grad_()
        for _ in range(3)
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fast_attn.attention(q, k, v, causal=True, backend=backend)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    rows = slice(seqlen - CHECKED_ROWS, seqlen)
    expected, _ = reference_attention(q.detach()[:, :, rows], k.detach(), v.detach(), causal="bottom_right")
    error = (out.detach()[:, :, rows].double() - expected.double()).abs().max().item()
    finite = all(t.grad.isfinite().all().item() for t in (q, k, v))
    return dict(
        backend=backend,
        seqlen=seqlen,
        seconds=seconds,
        peak_bytes=peak,
        bytes_per_token=peak / seqlen,
        max_error_last_rows=error,
        grads_finite=finite,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-seqlen", type=int, default=262144)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    free, total = torch.cuda.mem_get_info()
    results = []
    for backend in ("triton", "cuda"):
        if UNAVAILABLE[backend] is not None:
            continue
        seqlen = 16384
        while seqlen <= args.max_seqlen:
            try:
                result = run_length(backend, seqlen)
            except torch.OutOfMemoryError:
                print(f"{backend}: out of memory at S = {seqlen}", flush=True)
                break
            result["memory_limit_tokens"] = int(free / result["bytes_per_token"])
            results.append(result)
            print(
                f"{backend:<7} S={seqlen:>7} {result['seconds']:7.2f} s  peak {result['peak_bytes'] / 2**30:6.2f} GiB"
                f"  {result['bytes_per_token'] / 1024:6.1f} KiB/token (memory limit ~{result['memory_limit_tokens']:,}"
                f" tokens)  max error {result['max_error_last_rows']:.2e}  grads finite {result['grads_finite']}",
                flush=True,
            )
            seqlen *= 2
    if args.out:
        with open(args.out, "w") as file:
            json.dump(
                dict(
                    card=torch.cuda.get_device_name(),
                    free_bytes=free,
                    total_bytes=total,
                    heads=HEADS,
                    head_dim=HEAD_DIM,
                    results=results,
                ),
                file,
                indent=1,
            )


if __name__ == "__main__":
    main()
