"""benchmarks/gpu_check.sh's preset STEPS=cuda_kernels, run here with the GPU machine's commands
stubbed: a fake clock (`date`), a `timeout` that records each step and moves the clock by the
time the step is given to take (or by its limit, answering 124, when it would take longer), and a
fake python that records the build's environment. Checked: the steps and their order, what each
is asked to do, and that no step's limit reaches past TOTAL_SECONDS (480) from the start, however
long the steps before it took.

Build estimate behind the expected case (an estimate, not a timing). On this project's 2-core
CPU machine (2026-12-07, one unit at a time), sm_90a -O3 compiles of the bf16 units took
26 + 12 + 7 + 11 + 4 s at D 64 (forward, backward, their modifier paths, decode) and
13 + 11 + 5 + 10 + 5 s at D 128: with fp16 taken as the same and 10 s for the three other .cu
units, 215 s of CUDA compilation. The 12 host and CPU C++ units took 355 s together (7 to 95 s
each; ninja's log of a CPU-only build), and the three CUDA host units, not compilable here, are
taken as 120 s: about 690 s of compilation, 43 s on 16 cores, but the longest unit (95 s here)
sets the wall time. The whole build (every head dim) took 42-54 s on the H100 machine's 16 cores
on 2026-11-26 (benchmarks/logs), so its cores are faster: 60-90 s expected for the build, 180 s
allowed (a build cut off leaves nothing to measure; a slow one only shortens the sweep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TOTAL_SECONDS = 480
BUILD_ESTIMATE_S = 90

# The stubs, written into a folder put first on PATH. Each reads the fake clock from FAKE_CLOCK.
DATE = """#!/bin/sh
clock=$(cat "$FAKE_CLOCK")
case "$1" in
  +%s) echo "$clock" ;;
  +%T) echo "clock $clock" ;;
  *) echo "fake date: $*" >&2; exit 2 ;;
esac
"""
TIMEOUT = """#!{python}
import json, os, subprocess, sys
limit, command = int(sys.argv[1]), sys.argv[2:]
clock = int(open(os.environ["FAKE_CLOCK"]).read())
line = " ".join(command)
took = next((s for key, s in json.loads(os.environ["FAKE_DURATIONS"]).items() if key in line), 1)
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps({{"clock": clock, "limit": limit, "command": command}}) + "\\n")
open(os.environ["FAKE_CLOCK"], "w").write(str(clock + min(took, limit)))
sys.exit(124 if took > limit else subprocess.run(command).returncode)
"""
PYTHON = """#!{python}
import json, os, sys
arguments = sys.argv[1:]
if arguments[:2] == ["-m", "pip"]:
    names = ("FAST_ATTN_CUDA_HEAD_DIMS", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "FAST_ATTN_BUILD_CUDA")
    with open(os.environ["FAKE_BUILD_ENV"], "w") as out:
        json.dump({{name: os.environ.get(name) for name in names}}, out)
elif arguments[:1] == ["-c"] and "get_device_capability" in arguments[1]:
    print("9.0")
"""
QUIET = "#!/bin/sh\necho fake $0\n"


def run_preset(
    tmp_path: Path, durations: dict[str, int], **env: str
) -> tuple[int, list[dict], dict, str, int]:
    """(the exit status, the timeout calls, the build's environment, steps.md, the final clock - the start)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "date": DATE,
        "timeout": TIMEOUT,
        "python": PYTHON,
        "nvidia-smi": QUIET,
        "nvcc": QUIET,
        "nm": QUIET,
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(
            text.format(python=sys.executable) if name in ("timeout", "python") else text
        )
        (bin_dir / name).chmod(0o755)
    clock = tmp_path / "clock"
    clock.write_text("1000000")
    out = tmp_path / "out"
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "OUT": str(out),
        "PYTHON": str(bin_dir / "python"),
        "STEPS": "cuda_kernels",
        "FAKE_CLOCK": str(clock),
        "FAKE_CALLS": str(tmp_path / "calls"),
        "FAKE_BUILD_ENV": str(tmp_path / "build_env.json"),
        "FAKE_DURATIONS": json.dumps(durations),
        **env,
    }
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    build_env_file = tmp_path / "build_env.json"
    build_env = json.loads(build_env_file.read_text()) if build_env_file.exists() else {}
    steps_md = (out / "steps.md").read_text()
    return done.returncode, calls, build_env, steps_md, int(clock.read_text()) - 1000000


