// Attention backward, the dK/dV kernels (and dq by float atomics, and dbias). Two kernels:
//
// - attention_backward_dkdv_staged_kernel: the kFast and kCausal paths at the head dims of
//   dkdv_staged (D 32, 64, 96 and 128, tile_configs.h), FlashAttention-2's dataflow. A CTA of 8
//   warps owns 128 keys (K and V stay in shared memory) and walks the query blocks of the GQA
//   group's query heads in steps of kBlockM queries (128 at D 32 and 64, 64 at D 96 and 128),
//   each a whole-CTA product on its own warp grid:
//     S^T  = K Q^T                    4 x 2 warps (keys x queries), 16 (D <= 64) or 8
//                                     independent m16n8 accumulators per warp
//     P^T  = exp2(S^T scale log2(e) - lse log2(e))  -> shared memory (16-bit)
//     dP^T = V dO^T                   as S^T
//     dS^T = P^T (dP^T - delta)       -> shared memory (16-bit)
//     dV  += P^T dO, dK += dS^T Q     4 x 2 warps (keys x head dim), P^T / dS^T read by ldmatrix,
//                                     dO / Q by ldmatrix.trans; dK, dV in registers across the loop
//     dq_accum += dS K                4 x 2 (D <= 96) or 2 x 4 (D 128) warps (queries x head dim),
//                                     dS by ldmatrix.trans from dS^T; float atomics into dq_accum's
//                                     blocked layout (DqAccumLayout, kernel_api.h): each warp
//                                     instruction adds 128 contiguous bytes (sm_80, scalar red) or
//                                     512 (sm_90, red.global.add.v4.f32), 8 instructions per warp
//                                     per step on sm_90 instead of 16 red.v2, 32 scalar on sm_80
//   Three barriers per step: Q, lse, delta are double-buffered, dO single-buffered (its next copy
//   starts after the step's dV). One loop serves the steps a mask reaches (keys past Sk, the
//   band's right edge) and the others, whose per-key limits leave every score unmasked.
// - attention_backward_dkdv_kernel: every other path and head dim, described below.
//
// Both take their units from the schedule (backward_schedule.h); a unit is one key block (kBlockN
// keys) of one (batch, kv head), and dK, dV of a kv head sum over its query heads inside one CTA:
// no atomics, deterministic.
//
// attention_backward_dkdv_kernel: each warp owns 16 keys
// of the block and keeps their dK, dV in registers (all head-dim columns, or
// half of them at D = 256 where two warps share 16 keys) while the CTA loops
// over the query heads of the GQA group and their query blocks (kBlockM rows
// per step). Within a step, chunks of kChunkM queries at a time:
//   S^T  = K Q^T, dP^T = V dO^T     (16 keys x kChunkM queries per warp)
//   P^T  = exp2(S^T - lse)          scores recomputed in log2 units with the forward's masks
//   dS^T = P^T (dP^T Z - delta)     Z = dropout keep / (1 - p), 1 without dropout
//   dbias partial sums += dS reduced over the bias's broadcast dims (a bias of
//                         full rows and columns has its own kernel instead)
//   dS^T *= 1 - t^2                   softcap's t = tanh(scale q.k / c) (kModifiers)
//   dV  += (P^T Z) dO,  dK += dS^T Q  (scale applied to dK once at the end)
//   dS^T -> shared memory
// then, per step, dq_accum += dS K (scaled when converted): by default with float atomics, each
// thread's two neighbouring columns in one red.global.add.v2.f32 on sm_90 in the kFast and kCausal
// kernels (the others keep scalar ones: the vector's register pair made ptxas spill kGeneral at
// D 128, 24 B on sm_90a). The (16 x kDqPartDim) dq tiles of the CTA's warps are disjoint, so each
// dq element a step updates has one thread of the CTA.
//
// kDeterministic (the op's deterministic=True; FlashAttention-2's per-split dQ): no atomics. The
// schedule (backward_schedule.h) makes every key block of a (batch, kv head) a unit of one owner,
// and the owner's num_splits CTAs take its key blocks n = s, s + num_splits, ... in that order
// (split s; with dbias the owner's other units too, key block fastest). dq_accum holds num_splits
// partial sums per dq row, (B, Hq, Sq, num_splits, D); split s's CTA alone writes partial s of
// the owner's rows (its query heads, all queries), with plain read-modify-writes after the same
// barrier as the atomics; the convert kernel sums a row's partials in split order. The split
// count (choose_dkdv_splits) fills the GPU with owners x splits CTAs and bounds dq_accum to
// 4 x max(B x Hq, num_SMs) x Sq x D bytes, never a partial per key block.
// Units whose band (causal, windows) reaches no query skip their steps and add nothing; packed
// sequences loop over their own key blocks only (those past the sequence's Sk are skipped); D 256's
// two warps per 16 keys write dq through the same disjoint tiles. The staged kernel's
// kDeterministic variants write their partial sums the same way, in the blocked layout: (B, Hq,
// query blocks, num_splits, block), float4 (sm_90) or float read-modify-writes at the atomics'
// places. It replaces the dQ kernel that recomputed S and dP per query block (7 matmuls of the
// step instead of 5). At D 128 and 256 these kernels spill 4-44 bytes around the step's dq
// code, none inside the chunk loop (INTENDED_LOCAL_MEMORY in tools/cuda_compile_check.py). Q, dO,
// lse and delta of the next step are prefetched with cp.async into the other of two stages while
// the current step computes.
//
// kPath (kernel_api.h): the kGeneral and kModifiers kernels decide per step at run time
// which elementwise code it needs; the kFast and kCausal kernels have no bias or dropout
// code, and mask (one compare per score against a per-key limit) only in the steps that
// keys past Sk or the band's right edge reach. Those steps run one chunk loop and the others
// a second one with no mask or lse test (kTwoLoops, D <= 96); at D 256 one loop serves both,
// the limit leaving every score of the unmasked steps unmasked. (At D 32 to 128 the kFast and
// kCausal problems run the staged kernel below; these kernels run them there only with a tile
// sweep's dK/dV override.)
#pragma once

#include <type_traits>

#include "backward_schedule.h"
#include "device_runtime.cuh"
#include "score_context.cuh"
#include "shared_tile.cuh"
#include "tile_configs.h"

namespace fast_attn::cuda {

constexpr int largest_divisor_at_most(int n, int limit) {
  int best = 1;
  for (int d = 1; d <= limit; ++d) {
    if (n % d == 0) {
      best = d;
    }
  }
  return best;
}

template <typename Element_, int kHeadDim_>
struct DkdvTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr DkdvTileConfig kConfig = dkdv_tile_config(kHeadDim);
  static constexpr int kBlockN = kConfig.block_n;
  static constexpr int kBlockM = kConfig.block_m;
  static constexpr int kChunkM = kConfig.chunk_m;
  static constexpr int kWarps = kConfig.warps;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kMinBlocksPerSm = kConfig.min_blocks_per_sm;
  static constexpr int kSplit = kConfig.split_head_dim;
  static constexpr bool kKvInRegisters = kConfig.kv_in_registers;

  static constexpr int kKeyWarps = kWarps / kSplit;  // warps along the key block
  static constexpr int kPartDim = kHeadDim / kSplit;  // dK / dV columns per warp
  static_assert(kBlockN == 16 * kKeyWarps, "each warp owns 16 keys");
  static_assert(kPartDim % 16 == 0, "a warp's dK/dV columns are whole n16 pairs");
  static constexpr int kPartTiles = kPartDim / 8;
  static constexpr int kPartSteps = kPartDim / 16;
  static constexpr int kDimSteps = kHeadDim / 16;    // k16 steps of K Q^T and V dO^T
  static_assert(kBlockM % kChunkM == 0 && kChunkM % 16 == 0 && kChunkM <= 64, "query chunks");
  static_assert(kBlockM <= kThreads, "one lse / delta / dbias row per thread");
  static constexpr int kChunks = kBlockM / kChunkM;
  static constexpr int kChunkTiles = kChunkM / 8;    // n8 tiles of a chunk of S^T
  static constexpr int kChunkSteps = kChunkM / 16;

  // dQ = dS K: the (kBlockM x kHeadDim) tile split over warps, 16 rows x kDqPartDim columns each.
  static constexpr int kDqRowWarps = kBlockM / 16;
  static constexpr int kDqColWarps = largest_divisor_at_most(kHeadDim / 16, kWarps / kDqRowWarps);
  static constexpr int kDqWarps = kDqRowWarps * kDqColWarps;
  static constexpr int kDqPartDim = kHeadDim / kDqColWarps;
  static_assert(kDqRowWarps >= 1 && kDqWarps <= kWarps && kDqPartDim % 16 == 0, "dQ warp partition");
  static constexpr int kDqPartTiles = kDqPartDim / 8;
  static constexpr int kDqPartSteps = kDqPartDim / 16;

