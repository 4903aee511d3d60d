// The CPU attention kernels in portable C++ (the ISA of the build's default
// flags): the fallback for CPUs without AVX-512, and the float64 path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "attention_params.h"
#include "cpu/cpu_kernels.h"
#include "cpu/vec_generic.h"
#include "cpu/vector_workers.h"

namespace fast_attn::cpu {
namespace {

using VecFloat = VecGeneric<float>;
using VecDouble = VecGeneric<double>;

void forward_generic(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  if (plan.dtype == ElementType::kFloat64) return forward_float_products<VecDouble, double>(p, plan, counter);
  forward_on<VecFloat>(p, plan, counter);
}

void backward_generic(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  if (plan.dtype == ElementType::kFloat64) return backward_float_products<VecDouble, double>(p, plan, counter);
  backward_on<VecFloat>(p, plan, counter);
}

void decode_generic(const DecodeParams& p, const DecodePlan& plan, TaskCounter& counter) {
  if (plan.dtype == ElementType::kFloat64) return decode_worker<VecDouble, double>(p, plan, counter);
  decode_on<VecFloat>(p, plan, counter);
}

}  // namespace

const KernelSet& generic_kernels() {
  static const KernelSet kernels{VecFloat::kInstructionSet, &forward_generic, &backward_generic, &decode_generic};
  return kernels;
}

}  // namespace fast_attn::cpu
