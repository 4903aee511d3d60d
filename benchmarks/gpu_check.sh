#!/usr/bin/env bash
# The GPU check: one command on the device machine (H100/H200, 16 cores, no network).
# Builds the CUDA extension for this card, runs the GPU tests, benchmarks every
# backend against SDPA, and runs compute-sanitizer on a small forward+backward.
# Everything lands under $OUT (default ./gpu_out):
#   gpu_check.log   the whole log (every test by name, the build, the sanitizer)
#   bench/results.{json,md} and bench/throughput.png   the benchmark
#   measured_order.py   where the bench found the CUDA kernels faster than Triton ("auto"'s table:
#                       commit the bench's results.json, then regenerate fast_attn/measured_order.py from it)
#   bench_models.json, longest_sequence.json   end-to-end models, longest sequences
#   decode/results.{json,md}   the Triton decode op against SDPA, with its bandwidth
#   context_parallel.json   the ring and the all-to-all on one NCCL rank against plain attention
#   bench_window/results.{json,md}   a (256, 0) window against SDPA's bool mask and FlexAttention
#   bench_modifiers.json   window, softcap, ALiBi and sinks against the same calls without them
#   cuda_sweep/cuda_tile_sweep.{json,md}   candidate CUDA tiles (step cuda_sweep, not in the default STEPS)
#   steps.md        each step that ran: when it started, its time limit, how long it took, its exit status
# Each step has its own time limit so that a slow step cannot eat the others'.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh            # everything
#   STEPS="build bench" bash benchmarks/gpu_check.sh     # a subset
#   STEPS=cuda_kernels bash benchmarks/gpu_check.sh      # issue 15's CUDA kernels, 8 minutes at most
#
# The preset cuda_kernels runs, within TOTAL_SECONDS (480) of the script's start:
#   build       the CUDA extension for this card and head dims 64 and 128 only      limit 180 s
#   tests       -m gpu tests/test_cuda.py (correctness before speed)                 limit 120 s
#   bench       CUDA and Triton forward and backward against SDPA flash, bf16,
#               D 64 and 128, causal and not, S 1024..16384                           limit 100 s
#   bench_t5    a trainable T5 bias, forward+backward, CUDA and Triton against SDPA's
#               efficient backend, D 64, S 1024..4096                                 limit 60 s
#   cuda_sweep  the tile sweep at D 64 and 128 in whatever time is left              the rest
# Every step's limit is cut to what is left of TOTAL_SECONDS; the sweep's budget ends
# SWEEP_MARGIN (15) seconds before its limit, and the sweep is skipped when that budget is
# under SWEEP_MIN_SECONDS (90). Expected (estimates, not timings): build 60-90 s, tests
# 60-90 s, bench 60-70 s, bench_t5 20-40 s, so 190-280 s for the sweep: one or two rounds of
# 4 candidate builds (each a whole build for one head dim, the tile-independent C++ units
# included), so 4 to 8 of its 10 candidates, the released tiles and variant 1 of both head
# dims first.
# Overrides (TESTS, BENCH_*, ...) win.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(pwd)/gpu_out}
PY=${PYTHON:-python3}
START=$(date +%s)
# Test groups compiling many Triton variants run in parallel workers when
# pytest-xdist is there (compilation is CPU-bound; the 16 cores share one GPU).
PARALLEL=""
if $PY -c "import xdist" 2>/dev/null; then PARALLEL="-n ${TEST_WORKERS:-8}"; fi
if [[ "${STEPS:-}" == cuda_kernels ]]; then
  STEPS="build tests bench bench_t5 cuda_sweep"
  export FAST_ATTN_CUDA_HEAD_DIMS=${FAST_ATTN_CUDA_HEAD_DIMS:-64,128}
  TOTAL_SECONDS=${TOTAL_SECONDS:-480}
  BUILD_TIMEOUT=${BUILD_TIMEOUT:-180}
  TESTS=${TESTS:-"$PARALLEL -m gpu tests/test_cuda.py"}
  TEST_TIMEOUT=${TEST_TIMEOUT:-120}
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
  BENCH_T5_TIMEOUT=${BENCH_T5_TIMEOUT:-60}
  BENCH_T5_IMPLS=${BENCH_T5_IMPLS:-"fast_attn:cuda fast_attn:triton sdpa:efficient"}
  BENCH_IMPLS=${BENCH_IMPLS:-"fast_attn:cuda fast_attn:triton sdpa:flash"}
  SWEEP_HEAD_DIMS=${SWEEP_HEAD_DIMS:-"64 128"}
fi
STEPS=${STEPS:-"build probe overhead tests bench bench_window bench_modifiers bench_decode context_parallel bench_t5 bench_models longest sanitizer wheel"}
if [[ -n "${TESTS:-}" ]]; then
  IFS=';' read -r -a TEST_GROUPS <<< "$TESTS"   # groups separated by ';'
