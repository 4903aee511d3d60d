// 16 floats in one AVX-512 register: the fast path of the CPU kernels.
//
// Include only inside a `#pragma GCC target("avx512f,avx512bw,avx512vl,
// avx512dq,fma,f16c")` region (kernels_avx512.cpp), after <immintrin.h>; the
// kernels built from it run only where the CPU reports AVX-512 (chosen at run
// time in attention_cpu.cpp). Same interface as VecGeneric (vec_generic.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "exp_polynomial.h"
#include "storage_types.h"

namespace fast_attn::cpu {
namespace {

struct VecAvx512 {
  using value_type = float;
  using Mask = __mmask16;
  static constexpr const char* kInstructionSet = "avx512";  // the name kernel selection reports
  static constexpr int kWidth = 16;
  static constexpr int kTileVectors = 4;  // register tile of the matrix products: 6 rows x 4 vectors
  __m512 v;

  static __mmask16 first_lanes(int count) {
    if (count <= 0) return 0;
    if (count >= kWidth) return 0xffff;
    return static_cast<__mmask16>((1u << count) - 1u);
  }

  static VecAvx512 zero() { return {_mm512_setzero_ps()}; }
  static VecAvx512 broadcast(float value) { return {_mm512_set1_ps(value)}; }

  static VecAvx512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecAvx512 load(const BFloat16Bits* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
  }
  static VecAvx512 load(const Float16Bits* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }

  // Lanes >= count are zero; masked lanes are not read (no fault past a row end).
  static VecAvx512 load_first(const float* p, int count) {
    return {_mm512_maskz_loadu_ps(first_lanes(count), p)};
  }
  static VecAvx512 load_first(const BFloat16Bits* p, int count) {
    const __m256i raw = _mm256_maskz_loadu_epi16(first_lanes(count), p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
  }
  static VecAvx512 load_first(const Float16Bits* p, int count) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(count), p))};
  }

  // Raw-register operations for the matrix-product micro-kernel (tile_gemm.h),
  // whose 24 accumulators must stay plain __m512 values in registers.
  using Reg = __m512;
  static Reg reg_zero() { return _mm512_setzero_ps(); }
  static Reg reg_broadcast(float x) { return _mm512_set1_ps(x); }
  static Reg reg_load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg reg_load_masked(const float* p, Mask mask) { return _mm512_maskz_loadu_ps(mask, p); }
  static Reg reg_fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg reg_add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static void reg_store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static void reg_store_masked(float* p, Mask mask, Reg x) { _mm512_mask_storeu_ps(p, mask, x); }

  // float -> bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
  static __m256i to_bfloat16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    const __m512i result = _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, is_nan, quiet_nan), 16);
    return _mm512_cvtepi32_epi16(result);
  }
  static __m256i to_float16(__m512 x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(BFloat16Bits* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat16(v)); }
  void store(Float16Bits* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_float16(v)); }

  void store_first(float* p, int count) const { _mm512_mask_storeu_ps(p, first_lanes(count), v); }
  // Non-temporal store of a full vector to a 64-byte aligned address: no read
  // for ownership of a line that is entirely overwritten. Order with
  // std::atomic_thread_fence before other threads read it.
  void store_streaming(float* p) const { _mm512_stream_ps(p, v); }
  void store_first(BFloat16Bits* p, int count) const {
    _mm256_mask_storeu_epi16(p, first_lanes(count), to_bfloat16(v));
  }
  void store_first(Float16Bits* p, int count) const {
    _mm256_mask_storeu_epi16(p, first_lanes(count), to_float16(v));
  }

  // Member operators: GCC 12 does not give in-class friend functions the
  // target of the enclosing #pragma GCC target region.
  VecAvx512 operator+(VecAvx512 b) const { return {_mm512_add_ps(v, b.v)}; }
  VecAvx512 operator-(VecAvx512 b) const { return {_mm512_sub_ps(v, b.v)}; }
  VecAvx512 operator*(VecAvx512 b) const { return {_mm512_mul_ps(v, b.v)}; }

  // a * b + c
  static VecAvx512 fma(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }

  // Lane-wise maximum; a NaN in b is returned (vmaxps returns its second source on NaN).
  static VecAvx512 max(VecAvx512 a, VecAvx512 b) { return {_mm512_max_ps(a.v, b.v)}; }

  // e^x within ~1.2 ulp (exp_polynomial.h). NaN passes through the clamps (it
  // is their second source).
  VecAvx512 exp() const {
    using E = ExpPolynomial;
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(E::kMaxInput), _mm512_max_ps(_mm512_set1_ps(E::kMinInput), v));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(E::kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(E::kLn2High), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(E::kLn2Low), r);
    __m512 p = _mm512_set1_ps(E::kCoefficients[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(E::kCoefficients[i]));
    return {_mm512_scalef_ps(p, n)};
  }

  // tanh(x) = 1 - 2 / (e^(2x) + 1) on exp above: e^(2x) = inf gives 1 and 0 gives -1 (x = +-inf),
  // NaN stays NaN. Accurate to a few ulp of 1 in absolute terms (near 0 the
  // subtraction cancels), which is what softcap * tanh needs.
  VecAvx512 tanh() const {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 exp2x = VecAvx512{_mm512_add_ps(v, v)}.exp().v;
    return {_mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(exp2x, one)))};
  }

  float reduce_add() const { return _mm512_reduce_add_ps(v); }

  VecAvx512 replace_lanes_below(int count, float value) const {
    return {_mm512_mask_mov_ps(v, first_lanes(count), _mm512_set1_ps(value))};
  }
  VecAvx512 replace_lanes_from(int start, float value) const {
    const __mmask16 from = static_cast<__mmask16>(~first_lanes(start));
    return {_mm512_mask_mov_ps(v, from, _mm512_set1_ps(value))};
  }
  VecAvx512 replace_where_zero(VecAvx512 flags, float value) const {
    const __mmask16 zero_lanes = _mm512_cmp_ps_mask(flags.v, _mm512_setzero_ps(), _CMP_EQ_OQ);
    return {_mm512_mask_mov_ps(v, zero_lanes, _mm512_set1_ps(value))};
  }
  VecAvx512 replace_neg_inf(float value) const {
    const __mmask16 neg_inf = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
    return {_mm512_mask_mov_ps(v, neg_inf, _mm512_set1_ps(value))};
  }
  bool all_equal(float value) const {
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(value), _CMP_EQ_OQ) == 0xffff;
  }

  static __m512i mix32(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }

  // keep_scale where dropout_hash(seed, first_index + i * lane_stride) keeps
  // the score, else 0: the hash of attention_params.h on 16 lanes.
  static VecAvx512 dropout_multiplier(uint64_t seed, uint64_t first_index, int64_t lane_stride,
                                      uint32_t keep_threshold, float keep_scale) {
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i stride = _mm512_set1_epi64(lane_stride);
    const __m512i base = _mm512_set1_epi64(static_cast<long long>(first_index));
    const __m512i index_low8 = _mm512_add_epi64(base, _mm512_mullo_epi64(lane, stride));
    const __m512i index_high8 = _mm512_add_epi64(index_low8, _mm512_slli_epi64(stride, 3));
    // Low and high 32-bit halves of the 16 64-bit indices, lane order kept.
    const __m512i low = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(index_low8)),
                                           _mm512_cvtepi64_epi32(index_high8), 1);
    const __m512i high = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(index_low8, 32))),
        _mm512_cvtepi64_epi32(_mm512_srli_epi64(index_high8, 32)), 1);
    const __m512i seed_low = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
    const __m512i seed_high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
    __m512i h = mix32(_mm512_xor_si512(seed_low, low));
    h = mix32(_mm512_xor_si512(_mm512_xor_si512(h, high), seed_high));
    const __mmask16 keep =
        _mm512_cmp_epu32_mask(h, _mm512_set1_epi32(static_cast<int>(keep_threshold)), _MM_CMPINT_NLT);
    return {_mm512_maskz_mov_ps(keep, _mm512_set1_ps(keep_scale))};
  }

  // Lane r: the sum of rows[r]'s lanes (rows transposed in place, then added).
  static VecAvx512 sum_lanes(VecAvx512 (&rows)[kWidth]) {
    transpose(rows);
    VecAvx512 sum = rows[0];
    for (int c = 1; c < kWidth; ++c) sum = sum + rows[c];
    return sum;
  }

  // rows[r] lane c <-> rows[c] lane r, in three shuffle stages: 32-bit pairs,
  // 64-bit pairs, then 128-bit lanes across registers.
  static void transpose(VecAvx512 (&rows)[kWidth]) {
    __m512 pairs[kWidth];
    for (int i = 0; i < kWidth; i += 2) {
      pairs[i] = _mm512_unpacklo_ps(rows[i].v, rows[i + 1].v);
      pairs[i + 1] = _mm512_unpackhi_ps(rows[i].v, rows[i + 1].v);
    }
    // quads[4g + c]: columns {c, c+4, c+8, c+12} of rows 4g..4g+3, one 128-bit lane per column.
    __m512 quads[kWidth];
    for (int g = 0; g < 4; ++g) {
      const __m512d p0 = _mm512_castps_pd(pairs[4 * g]);
      const __m512d p1 = _mm512_castps_pd(pairs[4 * g + 1]);
      const __m512d p2 = _mm512_castps_pd(pairs[4 * g + 2]);
      const __m512d p3 = _mm512_castps_pd(pairs[4 * g + 3]);
      quads[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(p0, p2));
      quads[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(p0, p2));
      quads[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(p1, p3));
      quads[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(p1, p3));
    }
    for (int c = 0; c < 4; ++c) {
      const __m512 even01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0x88);
      const __m512 even23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0x88);
      const __m512 odd01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0xdd);
      const __m512 odd23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0xdd);
      rows[c].v = _mm512_shuffle_f32x4(even01, even23, 0x88);
      rows[c + 8].v = _mm512_shuffle_f32x4(even01, even23, 0xdd);
      rows[c + 4].v = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
      rows[c + 12].v = _mm512_shuffle_f32x4(odd01, odd23, 0xdd);
    }
  }
};

}  // namespace
}  // namespace fast_attn::cpu
