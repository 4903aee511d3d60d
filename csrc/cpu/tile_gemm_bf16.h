// Matrix products on bfloat16 operands with float accumulation, by AVX512-BF16
// dot products (vdpbf16ps: per 32-bit lane, two bf16 products added into a
// float). Twice the FMA throughput of float on the 2-core EPYC (measured 235
// vs 113 GFLOP/s per core).
//
//   C (rows x cols, float) = or += A (rows x 2 kpairs) * B (2 kpairs x cols)
//
// is gemm<Bf16PairDots, kAColumnMajor>(rows, cols, kpairs, a, lda, b, ldb, c,
// ldc, accumulate) of tile_gemm.h. Both operands hold consecutive k in pairs,
// one 32-bit word per pair with the even k in the low half:
//   A element (r, kp) = (A[r][2kp], A[r][2kp+1]) at a[r * lda + kp] (row-major)
//                       or at a[kp * lda + r] (column-major);
//   B row kp, column n = (B[2kp][n], B[2kp+1][n]) at b[kp * ldb + n].
// Include only inside a target region that enables avx512bf16.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "tile_gemm.h"
#include "vec_avx512.h"

namespace fast_attn::cpu {
namespace {

// The arithmetic of gemm on k-pairs: VecAvx512's float accumulators and C rows;
// A elements and B vectors are words of two bf16, and reg_fma adds both products
// of a pair into each float lane.
struct Bf16PairDots : VecAvx512 {
  using VecAvx512::reg_load;  // C rows
  using VecAvx512::reg_load_masked;
  static __m512i reg_broadcast(uint32_t pair) { return _mm512_set1_epi32(static_cast<int>(pair)); }
  static __m512i reg_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static __m512i reg_load_masked(const uint32_t* p, Mask mask) { return _mm512_maskz_loadu_epi32(mask, p); }
  static Reg reg_fma(__m512i a, __m512i b, Reg acc) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

}  // namespace
}  // namespace fast_attn::cpu
