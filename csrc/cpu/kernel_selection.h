// Host side of the CPU ops (attention_cpu.cpp, decode_cpu.cpp): which compiled
// kernels run on this CPU, and running a kernel's workers on torch's threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_kernels.h"

namespace fast_attn::cpu {

ElementType element_type(at::ScalarType dtype);

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
  bool avx512_bf16 = false;
};

// The instruction-set level a call may use: the CPU's, lowered by
// FAST_ATTN_CPU_ISA ("generic": portable kernels, "avx2": no AVX-512,
// "avx512": no bf16 dot products, anything else or unset: all the CPU has).
// Read on every call so tests can cover each path on one machine.
CpuFeatures allowed_features();

// The kernels of the best instruction set allowed for inputs of this dtype
// (float64 always runs the portable ones).
const KernelSet& kernels_for(at::ScalarType dtype);

// Each further worker of a call needs this many multiply-adds of work: waking torch's other threads
// costs more than a decoding-sized problem's whole math (fast_attn.attention on q (1, 12, 1, 64)
// against 64 keys, 2-core EPYC: 53 us a call on 2 threads, 37 us on one, before this rule).
constexpr int64_t kMultiplyAddsPerWorker = int64_t{1} << 18;

// One worker per thread, at most one per task and one per kMultiplyAddsPerWorker of the call's
// `multiply_adds` (an estimate from its shapes; more is safe); workers take tasks from a shared
// counter, so the results are the same for any number of them. One worker runs on the calling thread.
template <class Worker, class Params, class Plan>
void run_workers(Worker worker, const Params& params, const Plan& plan, int64_t multiply_adds) {
  TaskCounter counter;
  const int64_t by_work = std::max<int64_t>(1, multiply_adds / kMultiplyAddsPerWorker);
  const int64_t workers = std::min<int64_t>({at::get_num_threads(), plan.num_tasks, by_work});
  if (workers <= 1) {
    worker(params, plan, counter);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) worker(params, plan, counter);
  });
}

}  // namespace fast_attn::cpu
