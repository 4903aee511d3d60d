// The bfloat16 forward and backward on AVX512-BF16 dot products
// (forward_products_bf16.h, backward_products_bf16.h),
// compiled for avx512f/bw/vl/dq + avx512bf16 inside a target region only (see
// kernels_avx512.cpp for why everything here has internal linkage and the
// other headers come first). attention_cpu.cpp calls it only where the CPU
// reports avx512bf16.
#include "cpu/headers_before_target_region.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")

#include "cpu/backward_kernel.h"
#include "cpu/backward_products_bf16.h"
#include "cpu/forward_kernel.h"
#include "cpu/forward_products_bf16.h"
#include "cpu/vec_avx512.h"

namespace fast_attn::cpu {
namespace {

void forward_bf16_dot(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  forward_worker<VecAvx512, BFloat16Bits, Bfloat16DotForwardProducts>(p, plan, counter);
}

void backward_bf16_dot(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  backward_worker<VecAvx512, BFloat16Bits, Bfloat16DotProducts>(p, plan, counter);
}

}  // namespace
}  // namespace fast_attn::cpu

#pragma GCC pop_options

namespace fast_attn::cpu {

ForwardWorker avx512_bf16_dot_forward() { return &forward_bf16_dot; }
BackwardWorker avx512_bf16_dot_backward() { return &backward_bf16_dot; }

}  // namespace fast_attn::cpu
