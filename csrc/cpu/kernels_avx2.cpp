// The CPU attention kernels compiled for AVX2, FMA and F16C (8-float vectors,
// vec_avx2.h), for x86 CPUs without AVX-512. As in kernels_avx512.cpp: no global
// -m flag, only the code between push_options and pop_options targets AVX2,
// everything in it has internal linkage except avx2_kernels(), attention_cpu.cpp
// calls it only when the CPU reports those features, and the other headers come
// before the target region.
#include "cpu/headers_before_target_region.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "cpu/vec_avx2.h"
#include "cpu/vector_workers.h"

#pragma GCC pop_options

namespace fast_attn::cpu {

const KernelSet& avx2_kernels() { return kKernelsOn<VecAvx2>; }

}  // namespace fast_attn::cpu
