#include "cpu/kernel_selection.h"

#include <cstdlib>
#include <cstring>

namespace fast_attn::cpu {
namespace {

CpuFeatures detect_cpu_features() {
  __builtin_cpu_init();
  CpuFeatures features;
  features.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  features.avx512 = features.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  features.avx512_bf16 = features.avx512 && __builtin_cpu_supports("avx512bf16");
  return features;
}

}  // namespace

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kHalf: return ElementType::kFloat16;
    case at::kDouble: return ElementType::kFloat64;
    default: TORCH_CHECK(false, "fast_attn CPU: unsupported dtype ", dtype);
  }
}

CpuFeatures allowed_features() {
  static const CpuFeatures detected = detect_cpu_features();
  CpuFeatures allowed = detected;
  const char* forced = std::getenv("FAST_ATTN_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) allowed = CpuFeatures{};
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0) allowed.avx512 = allowed.avx512_bf16 = false;
  if (forced != nullptr && std::strcmp(forced, "avx512") == 0) allowed.avx512_bf16 = false;
  return allowed;
}

const KernelSet& kernels_for(at::ScalarType dtype) {
  const CpuFeatures allowed = allowed_features();
  if (dtype == at::kDouble) return generic_kernels();
  if (allowed.avx512) return avx512_kernels();
  return allowed.avx2 ? avx2_kernels() : generic_kernels();
}

const char* instruction_set_in_use() {
  return allowed_features().avx512_bf16 ? "avx512+bf16" : kernels_for(at::kFloat).isa;
}

}  // namespace fast_attn::cpu
