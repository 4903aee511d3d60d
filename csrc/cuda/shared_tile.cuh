// Shared-memory tiles and the tensor-core operand loads from them.
//
// Layout: row-major with a padded pitch of kCols + 8 elements (16 extra bytes
// per row). kCols is a multiple of 16, so the pitch is an odd number of
// 16-byte units: the 8 row addresses of one ldmatrix 8x8 matrix (same 16-byte
// column, 8 consecutive rows) then fall on 8 distinct 16-byte bank groups, and
// every ldmatrix phase is free of bank conflicts for every head dim (32..256)
// without an XOR swizzle. (cp.async writes of a D = 32 tile, 4 chunks per row,
// have one 2-way conflict per 8-thread phase; the other dims have none.)
//
// Operand loads (one warp, m16n8k16, per PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type"): with g = lane / 4, t = lane % 4,
//   A (16x16, row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B (16x8, col):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C (16x8, f32):  c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
#pragma once

#include "device_runtime.cuh"

namespace fast_attn::cuda {

template <int kRows, int kCols>
struct SharedTile {
  static_assert(kCols % 16 == 0, "tile columns must be a multiple of 16 (odd 16-byte pitch)");
  static_assert(kRows % 16 == 0, "tile rows must be a multiple of 16");
  static constexpr int kPitch = kCols + 8;  // elements
  static constexpr int kElements = kRows * kPitch;

