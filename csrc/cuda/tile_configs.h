// Tile shapes of the CUDA kernels, one set per compiled head dim. Plain C++:
// the host launcher sizes the dbias schedule from them, the kernels derive
// every loop bound from them.
//
// The backward kernels give each warp 16 rows of the MMA M dimension (one m16
// tile); the forward may give it two (warp_m_tiles), so that every K/V fragment
// read from shared memory feeds two MMAs. Why these sizes
// (to be re-tuned on the H100 by measurement):
// - forward: 8 warps = 128 query rows per CTA so that each K/V tile fetched
//   from L2 serves 128 rows (with 64 rows, K/V re-reads at S = 16k need about
//   6 TB/s of L2 bandwidth at 400 TFLOP/s; with 128 rows half of that).
//   Q fragments stay in registers for D <= 128 (32 registers at D = 128);
//   at D = 256 they would take 64 and are re-read from shared memory instead.
// - dK/dV: each warp owns 16 keys of the CTA's key block and keeps their dK and
//   dV in registers (2 * D / 2 floats per thread at 16 x D per warp); at D = 256
//   that is 256 registers, so two warps share 16 keys and each keeps half of
//   the head dim (split_head_dim = 2), both computing the 16 x block_m scores.
// - dQ (deterministic mode): like the forward, warps own query rows.
//
// Tuning: benchmarks/cuda_tile_sweep.py writes csrc/cuda/tile_overrides.h (never
// committed, see .gitignore) defining forward_tile_override and dkdv_tile_override,
// builds, measures and deletes it. An override with warps == 0 means "none"; the
// dK/dV override replaces the tiles of every path.
#pragma once

namespace fast_attn::cuda {

struct ForwardTileConfig {
  int block_m;  // query rows per CTA = 16 * warp_m_tiles * warps
  int block_n;  // keys per K/V tile
  int warps;
  int min_blocks_per_sm;
  bool q_in_registers;
  int warp_m_tiles;  // m16 tiles of query rows per warp (1 or 2)
};

struct DkdvTileConfig {
  int block_n;         // keys per CTA = 16 * warps / split_head_dim
  int block_m;         // query rows per step of the loop over queries (one barrier, one prefetch)
  int chunk_m;         // query rows whose S^T, dP^T are live at once within a step
  int warps;
  int split_head_dim;  // warps sharing 16 keys, each owning head_dim / split columns of dK, dV
  int min_blocks_per_sm;
  bool kv_in_registers;  // K and V fragments of the warp's keys held in registers for the whole loop
};

struct DbiasTileConfig {
  int block_m;  // query rows per CTA = 16 * warps
  int block_n;  // keys per CTA
  int warps;
};

struct DqTileConfig {
  int block_m;  // query rows per CTA = 16 * warps
  int block_n;  // keys per K/V tile
  int warps;
  bool q_do_in_registers;  // Q and dO fragments of the warp's rows held in registers
};

}  // namespace fast_attn::cuda

#if __has_include("tile_overrides.h")
#include "tile_overrides.h"
#define FAST_ATTN_TILE_OVERRIDES 1
#endif

namespace fast_attn::cuda {

constexpr ForwardTileConfig forward_tile_config(int head_dim) {
#ifdef FAST_ATTN_TILE_OVERRIDES
  if (forward_tile_override(head_dim).warps != 0) {
    return forward_tile_override(head_dim);
  }
#endif
  switch (head_dim) {
    case 32: return {128, 128, 8, 1, true, 1};
    case 64: return {128, 128, 8, 1, true, 1};
    case 96: return {128, 64, 8, 1, true, 1};
    case 128: return {128, 64, 8, 1, true, 1};
    case 256: return {128, 32, 8, 1, false, 1};
    default: return {0, 0, 0, 0, false, 0};
  }
}

// chunk_m bounds the registers: a warp holds dK and dV (16 x D / split each,
// D / split / 4 floats per thread) plus S^T and dP^T of one chunk (chunk_m / 4
// floats each). The kGeneral and kModifiers kernels (kernel_api.h) take these
// tiles: with masks, bias and dropout compiled in, a chunk of 32 spills at D = 128
// (255 registers); 16 does not.
constexpr DkdvTileConfig dkdv_tile_config(int head_dim) {
#ifdef FAST_ATTN_TILE_OVERRIDES
  if (dkdv_tile_override(head_dim).warps != 0) {
    return dkdv_tile_override(head_dim);
  }
#endif
  switch (head_dim) {
    case 32: return {128, 64, 32, 8, 1, 1, true};
    case 64: return {128, 64, 16, 8, 1, 1, true};
    case 96: return {128, 64, 16, 8, 1, 1, false};
    case 128: return {128, 64, 16, 8, 1, 1, false};
    case 256: return {64, 32, 16, 8, 2, 1, false};
    default: return {0, 0, 0, 0, 0, 0, false};
  }
}

// The kFast and kCausal kernels, which have no bias, dropout or modifier code: a chunk of 32
// queries at D <= 128 (spill-free, 255 registers at most), so that each chunk's fixed costs
// (addresses, loop control, the K and V fragments re-read at D >= 96) are spread over 64
// (D = 64) or 128 (D = 128) MMAs instead of half that, and S^T, dP^T have 8 independent
// accumulators each instead of 4. At D = 256 the general path's tiles. The key blocks are the
// general path's: the host sizes the dbias schedule from dkdv_tile_config, these kernels
// take no bias.
constexpr DkdvTileConfig dkdv_specialized_tile_config(int head_dim) {
#ifdef FAST_ATTN_TILE_OVERRIDES
  if (dkdv_tile_override(head_dim).warps != 0) {
    return dkdv_tile_override(head_dim);
  }
#endif
  switch (head_dim) {
    case 32: return {128, 64, 32, 8, 1, 1, true};
    case 64: return {128, 64, 32, 8, 1, 1, true};
    case 96: return {128, 64, 32, 8, 1, 1, false};
    case 128: return {128, 64, 32, 8, 1, 1, false};
    case 256: return {64, 32, 16, 8, 2, 1, false};
    default: return {0, 0, 0, 0, 0, 0, false};
  }
}

constexpr DqTileConfig dq_tile_config(int head_dim) {
  switch (head_dim) {
    case 32: return {128, 64, 8, true};
    case 64: return {128, 64, 8, true};
    case 96: return {128, 32, 8, false};
    case 128: return {128, 32, 8, false};
    case 256: return {64, 16, 4, false};
    default: return {0, 0, 0, false};
  }
}

// Two stages of Q, dO (block_m rows each), K and V (block_n rows each) must fit
// the 163 KiB an A100 gives a CTA: 139 KiB at D = 128, 135 KiB at D = 256.
// A warp holds three 16 x block_n float tiles (the sums, S and dP) and the bias
// tile. Not yet tuned on a GPU.
constexpr DbiasTileConfig dbias_tile_config(int head_dim) {
  switch (head_dim) {
    case 32: return {128, 64, 8};
    case 64: return {128, 64, 8};
    case 96: return {64, 64, 4};
    case 128: return {64, 64, 4};
    case 256: return {32, 32, 2};
    default: return {0, 0, 0};
  }
}

}  // namespace fast_attn::cuda