else
  TEST_GROUPS=(
    # What no GPU has confirmed yet (README: Awaiting a GPU) comes first.
    "$PARALLEL tests/test_decode.py tests/test_measured_order.py tests/test_score_modifiers.py tests/test_triton_modifiers.py tests/test_flash_attn_interface.py tests/test_varlen.py tests/test_triton_varlen.py"
    "-m gpu tests/test_cuda.py tests/test_distributed.py"
    "$PARALLEL tests/test_contract.py tests/test_robustness.py tests/test_fuzz.py"
    "-m gpu tests/test_nn.py tests/test_models.py tests/test_integrations.py"
    "$PARALLEL -m gpu tests/test_triton.py tests/test_triton_decode.py"
  )
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS_MD="$OUT/steps.md"
printf '| step | started (s after the start) | limit (s) | took (s) | exit status (124: cut off) |\n| --- | --- | --- | --- | --- |\n' \
  > "$STEPS_MD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() { echo "=== $1 [$(date +%T)]" | tee -a "$LOG"; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
# A step's time limit: its own, cut to what is left of TOTAL_SECONDS (when set) since the start.
limit() {
  local own=$1
  if [[ -n "${TOTAL_SECONDS:-}" ]]; then
    local left=$(( START + TOTAL_SECONDS - $(date +%s) ))
    (( left < own )) && own=$(( left > 0 ? left : 0 ))
  fi
  echo "$own"
}
# timed NAME LIMIT COMMAND...: the command under `timeout LIMIT` (none at all when LIMIT <= 0:
# `timeout 0` would never stop it), and a row of steps.md.
timed() {
  local name=$1 seconds=$2 begin status
  shift 2
  begin=$(date +%s)
  if (( seconds <= 0 )); then
    echo "no time left for $name" | tee -a "$LOG"
    status=124
  else
    timeout "$seconds" "$@"
    status=$?
  fi
  echo "| $name | $(( begin - START )) | $seconds | $(( $(date +%s) - begin )) | $status |" >> "$STEPS_MD"
  return "$status"
}

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -1
} 2>&1 | tee -a "$LOG"

if has_step build; then
  step "build (CUDA kernels for this card)"
  arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  start=$(date +%s)
  if ! MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} FAST_ATTN_BUILD_CUDA=1 \
      timed build "$(limit "${BUILD_TIMEOUT:-330}")" $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
    echo "BUILD FAILED" | tee -a "$LOG"
    grep -E "error|Error" "$LOG" | head -40
    exit 1
  fi
  echo "build took $(( $(date +%s) - start )) s" | tee -a "$LOG"
  {
    echo "host compiler: $(c++ --version | head -n 1); its libstdc++.so: $(c++ -print-file-name=libstdc++.so)"
    echo "C++ runtime symbols defined by the extension (must be 0):" \
      "$(nm -DC --defined-only fast_attn/_C*.so | grep -c -E 'std::(locale::|codecvt<|basic_ostream<|ios_base::)')"
  } 2>&1 | tee -a "$LOG"
  $PY -m fast_attn.info 2>&1 | tee -a "$LOG"
fi

if has_step probe; then
  # Direct op calls with broken invariants, one by one; on a crash, a native backtrace.
  step "direct op calls with broken invariants"
  $PY tests/test_robustness.py > "$OUT/direct_op_probe.py"
  timeout 90 $PY -X faulthandler "$OUT/direct_op_probe.py" 2>&1 | tail -n 30 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  echo "exit status $status" | tee -a "$LOG"
  if (( status != 0 )) && command -v cuda-gdb >/dev/null; then
    timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY "$OUT/direct_op_probe.py" \
      > "$OUT/direct_op_probe.gdb.txt" 2>&1
    grep -E "^#|signal|SIG" "$OUT/direct_op_probe.gdb.txt" | head -n 40 | tee -a "$LOG"
  fi
fi

if has_step overhead; then
  step "host time per call (launch overhead)"
  timeout 90 $PY benchmarks/launch_overhead.py 2>&1 | tee -a "$LOG"
fi

if has_step tests; then
  step "GPU tests"
  # Most valuable first; each group is one pytest run, all under one time limit.
  # Marked-gpu tests of the kernel suites, then the device-adaptive contract and
  # robustness suites, then the GPU variants of the model tests. The CUDA
  # emulator tests are CI's business.
  deadline=$(( $(date +%s) + $(limit "${TEST_TIMEOUT:-240}") ))
  for group in "${TEST_GROUPS[@]}"; do
    left=$(( deadline - $(date +%s) ))
    if (( left <= 5 )); then echo "no time left for: $group" | tee -a "$LOG"; continue; fi
    echo "--- pytest $group" | tee -a "$LOG"
    timed "tests: $group" "$left" $PY -m pytest -v -p no:cacheprovider --tb=short -rfE $group >>"$LOG" 2>&1
    echo "pytest exit status $? for: $group" | tee -a "$LOG"
  done
  grep -E "FAILED|ERROR|passed|failed" "$LOG" | grep -v "PASSED" | tail -n 40
fi

