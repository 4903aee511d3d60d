// The forward, backward and decode workers of one vector type of floats (VecAvx512,
// VecAvx2 or the portable VecGeneric<float>) for float32, bfloat16 and float16;
// float64 runs the portable kernels' VecGeneric<double> (kernels_generic.cpp).
// Included inside the target region of the translation unit that compiles that
// vector type (if any), so every instantiation has internal linkage and that
// unit's instruction set.
#pragma once

#include <cstdlib>

#include "attention_params.h"
#include "cpu/backward_kernel.h"
#include "cpu/backward_products.h"
#include "cpu/cpu_kernels.h"
#include "cpu/decode_kernel.h"
#include "cpu/forward_kernel.h"
#include "cpu/forward_products.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T>
void forward_float_products(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  forward_worker<V, T, AccumulationTypeForwardProducts<V, T>>(p, plan, counter);
}

template <class V, class T>
void backward_float_products(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<V, T, AccumulationTypeProducts<V, T>>(p, plan, counter);
}

// run(element) with a value of the storage type of a float32, bfloat16 or float16 problem.
template <class Run>
void with_storage_type(ElementType dtype, const Run& run) {
  switch (dtype) {
    case ElementType::kFloat32: return run(float{});
    case ElementType::kBFloat16: return run(BFloat16Bits{});
    case ElementType::kFloat16: return run(Float16Bits{});
    case ElementType::kFloat64: break;
  }
  std::abort();
}

template <class V>
void forward_on(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  with_storage_type(plan.dtype, [&](auto element) {
    forward_float_products<V, decltype(element)>(p, plan, counter);
  });
}

template <class V>
void backward_on(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  with_storage_type(plan.dtype, [&](auto element) {
    backward_float_products<V, decltype(element)>(p, plan, counter);
  });
}

template <class V>
void decode_on(const DecodeParams& p, const DecodePlan& plan, TaskCounter& counter) {
  with_storage_type(plan.dtype, [&](auto element) { decode_worker<V, decltype(element)>(p, plan, counter); });
}

// The kernels of V for float32, bfloat16 and float16, named by V's instruction set.
template <class V>
constexpr KernelSet kKernelsOn{V::kInstructionSet, &forward_on<V>, &backward_on<V>, &decode_on<V>};

}  // namespace
}  // namespace fast_attn::cpu