  using KvTile = SharedTile<kBlockN, kHeadDim>;
  using QTile = SharedTile<kBlockM, kHeadDim>;
  using DsTile = SharedTile<kBlockN, kBlockM>;  // dS^T: rows keys, columns queries

  // Element offsets: K, V, Q stages 0 and 1, dO stages 0 and 1, dS^T; then float offsets.
  static constexpr int kVOffset = KvTile::kElements;
  static constexpr int kQOffset = 2 * KvTile::kElements;
  static constexpr int kDoOffset = kQOffset + 2 * QTile::kElements;
  static constexpr int kDsOffset = kDoOffset + 2 * QTile::kElements;
  static constexpr int kElementBytes = (kDsOffset + DsTile::kElements) * static_cast<int>(sizeof(Element));
  static_assert(kElementBytes % 16 == 0, "float region stays 16-byte aligned");
  // lse stages 0 and 1, delta stages 0 and 1 (kBlockM each), dbias scratch (kKeyWarps x kBlockM),
  // dbias key sums (2 x kThreads, thread t's at t and kThreads + t).
  static constexpr int kLseOffset = 0;
  static constexpr int kDeltaOffset = 2 * kBlockM;
  static constexpr int kScratchOffset = 4 * kBlockM;
  static constexpr int kKeySumOffset = kScratchOffset + kKeyWarps * kBlockM;
  static constexpr int kFloats = kKeySumOffset + 2 * kThreads;
  static constexpr size_t kSmemBytes = kElementBytes + kFloats * sizeof(float);
};

// How dbias reduces one step's dS (16 keys x kBlockM queries per warp): the
// bias's rows (queries) and columns (keys) are each full or broadcast (1), not
// both full (such a bias has its own kernel, backward_dbias_kernel.cuh).
// Every partial element is updated by one fixed thread of one CTA in a fixed
// order, so the plain read-modify-writes are deterministic. The running sums
// across chunks live in shared memory that only their thread touches, not in
// registers (which the dK/dV accumulators need); the rest is re-derived from
// the parameters where used.
struct DbiasStep {
  // Rows broadcast: this thread's two keys summed over the step's queries so
  // far, key r at key_sums[r * stride].
  float* key_sums;
  int stride;

  static FA_DEVICE bool rows_full(const AttentionBackwardParams& p) { return p.dbias_rows == p.seqlen_q; }
  static FA_DEVICE bool cols_full(const AttentionBackwardParams& p) { return p.dbias_cols == p.seqlen_k; }

  // The (split, b', h') slice of the partial sums, (rows, cols) row-major.
  static FA_DEVICE float* partial(const AttentionBackwardParams& p, int64_t split, int64_t batch, int64_t head) {
    const int64_t bias_batch = p.dbias_batch == 1 ? 0 : batch;
    const int64_t bias_head = p.dbias_heads == 1 ? 0 : head;
    return static_cast<float*>(p.dbias) +
           ((split * p.dbias_batch + bias_batch) * p.dbias_heads + bias_head) * p.dbias_rows * p.dbias_cols;
  }

  // One chunk of dS^T in C layout: element (j, e) is the warp's key
  // group + 8 (e / 2), the step's query query_local0 + pair + 8 j + e % 2.
  // Called by every thread of the warp.
  template <int kTiles>
  FA_DEVICE void add_chunk(const AttentionBackwardParams& p, const float (&ds)[kTiles][4], float* scratch_row,
                           int query_local0, bool first_chunk, bool owner, int lane) const {
    const int pair = 2 * (lane % 4);
    if (!rows_full(p)) {
      // Rows broadcast: per-key sums (the total of both, when columns are broadcast too).
      float chunk_sum[2] = {0.0f, 0.0f};
      FA_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        FA_UNROLL
        for (int e = 0; e < 4; ++e) {
          chunk_sum[e >> 1] += ds[j][e];
        }
      }
      FA_UNROLL
      for (int r = 0; r < 2; ++r) {
        float* sum = key_sums + r * stride;
        store_shared(sum, first_chunk ? chunk_sum[r] : load_shared(sum) + chunk_sum[r]);
      }
    } else {
      // Columns broadcast, rows full: sum over the warp's 16 keys (rows group
      // and group + 8 in the thread, then the 8 groups), one value per query.
      FA_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        FA_UNROLL
        for (int c = 0; c < 2; ++c) {
          float v = ds[j][c] + ds[j][2 + c];
          v += shfl_xor(v, 4);
          v += shfl_xor(v, 8);
          v += shfl_xor(v, 16);
          if (owner && lane < 4) {
            store_shared(scratch_row + query_local0 + pair + j * 8 + c, v);
          }
        }
      }
    }
  }

  // After the chunks: per-thread sums to shared memory (both broadcast) or to
  // the partial sums (rows broadcast). Called by every thread; a barrier follows.
  FA_DEVICE void publish(const AttentionBackwardParams& p, int64_t split, int64_t batch, int64_t head,
                         float* scratch_row, int key0, bool owner, int lane) const {
    if (rows_full(p)) {
      return;
    }
    float key_sum[2] = {load_shared(key_sums), load_shared(key_sums + stride)};
    if (cols_full(p)) {
      float* slice = partial(p, split, batch, head);
      FA_UNROLL
      for (int r = 0; r < 2; ++r) {
        key_sum[r] += shfl_xor(key_sum[r], 1);
        key_sum[r] += shfl_xor(key_sum[r], 2);
        const int key = key0 + r * 8;
        if (owner && lane % 4 == 0 && key < p.seqlen_k) {
          store_global(slice + key, load_global(slice + key) + key_sum[r]);
        }
      }
    } else {
      float total = key_sum[0] + key_sum[1];
      FA_UNROLL
      for (int mask = 1; mask < kWarpSize; mask *= 2) {
        total += shfl_xor(total, mask);
      }
      if (owner && lane == 0) {
        store_shared(scratch_row, total);
      }
    }
  }

  // After the barrier: sum the key warps' shared-memory values in warp order.
  template <int kKeyWarps, int kBlockM>
  static FA_DEVICE void finish(const AttentionBackwardParams& p, int64_t split, int64_t batch, int64_t head,
                               const float* scratch, int m0) {
    if (cols_full(p)) {
      return;
    }
    const int tid = static_cast<int>(threadIdx.x);
    float* slice = partial(p, split, batch, head);
    if (rows_full(p)) {
      if (tid < kBlockM && m0 + tid < p.seqlen_q) {
        float sum = 0.0f;
        for (int w = 0; w < kKeyWarps; ++w) {
          sum += load_shared(scratch + w * kBlockM + tid);
        }
        float* element = slice + (m0 + tid) * p.dbias_cols;
        store_global(element, load_global(element) + sum);
      }
    } else if (tid == 0) {
      float sum = 0.0f;
      for (int w = 0; w < kKeyWarps; ++w) {
        sum += load_shared(scratch + w * kBlockM);
      }
      store_global(slice, load_global(slice) + sum);
    }
  }
};

// The kernel's schedule (backward_schedule.h) for key blocks of kBlockN keys: the splits of the
// dbias partial sums, or when deterministic those of dq_accum (the host makes the two equal).
template <int kBlockN>
FAST_ATTN_HOST_DEVICE DkdvSchedule dkdv_schedule(const AttentionBackwardParams& params,
                                                 const BackwardWorkspace& workspace, bool with_dbias,
                                                 bool deterministic) {
  const int64_t splits = deterministic ? workspace.dq_splits : with_dbias ? params.dbias_num_splits : 1;
  return DkdvSchedule(params.batch, params.heads_kv, ceil_div(params.seqlen_k, kBlockN), with_dbias,
                      params.dbias_batch, params.dbias_heads, params.dbias_cols, splits, deterministic);
}

// The first query block (of kBlockM rows; num_m_blocks when none) with a query that sees a key of
// the block from key n0 on (the band's right edge: query i sees keys up to i + band_last_key).
template <int kBlockM, bool kVarlen>
FA_DEVICE int first_query_block(const AttentionBackwardParams& params, const Sequence<kVarlen>& sequence, int n0,
                                int seqlen_q, int num_m_blocks) {
  int first_query = 0;
  if (band_bounds_right(params)) {
    const int64_t first = n0 - sequence.band_last_key(params);
    first_query = first > 0 ? (first < seqlen_q ? static_cast<int>(first) : seqlen_q) : 0;
  }
  return first_query >= seqlen_q ? num_m_blocks : first_query / kBlockM;
}

