"""fast_attn.distributed on gloo CPU ranks (and NCCL GPU ranks, marker gpu): context_parallel_attention
against fast_attn.attention on the whole sequence in one process (output, lse and every gradient), both
modes and layouts, and bad input.

One spawn of 4 CPU ranks (run_on_local_ranks, a module-scoped fixture) runs every case, in groups of 4, 2
and 1 ranks; test_case reports each case's outcome. Every rank builds the same whole problem from one
seed, computes the one-process reference itself, and checks its own shard. On a GPU machine one spawn of
NCCL ranks (one per GPU, at most 2) runs the GPU cases with the cuda and triton backends the same way.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from distributed_cases import assert_passed, run_checks

import fast_attn
from fast_attn.causal import CausalMode
from fast_attn.distributed import context_parallel_attention, gather_sequence, shard_sequence
from fast_attn.distributed.launch import run_on_local_ranks
from fast_attn.distributed.layout import Piece, shard_pieces
from fast_attn.distributed.ring import plan_blocks, visible_block
from fast_attn.reference import _visible_mask

TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Setting:
    mode: str
    layout: str
    causal: bool = False
    heads: tuple[int, int] = (4, 2)  # (Hq, Hkv)
    seqlen: int = 16  # the whole sequence
    window: tuple[int, int] | None = None
    softcap: float | None = None
    sinks: bool = False
    return_lse: bool = False
    head_dim: int = 8
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    backend: str = "auto"

    def __str__(self) -> str:
        parts = [
            self.mode,
            self.layout,
            "causal" if self.causal else "full",
            f"h{self.heads[0]}-{self.heads[1]}",
        ]
        parts += [f"s{self.seqlen}"] + ([f"window{self.window[0]}-{self.window[1]}"] if self.window else [])
        parts += ["softcap"] * bool(self.softcap) + ["sinks"] * self.sinks + ["lse"] * self.return_lse
        parts += [] if self.head_dim == 8 else [f"d{self.head_dim}"]
        parts += [] if self.dtype == torch.float64 else [str(self.dtype).replace("torch.", "")]
        return "-".join(parts + ([] if self.backend == "auto" else [self.backend]))


SETTINGS_2 = [
    Setting("ring", "zigzag", causal=True),
    Setting("ring", "contiguous", causal=True, heads=(2, 2)),
    Setting("ring", "zigzag", heads=(4, 1), return_lse=True),
    Setting("ring", "contiguous", sinks=True, return_lse=True),
    Setting("ring", "zigzag", causal=True, window=(5, -1), softcap=2.0, sinks=True),
    Setting("ring", "zigzag", window=(3, 6), seqlen=24),
    Setting("ring", "contiguous", window=(0, 0)),
    Setting("ring", "zigzag", causal=True, dtype=torch.float32),
    Setting("all_to_all", "zigzag", causal=True, sinks=True, return_lse=True),
    Setting("all_to_all", "contiguous", heads=(4, 1)),
    Setting("all_to_all", "zigzag", causal=True, window=(5, -1), softcap=2.0),
    Setting("all_to_all", "contiguous", causal=True, backend="reference"),
]
SETTINGS_4 = [
    Setting("ring", "zigzag", causal=True, seqlen=32),
    Setting("ring", "contiguous", causal=True, seqlen=32, sinks=True, return_lse=True),
    Setting("ring", "zigzag", causal=True, seqlen=32, window=(9, 0)),
    Setting("ring", "contiguous", seqlen=16, heads=(4, 1), window=(2, 7)),
    Setting("all_to_all", "zigzag", causal=True, seqlen=32, heads=(8, 4)),
    Setting("all_to_all", "contiguous", seqlen=16, heads=(4, 2), return_lse=True),
    Setting("all_to_all", "zigzag", seqlen=16, heads=(4, 1), sinks=True),
]


def _inputs(setting: Setting, generator: torch.Generator) -> dict:
    """The whole problem, the same on every rank: q, k, v, sinks, and the gradients of out and lse."""
    heads_q, heads_kv = setting.heads
    shape = (2, heads_q, setting.seqlen, setting.head_dim)
    kv_shape = (2, heads_kv, setting.seqlen, setting.head_dim)
    lse_dtype = torch.float64 if setting.dtype == torch.float64 else torch.float32

    def randn(*size, dtype=setting.dtype):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(setting.device, dtype)

    return {
        "q": randn(*shape),
        "k": randn(*kv_shape),
        "v": randn(*kv_shape),
        "sinks": randn(heads_q) if setting.sinks else None,
        "grad_out": randn(*shape),
        "grad_lse": randn(*shape[:3], dtype=lse_dtype),
    }


def _options(setting: Setting) -> dict:
    return {
        "causal": setting.causal,
        "window_size": setting.window,
        "softcap": setting.softcap,
        "return_lse": True,
        "backend": setting.backend,
    }


def _tolerance(setting: Setting, wanted: torch.Tensor) -> dict:
    """float64 and float32 differ by the order of their sums; half precision also by where each path
    rounds its partial results (the ring merges blocks in float32 and rounds once; the whole sequence
    rounds its own way), a few units of the last place of the largest value."""
    if setting.dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-10}
    if setting.dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5}
    return {"atol": 2e-2 * max(1.0, wanted.abs().max().item()), "rtol": 2e-2}


def _check_setting(setting: Setting, group) -> None:
    """context_parallel_attention on this rank's shards against attention on the whole sequence: out and lse,
    and dq, dk, dv (each rank's shard) and dsinks (summed over the ranks)."""
    inputs = _inputs(setting, torch.Generator().manual_seed(zlib.crc32(str(setting).encode())))
    leaves = {name: inputs[name] for name in ("q", "k", "v", "sinks") if inputs[name] is not None}

    whole = {name: t.clone().requires_grad_() for name, t in leaves.items()}
    out, lse = fast_attn.attention(
        whole["q"], whole["k"], whole["v"], sinks=whole.get("sinks"), **_options(setting)
    )
    loss = (out * inputs["grad_out"]).sum()
    if setting.return_lse:
        loss = loss + (lse * inputs["grad_lse"]).sum()
    loss.backward()

    layout = setting.layout
    mine = {
        name: shard_sequence(t, 2, group=group, layout=layout)
        for name, t in leaves.items()
        if name != "sinks"
    }
    mine = {name: t.detach().requires_grad_() for name, t in mine.items()}
    sinks = whole["sinks"].detach().clone().requires_grad_() if setting.sinks else None
    options = _options(setting) | {"return_lse": setting.return_lse}
    result = context_parallel_attention(
        mine["q"], mine["k"], mine["v"], group=group, mode=setting.mode, layout=layout, sinks=sinks, **options
    )
    out_mine, lse_mine = result if setting.return_lse else (result, None)
    # The loss on the gathered output is the same on every rank; gather_sequence's backward keeps each its part.
    cp_loss = (gather_sequence(out_mine, 2, group=group, layout=layout) * inputs["grad_out"]).sum()
    if setting.return_lse:
        cp_loss = (
            cp_loss + (gather_sequence(lse_mine, 2, group=group, layout=layout) * inputs["grad_lse"]).sum()
        )
    cp_loss.backward()

    expected = {"out": out, "lse": lse} | {f"d{name}": whole[name].grad for name in mine}
    actual = {"out": out_mine} | ({"lse": lse_mine} if setting.return_lse else {})
    actual |= {f"d{name}": t.grad for name, t in mine.items()}
    for name, value in actual.items():
        wanted = shard_sequence(expected[name].detach(), 2, group=group, layout=layout)
        tolerance = _tolerance(setting, wanted)
        torch.testing.assert_close(value, wanted, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    if setting.sinks:
        dsinks = sinks.grad.clone()
        dist.all_reduce(dsinks, group=group)
        wanted = whole["sinks"].grad
        torch.testing.assert_close(dsinks, wanted, **_tolerance(setting, wanted))


def _expect_error(error: type[Exception], words: str, function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except error as raised:
        assert words in str(raised), f"{error.__name__} without {words!r}: {raised}"
        return
    raise AssertionError(f"no {error.__name__} ({words!r})")


def _qkv(heads_q: int = 4, heads_kv: int = 2, seqlen: int = 8):
    q = torch.randn(1, heads_q, seqlen, 8, dtype=torch.float64)
    k = torch.randn(1, heads_kv, seqlen, 8, dtype=torch.float64)
    return q, k, k.clone()


def _shard_sequence_not_divisible(group) -> None:
    x = torch.zeros(1, 2, 2 * dist.get_world_size(group) + 2, 4)  # zigzag needs a multiple of 2 * world
    _expect_error(ValueError, "multiple of", shard_sequence, x, 2, group=group, layout="zigzag")


def _zigzag_odd_shard(group) -> None:
    _expect_error(
        ValueError, "S_local must be even", context_parallel_attention, *_qkv(seqlen=7), group=group
    )


def _heads_not_divisible(group) -> None:
    qkv = _qkv(heads_q=dist.get_world_size(group) + 1, heads_kv=1)
    _expect_error(
        ValueError, "Hq % world == 0", context_parallel_attention, *qkv, group=group, mode="all_to_all"
    )


def _kv_heads_not_divisible(group) -> None:
    qkv = _qkv(heads_q=12, heads_kv=3)  # for 2 and 4 ranks neither Hkv % world nor world % Hkv is 0
    _expect_error(
        ValueError, "Hkv % world == 0", context_parallel_attention, *qkv, group=group, mode="all_to_all"
    )


def _unequal_shapes(group) -> None:
    qkv = _qkv(seqlen=8 - 2 * dist.get_rank(group))
    for mode in ("ring", "all_to_all"):
        _expect_error(ValueError, "same shapes", context_parallel_attention, *qkv, group=group, mode=mode)


def _ring_refuses_reference(group) -> None:
    _expect_error(
        fast_attn.BackendNotSupportedError, "mode='all_to_all'",
        context_parallel_attention, *_qkv(), group=group, backend="reference",
    )  # fmt: skip


def _per_row_sinks(group) -> None:
    q, k, v = _qkv()
    sinks = torch.zeros(1, 4, 8, dtype=torch.float64)  # one logit per query row: fast_attn.attention only
    _expect_error(ValueError, "sinks must have shape (Hq,)", context_parallel_attention, q, k, v, group=group,
                  sinks=sinks)  # fmt: skip


def _bad_names(group) -> None:
    _expect_error(ValueError, "mode must be", context_parallel_attention, *_qkv(), group=group, mode="x")
    _expect_error(ValueError, "layout must be", context_parallel_attention, *_qkv(), group=group, layout="x")


# Inputs every rank must refuse alike (no rank left waiting for the others): name -> check(group).
BAD_INPUT_CASES = {
    "shard-sequence-not-divisible": _shard_sequence_not_divisible,
    "zigzag-odd-shard": _zigzag_odd_shard,
    "heads-not-divisible-all-to-all": _heads_not_divisible,
    "kv-heads-not-divisible-all-to-all": _kv_heads_not_divisible,
    "unequal-shapes": _unequal_shapes,
    "ring-refuses-reference": _ring_refuses_reference,
    "per-row-sinks": _per_row_sinks,
    "bad-names": _bad_names,
}
GROUP_OF_ONE = [Setting(mode, "zigzag", causal=True, seqlen=8, sinks=True) for mode in ("ring", "all_to_all")]


def _cases() -> dict[str, tuple]:
    """Every case: name -> (group size, check(group))."""
    cases = {}
    for size, settings in ((2, SETTINGS_2), (4, SETTINGS_4)):
        cases |= {f"{size}-ranks-{s}": (size, functools.partial(_check_setting, s)) for s in settings}
        cases |= {f"{size}-ranks-{name}": (size, check) for name, check in BAD_INPUT_CASES.items()}
    return cases | {f"1-rank-{s}": (1, functools.partial(_check_setting, s)) for s in GROUP_OF_ONE}


def _run_cases(rank: int, world: int) -> dict[str, str | None]:
    """Every case on this rank, of the 4: the 2-rank cases in the groups {0, 1} and {2, 3} side by side, the
    4-rank ones in the default group, the 1-rank ones in a group of this rank alone."""
    # Every rank creates every group, in one order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(world)]
    groups = {1: singles[rank], 2: pairs[rank // 2], 4: None}
    return run_checks(
        {name: functools.partial(check, groups[size]) for name, (size, check) in _cases().items()}
    )


@pytest.fixture(scope="module")
def outcomes():
    return run_on_local_ranks(_run_cases, 4, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", list(_cases()))
def test_case(outcomes, name):
    assert_passed(outcomes, name)


# NCCL ranks with one GPU each, on the GPU backends: half precision at a head dim the kernels are tuned for.
GPU_SETTINGS = [
    Setting(mode, layout, causal=causal, seqlen=512, head_dim=64, dtype=dtype, device="cuda", backend=backend)
    for backend in ("cuda", "triton")
    for mode, layout, causal, dtype in (
        ("ring", "zigzag", True, torch.bfloat16),
        ("ring", "contiguous", False, torch.float16),
        ("all_to_all", "zigzag", True, torch.bfloat16),
    )
] + [
    Setting(mode, "zigzag", causal=True, seqlen=512, head_dim=64, window=(100, -1), softcap=20.0, sinks=True,
            return_lse=True, dtype=torch.bfloat16, device="cuda", backend=backend)
    for backend in ("cuda", "triton")
    for mode in ("ring", "all_to_all")
]  # fmt: skip
GPU_WORLD = 2  # the most NCCL ranks the GPU cases use (one GPU each)


def _gpu_cases() -> dict[str, tuple]:
    """Every GPU case: name -> (group size, check(group)); each setting on one rank and on GPU_WORLD."""
    return {
        f"{size}-ranks-{s}": (size, functools.partial(_check_setting, s))
        for size in (1, GPU_WORLD)
        for s in GPU_SETTINGS
    }


def _run_gpu_cases(rank: int, world: int) -> dict[str, str | None]:
    """The GPU cases this many ranks can run: the 1-rank ones in a group of this rank alone, the others in
    the default group when there are GPU_WORLD ranks."""
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in one order
    groups = {1: singles[rank]} | ({GPU_WORLD: None} if world == GPU_WORLD else {})
    cases = {name: case for name, case in _gpu_cases().items() if case[0] in groups}
    return run_checks({name: functools.partial(check, groups[size]) for name, (size, check) in cases.items()})


@pytest.fixture(scope="module")
def gpu_outcomes():
    world = min(GPU_WORLD, torch.cuda.device_count())
    return run_on_local_ranks(_run_gpu_cases, world, device="cuda", timeout_s=TIMEOUT_S)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_gpu_cases()))
def test_gpu_case(gpu_outcomes, name):
    if name not in gpu_outcomes[0]:
        pytest.skip(f"needs {GPU_WORLD} GPUs (NCCL takes one per rank); this machine has {len(gpu_outcomes)}")
    assert_passed(gpu_outcomes, name)


@pytest.mark.parametrize(
    "band", [(None, None), (None, 0), (-3, 0), (-5, 2), (0, 0), (-1, None), (2, 6), (-7, -4)]
)
def test_visible_block_is_the_band(band):
    """Each (query chunk, key chunk) rectangle a ring step runs, with its window as the kernels read it
    (the reference's mask), is exactly the part of the chunk pair inside the band lo <= j - i <= hi, and
    every row in it sees a key."""
    lo, hi = band
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, m = (int(x) for x in torch.randint(1, 9, (2,), generator=generator))
        q = Piece(start=int(torch.randint(0, 20, (1,), generator=generator)), local=0, length=n)
        kv = Piece(start=int(torch.randint(0, 20, (1,), generator=generator)), local=0, length=m)
        relative = (kv.start + torch.arange(m))[None, :] - (q.start + torch.arange(n))[:, None]  # j - i
        expected = torch.ones(n, m, dtype=torch.bool)
        expected &= relative >= lo if lo is not None else expected
        expected &= relative <= hi if hi is not None else expected
        block = visible_block(q, kv, lo, hi)
        actual = torch.zeros(n, m, dtype=torch.bool)
        if block is not None:
            rows, cols = block.q.stop - block.q.start, block.k.stop - block.k.start
            window = _visible_mask(rows, cols, CausalMode.NONE, block.window, None, torch.device("cpu"))
            actual[block.q, block.k] = torch.ones(rows, cols, dtype=torch.bool) if window is None else window
            assert actual[block.q].any(dim=1).all(), (q, kv, block)
        assert torch.equal(actual, expected), (q, kv, band, block)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("band", [(None, None), (None, 0), (-5, 0), (-3, 9), (-1, None)], ids=str)
def test_ring_steps_cover_the_band_once(layout, band):
    """The blocks of every ring step together cover each visible (local query, held key) pair once and
    nothing else, for 1 to 4 ranks (blocks joined, a rank's own shard as one causal block)."""
    lo, hi = band
    for world in (1, 2, 3, 4):
        seqlen_local = 12
        for rank in range(world):
            mine = shard_pieces(rank, world, layout, seqlen_local)
            for step in range(world):
                held = shard_pieces((rank - step) % world, world, layout, seqlen_local)
                positions = [torch.cat([p.start + torch.arange(p.length) for p in ps]) for ps in (mine, held)]
                relative = positions[1][None, :] - positions[0][:, None]  # j - i of each (local i, held j)
                expected = (relative >= (lo if lo is not None else -999)) & (
                    relative <= (hi if hi is not None else 999)
                )
                covered = torch.zeros(seqlen_local, seqlen_local, dtype=torch.int64)
                for block in plan_blocks(mine, held, lo, hi):
                    rows, cols = block.q.stop - block.q.start, block.k.stop - block.k.start
                    window = _visible_mask(
                        rows, cols, CausalMode.NONE, block.window, None, torch.device("cpu")
                    )
                    covered[block.q, block.k] += 1 if window is None else window.long()
                assert torch.equal(covered, expected.long()), (world, rank, step)


def test_needs_an_initialized_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(q, q, q)
