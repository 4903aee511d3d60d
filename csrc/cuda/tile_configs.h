// Tile shapes of the CUDA kernels, one set per compiled head dim. Plain C++:
// the host launcher sizes the dbias schedule from them, the kernels derive
// every loop bound from them.
//
// The backward kernels give each warp 16 rows of the MMA M dimension (one m16
// tile); the forward may give it two (warp_m_tiles), so that every K/V fragment
// read from shared memory feeds two MMAs. Why these sizes (none measured on a GPU
// yet; csrc/cuda/PTXAS_REPORT.md gives the registers, shared memory, CTAs per SM
// and main-loop SASS that follow from them):
// - forward, kFast and kCausal kernels (forward_tile_config), FlashAttention-2's
//   layout: 4 warps x 32 query rows (two m16 tiles each) = 128 rows per CTA.
//   128 rows: each K/V tile fetched from L2 serves 128 rows (with 64, K/V
//   re-reads at S = 16k need about 6 TB/s of L2 bandwidth at 400 TFLOP/s).
//   32 rows per warp: each K or V fragment read from shared memory feeds two
//   MMAs (with 16, 256 bytes read per MMA made the loop shared-memory bound).
//   4 warps at <= 255 registers and <= 81 KiB of shared memory: two CTAs per SM
//   on sm_80 (164 KiB) and sm_90, each with its own barrier, so that one CTA's
//   softmax overlaps the other's MMAs. The key tile is the widest whose S
//   (2 x block_n / 2 floats per thread) fits beside O (2 x D / 2) without spills:
//   D 32, 64: 64 keys, Q in registers (128 keys spill 64-96 bytes);
//   D 96: 64 keys, Q re-read from shared memory (in registers it would take
//   48 of them);
//   D 128: 48 keys, Q re-read from shared memory, K/V single-buffered (two stages
//   of 48 keys would take 87040 bytes, one CTA per SM on sm_80; ForwardTraits::
//   kKvStages): FlashAttention-2's pipeline, two barriers per tile. 64 keys spill
//   8-92 bytes even so (FlashAttention-2's 128 x 64 spills too); 32 keys, double-
//   buffered, pay the O rescale (128 FMUL per thread) per 128 MMAs instead of 192:
//   1.37x FlashAttention-2's SASS per MMA in the unmasked loop, 48 keys 1.09-1.10x.
//   D 256 takes the general kernels' tile: O alone would be 2 x 128 floats per thread.
// - forward, kGeneral and kModifiers kernels (forward_general_tile_config):
//   8 warps x 16 rows, one CTA per SM. Their loops carry the bias, mask, dropout
//   and modifier code, with which two m16 tiles per warp spill (kModifiers on
//   sm_80: 104 bytes at D 64 with Q in shared memory, 16 bytes at D 128).
//   Q fragments stay in registers for D <= 128 (32 registers at D = 128);
//   at D = 256 they would take 64 and are re-read from shared memory instead.
// - dK/dV: each warp owns 16 keys of the CTA's key block and keeps their dK and
//   dV in registers (2 * D / 2 floats per thread at 16 x D per warp); at D = 256
//   that is 256 registers, so two warps share 16 keys and each keeps half of
//   the head dim (split_head_dim = 2), both computing the 16 x block_m scores.
//
// Tuning: benchmarks/cuda_tile_sweep.py writes csrc/cuda/tile_overrides.h (never
// committed, see .gitignore) defining forward_tile_override and dkdv_tile_override,
// builds, measures and deletes it. An override with warps == 0 means "none"; a
// forward override replaces the tile of every forward kernel, the dK/dV override
// the tiles of every path of the chunked dK/dV kernel, which then runs the paths of
// the staged one too (dkdv_staged_tile_config).
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

// The staged dK/dV kernel (backward_dkdv_kernel.cuh): three products per step, each with its own
// warp grid over the CTA's tiles, P^T and dS^T passing between them through shared memory.
struct DkdvStagedTileConfig {
  int block_n;          // keys per CTA
  int block_m;          // query rows per step
  int warps;
  int score_key_warps;  // S^T, dP^T (keys x queries): warps along the keys, the rest along the queries
  int dkdv_key_warps;   // dK, dV (keys x head dim): warps along the keys, the rest along the head dim
  int dq_query_warps;   // dQ (queries x head dim): warps along the queries, the rest along the head dim
};

struct DbiasTileConfig {
  int block_m;  // query rows per CTA = 16 * warps
  int block_n;  // keys per CTA
  int warps;
};

}  // namespace fast_attn::cuda

#if __has_include("tile_overrides.h")
#include "tile_overrides.h"
#else
namespace fast_attn::cuda {
// No sweep is building: no tile is overridden.
constexpr ForwardTileConfig forward_tile_override(int) { return {}; }
constexpr DkdvTileConfig dkdv_tile_override(int) { return {}; }
}  // namespace fast_attn::cuda
#endif