// The partial sum of dq_accum row `row` that the CTA of split `split` writes (kDeterministic;
// the row's only one otherwise).
template <bool kDeterministic>
FA_DEVICE float* dq_accum_row(const BackwardWorkspace& workspace, const DkdvSchedule& schedule, int64_t row,
                              int split, int head_dim) {
  return workspace.dq_accum + (kDeterministic ? row * schedule.num_splits + split : row) * head_dim;
}

// address[0] += first, address[1] += second in dq_accum (address 8-byte aligned): kDeterministic,
// a plain read-modify-write (the CTA's thread is the only writer of its split's element); else
// float atomics, kVector: one red.global.add.v2.f32 on sm_90 (atomic_add_global_pair).
template <bool kDeterministic, bool kVector>
FA_DEVICE void add_dq_pair(float* address, float first, float second) {
  if constexpr (kDeterministic) {
    float2* pair_address = reinterpret_cast<float2*>(address);
    const float2 sum = load_global(pair_address);
    store_global(pair_address, make_float2(sum.x + first, sum.y + second));
  } else if constexpr (kVector) {
    atomic_add_global_pair(address, first, second);
  } else {
    atomic_add_global(address, first);
    atomic_add_global(address + 1, second);
  }
}

// The four elements of quad `quad` of a lane of the dQ warp grid (an m16n8 C tile's registers)
// added to their places in a block of dq_accum's blocked layout (DqAccumLayout, kernel_api.h),
// `lane_elements` pointing at the lane's first element (lane_offset): kDqAccumVector floats per
// instruction (device_runtime.cuh), float atomics or, kDeterministic, read-modify-writes of the
// CTA's own split.
template <bool kDeterministic>
FA_DEVICE void add_dq_quad(float* lane_elements, int quad, const float (&values)[4]) {
  if constexpr (kDqAccumVector == 4) {
    float* address = lane_elements + DqAccumLayout::instruction_offset<4>(quad, 0);
    if constexpr (kDeterministic) {
      float4* elements = reinterpret_cast<float4*>(address);
      const float4 sum = load_global(elements);
      store_global(elements, make_float4(sum.x + values[0], sum.y + values[1], sum.z + values[2], sum.w + values[3]));
    } else {
      atomic_add_global_quad(address, make_float4(values[0], values[1], values[2], values[3]));
    }
  } else {
    FA_UNROLL
    for (int e = 0; e < 4; ++e) {
      float* address = lane_elements + DqAccumLayout::instruction_offset<1>(quad, e);
      if constexpr (kDeterministic) {
        store_global(address, load_global(address) + values[e]);
      } else {
        atomic_add_global(address, values[e]);
      }
    }
  }
}

