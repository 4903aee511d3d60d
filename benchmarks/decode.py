"""Decoding against a KV cache: time per call of the Triton decode op against SDPA, and the
bandwidth the op achieves (bytes of K and V read / time), for one new query per sequence.

The problem of a Llama-style model's decoding step: Hq 32 query heads on Hkv 8 kv heads, head dim
128, bf16, every sequence's cache full (cache_seqlens = S), B 1..64 sequences, S 8k..32k keys.
Each (B, S) is timed on a contiguous cache (B, S, Hkv, D) and on a paged one (pages of 256 keys
in a shuffled block table), the op's num_splits left to its heuristic (0). SDPA gets the same
contiguous cache as (B, Hkv, S, D) views with enable_gqa; its output is checked against the op's
before timing. Times are medians of triton.testing.do_bench on a GPU (perf_counter under the
Triton interpreter, for a smoke run only).

    python benchmarks/decode.py --out /tmp/decode          # writes results.json and results.md
    run_decode_benchmark(out_dir, batches=(1, 8), cache_lengths=(8192,))   # from a GPU script
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fast_attn  # noqa: F401  (registers the ops)

HEADS_Q, HEADS_KV, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 256


def _time_ms(fn, budget_ms: int) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=budget_ms // 4, rep=budget_ms, return_mode="median")
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _decode_call(q, k_cache, v_cache, cache_seqlens, block_table):
    """The op on one query row per sequence, the new keys already in the cache (k_new none)."""
    return lambda: torch.ops.fast_attn.triton_decode_forward(
        q, k_cache, v_cache, None, None, cache_seqlens, None, block_table, None,
        HEAD_DIM**-0.5, False, None, -1, -1, 0.0, 0,
    )  # fmt: skip


def benchmark_case(batch: int, cache_length: int, device: str, dtype: torch.dtype, budget_ms: int) -> dict:
    """One (B, S): the op on a contiguous and on a paged cache, SDPA on the contiguous one."""
    q = torch.randn(batch, 1, HEADS_Q, HEAD_DIM, device=device, dtype=dtype)
    k_cache, v_cache = (
        torch.randn(batch, cache_length, HEADS_KV, HEAD_DIM, device=device, dtype=dtype) for _ in range(2)
    )
    cache_seqlens = torch.full((batch,), cache_length, dtype=torch.int32, device=device)
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    contiguous = _decode_call(q, k_cache, v_cache, cache_seqlens, None)
    sdpa_args = (q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))

    def sdpa():
        return F.scaled_dot_product_attention(*sdpa_args, enable_gqa=True)

    out = contiguous()[0]
    max_difference = (out - sdpa().transpose(1, 2)).abs().max().item()
    result = dict(
        batch=batch,
        cache_length=cache_length,
        kv_bytes=kv_bytes,
        max_abs_difference_vs_sdpa=max_difference,
        triton_contiguous_ms=_time_ms(contiguous, budget_ms),
        sdpa_ms=_time_ms(sdpa, budget_ms),
    )
    # The same keys in shuffled pages of PAGE_SIZE: (num_pages, PAGE_SIZE, Hkv, D).
    pages_per_sequence = cache_length // PAGE_SIZE
    order = torch.randperm(batch * pages_per_sequence, device=device)
    block_table = order.reshape(batch, pages_per_sequence).to(torch.int32)
    k_pages, v_pages = (torch.empty_like(k_cache).view(-1, PAGE_SIZE, HEADS_KV, HEAD_DIM) for _ in range(2))
    k_pages[order] = k_cache.view(-1, PAGE_SIZE, HEADS_KV, HEAD_DIM)
    v_pages[order] = v_cache.view(-1, PAGE_SIZE, HEADS_KV, HEAD_DIM)
    paged = _decode_call(q, k_pages, v_pages, cache_seqlens, block_table)
    result["paged_matches_contiguous"] = bool(torch.equal(paged()[0], out))
    result["triton_paged_ms"] = _time_ms(paged, budget_ms)
    for name in ("triton_contiguous", "triton_paged", "sdpa"):
        result[f"{name}_gb_per_s"] = kv_bytes / (result[f"{name}_ms"] * 1e-3) / 1e9
    result["sdpa_over_triton_contiguous"] = result["sdpa_ms"] / result["triton_contiguous_ms"]
    return result


def run_decode_benchmark(
    out_dir: str | Path,
    batches=(1, 4, 16, 64),
    cache_lengths=(8192, 16384, 32768),
    dtype: torch.dtype = torch.bfloat16,
    budget_ms: int = 100,
) -> list[dict]:
    """Every (B, S) of batches x cache_lengths; writes results.json and results.md under out_dir
    and returns the rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    rows = []
    lines = [
        f"# Decode: Hq {HEADS_Q}, Hkv {HEADS_KV}, D {HEAD_DIM}, {str(dtype)[6:]}, one query per sequence ({machine})",
        "",
        "| B | S | K+V MB | triton ms | GB/s | paged ms | GB/s | sdpa ms | GB/s | sdpa / triton |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch in batches:
        for cache_length in cache_lengths:
            row = benchmark_case(batch, cache_length, device, dtype, budget_ms)
            rows.append(row)
            lines.append(
                f"| {batch} | {cache_length} | {row['kv_bytes'] / 1e6:.0f} "
                f"| {row['triton_contiguous_ms']:.3f} | {row['triton_contiguous_gb_per_s']:.0f} "
                f"| {row['triton_paged_ms']:.3f} | {row['triton_paged_gb_per_s']:.0f} "
                f"| {row['sdpa_ms']:.3f} | {row['sdpa_gb_per_s']:.0f} | {row['sdpa_over_triton_contiguous']:.2f} |"
            )
            print(lines[-1], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    (out_dir / "results.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--cache-length", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--budget-ms", type=int, default=100, help="do_bench's repetition time per timing")
    args = parser.parse_args()
    run_decode_benchmark(args.out, args.batch, args.cache_length, budget_ms=args.budget_ms)


if __name__ == "__main__":
    main()
