"""Launch configurations of the Triton kernels: block sizes, warps and pipeline
stages per GPU generation and head-dim block, pruned to a handful per launch so
autotuning stays short (each candidate is compiled and timed once per shape bucket).

The tables hold what is known to work for FlashAttention-style kernels in Triton:
forward BLOCK_M 128 with BLOCK_N 64-128, 4-8 warps and 3-4 stages on Hopper; the
backward with 64-128 keys per dK/dV program. Every entry was compiled for
sm_80 and sm_90 (tests/test_triton_compile.py) and dropped if it spilled registers
or did not fit in shared memory. Under TRITON_INTERPRET=1 one small fixed
configuration keeps CPU tests fast (the interpreter costs ~2.5 ms per tile).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query block and BLOCK_N the
# key block in every kernel. Keys of each table: head-dim block (16..256 rounded up to
# a power of two; the smallest entry >= it applies).
#
# Chosen from a compile sweep with triton 3.8 (GPUTarget, no GPU): each entry compiles
# without register spills (no stack frame) both plain (causal) and with a bf16 bias,
# for its head-dim block; the first entry of each list is the one used when
# autotuning is off (FAST_ATTN_TRITON_AUTOTUNE=0). On sm_90 every 16-bit entry with
# BLOCK_M (forward, dQ, dbias) or BLOCK_N (dK/dV) >= 64 per warpgroup lowers its dots
# to wgmma. Rejected examples: forward (128, 64, 4 warps, 3) at D 128 spills 336 B on
# sm_90; dK/dV (64, 128, 8, 2) at D 64 spills with a bias; every 4-warp dK/dV config at
# D >= 128 spills (dK and dV accumulators alone take 128 registers per thread).
# With a full (1, H, S, S) bias some later candidates spill (the worst: dK/dV
# (16, 128, 8, 2) at D 128 on sm_80, 184 B); they stay for the autotuner to time,
# and so do two first entries with 8 B each: dQ at D 128 on sm_80 and the float32
# forward at D 64 on sm_80 (swept 2026-11-26 with the batch-first grid).
# The kernels keep Triton's default specialization of int arguments (== 1, divisible
# by 16): with do_not_specialize on the sequence sizes, 9 of the 50 compile-test cases
# spilled 8-72 B with these tables, so a new sequence-length class (Sq == 1, S % 16
# == 0, other) costs one more compile instead.
Config = tuple[int, int, int, int]

_INTERPRETER_CONFIG: Config = (32, 32, 4, 1)

_FORWARD_16BIT = {
    "sm90": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
        256: [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    },
    "sm80": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    },
}
_DKDV_16BIT = {
    "sm90": {
        64: [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2)],
        128: [(16, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 2)],
    },
    "sm80": {
        64: [(16, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3)],
        128: [(32, 64, 8, 2), (16, 128, 8, 2), (64, 64, 8, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2)],
    },
}
_DQ_16BIT = {
    "sm90": {
        64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "sm80": {
        64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        128: [(64, 64, 4, 3), (128, 32, 8, 2)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2)],
    },
}
_DBIAS_16BIT = {
    "sm90": {
        64: [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
        128: [(128, 32, 8, 2), (64, 64, 8, 3)],
        256: [(64, 32, 8, 2)],
    },
    "sm80": {
        64: [(128, 32, 8, 3)],
        128: [(64, 32, 8, 3), (64, 32, 8, 2)],
        256: [(32, 64, 8, 2)],
    },
}
# Launches with dropout (a 32-bit hash per score) or a float32 bias on 16-bit inputs
# need more registers per score: these lists hold the entries that compile without
# spills for those too (swept with causal + float32 bias + key mask + dropout + GQA).
# Known exceptions: dbias on sm_80, and dbias at head-dim block 256, still spill a
# little (32-264 B) in that heaviest combination.
_HEAVY_16BIT = {
    "forward": {
        "sm90": {
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
            128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
            256: [(128, 32, 8, 2), (64, 32, 8, 2)],
        },
        "sm80": {
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
            128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2)],
            256: [(64, 32, 8, 2), (32, 64, 4, 2)],
        },
    },
    "dkdv": {
        "sm90": {
            64: [(16, 128, 8, 2), (16, 64, 8, 2)],
            128: [(16, 32, 8, 2), (16, 32, 4, 2)],
            256: [(16, 32, 8, 2)],
        },
        "sm80": {
            64: [(16, 128, 8, 2), (16, 64, 8, 2)],
            128: [(16, 64, 8, 2), (16, 32, 8, 2)],
            256: [(16, 32, 8, 2)],
        },
    },
    "dq": {
        "sm90": {
            64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 8, 2)],
            128: [(128, 64, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2)],
            256: [(32, 64, 4, 2)],
        },
        "sm80": {
            64: [(128, 64, 8, 3), (64, 32, 8, 2), (32, 64, 4, 2)],
            128: [(64, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
            256: [(32, 32, 4, 2), (64, 32, 8, 2)],
        },
    },
    "dbias": {
        "sm90": {
            64: [(128, 32, 8, 3), (64, 32, 8, 2)],
            128: [(64, 32, 8, 2)],
            256: [(64, 32, 8, 2)],
        },
        "sm80": {64: [(128, 32, 8, 3), (64, 32, 8, 2)], 128: [(64, 32, 8, 2)], 256: [(32, 64, 8, 2)]},
    },
}
# float32 runs "ieee" dots on CUDA cores (no tensor cores), whose operand layouts need
# far more registers: small tiles only.
_FLOAT32 = {
    "forward": {
        64: [(16, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)],
        128: [(16, 16, 4, 2), (32, 16, 4, 2)],
        256: [(16, 16, 4, 2), (16, 16, 4, 1)],
    },
    "dkdv": {64: [(16, 16, 8, 2)], 128: [(16, 32, 4, 2), (32, 16, 4, 2)], 256: [(16, 16, 4, 1)]},
    "dq": {
        64: [(32, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2)],
        128: [(16, 16, 4, 2), (16, 32, 4, 2)],
        256: [(16, 16, 4, 1), (16, 16, 4, 2)],
    },
    "dbias": {64: [(32, 16, 4, 1)], 128: [(16, 16, 4, 2)], 256: [(16, 16, 4, 2), (16, 32, 4, 1)]},
}
_TABLES = {"forward": _FORWARD_16BIT, "dkdv": _DKDV_16BIT, "dq": _DQ_16BIT, "dbias": _DBIAS_16BIT}
KERNEL_NAMES = tuple(_TABLES)


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose Python calls cost ~2 us each (triton 3.6 and 3.8), several times
# per launch: launches are host-bound for small problems.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def head_dim_block(head_dim: int) -> int:
    """The head-dim tile: a power of two >= 16 (tl.dot's smallest K); padding is masked."""
    return max(16, next_power_of_2(head_dim))


@functools.cache
def device_arch(device: torch.device) -> str:
    """Which config tables apply: "interpret", "sm90" (Hopper and later) or "sm80" (others)."""
    if interpreting() or device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs to fill; the interpreter pretends 4 so CPU tests exercise dbias splits."""
    if device_arch(device) == "interpret":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def is_heavy(
    dtype: torch.dtype, bias_dtype: torch.dtype | None, dropout_p: float, stores_dbias: bool = False
) -> bool:
    """Whether a launch takes the _HEAVY_16BIT candidates (see there). A dQ launch that
    also stores dbias (full-shape bias) counts too: (128, 64, 8, 3) spills 24 B on sm_80."""
    wide_bias = bias_dtype == torch.float32 and dtype != torch.float32
    return dropout_p > 0.0 or wide_bias or stores_dbias


def table_configs(
    kernel: str, arch: str, block_d: int, dtype: torch.dtype, heavy: bool = False
) -> list[Config]:
    """Every candidate of `kernel` for an architecture, head-dim block and dtype."""
    if arch == "interpret":
        return [_INTERPRETER_CONFIG]
    if dtype == torch.float32:
        by_head_dim = _FLOAT32[kernel]
    elif heavy:
        by_head_dim = _HEAVY_16BIT[kernel][arch]
    else:
        by_head_dim = _TABLES[kernel][arch]
    fitting = [d for d in sorted(by_head_dim) if d >= block_d]
    return list(by_head_dim[fitting[0] if fitting else max(by_head_dim)])


# Shared memory one block may use (bytes, opt-in maximum): H100 227 KiB, A100 163 KiB.
_SHARED_MEMORY_BYTES = {"sm90": 232448, "sm80": 166912}


def shared_memory_estimate(
    kernel: str, config: Config, block_d: int, dtype: torch.dtype, bias_dtype: torch.dtype | None
) -> int:
    """Bytes of shared memory a configuration needs: the pipelined tiles of each loop
    iteration times the stages (the bias tile with one stage less), plus the tiles
    loaded once. Matches what triton 3.8 allocates for the forward on sm_90 exactly
    (e.g. 65536 B for (128, 64, _, 3) at D 64; 98304 B with a bf16 bias); for dbias
    it is an upper bound (its loop over pairs streams q, grad_out, k and v)."""
    block_m, block_n, _, stages = config
    element = torch.empty((), dtype=dtype).element_size()
    bias_tile = (
        0 if bias_dtype is None else block_m * block_n * torch.empty((), dtype=bias_dtype).element_size()
    )
    if kernel == "dkdv":  # k, v held; q and grad_out streamed
        return (
            2 * block_n * block_d * element
            + stages * 2 * block_m * block_d * element
            + (stages - 1) * bias_tile
        )
    if kernel == "dbias":  # q, grad_out, k and v streamed
        return stages * 2 * (block_m + block_n) * block_d * element + (stages - 1) * bias_tile
    held_rows = block_m * block_d * element * (1 if kernel == "forward" else 2)  # q (and grad_out)
    return held_rows + stages * 2 * block_n * block_d * element + (stages - 1) * bias_tile


def prune_configs(
    configs: list[Config],
    arch: str,
    kernel: str,
    block_d: int,
    dtype: torch.dtype,
    bias_dtype: torch.dtype | None,
    seqlen_q: int,
    seqlen_k: int,
) -> tuple[Config, ...]:
    """The candidates worth timing: those that fit in shared memory, without blocks
    larger than the sequences they tile (a 128-row block for 20 queries only wastes
    work). Never empty: the smallest candidate stays."""
    useful_m = max(16, next_power_of_2(seqlen_q))
    useful_n = max(16, next_power_of_2(seqlen_k))
    limit = _SHARED_MEMORY_BYTES.get(arch)
    pruned = [
        c
        for c in configs
        if c[0] <= useful_m
        and c[1] <= useful_n
        and (limit is None or shared_memory_estimate(kernel, c, block_d, dtype, bias_dtype) <= limit)
    ]
    if not pruned:
        smallest = min(c[0] * c[1] * c[3] for c in configs)
        pruned = [c for c in configs if c[0] * c[1] * c[3] == smallest][:1]
    if not autotuning_enabled():
        pruned = pruned[:1]
    return tuple(dict.fromkeys(pruned))


def autotuning_enabled() -> bool:
    """Whether launches time their candidates and keep the fastest.

    Off (the first candidate only) with FAST_ATTN_TRITON_AUTOTUNE=0, for test runs on
    a GPU where compiling every candidate of every kernel variant dominates the time,
    and under torch.use_deterministic_algorithms(True): timing noise can make two
    processes pick different tiles, hence different summation orders and bits; a fixed
    tile gives the same bits in every process. (Within one process the tuned choice is
    cached, so results repeat either way.)
    """
    if torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("FAST_ATTN_TRITON_AUTOTUNE", "1") != "0"


def launch_configs(
    kernel: str,
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    seqlen_q: int,
    seqlen_k: int,
    bias_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    stores_dbias: bool = False,
) -> tuple[Config, ...]:
    """The candidates autotuned for one launch of `kernel` ("forward", "dkdv", "dq", "dbias")."""
    # No table block exceeds _LONGEST_PRUNED (tests/test_triton.py), so all longer
    # sequences prune alike: clamping keeps the cache small. Cached because it runs
    # on every launch (host time per call).
    return _launch_configs(
        kernel,
        device_arch(device),
        head_dim_block(head_dim),
        dtype,
        bias_dtype,
        is_heavy(dtype, bias_dtype, dropout_p, stores_dbias),
        min(seqlen_q, _LONGEST_PRUNED),
        min(seqlen_k, _LONGEST_PRUNED),
        autotuning_enabled(),
    )


_LONGEST_PRUNED = 256


@functools.cache
def _launch_configs(kernel, arch, block_d, dtype, bias_dtype, heavy, seqlen_q, seqlen_k, autotune):
    del autotune  # part of the cache key only: prune_configs reads it
    configs = table_configs(kernel, arch, block_d, dtype, heavy)
    return prune_configs(configs, arch, kernel, block_d, dtype, bias_dtype, seqlen_q, seqlen_k)


@functools.cache
def autotuned(kernel: triton.runtime.JITFunction, configs: tuple[Config, ...]) -> triton.runtime.Autotuner:
    """`kernel` autotuned over `configs` (BLOCK_M, BLOCK_N, warps, stages).

    One Autotuner per candidate list: the lists already encode the shape bucket.
    The tuner's key holds the masking features and the grid order (TUNING_KEY; it
    also separates dtypes), so a causal launch, or one with a bias or a window, does not
    inherit the tile timed on a plain one, whose work per program differs. Kernels only
    write their outputs (no read-modify-write), so timing runs need no reset.
    """
    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in configs
        ],
        key=list(TUNING_KEY),
    )(kernel)


# Constexprs of every tuned kernel that change the work per tile (a bias adds a load
# per score) or the order of the programs (packed sequences: programs past a short
# sequence's end exit at once). A kernel without one of them ignores it.
TUNING_KEY = (
    "LEFT_BOUNDED",
    "RIGHT_BOUNDED",
    "HAS_BIAS",
    "HAS_KEY_MASK",
    "HAS_DROPOUT",
    "HAS_SOFTCAP",
    "HAS_ALIBI",
    "BATCH_FASTEST",
    "IS_VARLEN",
)


MAX_DBIAS_SPLITS = 16


def dbias_splits(programs: int, pairs_per_slice: int, device: torch.device) -> int:
    """How many partial sums the dbias reduction is cut into: enough programs to fill
    the GPU twice over, at most one per (batch, head) pair and MAX_DBIAS_SPLITS (each
    split costs one fp32 copy of the bias)."""
    target = 2 * multiprocessor_count(device)
    if programs >= target:
        return 1
    return max(1, min(pairs_per_slice, MAX_DBIAS_SPLITS, cdiv(target, max(programs, 1))))


# The decode kernels (fast_attn/triton/decode.py), not autotuned: the number of key splits is
# chosen from the key block, and a fixed tile gives the same bits in every process. By head-dim
# block, (BLOCK_N, num_warps, num_stages): each key block is BLOCK_N rows of K and V read once for
# the g * Sq rows of the tile, so the kernel is bound by memory bandwidth and wants loads in
# flight (three stages) more than a large tile. Rows of the tile: g * Sq rounded up to a power
# of two >= 16 (tl.dot's smallest M), at most _DECODE_MAX_BLOCK_M per program.
_DECODE_CONFIGS = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
# float32's "ieee" dots run on CUDA cores and hold their operands in registers: (64, 4, 3) at D 40
# spilled 528 B on sm_80, (32, 4, 2) at D 256 160 B on sm_80 and 6.6 KB on sm_90.
_DECODE_FLOAT32_CONFIGS = {128: (32, 4, 2), 256: (16, 4, 2)}
_DECODE_MAX_BLOCK_M = 64
# Under the interpreter, 16-key blocks: small test caches still hold several blocks to split.
_INTERPRETER_DECODE_CONFIG = (16, 4, 1)
MAX_DECODE_SPLITS = 128


def decode_config(arch: str, head_dim: int, dtype: torch.dtype, tile_rows: int) -> Config:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode split kernel on `arch` (device_arch's
    names; sm_80 and sm_90 alike) for tiles of g * Sq = tile_rows rows."""
    block_m = min(_DECODE_MAX_BLOCK_M, max(16, next_power_of_2(tile_rows)))
    if arch == "interpret":
        return (block_m, *_INTERPRETER_DECODE_CONFIG)
    table = _DECODE_FLOAT32_CONFIGS if dtype == torch.float32 else _DECODE_CONFIGS
    block_d = head_dim_block(head_dim)
    return (block_m, *table[min(d for d in table if d >= block_d)])


def decode_splits(work_units: int, key_blocks: int, device: torch.device) -> int:
    """How many key ranges each (sequence, kv head, row block) is split into when the caller
    leaves it to the kernel (num_splits = 0). work_units: programs without splitting; key_blocks:
    the most key blocks a sequence can have (the cache's capacity in blocks).

    FlashAttention-2's rule: a launch that already fills 80% of the SMs is not split; otherwise
    each split count s from 1 to min(MAX_DECODE_SPLITS, key_blocks, SMs) runs in waves of SMs, with
    efficiency = waves / ceil(waves) (waves = work_units * s / SMs: 1 when the last wave is full),
    and the smallest s within 85% of the best efficiency wins: fewer splits mean less to merge.
    """
    sms = multiprocessor_count(device)
    if work_units >= 0.8 * sms or key_blocks <= 1:
        return 1
    candidates = range(1, min(MAX_DECODE_SPLITS, key_blocks, sms) + 1)

    def efficiency(splits: int) -> float:
        waves = work_units * splits / sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in candidates)
    return next(s for s in candidates if efficiency(s) >= 0.85 * best)
