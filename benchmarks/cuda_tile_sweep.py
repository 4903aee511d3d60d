"""CUDA tile sweep: the released tile shapes of csrc/cuda/tile_configs.h against
candidates, built and timed on the GPU machine in one run.

Variant i sets forward candidate i and dK/dV candidate i at once (they are
separate kernels, timed separately: forward in the fwd column, dK/dV in bwd);
variant 0 is the released configuration. For each head dim and variant the
script writes csrc/cuda/tile_overrides.h, rebuilds the extension for that head
dim only, checks a forward+backward against the float64 reference, and times
fwd and bwd at S = 4096 (bf16, 16k tokens, hidden 2048, causal and not) next to
SDPA's flash backend. The header is deleted at the end whatever happens, and the
extension is rebuilt with the released tiles for the swept head dims only.

Candidates are checked without a GPU first (ptxas: no spills; the CPU warp
emulator: correct results; its cached build does not notice a new header, so its
folder goes first):

    python benchmarks/cuda_tile_sweep.py --write 1      # variant 1 for every head dim
    python tools/cuda_compile_check.py --no-report
    rm -rf "${TMPDIR:-/tmp}"/fast_attn_cuda_emulator_torch* && pytest tests/test_cuda.py -k emulated
    python benchmarks/cuda_tile_sweep.py --write 0      # back to released

On the GPU machine it builds by itself, about 45 s per build and measurement, so
about 4 minutes per head dim (`STEPS=cuda_sweep SWEEP_HEAD_DIMS=64 bash
benchmarks/gpu_check.sh`):

    python benchmarks/cuda_tile_sweep.py --head-dim 128 --out $OUT/cuda_sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ROOT / "csrc" / "cuda" / "tile_overrides.h"

# ForwardTileConfig: (block_m, block_n, warps, min_blocks_per_sm, q_in_registers, warp_m_tiles),
# block_m = 16 * warp_m_tiles * warps. Released first: the kFast / kCausal kernels' tile
# (forward_tile_config), which the timed problems (no bias, causal or not) run; a variant replaces
# the tile of every forward kernel, the general ones of the reference check included. Then the
# general kernels' tile (8 warps x 16 rows, one CTA per SM), and other shapes: 4 warps x 16 rows
# with two CTAs per SM, other key-tile widths, Q in shared memory. Checked here (2026-12-07, nvcc
# 13.0): the released tiles ptxas-clean on sm_80 and sm_90a; variant 1 is the general tile.
FORWARD_CANDIDATES = {
    64: [
        (128, 64, 4, 2, True, 2),
        (128, 128, 8, 1, True, 1),
        (64, 128, 4, 2, True, 1),
        (64, 64, 4, 2, True, 1),
        (128, 64, 4, 2, False, 2),
    ],
    128: [
        (128, 32, 4, 2, False, 2),
        (128, 64, 8, 1, True, 1),
        (64, 64, 4, 2, True, 1),
        (128, 32, 8, 1, True, 1),
        (64, 32, 4, 2, True, 1),
    ],
}
# DkdvTileConfig: (block_n, block_m, chunk_m, warps, split_head_dim, min_blocks_per_sm, kv_in_registers),
# block_n = 16 * warps / split. Released first; repeated where a variant has no dK/dV candidate.
DKDV_CANDIDATES = {
    64: [
        (128, 64, 16, 8, 1, 1, True),
        (64, 64, 16, 4, 1, 2, True),
        (128, 128, 16, 8, 1, 1, True),
        (128, 64, 32, 8, 1, 1, True),
        (128, 64, 16, 8, 1, 1, True),
    ],
    # At D 128, four warps spill (16-80 B: each warp takes more dQ columns), so does a chunk
    # of 32, and 128 query rows per step need 244 KiB of shared memory.
    128: [
        (128, 64, 16, 8, 1, 1, False),
        (128, 64, 16, 8, 1, 1, False),
        (128, 32, 16, 8, 1, 1, False),
        (128, 64, 16, 8, 1, 1, False),
        (128, 64, 16, 8, 1, 1, False),
    ],
}
SEQLEN, TOKENS, HIDDEN = 4096, 16384, 2048


def _cpp(values: tuple) -> str:
    return (
        "{" + ", ".join(("true" if v else "false") if isinstance(v, bool) else str(v) for v in values) + "}"
    )


def write_overrides(variant: int, head_dims: list[int]) -> None:
    """csrc/cuda/tile_overrides.h for `variant` of each head dim; variant 0 removes it."""
    if variant == 0:
        OVERRIDES.unlink(missing_ok=True)
        return
    forward = "\n".join(
        f"  if (head_dim == {d}) return {_cpp(FORWARD_CANDIDATES[d][variant])};" for d in head_dims
    )
    dkdv = "\n".join(f"  if (head_dim == {d}) return {_cpp(DKDV_CANDIDATES[d][variant])};" for d in head_dims)
    OVERRIDES.write_text(
        f"// Written by benchmarks/cuda_tile_sweep.py (variant {variant}); delete to build the released tiles.\n"
        "#pragma once\n\nnamespace fast_attn::cuda {\n\n"
        f"constexpr ForwardTileConfig forward_tile_override(int head_dim) {{\n{forward}\n  return {{}};\n}}\n\n"
        f"constexpr DkdvTileConfig dkdv_tile_override(int head_dim) {{\n{dkdv}\n  return {{}};\n}}\n\n"
        "}  // namespace fast_attn::cuda\n"
    )


def build(head_dims: list[int], arch: str) -> tuple[bool, float, str]:
    """Rebuild the extension for these head dims; the object files go, since whether
    the overrides header exists is not something the compilers' dependency files track."""
    for temp in (ROOT / "build").glob("temp.*"):
        shutil.rmtree(temp)
    env = dict(
        os.environ,
        FAST_ATTN_BUILD_CUDA="1",
        FAST_ATTN_CUDA_HEAD_DIMS=",".join(map(str, head_dims)),
        TORCH_CUDA_ARCH_LIST=arch,
        MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "-e", str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    return done.returncode == 0, time.perf_counter() - start, (done.stdout + done.stderr)[-3000:]


def measure(head_dim: int) -> dict:
    """In a fresh process: the reference check, then fwd and bwd times of cuda and SDPA flash."""
    import torch

    import fast_attn
    from fast_attn import bench
    from fast_attn.testing import (
        assert_error_rule,
        random_key_mask,
        random_qkv,
        rounded_output_reference,
        run_reference,
    )

    dtype = torch.bfloat16
    q, k, v = random_qkv(2, 4, 2, 193, 250, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    bias = torch.randn(1, 4, 193, 250, device="cuda", dtype=dtype, requires_grad=True)
    key_mask = random_key_mask(2, 250, device="cuda")
    kwargs = dict(causal="bottom_right")
    out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, backend="cuda", **kwargs)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask}
    grad_out = torch.randn_like(out)
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    same = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    rounded = rounded_output_reference(inputs, out_dtype=dtype, grad_out=grad_out, **kwargs)
    assert_error_rule("out", out, exact.out, same.out, dtype)
    for name, grad in zip(("q", "k", "v", "bias"), torch.autograd.grad(out, (q, k, v, bias), grad_out)):
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], same.grads[name], dtype, rounded_output=rounded.grads[name]
        )

    times = {}
    heads = HIDDEN // head_dim
    for mode in ("fwd", "bwd"):
        for causal in (False, True):
            case = bench.Case(TOKENS // SEQLEN, heads, SEQLEN, head_dim, causal, "bf16", mode, "none")
            for name, fn in (("cuda", bench._fast_attn_fn("cuda")), ("flash", bench._sdpa_fn("flash"))):
                result = bench.run_case(case, name, fn, torch.device("cuda"), 300.0)
                times[f"{mode} causal={int(causal)} {name}"] = result.throughput
    return {"check": "passed", "tflops": times}


def sweep(head_dims: list[int], out: Path) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for head_dim in head_dims:
            for variant in range(len(FORWARD_CANDIDATES[head_dim])):
                write_overrides(variant, [head_dim])
                record = {
                    "head_dim": head_dim,
                    "variant": variant,
                    "forward": FORWARD_CANDIDATES[head_dim][variant],
                    "dkdv": DKDV_CANDIDATES[head_dim][variant],
                }
                built, seconds, log = build([head_dim], arch)
                record["build_s"] = round(seconds, 1)
                if not built:
                    record["error"] = "build failed: " + log[-600:]
                else:
                    done = subprocess.run(
                        [sys.executable, __file__, "--measure", str(head_dim)],
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False,
                        cwd=ROOT,
                    )
                    lines = done.stdout.strip().splitlines()
                    if done.returncode == 0 and lines:
                        record.update(json.loads(lines[-1]))
                    else:
                        record["error"] = (done.stdout + done.stderr)[-600:]
                results.append(record)
                print(json.dumps(record), flush=True)
                (out / "cuda_tile_sweep.json").write_text(json.dumps(results, indent=1))
    finally:
        write_overrides(0, head_dims)
        build(head_dims, arch)  # released tiles again
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dim", type=int, nargs="+", default=sorted(FORWARD_CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("cuda_sweep_out"))
    parser.add_argument(
        "--write", type=int, metavar="VARIANT", help="only write the overrides header (0 removes it)"
    )
    parser.add_argument(
        "--measure", type=int, metavar="HEAD_DIM", help=argparse.SUPPRESS
    )  # the per-variant process
    args = parser.parse_args()
    if args.write is not None:
        write_overrides(args.write, args.head_dim)
        return 0
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return 0
    return sweep(args.head_dim, args.out)


if __name__ == "__main__":
    sys.exit(main())