// kPath: the problems it runs (kernel_api.h); kModifiers adds the band's left edge, softcap and
// ALiBi (score_context.cuh). kVarlen (kGeneral, kModifiers; never with dbias): packed sequences,
// a unit's batch index being the sequence's; a key block beyond its sequence is skipped.
// kDeterministic: dq into the CTA's own partial sums of dq_accum (above).
template <typename Traits, bool kWithDbias, KernelPath kPath, bool kVarlen, bool kDeterministic>
FA_KERNEL(Traits::kThreads, Traits::kMinBlocksPerSm)
void attention_backward_dkdv_kernel(const AttentionBackwardParams params, const BackwardWorkspace workspace) {
  constexpr bool kModifiers = kPath == KernelPath::kModifiers;
  constexpr bool kSpecialized = is_specialized(kPath);
  // kFast and kCausal (D 256 here; D 32 to 128 run the staged kernel, this one only with a tile
  // sweep's override) run the masked and the unmasked steps in two chunk loops at D <= 96; at
  // D 256 two loops spill (44 bytes on sm_80), one loop serves both.
  constexpr bool kTwoLoops = kSpecialized && Traits::kHeadDim <= 96;
  static_assert(!(kSpecialized && (kVarlen || kWithDbias)), "kFast and kCausal have no packed sequences or bias");
  using Element = typename Traits::Element;
  using KvTile = typename Traits::KvTile;
  using QTile = typename Traits::QTile;
  using DsTile = typename Traits::DsTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kChunkM = Traits::kChunkM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int pair = 2 * (lane % 4);
  const int key_warp = warp % Traits::kKeyWarps;  // keys key_warp * 16 .. + 15 of the block
  const int part = warp / Traits::kKeyWarps;      // dK/dV columns part * kPartDim .. + kPartDim - 1
  const bool owns_keys = part == 0;               // the one warp of its 16 keys that publishes dS
  const int dq_row_warp = warp % Traits::kDqRowWarps;
  const int dq_col_warp = warp / Traits::kDqRowWarps;

  // The lengths of every unit's problem; with varlen those of the CTA's one unit (below).
  int seqlen_q = static_cast<int>(params.seqlen_q);
  int seqlen_k = static_cast<int>(params.seqlen_k);
  const int head_dim = static_cast<int>(params.head_dim);
  const int64_t group_size = params.heads_q / params.heads_kv;
  int num_m_blocks = static_cast<int>(ceil_div(seqlen_q, kBlockM));
  constexpr bool with_dbias = kWithDbias;
  static_assert(!(kWithDbias && kVarlen), "packed sequences take no bias");

  const DkdvSchedule schedule = dkdv_schedule<kBlockN>(params, workspace, kWithDbias, kDeterministic);
  const int owners = static_cast<int>(schedule.owners());  // at most the grid's x extent
  const int owner = static_cast<int>(blockIdx.x) % owners;
  const int split = static_cast<int>(blockIdx.x) / owners;
  // Always true (dq_accum is never nullptr), but a run-time test in the default mode: without
  // it ptxas spilled 4-16 bytes on sm_90a (kGeneral with dbias at D 128 and 256, kModifiers at
  // D 128) and the kFast and kCausal loops grew by an instruction.
  const bool with_dq = kDeterministic || workspace.dq_accum != nullptr;

  Element* smem = reinterpret_cast<Element*>(dynamic_shared_memory());
  Element* k_smem = smem;
  Element* v_smem = smem + Traits::kVOffset;
  Element* q_smem = smem + Traits::kQOffset;
  Element* do_smem = smem + Traits::kDoOffset;
  Element* ds_smem = smem + Traits::kDsOffset;
  float* float_smem = reinterpret_cast<float*>(dynamic_shared_memory() + Traits::kElementBytes);
  float* lse_smem = float_smem + Traits::kLseOffset;
  float* delta_smem = float_smem + Traits::kDeltaOffset;
  float* scratch = float_smem + Traits::kScratchOffset;

  // Varlen has no dbias: by default one unit per CTA (unit 0 of owner blockIdx.x), and no loop at
  // all; kDeterministic: the key blocks of split `split` of the sequence's (batch, kv head), fewer
  // than 2^31 (a 32-bit index: a 64-bit one made ptxas spill 16 bytes at D 128 on sm_80).
  constexpr bool kOneUnit = kVarlen && !kDeterministic;
  using UnitIndex = std::conditional_t<kVarlen, int, int64_t>;
  for (UnitIndex unit_index = kOneUnit ? 0 : split; unit_index < (kOneUnit ? 1 : schedule.units_per_owner());
       unit_index += schedule.num_splits) {
    const DkdvUnit unit = schedule.unit(owner, unit_index);
    const Sequence<kVarlen> sequence = sequence_of<Element, kVarlen>(params, unit.batch);
    const int64_t batch = sequence.batch;
    const int n0 = static_cast<int>(unit.key_block) * kBlockN;
    if constexpr (kVarlen) {  // the unit's sequence's lengths (the CTA's only sequence)
      seqlen_q = static_cast<int>(sequence.seqlen_q(params));
      seqlen_k = static_cast<int>(sequence.seqlen_k(params));
      num_m_blocks = static_cast<int>(ceil_div(seqlen_q, kBlockM));
      if (n0 >= seqlen_k) {
        continue;
      }
    }
    const int key0 = n0 + key_warp * 16 + group;  // this thread's keys: key0 and key0 + 8

    // Query blocks [m_begin, m_end) see some key of this block.
    const int m_begin = first_query_block<kBlockM>(params, sequence, n0, seqlen_q, num_m_blocks);
    int m_end = num_m_blocks;
    if (kModifiers && band_bounds_left(params)) {
      // Rows past the block's last key minus the left edge see none of its keys.
      const int64_t row_end = (n0 + kBlockN < seqlen_k ? n0 + kBlockN : seqlen_k) - sequence.band_first_key(params);
      m_end = row_end <= 0 ? 0 : static_cast<int>(ceil_div(row_end < seqlen_q ? row_end : seqlen_q, kBlockM));
    }
    // Steps run over (query head of the group, query block), query blocks fastest.
    const int steps_per_head = kModifiers ? (m_end > m_begin ? m_end - m_begin : 0) : num_m_blocks - m_begin;
    const int total_steps = static_cast<int>(group_size) * steps_per_head;
    const int64_t first_head = unit.kv_head * group_size;

    // Q, dO, lse, delta of (head, query block m0) into `stage`.
    auto load_step = [&](int64_t head, int m0, int stage) {
      const Element* q = static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
                         head * params.q_head_stride + (sequence.q_begin() + m0) * params.q_row_stride;
      const Element* grad_out = static_cast<const Element*>(params.grad_out) + batch * params.grad_out_batch_stride +
                                head * params.grad_out_head_stride +
                                (sequence.q_begin() + m0) * params.grad_out_row_stride;
      load_tile_async<kBlockM, kHeadDim, kThreads>(q_smem + stage * QTile::kElements, q, params.q_row_stride,
                                                   seqlen_q - m0, head_dim, static_cast<const Element*>(params.q));
      load_tile_async<kBlockM, kHeadDim, kThreads>(do_smem + stage * QTile::kElements, grad_out,
                                                   params.grad_out_row_stride, seqlen_q - m0, head_dim,
                                                   static_cast<const Element*>(params.grad_out));
      const int64_t row_offset = sequence.lse_index(params, seqlen_q, head, m0);
      load_vector_async<kBlockM, kThreads>(lse_smem + stage * kBlockM, static_cast<const float*>(params.lse) + row_offset,
                                           seqlen_q - m0, static_cast<const float*>(params.lse));
      load_vector_async<kBlockM, kThreads>(delta_smem + stage * kBlockM,
                                           static_cast<const float*>(params.delta) + row_offset, seqlen_q - m0,
                                           static_cast<const float*>(params.delta));
    };

    float acc_dk[Traits::kPartTiles][4];
    float acc_dv[Traits::kPartTiles][4];
    zero_accumulators(acc_dk);
    zero_accumulators(acc_dv);
    uint32_t k_fragments[Traits::kKvInRegisters ? Traits::kDimSteps : 1][4];
    uint32_t v_fragments[Traits::kKvInRegisters ? Traits::kDimSteps : 1][4];

    block_sync();  // the previous unit's readers of every shared buffer are done
    if (total_steps > 0) {
      const Element* k = static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                         unit.kv_head * params.k_head_stride + sequence.k_begin() * params.k_row_stride;
      const Element* v = static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                         unit.kv_head * params.v_head_stride + sequence.k_begin() * params.v_row_stride;
      load_tile_async<kBlockN, kHeadDim, kThreads>(k_smem, k + n0 * params.k_row_stride, params.k_row_stride,
                                                   seqlen_k - n0, head_dim, static_cast<const Element*>(params.k));
      load_tile_async<kBlockN, kHeadDim, kThreads>(v_smem, v + n0 * params.v_row_stride, params.v_row_stride,
                                                   seqlen_k - n0, head_dim, static_cast<const Element*>(params.v));
      load_step(first_head, m_begin * kBlockM, 0);
      cp_async_commit();
    }

    int64_t head = first_head;
    int m_block = m_begin;
    for (int step = 0; step < total_steps; ++step) {
      const int stage = step & 1;
      const int m0 = m_block * kBlockM;
      cp_async_wait<0>();
      block_sync();  // step's tiles landed; every warp is done with step - 1 (other stage, dS^T, scratch)
      if (step + 1 < total_steps) {
        const bool next_head = m_block + 1 == m_end;
        load_step(next_head ? head + 1 : head, next_head ? m_begin * kBlockM : m0 + kBlockM, stage ^ 1);
        cp_async_commit();
      }
      const Element* q_tile = q_smem + stage * QTile::kElements;
      const Element* do_tile = do_smem + stage * QTile::kElements;
      const float* lse_tile = lse_smem + stage * kBlockM;
      const float* delta_tile = delta_smem + stage * kBlockM;
      if constexpr (Traits::kKvInRegisters) {
        if (step == 0) {
          FA_UNROLL
          for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
            load_a_operand<KvTile>(k_fragments[kk], k_smem, key_warp * 16, kk * 16, lane);
            load_a_operand<KvTile>(v_fragments[kk], v_smem, key_warp * 16, kk * 16, lane);
          }
        }
      }
      using Scores = ScoreContext<Element, kModifiers, kVarlen>;
      const Scores step_scores(params, sequence, head);
      // kGeneral, kModifiers: whether the step's scores need the elementwise code; kFast, kCausal:
      // whether a mask reaches them (keys past Sk, or the band's right edge at row m0).
      const bool elementwise =
          kSpecialized ? n0 + kBlockN > seqlen_k ||
                             (kPath == KernelPath::kCausal && n0 + kBlockN - 1 > m0 + params.band_last_key)
                       : step_scores.needs_elementwise(m0, kBlockM, n0, kBlockN);
      const DbiasStep dbias{float_smem + Traits::kKeySumOffset + threadIdx.x, kThreads};

      // The step's chunks. kTwoLoops: masked_tag is std::true_type when a mask reaches the step and
      // std::false_type when none does, the second loop having no mask or lse test at all.
      auto chunks = [&](auto masked_tag) {
        constexpr bool kUnmasked = kTwoLoops && !decltype(masked_tag)::value;
        const bool masked = kTwoLoops ? decltype(masked_tag)::value : elementwise;
        // Built again in here: the step's context read through the capture made ptxas spill
        // kModifiers at D 128 (16 bytes, sm_80).
        const Scores scores(params, sequence, head);
        FA_NO_UNROLL
        for (int chunk = 0; chunk < Traits::kChunks; ++chunk) {
          const int cq = chunk * kChunkM;  // the chunk's first query, within the block
          // S^T = K Q^T and dP^T = V dO^T. Element (j, e): key key0 + 8 (e / 2), query m0 + cq + 8 j + pair + e % 2.
          float acc_s[Traits::kChunkTiles][4];
          float acc_dp[Traits::kChunkTiles][4];
          zero_accumulators(acc_s);
          zero_accumulators(acc_dp);
          FA_UNROLL
          for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
            uint32_t a_k[4];
            uint32_t a_v[4];
            if constexpr (Traits::kKvInRegisters) {
              FA_UNROLL
              for (int i = 0; i < 4; ++i) {
                a_k[i] = k_fragments[kk][i];
                a_v[i] = v_fragments[kk][i];
              }
            } else {
              load_a_operand<KvTile>(a_k, k_smem, key_warp * 16, kk * 16, lane);
              load_a_operand<KvTile>(a_v, v_smem, key_warp * 16, kk * 16, lane);
            }
            FA_UNROLL
            for (int nn = 0; nn < Traits::kChunkSteps; ++nn) {
              uint32_t b[4];
              load_b_operands_n_major<QTile>(b, q_tile, cq + nn * 16, kk * 16, lane);
              mma_m16n8k16<Element>(acc_s[2 * nn], a_k, b[0], b[1]);
              mma_m16n8k16<Element>(acc_s[2 * nn + 1], a_k, b[2], b[3]);
              load_b_operands_n_major<QTile>(b, do_tile, cq + nn * 16, kk * 16, lane);
              mma_m16n8k16<Element>(acc_dp[2 * nn], a_v, b[0], b[1]);
              mma_m16n8k16<Element>(acc_dp[2 * nn + 1], a_v, b[2], b[3]);
            }
          }

          // P^T = exp2(s - lse log2(e)); a row with lse = -inf saw no key, and +inf
          // as its base makes all its probabilities 0 (never inf - inf). kUnmasked: every row of
          // the step sees the block's first key, so its lse is finite (0, zero-filled, past Sq).
          // dS^T = P^T (dP^T Z - delta) into acc_dp; then acc_s = P^T Z. Under a softcap,
          // dS^T's factor 1 - t^2 (for dK and dQ) waits in softcap_slope until dbias has
          // taken dS^T itself.
          float softcap_slope[kPath == KernelPath::kModifiers ? Traits::kChunkTiles : 1][4];
          const int q0 = m0 + cq;
          const int query_base = q0 + pair;  // element (j, e): query query_base + 8 j + e % 2
          // kFast, kCausal masked steps: key key0 + 8 r is seen by the queries from
          // query_base + first_visible[r] on (none past Sk; kCausal: those from key - band_last_key).
          int first_visible[2] = {0, 0};
          if (kSpecialized && masked) {
            FA_UNROLL
            for (int r = 0; r < 2; ++r) {
              const int key = key0 + r * 8;
              const int64_t first_query = kPath == KernelPath::kCausal ? key - params.band_last_key : 0;
              const int64_t offset = key < seqlen_k ? first_query - query_base : kChunkM;
              first_visible[r] = offset < 0 ? 0 : (offset > kChunkM ? kChunkM : static_cast<int>(offset));
            }
          }
          FA_UNROLL
          for (int j = 0; j < Traits::kChunkTiles; ++j) {
            FA_UNROLL
            for (int c = 0; c < 2; ++c) {
              const float lse = load_shared(lse_tile + cq + pair + j * 8 + c);
              const float base =
                  !kUnmasked && lse == negative_infinity() ? -negative_infinity() : lse * kLog2e;
              const float delta = load_shared(delta_tile + cq + pair + j * 8 + c);
              FA_UNROLL
              for (int r = 0; r < 2; ++r) {
                const int e = 2 * r + c;
                const int query = query_base + j * 8 + c;
                const int key = key0 + r * 8;
                float slope = 1.0f;
                float probability;
                if constexpr (kUnmasked) {
                  probability = exp2f(fmaf(acc_s[j][e], scores.scale_log2(), -base));  // as below, unmasked
                } else if constexpr (kSpecialized) {
                  // q.k c - base, c = scale log2(e), as one FFMA; a masked score's -inf stays -inf.
                  const bool masked_out = 8 * j + c < first_visible[r];
                  const float dot = masked_out ? negative_infinity() : acc_s[j][e];
                  probability = exp2f(fmaf(dot, scores.scale_log2(), -base));
                } else {
                  const float score =
                      masked ? scores.score_log2(acc_s[j][e], query, key, slope) : acc_s[j][e] * scores.scale_log2();
                  probability = exp2f(score - base);
                }
                if constexpr (kModifiers) {
                  softcap_slope[j][e] = slope;
                }
                float dropout_factor = kSpecialized ? 1.0f : scores.dropout_keep_scale();
                if (!kSpecialized && scores.dropout() && scores.in_bounds(query, key) && !scores.keeps(query, key)) {
                  dropout_factor = 0.0f;
                }
                acc_dp[j][e] = probability * (acc_dp[j][e] * dropout_factor - delta);
                acc_s[j][e] = probability * dropout_factor;
              }
            }
          }

          if constexpr (with_dbias) {
            dbias.add_chunk(params, acc_dp, scratch + key_warp * kBlockM, cq, chunk == 0, owns_keys, lane);
          }
          if (scores.softcap()) {
            FA_UNROLL
            for (int j = 0; j < Traits::kChunkTiles; ++j) {
              FA_UNROLL
              for (int e = 0; e < 4; ++e) {
                acc_dp[j][e] *= softcap_slope[j][e];
              }
            }
          }

          // dV += (P^T Z) dO and dK += dS^T Q over the chunk's queries. The 16-bit
          // dS^T operand (register i: key row group + 8 (i % 2), query columns
          // 16 kk + 8 (i / 2) + pair) is also published to shared memory for dQ = dS K.
          FA_UNROLL
          for (int kk = 0; kk < Traits::kChunkSteps; ++kk) {
            uint32_t a_p[4];
            uint32_t a_ds[4];
            accumulators_to_a_operand<Element>(a_p, acc_s, kk);
            accumulators_to_a_operand<Element>(a_ds, acc_dp, kk);
            if (with_dq && owns_keys) {
              FA_UNROLL
              for (int i = 0; i < 4; ++i) {
                const int key_local = key_warp * 16 + group + (i % 2) * 8;
                const int query_local = cq + kk * 16 + (i / 2) * 8 + pair;
                store_shared(reinterpret_cast<uint32_t*>(ds_smem + DsTile::offset(key_local, query_local)), a_ds[i]);
              }
            }
            FA_UNROLL
            for (int dn = 0; dn < Traits::kPartSteps; ++dn) {
              const int col = part * Traits::kPartDim + dn * 16;
              uint32_t b[4];
              load_b_operands_k_major<QTile>(b, do_tile, cq + kk * 16, col, lane);
              mma_m16n8k16<Element>(acc_dv[2 * dn], a_p, b[0], b[1]);
              mma_m16n8k16<Element>(acc_dv[2 * dn + 1], a_p, b[2], b[3]);
              load_b_operands_k_major<QTile>(b, q_tile, cq + kk * 16, col, lane);
              mma_m16n8k16<Element>(acc_dk[2 * dn], a_ds, b[0], b[1]);
              mma_m16n8k16<Element>(acc_dk[2 * dn + 1], a_ds, b[2], b[3]);
            }
          }
        }

      };
      if (!kTwoLoops || elementwise) {
        chunks(std::true_type{});
      } else if constexpr (kTwoLoops) {
        chunks(std::false_type{});
      }

      if constexpr (with_dbias) {
        dbias.publish(params, split, batch, head, scratch + key_warp * kBlockM, key0, owns_keys, lane);
      }
      if (with_dq || with_dbias) {
        block_sync();  // dS^T and the dbias scratch of every warp are written
      }
      if constexpr (with_dbias) {
        DbiasStep::finish<Traits::kKeyWarps, kBlockM>(params, split, batch, head, scratch, m0);
      }
      if (with_dq && warp < Traits::kDqWarps) {
        float acc_dq[Traits::kDqPartTiles][4];
        zero_accumulators(acc_dq);
        FA_UNROLL
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          load_a_operand_transposed<DsTile>(a, ds_smem, kk * 16, dq_row_warp * 16, lane);
          FA_UNROLL
          for (int dn = 0; dn < Traits::kDqPartSteps; ++dn) {
            uint32_t b[4];
            load_b_operands_k_major<KvTile>(b, k_smem, kk * 16, dq_col_warp * Traits::kDqPartDim + dn * 16, lane);
            mma_m16n8k16<Element>(acc_dq[2 * dn], a, b[0], b[1]);
            mma_m16n8k16<Element>(acc_dq[2 * dn + 1], a, b[2], b[3]);
          }
        }
        const int col_base = dq_col_warp * Traits::kDqPartDim + pair;
        const int cols_left = head_dim - col_base;
        FA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int query = m0 + dq_row_warp * 16 + group + r * 8;
          if (query < seqlen_q) {
            const int64_t row = sequence.lse_index(params, seqlen_q, head, query);
            // column col_base + 8 j + c below
            float* dq_row = dq_accum_row<kDeterministic>(workspace, schedule, row, split, head_dim) + col_base;
            FA_UNROLL
            for (int j = 0; j < Traits::kDqPartTiles; ++j) {
              if (j * 8 < cols_left) {
                add_dq_pair<kDeterministic, kSpecialized>(dq_row + j * 8, acc_dq[j][2 * r], acc_dq[j][2 * r + 1]);
              }
            }
          }
        }
      }
      if (++m_block == m_end) {
        m_block = m_begin;
        ++head;
      }
    }

    // dK = scale * sum dS^T Q, dV; stored for keys < Sk and columns < head_dim.
    Element* dk = static_cast<Element*>(params.dk) + batch * params.dk_batch_stride +
                  unit.kv_head * params.dk_head_stride + sequence.k_begin() * params.dk_row_stride;
    Element* dv = static_cast<Element*>(params.dv) + batch * params.dv_batch_stride +
                  unit.kv_head * params.dv_head_stride + sequence.k_begin() * params.dv_row_stride;
    const int col_base = part * Traits::kPartDim + pair;
    const int cols_left = head_dim - col_base;
    FA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + r * 8;
      if (key >= seqlen_k) {
        continue;
      }
      Element* dk_row = dk + key * params.dk_row_stride + col_base;  // column col_base + 8 j below
      Element* dv_row = dv + key * params.dv_row_stride + col_base;
      FA_UNROLL
      for (int j = 0; j < Traits::kPartTiles; ++j) {
        if (j * 8 < cols_left) {
          store_global(reinterpret_cast<uint32_t*>(dk_row + j * 8),
                       ElementOps<Element>::pack(acc_dk[j][2 * r] * params.scale, acc_dk[j][2 * r + 1] * params.scale));
          store_global(reinterpret_cast<uint32_t*>(dv_row + j * 8),
                       ElementOps<Element>::pack(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]));
        }
      }
    }
  }
}

