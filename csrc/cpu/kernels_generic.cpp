// The CPU attention kernels in portable C++ (the ISA of the build's default
// flags): the fallback for CPUs without AVX-512, and the float64 path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "attention_params.h"
#include "cpu/backward_kernel.h"
#include "cpu/backward_products.h"
#include "cpu/cpu_kernels.h"
#include "cpu/forward_kernel.h"
#include "cpu/forward_products.h"
#include "cpu/vec_generic.h"

namespace fast_attn::cpu {
namespace {

using VecFloat = VecGeneric<float>;
using VecDouble = VecGeneric<double>;

template <class V, class T>
void forward_float_products(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  forward_worker<V, T, AccumulationTypeForwardProducts<V, T>>(p, plan, counter);
}

void forward_generic(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return forward_float_products<VecFloat, float>(p, plan, counter);
    case ElementType::kBFloat16: return forward_float_products<VecFloat, BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return forward_float_products<VecFloat, Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: return forward_float_products<VecDouble, double>(p, plan, counter);
  }
  std::abort();
}

template <class V, class T>
void backward_float_products(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<V, T, AccumulationTypeProducts<V, T>>(p, plan, counter);
}

void backward_generic(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return backward_float_products<VecFloat, float>(p, plan, counter);
    case ElementType::kBFloat16: return backward_float_products<VecFloat, BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return backward_float_products<VecFloat, Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: return backward_float_products<VecDouble, double>(p, plan, counter);
  }
  std::abort();
}

}  // namespace

const KernelSet& generic_kernels() {
  static const KernelSet kernels{"generic", &forward_generic, &backward_generic};
  return kernels;
}

}  // namespace fast_attn::cpu