if has_step bench; then
  step "benchmark against SDPA"
  # results.{json,md} are rewritten after each measurement: a bench cut off keeps what it measured.
  timed bench "$(limit "${BENCH_TIMEOUT:-300}")" $PY -m fast_attn.bench --out "$OUT/bench" \
    --budget-ms "${BENCH_BUDGET_MS:-200}" --seqlen ${BENCH_SEQLENS:-1024 2048 4096 8192 16384} \
    --head-dim ${BENCH_HEAD_DIMS:-64 128} --mode fwd bwd \
    --backend ${BENCH_IMPLS:-fast_attn sdpa:flash sdpa:efficient sdpa:cudnn} 2>>"$LOG" | tee -a "$LOG"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
  $PY tools/measured_order.py "$OUT/bench/results.json" --out "$OUT/measured_order.py" 2>&1 | tee -a "$LOG"
fi

if has_step bench_window; then
  step "benchmark: a sliding window (256, 0) against SDPA with the bool mask and FlexAttention"
  timeout "${BENCH_WINDOW_TIMEOUT:-180}" $PY -m fast_attn.bench --out "$OUT/bench_window" --window 256 \
    --causal true --seqlen 4096 16384 --head-dim 64 128 --mode fwd fwd_bwd --budget-ms "${BENCH_BUDGET_MS:-200}" \
    2>>"$LOG" | tee -a "$LOG"
fi

if has_step bench_modifiers; then
  step "benchmark: the score modifiers' cost (window vs causal, softcap, ALiBi, sinks vs none), bf16"
  timeout "${BENCH_MODIFIERS_TIMEOUT:-180}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_modifiers.py \
    --benchmark-only --benchmark-columns=median,rounds --benchmark-json "$OUT/bench_modifiers.json" 2>&1 \
    | tail -n 30 | tee -a "$LOG"
fi

if has_step bench_decode; then
  step "benchmark: decoding against a KV cache (Triton decode op vs SDPA)"
  timeout "${BENCH_DECODE_TIMEOUT:-240}" $PY benchmarks/decode.py --out "$OUT/decode" 2>&1 | tee -a "$LOG"
fi

if has_step context_parallel; then
  step "benchmark: context parallelism on one NCCL rank (ring, all-to-all) against plain attention"
  timeout "${CONTEXT_PARALLEL_TIMEOUT:-120}" $PY benchmarks/context_parallel.py --device cuda \
    --json "$OUT/context_parallel.json" 2>&1 | tee -a "$LOG"
fi

if has_step bench_t5; then
  step "benchmark: trainable T5 bias"
  timed bench_t5 "$(limit "${BENCH_T5_TIMEOUT:-120}")" $PY -m fast_attn.bench --out "$OUT/bench_t5" --bias t5 \
    --causal false --seqlen 1024 2048 4096 --head-dim 64 --mode fwd_bwd --budget-ms "${BENCH_BUDGET_MS:-200}" \
    --backend ${BENCH_T5_IMPLS:-fast_attn sdpa:efficient sdpa:math} 2>>"$LOG" | tee -a "$LOG"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

if has_step bench_models; then
  step "benchmark: transformers models end to end (fast_attn vs sdpa vs eager)"
  timeout "${BENCH_MODELS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_models.py \
    --benchmark-only --benchmark-group-by=group --benchmark-columns=median,rounds \
    --benchmark-json "$OUT/bench_models.json" 2>&1 | tail -n 60 | tee -a "$LOG"
fi

if has_step longest; then
  step "longest sequence per backend"
  timeout "${LONGEST_TIMEOUT:-150}" $PY benchmarks/longest_sequence.py --out "$OUT/longest_sequence.json" \
    --max-seqlen "${LONGEST_MAX_SEQLEN:-262144}" 2>&1 | tee -a "$LOG"
fi

if has_step cuda_sweep; then
  # Opt-in. Candidates are built side by side in folders of their own (the checkout's build
  # is left alone) and measured as they finish; the sweep stops starting work when its
  # budget, SWEEP_MARGIN seconds inside its limit, is spent, and its json keeps what it measured.
  step "CUDA tile sweep"
  sweep_limit=$(limit "${SWEEP_TIMEOUT:-500}")
  # Less than a round of builds and measurements is not worth starting.
  (( sweep_limit - ${SWEEP_MARGIN:-15} < ${SWEEP_MIN_SECONDS:-90} )) && sweep_limit=0
  timed cuda_sweep "$sweep_limit" $PY benchmarks/cuda_tile_sweep.py --out "$OUT/cuda_sweep" \
    --head-dim ${SWEEP_HEAD_DIMS:-128} --budget-seconds $(( sweep_limit - ${SWEEP_MARGIN:-15} )) 2>&1 | tee -a "$LOG"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

if has_step sanitizer; then
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck}; do
    step "compute-sanitizer $tool"
    timeout "${SANITIZER_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      $PY benchmarks/sanitizer_case.py ${SANITIZE_BACKENDS:-cuda} 2>&1 | tail -n 25 | tee -a "$LOG"
    echo "exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
  done
fi
if has_step wheel; then
  step "CUDA wheel: build, install into a fresh venv, smoke test"
  WHEEL_REUSE_TORCH=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    timeout "${WHEEL_TIMEOUT:-300}" bash tools/check_wheel.sh "$(mktemp -d)" 2>&1 | tail -n 20 | tee -a "$LOG"
fi
step "done"
cat "$STEPS_MD"
