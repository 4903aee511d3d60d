"""`python -m fast_attn.bench`: throughput of fast_attn against PyTorch on this machine.

Sweeps the field's protocol (on a GPU: bf16, 16k tokens per
batch, hidden 2048, D 64 and 128, S 512..16384, causal and not), times every
fast_attn backend and every SDPA backend available in the same run, and writes
a table, JSON and a PNG plot. A short sweep by default, `--full` for all of it.
On a CPU-only machine the default finishes in about a minute.

    python -m fast_attn.bench                       # short sweep, results in ./bench_out
    python -m fast_attn.bench --full --out results  # the whole protocol
    python -m fast_attn.bench --bias t5 --mode fwd_bwd   # trainable (1, H, S, S) bias
    python -m fast_attn.bench --window 256               # causal sliding window vs SDPA's mask and FlexAttention
    python -m fast_attn.bench --compare .benchmarks/x.json  # table/plot of a pytest-benchmark run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import bench_report
from .dispatch import BACKENDS, capability_name
from .masks import bias_from_mask
from .testing import attention_flops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


@dataclass(frozen=True)
class Case:
    """One benchmarked problem."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # fwd | bwd | fwd_bwd
    bias: str  # none | t5 (a (1, H, S, S) bias that requires grad)
    window: int | None = None  # causal with a left window of this many keys: window_size=(window, 0)

    @property
    def flops(self) -> float:
        window_size = None if self.window is None else (self.window, 0)
        shape = (self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim)
        return attention_flops(*shape, self.causal, self.mode, window_size=window_size)


@dataclass
class Result:
    case: Case
    implementation: str
    median_ms: float | None
    peak_memory_mb: float | None
    error: str | None = None

    @property
    def throughput(self) -> float | None:
        """TFLOP/s on a GPU, GFLOP/s on a CPU (the unit is in the report)."""
        if self.median_ms is None:
            return None
        return self.case.flops / (self.median_ms * 1e-3) / 1e12


def _protocol_cases(args, device: torch.device) -> list[Case]:
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.seqlen:
        seqlens = args.seqlen
    elif device.type == "cuda":
        seqlens = [512, 1024, 2048, 4096, 8192, 16384] if args.full else [1024, 4096, 16384]
    else:
        seqlens = [512, 1024, 2048, 4096] if args.full else [256, 512, 1024]
    head_dims = args.head_dim or ([64, 128] if (args.full or device.type == "cuda") else [64])
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    if args.window is not None:
        causals = [True]
    modes = args.mode or (["fwd", "bwd"] if device.type == "cuda" else ["fwd", "fwd_bwd"])
    cases = []
    for bias in args.bias:
        for head_dim in head_dims:
            for causal in causals:
                for mode in modes:
                    for seqlen in seqlens:
                        if device.type == "cuda":
                            batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
                        else:
                            batch, heads = 1, 8
                        cases.append(
                            Case(batch, heads, seqlen, head_dim, causal, dtype, mode, bias, args.window)
                        )
    return cases


def _make_inputs(case: Case, device: torch.device):
    dtype = DTYPES[case.dtype]
    shape = (case.batch, case.heads, case.seqlen, case.head_dim)
    needs_grad = case.mode != "fwd"
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=needs_grad) for _ in range(3))
    bias = None
    if case.bias == "t5":
        bias = torch.randn(1, case.heads, case.seqlen, case.seqlen, device=device, dtype=dtype)
        bias.requires_grad_(needs_grad)
    return q, k, v, bias


def _implementations(
    device: torch.device, chosen: list[str] | None, window: int | None = None
) -> dict[str, Callable]:
    """name -> fn(q, k, v, bias, causal, window=None) -> out, for everything runnable on `device`.
    With a window, SDPA runs given the equivalent bool mask ("+mask"), and FlexAttention, with a
    sliding-window block mask, is compared without being asked for."""
    impls: dict[str, Callable] = {}
    from .dispatch import UNAVAILABLE

    for name, backend in BACKENDS.items():
        if name == "reference" or device.type not in backend.device_types or UNAVAILABLE[name] is not None:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        impls[f"fast_attn:{name}"] = _fast_attn_fn(name)
    sdpa_names = ["flash", "efficient", "cudnn", "math"] if device.type == "cuda" else ["flash", "math"]
    for name in sdpa_names:
        impls[f"sdpa:{name}" + ("+mask" if window is not None else "")] = _sdpa_fn(name)
    if window is not None and _has_flex_attention():
        # Compiled on a GPU. On a CPU, FlexAttention's eager path (unfused: it builds the (S, S) scores):
        # torch 2.13's compiled FlexAttention on CPU is flaky (a zero first row, see tests/test_bench.py).
        if device.type == "cuda":
            impls["flex"] = _flex_fn()
        else:
            impls["flex:eager"] = _flex_fn(compiled=False)
    elif chosen and any("flex" in c for c in chosen) and _has_flex_attention():
        impls["flex"] = _flex_fn()  # opt-in: it compiles every new shape (seconds to tens of seconds)
    if chosen:
        impls = {n: f for n, f in impls.items() if any(c in n for c in chosen)}
    return impls