// The kFast and kCausal kernels at the head dims of dkdv_staged (tile_configs.h): FlashAttention-2's
// dataflow, three products per step on three warp grids, P^T and dS^T through shared memory.
template <typename Element_, int kHeadDim_>
struct DkdvStagedTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr DkdvStagedTileConfig kConfig = dkdv_staged_tile_config(kHeadDim);
  static constexpr int kBlockN = kConfig.block_n;
  static constexpr int kBlockM = kConfig.block_m;
  static constexpr int kWarps = kConfig.warps;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kDimSteps = kHeadDim / 16;  // k16 steps of K Q^T and V dO^T

  // S^T, dP^T: kScoreKeys x kScoreQueries per warp (m16 x n8 tiles).
  static constexpr int kScoreKeyWarps = kConfig.score_key_warps;
  static constexpr int kScoreKeys = kBlockN / kScoreKeyWarps;
  static constexpr int kScoreQueries = kBlockM / (kWarps / kScoreKeyWarps);
  static constexpr int kScoreMTiles = kScoreKeys / 16;
  static constexpr int kScoreNTiles = kScoreQueries / 8;
  // dK, dV: kDkdvKeys x kDkdvCols per warp.
  static constexpr int kDkdvKeyWarps = kConfig.dkdv_key_warps;
  static constexpr int kDkdvKeys = kBlockN / kDkdvKeyWarps;
  static constexpr int kDkdvCols = kHeadDim / (kWarps / kDkdvKeyWarps);
  static constexpr int kDkdvMTiles = kDkdvKeys / 16;
  static constexpr int kDkdvNTiles = kDkdvCols / 8;
  // dQ: kDqQueries x kDqCols per warp.
  static constexpr int kDqQueryWarps = kConfig.dq_query_warps;
  static constexpr int kDqQueries = kBlockM / kDqQueryWarps;
  static constexpr int kDqCols = kHeadDim / (kWarps / kDqQueryWarps);
  static constexpr int kDqMTiles = kDqQueries / 16;
  static constexpr int kDqNTiles = kDqCols / 8;
  static_assert(kScoreKeys % 16 == 0 && kScoreQueries % 16 == 0, "S^T warp tiles of m16 tiles, n8 pairs");
  static_assert(kDkdvKeys % 16 == 0 && kDkdvCols % 16 == 0, "dK/dV warp tiles of m16 tiles, n8 pairs");
  static_assert(kDqQueries % 16 == 0 && kDqCols % 16 == 0, "dQ warp tiles of m16 tiles, n8 pairs");
  static_assert(kBlockM <= kThreads, "one lse / delta row per thread");
  // dq_accum's blocked layout (kernel_api.h) for the dQ warp grid; the host's dq_accum_layout.
  static constexpr DqAccumLayout kDqLayout{kBlockM, kHeadDim, kDqQueryWarps, kWarps / kDqQueryWarps};
  static_assert(kDqLayout.quads() == kDqMTiles * kDqNTiles, "a quad per C tile of the warp's dQ");

  using KvTile = SharedTile<kBlockN, kHeadDim>;
  using QTile = SharedTile<kBlockM, kHeadDim>;
  using ScoreTile = SharedTile<kBlockN, kBlockM>;  // P^T, dS^T: rows keys, columns queries

  // Element offsets: K, V, Q stages 0 and 1, dO (one stage), P^T, dS^T; then float offsets:
  // lse stages 0 and 1, delta stages 0 and 1.
  static constexpr int kVOffset = KvTile::kElements;
  static constexpr int kQOffset = 2 * KvTile::kElements;
  static constexpr int kDoOffset = kQOffset + 2 * QTile::kElements;
  static constexpr int kPOffset = kDoOffset + QTile::kElements;
  static constexpr int kDsOffset = kPOffset + ScoreTile::kElements;
  static constexpr int kElementBytes = (kDsOffset + ScoreTile::kElements) * static_cast<int>(sizeof(Element));
  static_assert(kElementBytes % 16 == 0, "float region stays 16-byte aligned");
  static constexpr int kLseOffset = 0;
  static constexpr int kDeltaOffset = 2 * kBlockM;
  static constexpr int kFloats = 4 * kBlockM;
  static constexpr size_t kSmemBytes = kElementBytes + kFloats * sizeof(float);
};

