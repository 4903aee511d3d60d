// The loop of every worker of the CPU kernels (forward_kernel.h, backward_kernel.h,
// decode_kernel.h): one kernel object per worker, with scratch of its own, runs the
// tasks it takes from the shared counter until none is left.
#pragma once

#include <cstdint>

#include "cpu_kernels.h"

namespace fast_attn::cpu {
namespace {

// Kernel(params, plan) holds the worker's scratch; kernel.run(task) does one task.
template <class Kernel, class Params, class Plan>
void run_tasks(const Params& p, const Plan& plan, TaskCounter& counter) {
  Kernel kernel(p, plan);
  for (int64_t task = counter.next.fetch_add(1); task < plan.num_tasks; task = counter.next.fetch_add(1)) {
    kernel.run(task);
  }
}

}  // namespace
}  // namespace fast_attn::cpu
