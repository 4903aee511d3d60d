// The CPU attention kernels compiled for AVX-512 (avx512f/bw/vl/dq, FMA, F16C)
// without any global -mavx512 flag: only the code between push_options and
// pop_options targets AVX-512, and attention_cpu.cpp calls it only when the
// CPU reports those features. Everything compiled here has internal linkage
// (anonymous namespaces) except avx512_kernels(), so no AVX-512 copy of an
// inline function can replace a portable one at link time. Standard headers
// are included before the target region for the same reason.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "cpu/backward_kernel.h"
#include "cpu/backward_products.h"
#include "cpu/forward_kernel.h"
#include "cpu/vec_avx512.h"

namespace fast_attn::cpu {
namespace {

void forward_avx512(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return forward_worker<VecAvx512, float>(p, plan, counter);
    case ElementType::kBFloat16: return forward_worker<VecAvx512, BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return forward_worker<VecAvx512, Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: break;  // float64 runs the portable kernels
  }
  std::abort();
}

template <class T>
void backward_float_products(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<VecAvx512, T, AccumulationTypeProducts<VecAvx512, T>>(p, plan, counter);
}

void backward_avx512(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return backward_float_products<float>(p, plan, counter);
    case ElementType::kBFloat16: return backward_float_products<BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return backward_float_products<Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: break;
  }
  std::abort();
}

}  // namespace
}  // namespace fast_attn::cpu

#pragma GCC pop_options

namespace fast_attn::cpu {

const KernelSet& avx512_kernels() {
  static const KernelSet kernels{"avx512", &forward_avx512, &backward_avx512};
  return kernels;
}

}  // namespace fast_attn::cpu
