// The one matrix-product shape every CPU attention kernel uses:
//
//   C (rows x cols) = or += A (rows x kdim) * B (kdim x cols)
//
// B's rows are contiguous (cols along a row) with any row stride; A is read
// one element at a time (broadcast to all lanes), either row-major
// (A(r, k) = a[r * lda + k]) or column-major (A(r, k) = a[k * lda + r]), so a
// transposed operand (P^T, dS^T) needs no copy.
//
// The arithmetic comes from the template argument V: a vector type of
// floats or doubles (vec_*.h: its reg_* operations, A, B and C all of its value
// type, accumulation in that type), or the bfloat16 k-pair dot products of
// tile_gemm_bf16.h (A and B hold pairs of bf16, C is float). V provides Reg
// (the accumulator), kWidth, kTileVectors, Mask and first_lanes, and:
//   reg_zero()                                an accumulator of zeros
//   reg_broadcast(a)                          an element of A on every lane
//   reg_load(p), reg_load_masked(p, mask)     a vector of a B row or of a C row
//   reg_fma(a, b, acc)                        acc + a * b
//   reg_add, reg_store, reg_store_masked      on accumulators and C rows
//
// Register tile: 6 rows x 4 vectors (6 x 64 floats) = 24 accumulators, plus 4
// B vectors and one broadcast, within the 32 AVX-512 registers. Measured on
// the 2-core EPYC (AVX-512 at 3.5 GHz, peak 113 GFLOP/s/core): 115 GFLOP/s on a
// 60x64x64 product in L1, i.e. at the FMA peak.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace fast_attn::cpu {
namespace {

constexpr int kTileRows = 6;
constexpr int kTileVectors = 4;  // the most; a vector type may use fewer (V::kTileVectors)

// One register tile: MR rows x NV vectors (MR <= 6, NV <= 4). With kMaskLast the
// last vector holds `last_lanes` valid columns (1..W-1): only those are read from B
// and written to C. Without it every vector is whole, the common case (query
// columns are padded to W, head dims are multiples of W), which needs no mask:
// AVX2's masked loads and stores (vmaskmovps) are slow on AMD cores. On the
// 2-core Zen 3 (AVX2) VM, leaving them out where the last vector is whole made
// the forward, backward and decode kernels 1.14-1.35x faster (fp32 and bf16).
//
// The 24 accumulators are named variables, not an array: GCC 12 keeps an
// array of 24 vector registers in registers but, depending on the code
// around it, also stores the whole array to the stack on every k step
// (measured 28-83 instead of 115 GFLOP/s); named locals never spill.
template <class V, int MR, int NV, bool kMaskLast, bool kAColumnMajor, class Operand, class Result>
void gemm_tile(int64_t kdim, const Operand* a, int64_t lda, const Operand* b, int64_t ldb, Result* c, int64_t ldc,
               int last_lanes, bool accumulate) {
  static_assert(MR >= 1 && MR <= kTileRows && NV >= 1 && NV <= kTileVectors, "tile shape");
  constexpr int W = V::kWidth;
  using Reg = typename V::Reg;
  const typename V::Mask last = V::first_lanes(last_lanes);

  // Vector v of a B row or C row: masked when it is the last one and kMaskLast.
  auto load = [&](const auto* row, int v) {
    return kMaskLast && v == NV - 1 ? V::reg_load_masked(row + v * W, last) : V::reg_load(row + v * W);
  };
  auto store = [&](Reg x, int r, int v) {
    Result* dst = c + r * ldc + v * W;
    if (accumulate) x = V::reg_add(x, load(c + r * ldc, v));
    if (kMaskLast && v == NV - 1) {
      V::reg_store_masked(dst, last, x);
    } else {
      V::reg_store(dst, x);
    }
  };
  auto a_value = [&](int r, int64_t k) { return kAColumnMajor ? a[k * lda + r] : a[r * lda + k]; };

#define FAST_ATTN_TILE_ROW_DECLARE(r) \
  Reg c##r##0 = V::reg_zero(), c##r##1 = V::reg_zero(), c##r##2 = V::reg_zero(), c##r##3 = V::reg_zero();
#define FAST_ATTN_TILE_ROW_FMA(r)                                  \
  if constexpr (MR > r) {                                          \
    const auto ar = V::reg_broadcast(a_value(r, k));               \
    c##r##0 = V::reg_fma(ar, b0, c##r##0);                         \
    if constexpr (NV > 1) c##r##1 = V::reg_fma(ar, b1, c##r##1);   \
    if constexpr (NV > 2) c##r##2 = V::reg_fma(ar, b2, c##r##2);   \
    if constexpr (NV > 3) c##r##3 = V::reg_fma(ar, b3, c##r##3);   \
  }
#define FAST_ATTN_TILE_ROW_STORE(r)             \
  if constexpr (MR > r) {                       \
    store(c##r##0, r, 0);                       \
    if constexpr (NV > 1) store(c##r##1, r, 1); \
    if constexpr (NV > 2) store(c##r##2, r, 2); \
    if constexpr (NV > 3) store(c##r##3, r, 3); \
  }

  FAST_ATTN_TILE_ROW_DECLARE(0)
  FAST_ATTN_TILE_ROW_DECLARE(1)
  FAST_ATTN_TILE_ROW_DECLARE(2)
  FAST_ATTN_TILE_ROW_DECLARE(3)
  FAST_ATTN_TILE_ROW_DECLARE(4)
  FAST_ATTN_TILE_ROW_DECLARE(5)
  for (int64_t k = 0; k < kdim; ++k) {
    const Operand* b_row = b + k * ldb;
    const auto b0 = load(b_row, 0);
    const auto b1 = NV > 1 ? load(b_row, 1) : b0;
    const auto b2 = NV > 2 ? load(b_row, 2) : b0;
    const auto b3 = NV > 3 ? load(b_row, 3) : b0;
    FAST_ATTN_TILE_ROW_FMA(0)
    FAST_ATTN_TILE_ROW_FMA(1)
    FAST_ATTN_TILE_ROW_FMA(2)
    FAST_ATTN_TILE_ROW_FMA(3)
    FAST_ATTN_TILE_ROW_FMA(4)
    FAST_ATTN_TILE_ROW_FMA(5)
  }
  FAST_ATTN_TILE_ROW_STORE(0)
  FAST_ATTN_TILE_ROW_STORE(1)
  FAST_ATTN_TILE_ROW_STORE(2)
  FAST_ATTN_TILE_ROW_STORE(3)
  FAST_ATTN_TILE_ROW_STORE(4)
  FAST_ATTN_TILE_ROW_STORE(5)
#undef FAST_ATTN_TILE_ROW_DECLARE
#undef FAST_ATTN_TILE_ROW_FMA
#undef FAST_ATTN_TILE_ROW_STORE
}

template <class V, bool kAColumnMajor, class Operand, class Result>
struct GemmTiles {
  using Fn = void (*)(int64_t, const Operand*, int64_t, const Operand*, int64_t, Result*, int64_t, int, bool);

  template <int MR, bool kMaskLast>
  static constexpr Fn at(int nv) {
    return nv == 1   ? &gemm_tile<V, MR, 1, kMaskLast, kAColumnMajor, Operand, Result>
           : nv == 2 ? &gemm_tile<V, MR, 2, kMaskLast, kAColumnMajor, Operand, Result>
           : nv == 3 ? &gemm_tile<V, MR, 3, kMaskLast, kAColumnMajor, Operand, Result>
                     : &gemm_tile<V, MR, 4, kMaskLast, kAColumnMajor, Operand, Result>;
  }

  template <bool kMaskLast>
  static Fn select(int mr, int nv) {
    switch (mr) {
      case 1: return at<1, kMaskLast>(nv);
      case 2: return at<2, kMaskLast>(nv);
      case 3: return at<3, kMaskLast>(nv);
      case 4: return at<4, kMaskLast>(nv);
      case 5: return at<5, kMaskLast>(nv);
      default: return at<6, kMaskLast>(nv);
    }
  }

  // The tile for mr rows and nv vectors, the last with last_lanes valid columns.
  static Fn select(int mr, int nv, int last_lanes) {
    return last_lanes == V::kWidth ? select<false>(mr, nv) : select<true>(mr, nv);
  }
};

// A product of one row (a decoding step's query): NV <= kRowVectors vectors of the C row at once.
// gemm_tile's one-row tile would keep only kTileVectors FMA chains (2 with AVX2), each step waiting
// on the last one's latency; kRowVectors chains fill the FMA pipelines. Every element of C sees the
// FMAs of gemm_tile in the same order, so the result is the same to the bit.
constexpr int kRowVectors = 8;

template <class V, int NV, bool kMaskLast, bool kAColumnMajor, class Operand, class Result>
void gemm_row_chunk(int64_t kdim, const Operand* a, int64_t lda, const Operand* b, int64_t ldb, Result* c,
                    int last_lanes, bool accumulate) {
  static_assert(NV >= 1 && NV <= kRowVectors, "row chunk shape");
  constexpr int W = V::kWidth;
  using Reg = typename V::Reg;
  const typename V::Mask last = V::first_lanes(last_lanes);
  auto load = [&](const auto* row, int v) {
    return kMaskLast && v == NV - 1 ? V::reg_load_masked(row + v * W, last) : V::reg_load(row + v * W);
  };
  auto store = [&](Reg x, int v) {
    if (accumulate) x = V::reg_add(x, load(c, v));
    if (kMaskLast && v == NV - 1) {
      V::reg_store_masked(c + v * W, last, x);
    } else {
      V::reg_store(c + v * W, x);
    }
  };
  // Named accumulators, as in gemm_tile: as an array, GCC stores all of them on every k step.
  Reg c0 = V::reg_zero(), c1 = V::reg_zero(), c2 = V::reg_zero(), c3 = V::reg_zero();
  Reg c4 = V::reg_zero(), c5 = V::reg_zero(), c6 = V::reg_zero(), c7 = V::reg_zero();
  for (int64_t k = 0; k < kdim; ++k) {
    const auto ak = V::reg_broadcast(kAColumnMajor ? a[k * lda] : a[k]);
    const Operand* b_row = b + k * ldb;
    c0 = V::reg_fma(ak, load(b_row, 0), c0);
    if constexpr (NV > 1) c1 = V::reg_fma(ak, load(b_row, 1), c1);
    if constexpr (NV > 2) c2 = V::reg_fma(ak, load(b_row, 2), c2);
    if constexpr (NV > 3) c3 = V::reg_fma(ak, load(b_row, 3), c3);
    if constexpr (NV > 4) c4 = V::reg_fma(ak, load(b_row, 4), c4);
    if constexpr (NV > 5) c5 = V::reg_fma(ak, load(b_row, 5), c5);
    if constexpr (NV > 6) c6 = V::reg_fma(ak, load(b_row, 6), c6);
    if constexpr (NV > 7) c7 = V::reg_fma(ak, load(b_row, 7), c7);
  }
  store(c0, 0);
  if constexpr (NV > 1) store(c1, 1);
  if constexpr (NV > 2) store(c2, 2);
  if constexpr (NV > 3) store(c3, 3);
  if constexpr (NV > 4) store(c4, 4);
  if constexpr (NV > 5) store(c5, 5);
  if constexpr (NV > 6) store(c6, 6);
  if constexpr (NV > 7) store(c7, 7);
}

// gemm_row_chunk for NV + 1 = 1 .. kRowVectors vectors, at index NV.
template <class V, bool kMaskLast, bool kAColumnMajor, class Operand, class Result, int... NV>
constexpr auto row_chunks(std::integer_sequence<int, NV...>) {
  using Fn = void (*)(int64_t, const Operand*, int64_t, const Operand*, int64_t, Result*, int, bool);
  return std::array<Fn, sizeof...(NV)>{&gemm_row_chunk<V, NV + 1, kMaskLast, kAColumnMajor, Operand, Result>...};
}

// C (1 x cols) (+)= A (1 x kdim) * B (kdim x cols), in chunks of kRowVectors vectors.
template <class V, bool kAColumnMajor, class Operand, class Result>
void gemm_row(int64_t cols, int64_t kdim, const Operand* a, int64_t lda, const Operand* b, int64_t ldb, Result* c,
              bool accumulate) {
  constexpr int W = V::kWidth;
  constexpr int64_t kChunk = kRowVectors * W;
  constexpr auto kCounts = std::make_integer_sequence<int, kRowVectors>();
  constexpr auto kWhole = row_chunks<V, false, kAColumnMajor, Operand, Result>(kCounts);
  constexpr auto kMasked = row_chunks<V, true, kAColumnMajor, Operand, Result>(kCounts);
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int64_t chunk = std::min(kChunk, cols - c0);
    const int nv = static_cast<int>((chunk + W - 1) / W);
    const int last_lanes = static_cast<int>(chunk - (nv - 1) * W);
    const auto& chunks = last_lanes < W ? kMasked : kWhole;
    chunks[nv - 1](kdim, a, lda, b + c0, ldb, c + c0, last_lanes, accumulate);
  }
}

// C (rows x cols) (+)= A (rows x kdim) * B (kdim x cols), with V's arithmetic on
// A and B elements of type Operand and C of type Result. Column panels of 64
// outer, so one B panel (kdim x 64) stays in cache across all row tiles.
template <class V, bool kAColumnMajor, class Operand, class Result>
void gemm(int64_t rows, int64_t cols, int64_t kdim, const Operand* a, int64_t lda, const Operand* b, int64_t ldb,
          Result* c, int64_t ldc, bool accumulate) {
  if (rows == 1) return gemm_row<V, kAColumnMajor>(cols, kdim, a, lda, b, ldb, c, accumulate);
  constexpr int W = V::kWidth;
  constexpr int64_t kPanel = V::kTileVectors * W;
  for (int64_t c0 = 0; c0 < cols; c0 += kPanel) {
    const int64_t panel = std::min(kPanel, cols - c0);
    const int nv = static_cast<int>((panel + W - 1) / W);
    const int last_lanes = static_cast<int>(panel - (nv - 1) * W);
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, rows - r0));
      const Operand* a_tile = kAColumnMajor ? a + r0 : a + r0 * lda;
      const auto tile = GemmTiles<V, kAColumnMajor, Operand, Result>::select(mr, nv, last_lanes);
      tile(kdim, a_tile, lda, b + c0, ldb, c + r0 * ldc + c0, ldc, last_lanes, accumulate);
    }
  }
}

}  // namespace
}  // namespace fast_attn::cpu
