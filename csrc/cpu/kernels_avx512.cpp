// The CPU attention kernels compiled for AVX-512 (avx512f/bw/vl/dq, FMA, F16C)
// without any global -mavx512 flag: only the code between push_options and
// pop_options targets AVX-512, and attention_cpu.cpp calls it only when the
// CPU reports those features. Everything compiled here has internal linkage
// (anonymous namespaces) except avx512_kernels(), so no AVX-512 copy of an
// inline function can replace a portable one at link time. The other headers
// are included before the target region for the same reason
// (headers_before_target_region.h).
#include "cpu/headers_before_target_region.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "cpu/vec_avx512.h"
#include "cpu/vector_workers.h"

#pragma GCC pop_options

namespace fast_attn::cpu {

const KernelSet& avx512_kernels() { return kKernelsOn<VecAvx512>; }

}  // namespace fast_attn::cpu