def step_rows(steps_md: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in steps_md.splitlines()[2:]]


def check_within_total(calls: list[dict], end: int) -> None:
    for call in calls:
        assert call["clock"] - 1000000 + call["limit"] <= TOTAL_SECONDS, call
    assert end <= TOTAL_SECONDS


def test_preset_builds_two_head_dims_then_tests_benchmarks_and_sweeps_in_the_rest(tmp_path):
    durations = {
        "-m pip install": BUILD_ESTIMATE_S,
        "-m pytest": 90,
        "--bias t5": 30,  # before the bench's key, which its line holds too
        "-m fast_attn.bench": 70,
        "benchmarks/cuda_tile_sweep.py": 10_000,
    }
    status, calls, build_env, steps_md, end = run_preset(tmp_path, durations)
    assert status == 0
    build, tests, bench, bench_t5, sweep = (call["command"] for call in calls)
    assert build[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    assert build_env == {
        "FAST_ATTN_CUDA_HEAD_DIMS": "64,128",
        "TORCH_CUDA_ARCH_LIST": "9.0",
        "MAX_JOBS": "16",
        "FAST_ATTN_BUILD_CUDA": "1",
    }
    assert " -m gpu tests/test_cuda.py" in " ".join(tests) and "-n" in tests
    bench_line = " ".join(bench)
    for wanted in (
        "-m fast_attn.bench",
        "--seqlen 1024 2048 4096 8192 16384",
        "--head-dim 64 128",
        "--mode fwd bwd",
        "--backend fast_attn:cuda fast_attn:triton sdpa:flash",
    ):
        assert wanted in bench_line
    t5_line = " ".join(bench_t5)
    for wanted in ("--bias t5", "--mode fwd_bwd", "--backend fast_attn:cuda fast_attn:triton sdpa:efficient"):
        assert wanted in t5_line
    assert sweep[1] == "benchmarks/cuda_tile_sweep.py"
    assert "--head-dim 64 128" in " ".join(sweep)
    budget = int(sweep[sweep.index("--budget-seconds") + 1])
    sweep_limit = TOTAL_SECONDS - BUILD_ESTIMATE_S - 90 - 70 - 30
    assert [call["limit"] for call in calls] == [180, 120, 100, 60, sweep_limit]
    assert budget == sweep_limit - 15
    check_within_total(calls, end)
    assert [row[0] for row in step_rows(steps_md)] == [
        "build",
        f"tests: {' '.join(tests[tests.index('-n') :])}",
        "bench",
        "bench_t5",
        "cuda_sweep",
    ]
    assert [row[-1] for row in step_rows(steps_md)] == ["0", "0", "0", "0", "124"]


def test_preset_steps_at_their_limits_stay_within_the_total(tmp_path):
    """A build just inside its limit, then tests and both benchmarks cut off at theirs: the later
    steps still run, and what is left (21 s) is less than a sweep's round, so the sweep is skipped."""
    durations = {"-m pip install": 179, "-m pytest": 10_000, "-m fast_attn.bench": 10_000}
    status, calls, _, steps_md, end = run_preset(tmp_path, durations)
    assert status == 0
    assert [call["limit"] for call in calls] == [180, 120, 100, 60]
    rows = step_rows(steps_md)
    assert [row[2:] for row in rows] == [
        ["180", "179", "0"],
        ["120", "120", "124"],
        ["100", "100", "124"],
        ["60", "60", "124"],
        ["0", "0", "124"],
    ]
    assert rows[-1][:2] == ["cuda_sweep", str(179 + 120 + 100 + 60)]
    check_within_total(calls, end)


def test_preset_with_a_slower_start_still_sweeps_in_what_is_left(tmp_path):
    durations = {"-m pip install": 100, "-m pytest": 10_000, "-m fast_attn.bench": 60}
    status, calls, _, steps_md, end = run_preset(tmp_path, durations)
    assert status == 0 and calls[-1]["command"][1] == "benchmarks/cuda_tile_sweep.py"
    assert calls[-1]["limit"] == TOTAL_SECONDS - 100 - 120 - 60 - 60  # the bench, then the T5 bench
    check_within_total(calls, end)


def test_preset_stops_after_a_build_cut_off(tmp_path):
    status, calls, _, steps_md, end = run_preset(tmp_path, {"-m pip install": 10_000})
    assert status == 1 and len(calls) == 1 and end == 180
    assert step_rows(steps_md) == [["build", "0", "180", "180", "124"]]
