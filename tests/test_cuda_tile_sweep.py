"""The candidate tables of benchmarks/cuda_tile_sweep.py: variant 0 is what
csrc/cuda/tile_configs.h releases, every candidate keeps the kernels' shape rules,
and the overrides header it writes names every candidate (and goes away)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_tile_sweep", ROOT / "benchmarks" / "cuda_tile_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep  # its dataclasses look their module up
spec.loader.exec_module(sweep)


def released(function: str) -> dict[int, tuple]:
    """{head_dim: config tuple} of one constexpr function of tile_configs.h."""
    text = (ROOT / "csrc" / "cuda" / "tile_configs.h").read_text()
    body = text[text.index(f"{function}(int head_dim)") :]
    body = body[: body.index("default:")]
    configs = {}
    for head_dim, values in re.findall(r"case (\d+): return \{([^}]*)\};", body):
        fields = [v.strip() for v in values.split(",")]
        configs[int(head_dim)] = tuple(f == "true" if f in ("true", "false") else int(f) for f in fields)
    return configs


def test_variant_zero_is_the_released_configuration():
    forward, dkdv = released("forward_tile_config"), released("dkdv_tile_config")
    for head_dim in sweep.FORWARD_CANDIDATES:
        assert sweep.FORWARD_CANDIDATES[head_dim][0] == forward[head_dim]
        assert sweep.DKDV_CANDIDATES[head_dim][0] == dkdv[head_dim]
        assert len(sweep.FORWARD_CANDIDATES[head_dim]) == len(sweep.DKDV_CANDIDATES[head_dim])


def test_candidates_keep_the_kernels_shape_rules():
    for candidates in sweep.FORWARD_CANDIDATES.values():
        for block_m, block_n, warps, min_blocks, _, m_tiles in candidates:
            assert block_m == 16 * m_tiles * warps and block_n % 16 == 0 and warps * 32 * min_blocks <= 1024
    for head_dim, candidates in sweep.DKDV_CANDIDATES.items():
        for block_n, block_m, chunk_m, warps, split, _, _ in candidates:
            assert block_n == 16 * warps // split and block_m % chunk_m == 0 and chunk_m % 16 == 0
            assert chunk_m <= 64 and block_m <= 32 * warps and head_dim // split % 16 == 0


def test_overrides_header_names_every_candidate_and_goes_away(monkeypatch, tmp_path):
    header = tmp_path / "tile_overrides.h"
    monkeypatch.setattr(sweep, "OVERRIDES", header)
    dims = sorted(sweep.FORWARD_CANDIDATES)
    for variant in range(1, len(sweep.FORWARD_CANDIDATES[dims[0]])):
        sweep.write_overrides(variant, dims)
        text = header.read_text()
        for head_dim in dims:
            assert (
                f"if (head_dim == {head_dim}) return {sweep._cpp(sweep.FORWARD_CANDIDATES[head_dim][variant])};"
                in text
            )
            dkdv = sweep.DKDV_CANDIDATES[head_dim][variant]
            # Only a tile other than the released one overrides (and turns the staged kernel off).
            overridden = f"if (head_dim == {head_dim}) return {sweep._cpp(dkdv)};" in text
            assert overridden == (dkdv != sweep.DKDV_CANDIDATES[head_dim][0])
    sweep.write_overrides(0, dims)
    assert not header.exists()


# The driver (no GPU here: builds and measurements stubbed, or plain processes in their place).


def test_candidates_go_variant_by_variant_each_head_dim_in_turn():
    order = [(c.head_dim, c.variant) for c in sweep.candidates([64, 128])]
    variants = len(sweep.FORWARD_CANDIDATES[64])
    assert order == [(d, v) for v in range(variants) for d in (64, 128)]


def test_a_candidate_tree_holds_its_header_and_leaves_the_checkout_alone(tmp_path):
    checkout_header = sweep.OVERRIDES.exists()
    tree = sweep.copy_tree(sweep.Candidate(128, 2), tmp_path)
    header = (tree / "csrc" / "cuda" / "tile_overrides.h").read_text()
    assert f"return {sweep._cpp(sweep.FORWARD_CANDIDATES[128][2])};" in header
    assert (tree / "setup.py").is_file() and (tree / "csrc" / "cuda" / "build_matrix.json").is_file()
    assert not list((tree / "fast_attn").glob("_C*.so")), "the checkout's extension was copied"
    assert sweep.OVERRIDES.exists() == checkout_header
    released = sweep.copy_tree(sweep.Candidate(64, 0), tmp_path)
    assert not (released / "csrc" / "cuda" / "tile_overrides.h").exists()


def test_a_candidate_tree_is_what_its_measurement_imports(tmp_path):
    """Its package comes before the checkout's (and before an editable install of it)."""
    tree = sweep.copy_tree(sweep.Candidate(64, 1), tmp_path)
    shutil.copy2(importlib.import_module("fast_attn._C").__file__, tree / "fast_attn")  # the build's stand-in
    done = subprocess.run(
        [sys.executable, "-c", "import fast_attn; print(fast_attn.__file__)"],
        cwd=tmp_path,  # not the tree: python -c would find its package there by itself
        env=sweep.tree_environment(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).resolve() == (tree / "fast_attn" / "__init__.py").resolve()


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_process_cut_off_goes_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"
    command = ["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"]
    start = time.monotonic()
    status, _, _ = sweep.Processes().run(command, timeout=0.5)
    assert status is None and time.monotonic() - start < 5
    assert _gone(int(pid_file.read_text()))
    # Stopped from outside (gpu_check.sh's timeout: SIGTERM, then SystemExit), likewise.
    pid_file.unlink()

    def stop(*_):
        raise SystemExit(143)

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(SystemExit):
            sweep.Processes().run(command, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _gone(int(pid_file.read_text()))


class FakeRuns:
    """Builds of `build_s` seconds and measurements of `measure_s`, recording what ran when."""

    def __init__(self, build_s: float, measure_s: float) -> None:
        self.build_s, self.measure_s = build_s, measure_s
        self.running = self.most_running = 0
        self.lock = threading.Lock()
        self.jobs: set[int] = set()
        self.measured: list[str] = []

    def build(self, tree, head_dim, arch, jobs, processes, timeout):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.jobs.add(jobs)
        time.sleep(self.build_s)
        with self.lock:
            self.running -= 1
        return 0, "", ""

    def measure_in(self, tree, head_dim, processes, timeout):
        time.sleep(self.measure_s)
        self.measured.append(tree.name)
        return 0, json.dumps({"check": "passed", "tflops": {}, "package": str(tree / "fast_attn")}), ""


def _fake_sweep(monkeypatch, tmp_path, runs, budget, workers=2) -> tuple[list[dict], float]:
    monkeypatch.setattr(sweep, "build", runs.build)
    monkeypatch.setattr(sweep, "measure_in", runs.measure_in)
    monkeypatch.setattr(sweep, "copy_tree", lambda c, work: work / c.name)
    monkeypatch.setattr(sweep, "MEASURE_ESTIMATE_S", 0.2)
    start = time.monotonic()
    sweep.Sweep(tmp_path / "out", "9.0", budget, workers).run([64, 128])
    elapsed = time.monotonic() - start
    written = json.loads((tmp_path / "out" / "cuda_tile_sweep.json").read_text())
    return written, elapsed


def test_sweep_builds_side_by_side_and_stops_starting_at_its_budget(monkeypatch, tmp_path):
    """Builds of 0.5 s two at a time within 1.6 s: two rounds start (at 0 and 0.5 s, while the
    budget holds the longest build and a measurement's estimate), the third would not fit."""
    runs = FakeRuns(build_s=0.5, measure_s=0.05)
    written, elapsed = _fake_sweep(monkeypatch, tmp_path, runs, budget=1.6)
    assert runs.most_running == 2 and runs.jobs == {max(1, (os.cpu_count() or 1) // 2)}
    assert [(r["head_dim"], r["variant"]) for r in written] == [
        (c.head_dim, c.variant) for c in sweep.candidates([64, 128])
    ]
    assert runs.measured == ["d64_v0", "d128_v0", "d64_v1", "d128_v1"]
    assert all(r["check"] == "passed" and "build_s" in r for r in written[:4])
    assert all(r["skipped"] == "budget spent before its build" for r in written[4:])
    assert elapsed < 2.5


def test_sweep_cuts_off_a_measurement_at_its_budget_and_keeps_the_rest(monkeypatch, tmp_path):
    runs = FakeRuns(build_s=0.0, measure_s=0.0)

    def endless_measurement(tree, head_dim, processes, timeout):
        return processes.run(["sleep", "30"], timeout)

    runs.measure_in = endless_measurement
    written, elapsed = _fake_sweep(monkeypatch, tmp_path, runs, budget=1.0)
    assert elapsed < 4
    assert written[0]["error"] == "measurement cut off at the budget's end"
    assert all(r["skipped"] == "budget spent before its measurement" for r in written[1:])


def test_sweep_refuses_a_measurement_of_another_package(monkeypatch, tmp_path):
    runs = FakeRuns(build_s=0.0, measure_s=0.0)
    checkout = json.dumps({"check": "passed", "tflops": {}, "package": str(ROOT / "fast_attn")})
    runs.measure_in = lambda tree, head_dim, processes, timeout: (0, checkout, "")
    written, _ = _fake_sweep(monkeypatch, tmp_path, runs, budget=None)
    assert all(r["error"].startswith("measured the package at") for r in written)


def test_markdown_gives_each_candidate_its_ratios_or_why_not():
    times = {
        f"{m} causal={c} {n}": 100.0 * (1 + (n == "flash"))
        for m in ("fwd", "bwd")
        for c in (0, 1)
        for n in ("cuda", "flash")
    }
    measured = sweep.Candidate(64, 1).record() | {"build_s": 50.0, "check": "passed", "tflops": times}
    skipped = sweep.Candidate(128, 1).record() | {"skipped": "budget spent before its build"}
    table = sweep.markdown([measured, skipped]).splitlines()
    assert table[-2].startswith("| 64 | 1 |") and table[-2].count("100 (0.50x)") == 4
    assert table[-1].startswith("| 128 | 1 |") and table[-1].endswith("| budget spent before its build |")
