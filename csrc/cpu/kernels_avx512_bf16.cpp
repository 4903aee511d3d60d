// The bfloat16 backward on AVX512-BF16 dot products (backward_products_bf16.h),
// compiled for avx512f/bw/vl/dq + avx512bf16 inside a target region only (see
// kernels_avx512.cpp for why everything here has internal linkage and the
// standard headers come first). attention_cpu.cpp calls it only where the CPU
// reports avx512bf16.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include "attention_params.h"
#include "cpu/cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")

#include "cpu/backward_kernel.h"
#include "cpu/backward_products_bf16.h"
#include "cpu/vec_avx512.h"

namespace fast_attn::cpu {
namespace {

void backward_bf16_dot(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<VecAvx512, BFloat16Bits, Bfloat16DotProducts>(p, plan, counter);
}

}  // namespace
}  // namespace fast_attn::cpu

#pragma GCC pop_options

namespace fast_attn::cpu {

BackwardWorker avx512_bf16_dot_backward() { return &backward_bf16_dot; }

}  // namespace fast_attn::cpu