def _fast_attn_fn(backend: str) -> Callable:
    from .functional import attention

    def run(q, k, v, bias, causal, window=None):
        window_size = None if window is None else (window, 0)
        return attention(q, k, v, bias=bias, causal=causal, window_size=window_size, backend=backend)

    return run


def _sdpa_fn(name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])
    window_masks: dict[tuple, torch.Tensor] = {}

    def window_mask(seqlen: int, window: int, device: torch.device) -> torch.Tensor:
        """Bool (S, S), True where query i sees key j: i - window <= j <= i; built once per case."""
        key = (seqlen, window, device)
        if key not in window_masks:
            rows = torch.arange(seqlen, device=device)[:, None]
            distance = rows - torch.arange(seqlen, device=device)[None, :]
            window_masks[key] = (distance >= 0) & (distance <= window)
        return window_masks[key]

    def run(q, k, v, bias, causal, window=None):
        with sdpa_kernel(backend):
            if window is not None:
                mask = window_mask(q.shape[2], window, q.device)
                if bias is not None:
                    mask = bias_from_mask(mask, bias.dtype, bias)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if bias is not None and causal:
                # SDPA refuses attn_mask with is_causal: fold causality into the bias.
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
                bias = bias_from_mask(mask, bias.dtype, bias)
                causal = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)

    return run


def _has_flex_attention() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# Every (shape, mask, bias) case compiles FlexAttention anew: allow them all.
FLEX_RECOMPILE_LIMIT = 256


def _flex_fn(compiled: bool = True) -> Callable:
    """FlexAttention compiled by torch.compile: causality as a block mask (fully
    masked tiles skipped), a bias as a score_mod that reads it (its gradient
    flows). Block masks and score_mods are built once per case and reused, so
    only the warm-up call compiles. torch has no FlexAttention backward on CPU.
    compiled=False runs FlexAttention's unfused eager path (the same semantics). A window
    (with causality) is a sliding-window block mask: key j visible from query i when
    i - window <= j <= i."""
    import torch._dynamo.config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    run_flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    block_masks: dict[tuple, object] = {}
    last_bias: list = [None, None]  # (bias, its score_mod) of the latest case only

    def causal_mask(batch, head, q_index, kv_index):
        return q_index >= kv_index

    def sliding_window_mask(window: int) -> Callable:
        def in_window(batch, head, q_index, kv_index):
            return (q_index >= kv_index) & (q_index - kv_index <= window)

        return in_window

    def score_mod_for(bias: torch.Tensor) -> Callable:
        if last_bias[0] is not bias:

            def add_bias(score, batch, head, q_index, kv_index):
                return score + bias[0, head, q_index, kv_index]  # bias (1, H, Sq, Sk)

            last_bias[:] = [bias, add_bias]
        return last_bias[1]

    def run(q, k, v, bias, causal, window=None):
        block_mask = None
        if causal:
            key = (q.shape[2], k.shape[2], q.device, window)
            if key not in block_masks:
                mask_mod = causal_mask if window is None else sliding_window_mask(window)
                block_masks[key] = create_block_mask(
                    mask_mod, None, None, q.shape[2], k.shape[2], device=q.device
                )
            block_mask = block_masks[key]
        score_mod = None if bias is None else score_mod_for(bias)
        return run_flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return run


# Each timed sample runs calls back to back until it lasts about this long, so that
# a call's Python launch cost overlaps the previous call's GPU work, as it does in a
# training loop (one synchronizing call per sample would add the launch cost of every
# call to its time, which hides kernel speed at short sequences).
SAMPLE_MS = 5.0
MAX_CALLS_PER_SAMPLE = 50


def step_of(attend: Callable, mode: str, inputs) -> Callable:
    """A no-argument callable for a benchmark's timer: attend() without autograd (mode "fwd"),
    else attend() and the gradients of `inputs` for a random output gradient shaped like inputs[0]."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                attend()

        return step
    grad_out = torch.randn_like(inputs[0])
    return lambda: torch.autograd.grad(attend(), inputs, grad_out)


def _time_calls(fn: Callable, device: torch.device, calls: int) -> float:
    """Milliseconds for `calls` back-to-back calls of fn (events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) * 1e3


def _median_ms(fn: Callable, device: torch.device, budget_ms: float) -> float:
    """Median time of one call of an already warmed-up fn, over samples of
    back-to-back calls (see SAMPLE_MS), within about budget_ms."""
    estimate = max(_time_calls(fn, device, 2) / 2, 1e-3)
    calls = int(min(MAX_CALLS_PER_SAMPLE, max(1, SAMPLE_MS / estimate)))
    samples = int(min(30, max(3, budget_ms / (estimate * calls))))
    return statistics.median(_time_calls(fn, device, calls) / calls for _ in range(samples))


