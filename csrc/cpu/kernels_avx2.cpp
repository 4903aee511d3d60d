// The CPU attention kernels compiled for AVX2, FMA and F16C (8-float vectors,
// vec_avx2.h), for x86 CPUs without AVX-512. As in kernels_avx512.cpp: no global
// -m flag, only the code between push_options and pop_options targets AVX2,
// everything in it has internal linkage except avx2_kernels(), attention_cpu.cpp
// calls it only when the CPU reports those features, and standard headers come
// before the target region.
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
#pragma GCC target("avx2,fma,f16c")

#include "cpu/vec_avx2.h"
#include "cpu/vector_workers.h"

#pragma GCC pop_options

namespace fast_attn::cpu {

const KernelSet& avx2_kernels() {
  static const KernelSet kernels{"avx2", &forward_on<VecAvx2>, &backward_on<VecAvx2>, &decode_on<VecAvx2>};
  return kernels;
}

}  // namespace fast_attn::cpu