// Per step (kBlockM queries of one query head against the CTA's kBlockN keys), barriers A, B, C:
//   A   Q, lse, delta (stage step % 2) and dO have landed; every warp is done with step - 1.
//       The next step's Q, lse, delta start into the other stage.
//       S^T = K Q^T; P^T = exp2(S^T log2(e) scale - lse log2(e)) to shared memory (16-bit);
//       dP^T = V dO^T; dS^T = P^T (dP^T - delta) to shared memory (FlashAttention-2's order: the
//       scheduler may overlap P^T's exp2 with dP^T's MMAs; one product's fragments live at a time).
//   B   dV += P^T dO.
//   C   (every warp is done with dO) the next step's dO starts.
//       dK += dS^T Q; dQ = dS K into dq_accum (blocked layout).
template <typename Traits, KernelPath kPath, bool kDeterministic>
FA_KERNEL(Traits::kThreads, 1)
void attention_backward_dkdv_staged_kernel(const AttentionBackwardParams params, const BackwardWorkspace workspace) {
  static_assert(is_specialized(kPath), "the staged kernels have no bias, dropout, modifiers or packed sequences");
  using Element = typename Traits::Element;
  using KvTile = typename Traits::KvTile;
  using QTile = typename Traits::QTile;
  using ScoreTile = typename Traits::ScoreTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr DqAccumLayout kDqLayout = Traits::kDqLayout;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int pair = 2 * (lane % 4);
  // The warp's tiles, within the key block and the step's queries.
  const int score_key0 = (warp % Traits::kScoreKeyWarps) * Traits::kScoreKeys;
  const int score_query0 = (warp / Traits::kScoreKeyWarps) * Traits::kScoreQueries;
  const int dkdv_key0 = (warp % Traits::kDkdvKeyWarps) * Traits::kDkdvKeys;
  const int dkdv_col0 = (warp / Traits::kDkdvKeyWarps) * Traits::kDkdvCols;
  const int dq_query0 = (warp % Traits::kDqQueryWarps) * Traits::kDqQueries;
  const int dq_col0 = (warp / Traits::kDqQueryWarps) * Traits::kDqCols;
  // The lane's part of its ldmatrix row addresses (shared_tile.cuh) in each tile it reads, from the
  // warp's tile on: the step adds only constants to them (and the stage's offset to Q's).
  const int kv_lane = lane_offset_rows_low<KvTile>(lane) + KvTile::offset(score_key0, 0);  // A: K, V
  const int qdo_lane = lane_offset_rows_high<QTile>(lane) + QTile::offset(score_query0, 0);  // B: Q, dO
  const int scores_lane = lane_offset_rows_low<ScoreTile>(lane) + ScoreTile::offset(dkdv_key0, 0);  // A: P^T, dS^T
  const int operand_lane = lane_offset_rows_low<QTile>(lane) + QTile::offset(0, dkdv_col0);  // B: dO, Q
  const int ds_transposed_lane = lane_offset_rows_high<ScoreTile>(lane) + ScoreTile::offset(0, dq_query0);  // A: dS
  const int k_dq_lane = lane_offset_rows_low<KvTile>(lane) + KvTile::offset(0, dq_col0);  // B: K

  const int seqlen_q = static_cast<int>(params.seqlen_q);
  const int seqlen_k = static_cast<int>(params.seqlen_k);
  const int head_dim = static_cast<int>(params.head_dim);
  const int64_t group_size = params.heads_q / params.heads_kv;
  const int num_m_blocks = static_cast<int>(ceil_div(seqlen_q, kBlockM));
  const float scale_log2 = params.scale * kLog2e;

  const DkdvSchedule schedule = dkdv_schedule<kBlockN>(params, workspace, false, kDeterministic);
  const int owners = static_cast<int>(schedule.owners());
  const int owner = static_cast<int>(blockIdx.x) % owners;
  const int split = static_cast<int>(blockIdx.x) / owners;
  const int dq_splits = kDeterministic ? schedule.num_splits : 1;

  Element* smem = reinterpret_cast<Element*>(dynamic_shared_memory());
  Element* k_smem = smem;
  Element* v_smem = smem + Traits::kVOffset;
  Element* q_smem = smem + Traits::kQOffset;
  Element* do_smem = smem + Traits::kDoOffset;
  Element* p_smem = smem + Traits::kPOffset;
  Element* ds_smem = smem + Traits::kDsOffset;
  float* float_smem = reinterpret_cast<float*>(dynamic_shared_memory() + Traits::kElementBytes);
  float* lse_smem = float_smem + Traits::kLseOffset;
  float* delta_smem = float_smem + Traits::kDeltaOffset;

  for (int64_t unit_index = split; unit_index < schedule.units_per_owner(); unit_index += schedule.num_splits) {
    const DkdvUnit unit = schedule.unit(owner, unit_index);
    const int64_t batch = unit.batch;
    const int n0 = static_cast<int>(unit.key_block) * kBlockN;
    const Sequence<false> sequence = sequence_of<Element, false>(params, unit.batch);
    const int m_begin = first_query_block<kBlockM>(params, sequence, n0, seqlen_q, num_m_blocks);
    const int total_steps = static_cast<int>(group_size) * (num_m_blocks - m_begin);
    const int64_t first_head = unit.kv_head * group_size;

    // Q, lse, delta of (head, query block m0) into `stage`; dO into its one stage.
    auto q_rows = [&](int64_t head, int m0) {
      return static_cast<const Element*>(params.q) + batch * params.q_batch_stride + head * params.q_head_stride +
             m0 * params.q_row_stride;
    };
    auto load_q = [&](int64_t head, int m0, int stage) {
      load_tile_async<kBlockM, kHeadDim, kThreads>(q_smem + stage * QTile::kElements, q_rows(head, m0),
                                                   params.q_row_stride, seqlen_q - m0, head_dim,
                                                   static_cast<const Element*>(params.q));
      const int64_t row_offset = (batch * params.heads_q + head) * seqlen_q + m0;
      load_vector_async<kBlockM, kThreads>(lse_smem + stage * kBlockM, static_cast<const float*>(params.lse) + row_offset,
                                           seqlen_q - m0, static_cast<const float*>(params.lse));
      load_vector_async<kBlockM, kThreads>(delta_smem + stage * kBlockM,
                                           static_cast<const float*>(params.delta) + row_offset, seqlen_q - m0,
                                           static_cast<const float*>(params.delta));
    };
    auto load_do = [&](int64_t head, int m0) {
      const Element* grad_out = static_cast<const Element*>(params.grad_out) + batch * params.grad_out_batch_stride +
                                head * params.grad_out_head_stride + m0 * params.grad_out_row_stride;
      load_tile_async<kBlockM, kHeadDim, kThreads>(do_smem, grad_out, params.grad_out_row_stride, seqlen_q - m0,
                                                   head_dim, static_cast<const Element*>(params.grad_out));
    };

    float acc_dk[Traits::kDkdvMTiles][Traits::kDkdvNTiles][4];
    float acc_dv[Traits::kDkdvMTiles][Traits::kDkdvNTiles][4];
    FA_UNROLL
    for (int mt = 0; mt < Traits::kDkdvMTiles; ++mt) {
      zero_accumulators(acc_dk[mt]);
      zero_accumulators(acc_dv[mt]);
    }

    block_sync();  // the previous unit's readers of every shared buffer are done
    if (total_steps > 0) {
      // (The other kernel's K/V copy, written as a function shared by both, made ptxas spill 16
      // bytes in that kernel's kGeneral variant at D 128 on sm_90a.)
      const Element* k = static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                         unit.kv_head * params.k_head_stride + n0 * params.k_row_stride;
      const Element* v = static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                         unit.kv_head * params.v_head_stride + n0 * params.v_row_stride;
      load_tile_async<kBlockN, kHeadDim, kThreads>(k_smem, k, params.k_row_stride, seqlen_k - n0, head_dim,
                                                   static_cast<const Element*>(params.k));
      load_tile_async<kBlockN, kHeadDim, kThreads>(v_smem, v, params.v_row_stride, seqlen_k - n0, head_dim,
                                                   static_cast<const Element*>(params.v));
      load_q(first_head, m_begin * kBlockM, 0);
      load_do(first_head, m_begin * kBlockM);
      cp_async_commit();
    }

    int64_t head = first_head;
    int m_block = m_begin;
    for (int step = 0; step < total_steps; ++step) {
      const int stage = step & 1;
      const int m0 = m_block * kBlockM;
      // Whether a mask reaches the step (keys past Sk, or the band's right edge). One loop serves the
      // masked and the unmasked steps, the latter's limits leaving every score unmasked: a second
      // loop without mask code (as the forward has) made ptxas spill 52-108 bytes, reloaded in
      // the loop, where this one spills 0-24 outside it (issue 15 step 5).
      const bool masked = n0 + kBlockN > seqlen_k ||
                          (kPath == KernelPath::kCausal && n0 + kBlockN - 1 > m0 + params.band_last_key);
      const bool last_step = step + 1 == total_steps;
      const bool next_head = m_block + 1 == num_m_blocks;
      const int64_t next_head_index = next_head ? head + 1 : head;
      const int next_m0 = next_head ? m_begin * kBlockM : m0 + kBlockM;
      cp_async_wait<0>();
      block_sync();  // A
      if (!last_step) {
        load_q(next_head_index, next_m0, stage ^ 1);
        cp_async_commit();
      }
      const Element* q_tile = q_smem + stage * QTile::kElements;
      const float* lse_tile = lse_smem + stage * kBlockM;
      const float* delta_tile = delta_smem + stage * kBlockM;

      // S^T = K Q^T, then dP^T = V dO^T (score_product). Element (mt, j, e) of either: key
      // score_key0 + 16 mt + group + 8 (e / 2), query score_query0 + 8 j + pair + e % 2 (of the block and
      // the step). Each K or V fragment feeds 2 kScoreNTiles MMAs, each Q or dO fragment 2 kScoreMTiles.
      auto score_product = [&](float (&acc)[Traits::kScoreMTiles][Traits::kScoreNTiles][4], const Element* kv,
                               const Element* queries) {
        FA_UNROLL
        for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
          zero_accumulators(acc[mt]);
        }
        FA_UNROLL
        for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
          uint32_t a[Traits::kScoreMTiles][4];
          FA_UNROLL
          for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
            load_a_operand_at<KvTile>(a[mt], kv + kv_lane, mt * 16, kk * 16);
          }
          FA_UNROLL
          for (int nn = 0; nn < Traits::kScoreNTiles / 2; ++nn) {
            uint32_t b[4];
            load_b_operands_n_major_at<QTile>(b, queries + qdo_lane, nn * 16, kk * 16);
            mma_pair_each_m_tile<Element>(acc, a, b, nn);
          }
        }
      };
      // A 16-bit copy of scores (P^T or dS^T) into `tile` (rows keys, columns queries).
      auto store_scores = [&](const float (&scores)[Traits::kScoreMTiles][Traits::kScoreNTiles][4], Element* tile) {
        FA_UNROLL
        for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
          FA_UNROLL
          for (int j = 0; j < Traits::kScoreNTiles; ++j) {
            FA_UNROLL
            for (int r = 0; r < 2; ++r) {
              const int offset = ScoreTile::offset(score_key0 + mt * 16 + group + r * 8, score_query0 + j * 8 + pair);
              store_shared(reinterpret_cast<uint32_t*>(tile + offset),
                           ElementOps<Element>::pack(scores[mt][j][2 * r], scores[mt][j][2 * r + 1]));
            }
          }
        }
      };

      // P^T = exp2(S^T scale log2(e) - lse log2(e)) in place. A row with lse = -inf saw no key, and
      // +inf as its base makes all its probabilities 0 (never inf - inf); unmasked steps (no key past
      // Sk, kCausal: every key of the block seen by the step's first query) have no such row. Key k
      // of the thread's row (mt, r) is seen by the queries from query_base + first_visible on (none
      // past Sk; kCausal: those from k - band_last_key); in unmasked steps first_visible stays 0.
      float acc_s[Traits::kScoreMTiles][Traits::kScoreNTiles][4];
      score_product(acc_s, k_smem, q_tile);
      const int query_base = m0 + score_query0 + pair;  // element (mt, j, e): query query_base + 8 j + e % 2
      int first_visible[Traits::kScoreMTiles][2] = {};
      if (masked) {
        FA_UNROLL
        for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
          FA_UNROLL
          for (int r = 0; r < 2; ++r) {
            const int key = n0 + score_key0 + mt * 16 + group + r * 8;
            const int64_t first_query = kPath == KernelPath::kCausal ? key - params.band_last_key : 0;
            const int64_t offset = key < seqlen_k ? first_query - query_base : Traits::kScoreQueries;
            first_visible[mt][r] = offset < 0 ? 0
                                   : offset > Traits::kScoreQueries ? Traits::kScoreQueries
                                                                    : static_cast<int>(offset);
          }
        }
      }
      FA_UNROLL
      for (int j = 0; j < Traits::kScoreNTiles; ++j) {
        const float2 lse = load_shared(reinterpret_cast<const float2*>(lse_tile + score_query0 + j * 8 + pair));
        FA_UNROLL
        for (int c = 0; c < 2; ++c) {
          const float row_lse = c == 0 ? lse.x : lse.y;
          const float base = masked && row_lse == negative_infinity() ? -negative_infinity() : row_lse * kLog2e;
          FA_UNROLL
          for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
            FA_UNROLL
            for (int r = 0; r < 2; ++r) {
              // q.k c - base, c = scale log2(e), as one FFMA; a masked score's -inf stays -inf.
              float& score = acc_s[mt][j][2 * r + c];
              const float dot = 8 * j + c < first_visible[mt][r] ? negative_infinity() : score;
              score = exp2f(fmaf(dot, scale_log2, -base));
            }
          }
        }
      }
      store_scores(acc_s, p_smem);

      // dS^T = P^T (dP^T - delta).
      float acc_dp[Traits::kScoreMTiles][Traits::kScoreNTiles][4];
      score_product(acc_dp, v_smem, do_smem);
      FA_UNROLL
      for (int j = 0; j < Traits::kScoreNTiles; ++j) {
        const float2 delta = load_shared(reinterpret_cast<const float2*>(delta_tile + score_query0 + j * 8 + pair));
        FA_UNROLL
        for (int mt = 0; mt < Traits::kScoreMTiles; ++mt) {
          FA_UNROLL
          for (int e = 0; e < 4; ++e) {
            acc_dp[mt][j][e] = acc_s[mt][j][e] * (acc_dp[mt][j][e] - (e % 2 == 0 ? delta.x : delta.y));
          }
        }
      }
      store_scores(acc_dp, ds_smem);
      block_sync();  // B

      // acc += A B over the step's queries, A = the warp's keys of `scores` (P^T or dS^T), B = the
      // warp's columns of `operand` (dO or Q).
      auto add_product = [&](float (&acc)[Traits::kDkdvMTiles][Traits::kDkdvNTiles][4], const Element* scores,
                             const Element* operand) {
        FA_UNROLL
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          uint32_t a[Traits::kDkdvMTiles][4];
          FA_UNROLL
          for (int mt = 0; mt < Traits::kDkdvMTiles; ++mt) {
            load_a_operand_at<ScoreTile>(a[mt], scores + scores_lane, mt * 16, kk * 16);
          }
          FA_UNROLL
          for (int dn = 0; dn < Traits::kDkdvNTiles / 2; ++dn) {
            uint32_t b[4];
            load_b_operands_k_major_at<QTile>(b, operand + operand_lane, kk * 16, dn * 16);
            mma_pair_each_m_tile<Element>(acc, a, b, dn);
          }
        }
      };
      add_product(acc_dv, p_smem, do_smem);
      if (!last_step) {
        block_sync();  // C
        load_do(next_head_index, next_m0);
        cp_async_commit();
      }
      add_product(acc_dk, ds_smem, q_tile);

      // dQ = dS K: element (mt, j, e) query dq_query0 + 16 mt + group + 8 (e / 2), column dq_col0 + 8 j + pair + e % 2.
      float acc_dq[Traits::kDqMTiles][Traits::kDqNTiles][4];
      FA_UNROLL
      for (int mt = 0; mt < Traits::kDqMTiles; ++mt) {
        zero_accumulators(acc_dq[mt]);
      }
      FA_UNROLL
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[Traits::kDqMTiles][4];
        FA_UNROLL
        for (int mt = 0; mt < Traits::kDqMTiles; ++mt) {
          load_a_operand_transposed_at<ScoreTile>(a[mt], ds_smem + ds_transposed_lane, kk * 16, mt * 16);
        }
        FA_UNROLL
        for (int dn = 0; dn < Traits::kDqNTiles / 2; ++dn) {
          uint32_t b[4];
          load_b_operands_k_major_at<KvTile>(b, k_smem + k_dq_lane, kk * 16, dn * 16);
          mma_pair_each_m_tile<Element>(acc_dq, a, b, dn);
        }
      }
      // Into the step's block of dq_accum (DqAccumLayout: each instruction's addresses contiguous),
      // the CTA's split of it when kDeterministic; every element, rows past Sq and columns past
      // head_dim included (never read).
      float* lane_elements = workspace.dq_accum +
                             (((batch * params.heads_q + head) * num_m_blocks + m_block) * dq_splits + split) *
                                 kDqLayout.block_floats() +
                             kDqLayout.lane_offset<kDqAccumVector>(warp, lane);
      FA_UNROLL
      for (int mt = 0; mt < Traits::kDqMTiles; ++mt) {
        FA_UNROLL
        for (int j = 0; j < Traits::kDqNTiles; ++j) {
          add_dq_quad<kDeterministic>(lane_elements, mt * Traits::kDqNTiles + j, acc_dq[mt][j]);
        }
      }
      if (++m_block == num_m_blocks) {
        m_block = m_begin;
        ++head;
      }
    }

    // dK = scale * sum dS^T Q, dV; stored for keys < Sk and columns < head_dim.
    Element* dk = static_cast<Element*>(params.dk) + batch * params.dk_batch_stride + unit.kv_head * params.dk_head_stride;
    Element* dv = static_cast<Element*>(params.dv) + batch * params.dv_batch_stride + unit.kv_head * params.dv_head_stride;
    const int cols_left = head_dim - (dkdv_col0 + pair);
    FA_UNROLL
    for (int mt = 0; mt < Traits::kDkdvMTiles; ++mt) {
      FA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int key = n0 + dkdv_key0 + mt * 16 + group + r * 8;
        if (key >= seqlen_k) {
          continue;
        }
        Element* dk_row = dk + key * params.dk_row_stride + dkdv_col0 + pair;  // column dkdv_col0 + pair + 8 j below
        Element* dv_row = dv + key * params.dv_row_stride + dkdv_col0 + pair;
        FA_UNROLL
        for (int j = 0; j < Traits::kDkdvNTiles; ++j) {
          if (j * 8 < cols_left) {
            store_global(reinterpret_cast<uint32_t*>(dk_row + j * 8),
                         ElementOps<Element>::pack(acc_dk[mt][j][2 * r] * params.scale,
                                                   acc_dk[mt][j][2 * r + 1] * params.scale));
            store_global(reinterpret_cast<uint32_t*>(dv_row + j * 8),
                         ElementOps<Element>::pack(acc_dv[mt][j][2 * r], acc_dv[mt][j][2 * r + 1]));
          }
        }
      }
    }
  }
}

