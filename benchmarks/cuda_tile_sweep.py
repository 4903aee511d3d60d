"""CUDA tile sweep: the released tile shapes of csrc/cuda/tile_configs.h against
candidates, built and timed on the GPU machine in one run.

Variant i sets forward candidate i and dK/dV candidate i at once (they are
separate kernels, timed separately: forward in the fwd column, dK/dV in bwd);
variant 0 is the released configuration. Each head dim and variant is built in
a folder of its own (a copy of setup.py, csrc and fast_attn with the variant's
csrc/cuda/tile_overrides.h; the checkout and its built extension are never
touched), for that head dim and this card only, several builds at once
(--build-workers, the cores shared among them). As each build finishes, in order,
a fresh process importing that folder's package checks a forward+backward
against the float64 reference and times fwd and bwd at S = 4096 (bf16, 16k
tokens, hidden 2048, causal and not) next to SDPA's flash backend, measured in
the same process: compare cuda/flash ratios (the other candidates' builds may be
running meanwhile, `builds_running` in the record). The order is variant by
variant, each head dim in turn, so a sweep cut short has the first variants of
every head dim. --budget-seconds stops starting builds and measurements when it
is spent and cuts off what still runs; cuda_tile_sweep.json is rewritten after
each candidate, the ones never built or measured listed as skipped.

Candidates are checked without a GPU first (ptxas: no spills; the CPU warp
emulator: correct results; its cached build does not notice a new header, so its
folder goes first):

    python benchmarks/cuda_tile_sweep.py --write 1      # variant 1 for every head dim
    python tools/cuda_compile_check.py --no-report
    rm -rf "${TMPDIR:-/tmp}"/fast_attn_cuda_emulator_torch* && pytest tests/test_cuda.py -k emulated
    python benchmarks/cuda_tile_sweep.py --write 0      # back to released

On the GPU machine (gpu_check.sh's step cuda_sweep, in the preset `STEPS=cuda_kernels`):

    python benchmarks/cuda_tile_sweep.py --head-dim 64 128 --budget-seconds 200 --out $OUT/cuda_sweep
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
        (128, 48, 4, 2, False, 2),
        (128, 64, 8, 1, True, 1),
        (64, 64, 4, 2, True, 1),
        (128, 32, 8, 1, True, 1),
        (128, 32, 4, 2, False, 2),
    ],
}
# DkdvTileConfig: (block_n, block_m, chunk_m, warps, split_head_dim, min_blocks_per_sm, kv_in_registers),
# block_n = 16 * warps / split. Released first (the general kernels' tile; at D 64 and 128 the timed
# problems run the staged kernel, FlashAttention-2's dataflow, which has no override). A candidate
# other than variant 0's runs the chunked kernel with its tile on every path, the staged kernel off
# (tile_configs.h); one equal to variant 0's is no candidate (the released kernels run). Variant 1 is
# the chunked kFast / kCausal kernels' tile before the staged kernel: staged against chunked.
DKDV_CANDIDATES = {
    64: [
        (128, 64, 16, 8, 1, 1, True),
        (128, 64, 32, 8, 1, 1, True),
        (128, 128, 16, 8, 1, 1, True),
        (64, 64, 16, 4, 1, 2, True),
        (128, 64, 16, 8, 1, 1, True),
    ],
    # At D 128, four warps spill (16-80 B: each warp takes more dQ columns), and 128 query rows
    # per step need 244 KiB of shared memory; a chunk of 32 spills in the general kernels only.
    128: [
        (128, 64, 16, 8, 1, 1, False),
        (128, 64, 32, 8, 1, 1, False),
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


def write_overrides(variant: int, head_dims: list[int], path: Path | None = None) -> None:
    """The overrides header (default: csrc/cuda/tile_overrides.h of this checkout) for `variant`
    of each head dim; variant 0 removes it."""
    path = path or OVERRIDES
    if variant == 0:
        path.unlink(missing_ok=True)
        return
    forward = "\n".join(
        f"  if (head_dim == {d}) return {_cpp(FORWARD_CANDIDATES[d][variant])};" for d in head_dims
    )
    dkdv = "\n".join(
        f"  if (head_dim == {d}) return {_cpp(DKDV_CANDIDATES[d][variant])};"
        for d in head_dims
        if DKDV_CANDIDATES[d][variant] != DKDV_CANDIDATES[d][0]
    )
    path.write_text(
        f"// Written by benchmarks/cuda_tile_sweep.py (variant {variant}); delete to build the released tiles.\n"
        "#pragma once\n\nnamespace fast_attn::cuda {\n\n"
        f"constexpr ForwardTileConfig forward_tile_override(int head_dim) {{\n{forward}\n  return {{}};\n}}\n\n"
        f"constexpr DkdvTileConfig dkdv_tile_override(int head_dim) {{\n{dkdv}\n  return {{}};\n}}\n\n"
        "}  // namespace fast_attn::cuda\n"
    )


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
    return {"check": "passed", "tflops": times, "package": str(Path(fast_attn.__file__).parent)}


# Seconds a measurement takes (the check, then 8 timings of about 0.3 s; a guess, not yet timed
# on a GPU): a build starts only while the budget holds the longest build so far and this.
MEASURE_ESTIMATE_S = 30
# What a candidate's build reads, copied into its own folder (the checkout's own build left out).
TREE_FILES = ("setup.py",)
TREE_FOLDERS = {"csrc": ("tile_overrides.h",), "fast_attn": ("_C*.so", "_build_info.py", "__pycache__")}


@dataclass(frozen=True)
class Candidate:
    head_dim: int
    variant: int

    @property
    def name(self) -> str:
        return f"d{self.head_dim}_v{self.variant}"

    def record(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "variant": self.variant,
            "forward": FORWARD_CANDIDATES[self.head_dim][self.variant],
            "dkdv": DKDV_CANDIDATES[self.head_dim][self.variant],
        }


def candidates(head_dims: list[int]) -> list[Candidate]:
    """Variant by variant, each head dim in turn: a sweep cut short has every head dim's first
    variants (the released tiles first)."""
    variants = max(len(FORWARD_CANDIDATES[d]) for d in head_dims)
    return [Candidate(d, v) for v in range(variants) for d in head_dims if v < len(FORWARD_CANDIDATES[d])]


def copy_tree(candidate: Candidate, work: Path) -> Path:
    """The sources one build reads, in a folder of its own, with the candidate's overrides header:
    builds run side by side and the checkout (its csrc, its built extension) is never touched."""
    tree = work / candidate.name
    tree.mkdir(parents=True)
    for name in TREE_FILES:
        shutil.copy2(ROOT / name, tree / name)
    for name, ignored in TREE_FOLDERS.items():
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns(*ignored))
    write_overrides(candidate.variant, [candidate.head_dim], tree / "csrc" / "cuda" / "tile_overrides.h")
    return tree


class Processes:
    """Child processes, each in a process group of its own (a build's compilers with it), run with
    a time limit; stop() kills every group still running (at the budget's end, or when this
    script is stopped: gpu_check.sh's timeout sends SIGTERM)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopped = threading.Event()

    def run(self, command: list[str], timeout: float, **kwargs) -> tuple[int | None, str, str]:
        """(exit status, or None when cut off at `timeout` or by stop(); stdout; the last 3000
        characters of stdout and stderr)."""
        with self._lock:
            if self.stopped.is_set():
                return None, "", "not started: the sweep was stopped"
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                **kwargs,
            )
            self._running.add(process)
        try:
            stdout, stderr = process.communicate(
                timeout=None if timeout == float("inf") else max(timeout, 0.1)
            )
            status = None if self.stopped.is_set() else process.returncode
        except subprocess.TimeoutExpired:
            self._kill(process)
            stdout, stderr = process.communicate()
            status = None
        except BaseException:  # SystemExit from SIGTERM: the child goes too
            self._kill(process)
            raise
        finally:
            with self._lock:
                self._running.discard(process)
        return status, stdout, (stdout + stderr)[-3000:]

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            for process in self._running:
                self._kill(process)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def build(
    tree: Path, head_dim: int, arch: str, jobs: int, processes: Processes, timeout: float
) -> tuple[int | None, str, str]:
    """The extension built in place in `tree` for one head dim and arch (what measure imports)."""
    env = dict(
        os.environ,
        FAST_ATTN_BUILD_CUDA="1",
        FAST_ATTN_CUDA_HEAD_DIMS=str(head_dim),
        TORCH_CUDA_ARCH_LIST=arch,
        MAX_JOBS=str(jobs),
    )
    return processes.run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, cwd=tree, env=env)


