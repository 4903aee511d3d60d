// The forward and backward workers of one vector type of floats (VecAvx512,
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
#include "cpu/forward_kernel.h"
#include "cpu/forward_products.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T>
void forward_float_products(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  forward_worker<V, T, AccumulationTypeForwardProducts<V, T>>(p, plan, counter);
}

template <class V>
void forward_on(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return forward_float_products<V, float>(p, plan, counter);
    case ElementType::kBFloat16: return forward_float_products<V, BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return forward_float_products<V, Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: break;
  }
  std::abort();
}

template <class V, class T>
void backward_float_products(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<V, T, AccumulationTypeProducts<V, T>>(p, plan, counter);
}

template <class V>
void backward_on(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  switch (plan.dtype) {
    case ElementType::kFloat32: return backward_float_products<V, float>(p, plan, counter);
    case ElementType::kBFloat16: return backward_float_products<V, BFloat16Bits>(p, plan, counter);
    case ElementType::kFloat16: return backward_float_products<V, Float16Bits>(p, plan, counter);
    case ElementType::kFloat64: break;
  }
  std::abort();
}

}  // namespace
}  // namespace fast_attn::cpu