  static FA_DEVICE constexpr int offset(int row, int col) { return row * kPitch + col; }
};

// Copies rows [0, kRows) x columns [0, kCols) of a row-major global tile into
// shared memory with cp.async, 16 bytes per copy. Rows >= valid_rows and
// columns >= valid_cols (a multiple of 8) are zero-filled without being read:
// padded head dims and rows past the sequence end contribute exact zeros (and
// never NaN) to every product. `fallback` is any readable address, handed to
// the zero-filling copies. The caller commits the group.
//
// Thread t copies column chunk t % kSlots of rows t / kSlots + p * kRowsPerPass
// (kSlots: chunks per row rounded up to a power of two; slots past the row
// copy nothing): one source pointer advanced by a fixed stride, so that no
// per-pass address stays live in registers across the caller's loops.
template <int kRows, int kCols, int kThreads, typename Element>
FA_DEVICE void load_tile_async(Element* smem, const Element* gmem, int64_t row_stride, int64_t valid_rows,
                               int valid_cols, const Element* fallback) {
  using Tile = SharedTile<kRows, kCols>;
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kSlots = kChunksPerRow <= 4 ? 4 : kChunksPerRow <= 8 ? 8 : kChunksPerRow <= 16 ? 16 : 32;
  static_assert(kChunksPerRow <= 32 && kThreads % kSlots == 0, "whole rows per pass");
  constexpr int kRowsPerPass = kThreads / kSlots;
  constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  const int row = static_cast<int>(threadIdx.x) / kSlots;
  const int chunk = static_cast<int>(threadIdx.x) % kSlots;
  if (kSlots != kChunksPerRow && chunk >= kChunksPerRow) {
    return;
  }
  const int col = chunk * 8;
  const bool col_valid = col < valid_cols;
  const Element* src = gmem + row * row_stride + col;
  Element* dst = smem + Tile::offset(row, col);
  FA_UNROLL
  for (int p = 0; p < kPasses; ++p) {
    if (kRows % kRowsPerPass == 0 || row + p * kRowsPerPass < kRows) {
      const bool valid = col_valid && row + p * kRowsPerPass < valid_rows;
      cp_async_16(dst + p * kRowsPerPass * Tile::kPitch, valid ? src : fallback, valid);
    }
    src += kRowsPerPass * row_stride;
  }
}

// load_tile_async of a tile whose kRows rows all exist (valid_rows >= kRows): no bound per row,
// so each pass is one pointer step and the copy. A chunk past valid_cols is zero-filled; its
// thread's address is then its row's first element, which exists.
template <int kRows, int kCols, int kThreads, typename Element>
FA_DEVICE void load_full_tile_async(Element* smem, const Element* gmem, int64_t row_stride, int valid_cols) {
  using Tile = SharedTile<kRows, kCols>;
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kSlots = kChunksPerRow <= 4 ? 4 : kChunksPerRow <= 8 ? 8 : kChunksPerRow <= 16 ? 16 : 32;
  static_assert(kChunksPerRow <= 32 && kThreads % kSlots == 0, "whole rows per pass");
  constexpr int kRowsPerPass = kThreads / kSlots;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const int row = static_cast<int>(threadIdx.x / kSlots);  // unsigned division: no sign to carry
  const int chunk = static_cast<int>(threadIdx.x % kSlots);
  if (kSlots != kChunksPerRow && chunk >= kChunksPerRow) {
    return;
  }
  const int col = chunk * 8;
  const bool valid = col < valid_cols;
  const Element* src = gmem + row * row_stride + (valid ? col : 0);
  Element* dst = smem + Tile::offset(row, col);
  FA_UNROLL
  for (int p = 0; p < kRows / kRowsPerPass; ++p) {
    cp_async_16(dst + p * kRowsPerPass * Tile::kPitch, src, valid);
    src += kRowsPerPass * row_stride;
  }
}

// Copies n floats (a per-row vector such as lse or delta) into shared memory
// with 4-byte cp.async; entries >= valid are zero-filled.
template <int kCount, int kThreads>
FA_DEVICE void load_vector_async(float* smem, const float* gmem, int64_t valid, const float* fallback) {
  static_assert(kCount <= kThreads, "one element per thread");
  const int i = static_cast<int>(threadIdx.x);
  if (i < kCount) {
    const bool fill = i < valid;
    cp_async_4(smem + i, fill ? gmem + i : fallback, fill);
  }
}

// A operand, A[r][c] = tile[row0 + r][col0 + c] (tile stored row-major along k).
// Matrix i of ldmatrix.x4 is register a[i]: rows row0 + 8 (i & 1), columns col0 + 8 (i >> 1).
template <typename Tile, typename Element>
FA_DEVICE void load_a_operand(uint32_t (&a)[4], const Element* tile, int row0, int col0, int lane) {
  const int matrix = lane / 8;
  const int row = row0 + (matrix & 1) * 8 + lane % 8;
  const int col = col0 + (matrix >> 1) * 8;
  ldmatrix_x4(a, tile + Tile::offset(row, col));
}

// A operand of a transposed tile, A[r][c] = tile[row0 + c][col0 + r].
// Register a[i] covers A rows 8 (i & 1), A columns 8 (i >> 1): stored rows
// row0 + 8 (i >> 1), stored columns col0 + 8 (i & 1), read transposed.
template <typename Tile, typename Element>
FA_DEVICE void load_a_operand_transposed(uint32_t (&a)[4], const Element* tile, int row0, int col0, int lane) {
  const int matrix = lane / 8;
  const int row = row0 + (matrix >> 1) * 8 + lane % 8;
  const int col = col0 + (matrix & 1) * 8;
  ldmatrix_x4_trans(a, tile + Tile::offset(row, col));
}

// B operands of two adjacent n8 tiles from a tile stored with n along rows and
// k along columns: B[k][n] = tile[n0 + n][k0 + k] (K of S = Q K^T).
// b[0], b[1]: n tile n0; b[2], b[3]: n tile n0 + 8.
// Matrix i: stored rows n0 + 8 (i >> 1), stored columns k0 + 8 (i & 1).
template <typename Tile, typename Element>
FA_DEVICE void load_b_operands_n_major(uint32_t (&b)[4], const Element* tile, int n0, int k0, int lane) {
  const int matrix = lane / 8;
  const int row = n0 + (matrix >> 1) * 8 + lane % 8;
  const int col = k0 + (matrix & 1) * 8;
  ldmatrix_x4(b, tile + Tile::offset(row, col));
}

// B operands of two adjacent n8 tiles from a tile stored with k along rows and
// n along columns: B[k][n] = tile[k0 + k][n0 + n] (V of O = P V), read transposed.
// b[0], b[1]: n tile n0; b[2], b[3]: n tile n0 + 8.
// Matrix i: stored rows k0 + 8 (i & 1), stored columns n0 + 8 (i >> 1).
template <typename Tile, typename Element>
FA_DEVICE void load_b_operands_k_major(uint32_t (&b)[4], const Element* tile, int k0, int n0, int lane) {
  const int matrix = lane / 8;
  const int row = k0 + (matrix & 1) * 8 + lane % 8;
  const int col = n0 + (matrix >> 1) * 8;
  ldmatrix_x4_trans(b, tile + Tile::offset(row, col));
}

// The four loads above from a lane's pointer into the tile (the *_at forms): lane_tile = tile +
// lane_offset_rows_low<Tile>(lane) for load_a_operand_at and load_b_operands_k_major_at (matrix i
// at stored rows 8 (i & 1) + lane % 8, stored columns 8 (i >> 1)), tile +
// lane_offset_rows_high<Tile>(lane) for load_a_operand_transposed_at and load_b_operands_n_major_at
// (stored rows 8 (i >> 1) + lane % 8, stored columns 8 (i & 1)). A loop that reads many fragments
// of one tile computes the lane's pointer once and adds a constant per fragment (the staged dK/dV
// kernel). The loads above keep their own address arithmetic: written as these, they made ptxas
// spill in the forward (D 96, sm_90a) and dK/dV (D 128, 256) kernels.
template <typename Tile>
FA_DEVICE int lane_offset_rows_low(int lane) {
  const int matrix = lane / 8;
  return Tile::offset((matrix & 1) * 8 + lane % 8, (matrix >> 1) * 8);
}
template <typename Tile>
FA_DEVICE int lane_offset_rows_high(int lane) {
  const int matrix = lane / 8;
  return Tile::offset((matrix >> 1) * 8 + lane % 8, (matrix & 1) * 8);
}

template <typename Tile, typename Element>
FA_DEVICE void load_a_operand_at(uint32_t (&a)[4], const Element* lane_tile, int row0, int col0) {
  ldmatrix_x4(a, lane_tile + Tile::offset(row0, col0));
}

template <typename Tile, typename Element>
FA_DEVICE void load_a_operand_transposed_at(uint32_t (&a)[4], const Element* lane_tile, int row0, int col0) {
  ldmatrix_x4_trans(a, lane_tile + Tile::offset(row0, col0));
}

template <typename Tile, typename Element>
FA_DEVICE void load_b_operands_n_major_at(uint32_t (&b)[4], const Element* lane_tile, int n0, int k0) {
  ldmatrix_x4(b, lane_tile + Tile::offset(n0, k0));
}

template <typename Tile, typename Element>
FA_DEVICE void load_b_operands_k_major_at(uint32_t (&b)[4], const Element* lane_tile, int k0, int n0) {
  ldmatrix_x4_trans(b, lane_tile + Tile::offset(k0, n0));
}

// The A operand for k step kk of a product whose left factor is held as C
// accumulators acc[n8 tile][4] (16 rows x 8 columns each): columns 16 kk .. 16 kk + 15
// are n8 tiles 2 kk and 2 kk + 1, and the C layout of a pair of n8 tiles is the A layout.
template <typename Element, int kTiles>
FA_DEVICE void accumulators_to_a_operand(uint32_t (&a)[4], const float (&acc)[kTiles][4], int kk) {
  a[0] = ElementOps<Element>::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = ElementOps<Element>::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = ElementOps<Element>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = ElementOps<Element>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[mt][2 n], acc[mt][2 n + 1] += A of m16 tile mt times the n8 pair b (from
// load_b_operands_*), for every m16 tile: one B fragment read serves them all.
template <typename Element, int kMTiles, int kTiles>
FA_DEVICE void mma_pair_each_m_tile(float (&acc)[kMTiles][kTiles][4], const uint32_t (&a)[kMTiles][4],
                                    const uint32_t (&b)[4], int n) {
  FA_UNROLL
  for (int mt = 0; mt < kMTiles; ++mt) {
    mma_m16n8k16<Element>(acc[mt][2 * n], a[mt], b[0], b[1]);
    mma_m16n8k16<Element>(acc[mt][2 * n + 1], a[mt], b[2], b[3]);
  }
}

// f(j, e, row, col) for each element (j, e) of a warp's C accumulators acc[kTiles][4]
// (16 rows x 8 kTiles columns): row row0 + 8 (e / 2), column col0 + 8 j + e % 2, where
// row0 is the tile's first row + lane / 4 and col0 its first column + 2 (lane % 4).
template <int kTiles, typename F>
FA_DEVICE void for_each_accumulator(int row0, int col0, F&& f) {
  FA_UNROLL
  for (int j = 0; j < kTiles; ++j) {
    FA_UNROLL
    for (int e = 0; e < 4; ++e) {
      f(j, e, row0 + (e >> 1) * 8, col0 + j * 8 + (e & 1));
    }
  }
}

template <int kTiles>
FA_DEVICE void zero_accumulators(float (&acc)[kTiles][4]) {
  FA_UNROLL
  for (int j = 0; j < kTiles; ++j) {
    FA_UNROLL
    for (int e = 0; e < 4; ++e) {
      acc[j][e] = 0.0f;
    }
  }
}

// S = Q K^T and dP = dO V^T for one warp's 16 query rows against a K/V tile
// (kTiles n8 tiles of keys, stored with keys along rows): a_operands(kk, a_q,
// a_do) gives the warp's Q and dO fragments of k16 step kk of the head dim
// (from registers or shared memory). Each K and V fragment read feeds two MMAs.
template <typename KvTile, int kDimSteps, typename Element, int kTiles, typename AOperands>
FA_DEVICE void scores_and_dprobs(float (&acc_s)[kTiles][4], float (&acc_dp)[kTiles][4], AOperands a_operands,
                                 const Element* k_tile, const Element* v_tile, int lane) {
  zero_accumulators(acc_s);
  zero_accumulators(acc_dp);
  FA_UNROLL
  for (int kk = 0; kk < kDimSteps; ++kk) {
    uint32_t a_q[4];
    uint32_t a_do[4];
    a_operands(kk, a_q, a_do);
    FA_UNROLL
    for (int nn = 0; nn < kTiles / 2; ++nn) {
      uint32_t b[4];
      load_b_operands_n_major<KvTile>(b, k_tile, nn * 16, kk * 16, lane);
      mma_m16n8k16<Element>(acc_s[2 * nn], a_q, b[0], b[1]);
      mma_m16n8k16<Element>(acc_s[2 * nn + 1], a_q, b[2], b[3]);
      load_b_operands_n_major<KvTile>(b, v_tile, nn * 16, kk * 16, lane);
      mma_m16n8k16<Element>(acc_dp[2 * nn], a_do, b[0], b[1]);
      mma_m16n8k16<Element>(acc_dp[2 * nn + 1], a_do, b[2], b[3]);
    }
  }
}

// What the traits of the tensor-core kernels (forward, dK/dV, dbias) share: the
// element type, the head dim, the tile config that kConfigOf (tile_configs.h) gives it,
// with that config's query and key tile rows (kBlockM, kBlockN) and warps, and the
// fragment counts and shared-memory tiles that follow from them.
template <typename Element_, int kHeadDim_, auto kConfigOf>
struct MmaKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr decltype(kConfigOf(0)) kConfig = kConfigOf(kHeadDim);
  static constexpr int kBlockM = kConfig.block_m;
  static constexpr int kBlockN = kConfig.block_n;
  static constexpr int kWarps = kConfig.warps;
  static constexpr int kThreads = kWarps * kWarpSize;
  static_assert(kBlockN % 16 == 0, "key tiles are a whole number of k16 steps");

  static constexpr int kDimTiles = kHeadDim / 8;   // n8 tiles of the head dim (of O)
  static constexpr int kDimSteps = kHeadDim / 16;  // k16 steps of the head dim (of Q K^T, dO V^T)
  static constexpr int kKeyTiles = kBlockN / 8;    // n8 tiles of a key tile (of S)
  static constexpr int kKeySteps = kBlockN / 16;   // k16 steps of a key tile (of P V, dS K)

  using QTile = SharedTile<kBlockM, kHeadDim>;
  using KvTile = SharedTile<kBlockN, kHeadDim>;
};

}  // namespace fast_attn::cuda