def tree_environment(tree: Path) -> dict[str, str]:
    """The environment under which `import fast_attn` finds `tree`'s package first (before the
    checkout's editable install)."""
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def measure_in(
    tree: Path, head_dim: int, processes: Processes, timeout: float
) -> tuple[int | None, str, str]:
    """measure(head_dim) in a fresh process importing the fast_attn package of `tree`."""
    command = [sys.executable, __file__, "--measure", str(head_dim)]
    return processes.run(command, timeout, cwd=tree, env=tree_environment(tree))


def markdown(results: list[dict]) -> str:
    """One row per candidate: the CUDA kernels' TFLOP/s and their ratio to SDPA flash measured in the
    same process, per mode and causal, or why it has none."""
    timings = [f"{mode} causal={causal}" for mode in ("fwd", "bwd") for causal in (0, 1)]
    lines = [
        f"CUDA kernels' TFLOP/s (and their ratio to SDPA flash, timed in the same process) at S = {SEQLEN},"
        f" bf16, {TOKENS} tokens, hidden {HIDDEN}",
        "",
        "| D | variant | forward tile | dK/dV tile | build (s) | " + " | ".join(timings) + " | note |",
        "| --- " * (6 + len(timings)) + "|",
    ]
    for r in results:
        tflops = r.get("tflops", {})
        cells = []
        for timing in timings:
            cuda, flash = tflops.get(f"{timing} cuda"), tflops.get(f"{timing} flash")
            cells.append(f"{cuda:.0f} ({cuda / flash:.2f}x)" if cuda and flash else "")
        note = r.get("error", r.get("skipped", "")).replace("\n", " ").replace("|", "/")[:200]
        row = [r["head_dim"], r["variant"], r["forward"], r["dkdv"], r.get("build_s", ""), *cells, note]
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


