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

// One worker per thread (at most one per task); workers take tasks from a shared counter.
template <class Worker, class Params, class Plan>
void run_workers(Worker worker, const Params& params, const Plan& plan) {
  TaskCounter counter;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), plan.num_tasks));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) worker(params, plan, counter);
  });
}

}  // namespace fast_attn::cpu