namespace fast_attn::cuda {

// The forward tile of the kGeneral and kModifiers kernels.
constexpr ForwardTileConfig forward_general_tile_config(int head_dim) {
  if (forward_tile_override(head_dim).warps != 0) return forward_tile_override(head_dim);
  switch (head_dim) {
    case 32: return {128, 128, 8, 1, true, 1};
    case 64: return {128, 128, 8, 1, true, 1};
    case 96: return {128, 64, 8, 1, true, 1};
    case 128: return {128, 64, 8, 1, true, 1};
    case 256: return {128, 32, 8, 1, false, 1};
    default: return {0, 0, 0, 0, false, 0};
  }
}

// The forward tile of the kFast and kCausal kernels (kernel_api.h).
constexpr ForwardTileConfig forward_tile_config(int head_dim) {
  if (forward_tile_override(head_dim).warps != 0) return forward_tile_override(head_dim);
  switch (head_dim) {
    case 32: return {128, 64, 4, 2, true, 2};
    case 64: return {128, 64, 4, 2, true, 2};
    case 96: return {128, 64, 4, 2, false, 2};
    case 128: return {128, 48, 4, 2, false, 2};
    case 256: return forward_general_tile_config(head_dim);
    default: return {0, 0, 0, 0, false, 0};
  }
}

// chunk_m bounds the registers: a warp holds dK and dV (16 x D / split each,
// D / split / 4 floats per thread) plus S^T and dP^T of one chunk (chunk_m / 4
// floats each). The kGeneral and kModifiers kernels (kernel_api.h) take these
// tiles: with masks, bias and dropout compiled in, a chunk of 32 spills at D = 128
// (255 registers); 16 does not. So do the kFast and kCausal kernels at the head dims
// without a staged tile (dkdv_staged below: D 256).
constexpr DkdvTileConfig dkdv_tile_config(int head_dim) {
  if (dkdv_tile_override(head_dim).warps != 0) return dkdv_tile_override(head_dim);
  switch (head_dim) {
    case 32: return {128, 64, 32, 8, 1, 1, true};
    case 64: return {128, 64, 16, 8, 1, 1, true};
    case 96: return {128, 64, 16, 8, 1, 1, false};
    case 128: return {128, 64, 16, 8, 1, 1, false};
    case 256: return {64, 32, 16, 8, 2, 1, false};
    default: return {0, 0, 0, 0, 0, 0, false};
  }
}

// The kFast and kCausal dK/dV kernels at D 32, 64, 96 and 128 (dkdv_staged): FlashAttention-2's
// backward dataflow. 8 warps, 128 keys per CTA (K and V stay in shared memory for the whole
// loop over queries), 128 (D 64) or 64 (D 128) queries per step, so that every step does
// 5 x 512 MMAs (m16n8k16) per CTA, 320 per warp:
// - S^T = K Q^T and dP^T = V dO^T on a 4 x 2 warp grid (keys x queries): 32 keys x 64 queries
//   (D 64) or 32 x 32 (D 128) per warp, 16 or 8 independent accumulators (m16n8) for each
//   product, each K / V fragment read feeding 8 or 4 MMAs and each Q / dO fragment 4. Of
//   the grids of 8 warps, 4 x 2 reads the fewest fragments (48 (D 64) and 64 (D 128) ldmatrix
//   per warp per step; 8 x 1 and 2 x 4 read 80 at D 128).
// - P^T and dS^T (16-bit) to shared memory; dV += P^T dO and dK += dS^T Q on a 4 x 2 grid
//   (keys x head dim): 32 keys x 32 (D 64) or 64 (D 128) columns per warp, dK and dV held
//   in registers across the loop (64 or 128 floats per thread).
// - dQ = dS K on a 4 x 2 (D 64) or 2 x 4 (D 128) grid (queries x head dim): 32 x 32 per warp.
// Per warp per step: 144 ldmatrix for 320 MMAs at both head dims (FlashAttention-2's count).
// Shared memory: K, V, P^T, dS^T, Q in two stages, dO in one (its next step's copy starts
// after the step's dV, a third barrier): 159744 bytes at D 128, 163840 at D 64 (a second dO
// stage would take 177152 and 182272, over the 166912 an A100 gives a CTA). One CTA per SM.
// D 32 takes D 64's tile; D 96 D 128's steps of 64 queries with dQ on a 4 x 2 grid (16 x 48 per
// warp: 2 x 4 would give 24 columns, no whole n16 pair). 160 and 240 MMAs per warp per step, no
// spills; per MMA of a whole unmasked step (sm_80, bf16) 6.8 and 4.0 instructions and 0.60 and
// 0.50 ldmatrix, where the chunked kernel they replace took 7.7 and 4.5 and 0.65 and 0.63.
// D 256 keeps the chunked kernel (warps == 0 here): its dK and dV alone would take 256 floats
// per thread.
// A dK/dV override (the tile sweep) turns it off: the chunked kernel then runs every path with the
// override's tile, so that the sweep times the two dataflows against each other.
constexpr DkdvStagedTileConfig dkdv_staged_tile_config(int head_dim) {
  if (dkdv_tile_override(head_dim).warps != 0) return {0, 0, 0, 0, 0, 0};
  switch (head_dim) {
    case 32: return {128, 128, 8, 4, 4, 4};
    case 64: return {128, 128, 8, 4, 4, 4};
    case 96: return {128, 64, 8, 4, 4, 4};
    case 128: return {128, 64, 8, 4, 4, 2};
    default: return {0, 0, 0, 0, 0, 0};
  }
}
constexpr bool dkdv_staged(int head_dim) { return dkdv_staged_tile_config(head_dim).warps != 0; }

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