class Sweep:
    """Candidates built side by side (`build_workers` builds of cpu_count / build_workers jobs each),
    measured one at a time in order as their builds finish, within an optional time budget: a build
    starts only while the budget holds the longest build so far and a measurement's estimate, a
    measurement only while it holds the estimate, and whatever runs at the budget's end is cut off.
    The json is rewritten after each candidate, so a sweep stopped early leaves what it measured."""

    def __init__(self, out: Path, arch: str, budget_seconds: float | None, build_workers: int) -> None:
        self.out, self.arch = out, arch
        self.deadline = time.monotonic() + (budget_seconds if budget_seconds is not None else float("inf"))
        self.build_workers = build_workers
        self.jobs = max(1, (os.cpu_count() or 1) // build_workers)
        self.processes = Processes()
        self.longest_build = 0.0
        self.builds_running = 0
        self._lock = threading.Lock()
        self.results: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def build(self, candidate: Candidate, work: Path) -> dict:
        with self._lock:
            if self.left() < self.longest_build + MEASURE_ESTIMATE_S:
                return {"skipped": "budget spent before its build"}
            self.builds_running += 1
        start = time.monotonic()
        try:
            tree = copy_tree(candidate, work)
            status, _, log = build(
                tree, candidate.head_dim, self.arch, self.jobs, self.processes, self.left()
            )
        finally:
            seconds = time.monotonic() - start
            with self._lock:
                self.builds_running -= 1
                self.longest_build = max(self.longest_build, seconds)
        record = {"build_s": round(seconds, 1)}
        if status is None:
            record["error"] = "build cut off at the budget's end"
        elif status != 0:
            record["error"] = "build failed: " + log[-600:]
        else:
            record["tree"] = str(tree)
        return record

    def measure(self, candidate: Candidate, tree: Path) -> dict:
        if self.left() < MEASURE_ESTIMATE_S:
            return {"skipped": "budget spent before its measurement"}
        record = {"builds_running": self.builds_running}
        status, stdout, log = measure_in(tree, candidate.head_dim, self.processes, min(300.0, self.left()))
        try:
            measured = json.loads(stdout.strip().splitlines()[-1]) if status == 0 else None
        except (IndexError, ValueError):
            measured = None
        if status is None:
            record["error"] = "measurement cut off at the budget's end"
        elif measured is None:
            record["error"] = log[-600:]
        elif Path(measured.get("package", "")).resolve() != (tree / "fast_attn").resolve():
            record["error"] = f"measured the package at {measured.get('package')}, not the candidate's"
        else:
            record.update(measured)
        return record

    def save(self) -> None:
        (self.out / "cuda_tile_sweep.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "cuda_tile_sweep.md").write_text(markdown(self.results))

    def run(self, head_dims: list[int]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        queue = candidates(head_dims)
        with tempfile.TemporaryDirectory(prefix="fast_attn_tile_sweep_") as work:
            pool = concurrent.futures.ThreadPoolExecutor(self.build_workers)
            try:
                builds = [pool.submit(self.build, c, Path(work)) for c in queue]
                for candidate, future in zip(queue, builds):
                    record = candidate.record() | future.result()
                    tree = record.pop("tree", None)
                    if tree is not None:
                        record |= self.measure(candidate, Path(tree))
                        shutil.rmtree(tree, ignore_errors=True)
                    self.results.append(record)
                    print(json.dumps(record), flush=True)
                    self.save()
            finally:
                self.processes.stop()
                pool.shutdown(wait=True, cancel_futures=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dim", type=int, nargs="+", default=sorted(FORWARD_CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("cuda_sweep_out"))
    parser.add_argument(
        "--budget-seconds",
        type=float,
        help="stop starting builds and measurements when this is spent, cut off what still runs at its end",
    )
    parser.add_argument(
        "--build-workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 4),
        help="candidates built at once, each with cpu_count / this compile jobs (default: a quarter of the cores)",
    )
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
    import torch

    major, minor = torch.cuda.get_device_capability()
    sweep = Sweep(args.out, f"{major}.{minor}", args.budget_seconds, args.build_workers)
    # gpu_check.sh's timeout stops the sweep with SIGTERM: the builds and the measurement still
    # running go with it, and the json keeps what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sweep.run(args.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