@contextlib.contextmanager
def _peak_memory(device: torch.device):
    """Yields a list that receives the peak extra memory (MB) allocated by torch in the block."""
    box: list[float | None] = [None]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield box
        torch.cuda.synchronize()
        box[0] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    # The CPU allocator keeps no statistics (and the resident set hides memory the allocator reuses):
    # the profiler's allocation events, summed in time order, give the peak.
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        yield box
    events = profiler.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    box[0] = peak / 2**20


def run_case(case: Case, name: str, fn: Callable, device: torch.device, budget_ms: float) -> Result:
    try:
        q, k, v, bias = _make_inputs(case, device)
        inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
        call = lambda: fn(q, k, v, bias, case.causal, case.window)  # noqa: E731
        if case.mode == "fwd":
            with torch.no_grad():
                call()  # warm-up: compilation and autotuning stay out of time and memory
                with _peak_memory(device) as peak:
                    call()
                median = _median_ms(call, device, budget_ms)
        else:
            out = call()
            grad = torch.randn_like(out)
            if case.mode == "bwd":
                work = lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)  # noqa: E731
            else:
                work = lambda: torch.autograd.grad(call(), inputs, grad)  # noqa: E731
            work()  # warm-up: compilation and autotuning stay out of time and memory
            with _peak_memory(device) as peak:
                work()
            median = _median_ms(work, device, budget_ms)
        return Result(case, name, median, peak[0])
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
        message = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        return Result(case, name, None, None, error=message)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sweep(
    cases: list[Case],
    impls: dict[str, Callable],
    device: torch.device,
    budget_ms: float,
    on_result: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Time every implementation on every case; `on_result` sees the results so far after each one."""
    results = []
    total = len(cases) * len(impls)
    done = 0
    for case in cases:
        for name, fn in impls.items():
            if name == "sdpa:math" and case.seqlen * case.seqlen * case.batch * case.heads > 2**31:
                continue  # the math path materializes (B, H, S, S) scores: skip what cannot fit
            result = run_case(case, name, fn, device, budget_ms)
            results.append(result)
            done += 1
            shown = f"{result.median_ms:8.3f} ms" if result.median_ms is not None else f"n/a ({result.error})"
            window = f" window={case.window}" if case.window is not None else ""
            print(
                f"[{done}/{total}] {case.mode:7} S={case.seqlen:<6} D={case.head_dim:<4} "
                f"causal={int(case.causal)}{window} bias={case.bias:<4} {name:<18} {shown}",
                file=sys.stderr,
                flush=True,
            )
            if on_result is not None:
                on_result(results)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fast_attn.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="sweep the whole protocol (S 512..16384, D 64 and 128)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--head-dim", type=int, nargs="+", help="head dims, e.g. 64 128")
    parser.add_argument("--seqlen", type=int, nargs="+", help="sequence lengths, e.g. 1024 4096")
    parser.add_argument(
        "--mode", choices=["fwd", "bwd", "fwd_bwd"], nargs="+", help="default: fwd and bwd (GPU)"
    )
    parser.add_argument(
        "--bias",
        choices=["none", "t5"],
        nargs="+",
        default=["none"],
        help="t5: a trainable (1, H, S, S) bias",
    )
    parser.add_argument(
        "--window",
        type=int,
        metavar="L",
        help="causal with a left window of L keys (window_size=(L, 0)), against SDPA given the equivalent "
        "bool mask and FlexAttention with a sliding-window block mask",
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        help="only implementations whose name contains one of these; 'flex' adds FlexAttention (compiled)",
    )
    parser.add_argument("--budget-ms", type=float, default=None, help="timing budget per measurement")
    parser.add_argument("--out", default="bench_out", help="folder for results.json, results.md and the plot")
    parser.add_argument(
        "--compare", help="a pytest-benchmark --benchmark-json file to tabulate and plot instead"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.window is not None and (args.window < 0 or args.causal == "false"):
        parser.error("--window L takes L >= 0 and is causal (not with --causal false)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    if args.compare:
        results = bench_report.load_pytest_benchmark(Path(args.compare))
        bench_report.write_all(results, out_dir, title=f"pytest-benchmark {args.compare}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget_ms = args.budget_ms or (200.0 if device.type == "cuda" else 400.0)
    impls = _implementations(device, args.backend, args.window)
    cases = _protocol_cases(args, device)
    card = bench_report.device_name(device)
    capability = capability_name(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    print(f"fast_attn.bench on {card}: {len(cases)} cases x {len(impls)} implementations", file=sys.stderr)
    title = f"fast_attn.bench on {card}"

    def save_so_far(results: list[Result]) -> None:
        # A sweep stopped by a time limit still leaves what it measured.
        bench_report.write_records(
            [bench_report.record(r, card, device.type, capability) for r in results], out_dir, title
        )

    results = sweep(cases, impls, device, budget_ms, on_result=save_so_far)
    records = [bench_report.record(r, card, device.type, capability) for r in results]
    bench_report.write_all(records, out_dir, title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