template <ElementType kElement, int kHeadDim, KernelPath kPath>
LaunchStatus run_attention_backward_dkdv(const AttentionBackwardParams& params, const BackwardWorkspace& workspace,
                                         cudaStream_t stream) {
  using Traits = DkdvTraits<typename ElementOf<kElement>::type, kHeadDim>;
  constexpr bool kModifiers = kPath == KernelPath::kModifiers;
  const bool with_dbias = params.dbias != nullptr;
  const dim3 grid(static_cast<unsigned>(dkdv_schedule<Traits::kBlockN>(params, workspace, with_dbias, workspace.deterministic).ctas()));
  // The kernel for the dbias and varlen flags, with or without kDeterministic.
  auto launch = [&](auto dbias, auto varlen) {
    constexpr bool kDbias = decltype(dbias)::value;
    constexpr bool kVarlen = decltype(varlen)::value;
    return workspace.deterministic
               ? launch_kernel(attention_backward_dkdv_kernel<Traits, kDbias, kPath, kVarlen, true>, grid,
                               dim3(Traits::kThreads), Traits::kSmemBytes, stream, params, workspace)
               : launch_kernel(attention_backward_dkdv_kernel<Traits, kDbias, kPath, kVarlen, false>, grid,
                               dim3(Traits::kThreads), Traits::kSmemBytes, stream, params, workspace);
  };
  if constexpr (is_specialized(kPath)) {
    if (kernel_path(params) != kPath) {
      return {false, "dK/dV kernel path does not match the problem"};
    }
    if constexpr (dkdv_staged(kHeadDim)) {
      using StagedTraits = DkdvStagedTraits<typename ElementOf<kElement>::type, kHeadDim>;
      const dim3 staged_grid(static_cast<unsigned>(
          dkdv_schedule<StagedTraits::kBlockN>(params, workspace, false, workspace.deterministic).ctas()));
      return workspace.deterministic
                 ? launch_kernel(attention_backward_dkdv_staged_kernel<StagedTraits, kPath, true>, staged_grid,
                                 dim3(StagedTraits::kThreads), StagedTraits::kSmemBytes, stream, params, workspace)
                 : launch_kernel(attention_backward_dkdv_staged_kernel<StagedTraits, kPath, false>, staged_grid,
                                 dim3(StagedTraits::kThreads), StagedTraits::kSmemBytes, stream, params, workspace);
    } else {
      return launch(std::false_type{}, std::false_type{});
    }
  } else {
    if (with_dbias) {
      if constexpr (kModifiers && !dkdv_dbias_with_modifiers(kHeadDim)) {
        return {false, "no dK/dV kernel with dbias and score modifiers at this head dim"};
      } else {
        return launch(std::true_type{}, std::false_type{});
      }
    }
    if (is_varlen(params)) {
      return launch(std::false_type{}, std::true_type{});
    }
    return launch(std::false_type{}, std::false_type{});
  }
}

}  // namespace fast_attn::cuda
