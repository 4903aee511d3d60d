// Attention backward, dbias of a bias with full rows and columns, such as
// T5's trainable relative position bias (1, H, Sq, Sk).
//
// One CTA owns one (kBlockM queries x kBlockN keys) tile of one slice (b', h')
// of dbias and loops over the (batch, query head) pairs that the slice sums:
// every batch when the bias is broadcast over the batch, every query head when
// it is broadcast over the heads, else just (b', h'). Per pair, warps owning
// 16 query rows each:
//   S  = Q K^T, dP = dO V^T        (16 x kBlockN per warp)
//   P  = exp2(S - lse)             scores in log2 units with the forward's masks
//                                  (and softcap and ALiBi: kModifiers)
//   dS = P (dP Z - delta)          Z = dropout keep / (1 - p), 1 without dropout;
//                                  the bias comes after the softcap: no 1 - t^2
//   sum += dS
// and the tile is stored once, in the bias's dtype. The sums stay in
// registers, in the same order on every run: no atomics, no float32 partial
// sums in memory, the same bits every time. The bias tile itself is the same
// for every pair of the slice, so it is read from global memory once, into
// shared memory that each thread alone reads back (registers are short here).
//
// The price is S and dP, which the dK/dV kernel computes too (two of the
// backward's five matmuls). Accumulating dS inside the dK/dV kernel instead
// costs a float32 read-modify-write of the slice per pair (8 bytes per score
// per batch), which leaves that kernel bound by memory at T5's shapes.
// The Q, dO, K, V tiles (and lse, delta) of the next pair are prefetched with
// cp.async into the other of two stages while the current pair computes.
#pragma once

#include "device_runtime.cuh"
#include "score_context.cuh"
#include "shared_tile.cuh"
#include "tile_configs.h"

namespace fast_attn::cuda {

template <typename Element_, int kHeadDim_>
struct DbiasTraits : MmaKernelTraits<Element_, kHeadDim_, dbias_tile_config> {
  using Base = MmaKernelTraits<Element_, kHeadDim_, dbias_tile_config>;
  static_assert(Base::kBlockM == 16 * Base::kWarps, "each warp owns 16 query rows");
  static_assert(Base::kBlockM <= Base::kThreads, "one lse / delta row per thread");

  // One stage: Q, dO, K, V; two stages, then lse and delta of each stage (floats).
  static constexpr int kDoOffset = Base::QTile::kElements;
  static constexpr int kKOffset = 2 * Base::QTile::kElements;
  static constexpr int kVOffset = kKOffset + Base::KvTile::kElements;
  static constexpr int kStageElements = kVOffset + Base::KvTile::kElements;
  static constexpr int kElementBytes = 2 * kStageElements * static_cast<int>(sizeof(Element_));
  static_assert(kElementBytes % 16 == 0, "float region stays 16-byte aligned");
  // Floats: lse stages 0 and 1, delta stages 0 and 1, then the bias tile in
  // log2 units, thread t's element (j, e) at (4 j + e) kThreads + t (no bank conflicts).
  static constexpr int kLseOffset = 0;
  static constexpr int kDeltaOffset = 2 * Base::kBlockM;
  static constexpr int kBiasOffset = 4 * Base::kBlockM;
  static constexpr int kFloats = kBiasOffset + Base::kKeyTiles * 4 * Base::kThreads;
  static constexpr size_t kSmemBytes = kElementBytes + kFloats * sizeof(float);
};

// kModifiers: the band's left edge, softcap and ALiBi (score_context.cuh).
template <typename Traits, bool kModifiers>
FA_KERNEL(Traits::kThreads, 1)
void attention_backward_dbias_kernel(const AttentionBackwardParams params, const DbiasTiles dbias) {
  using Element = typename Traits::Element;
  using QTile = typename Traits::QTile;
  using KvTile = typename Traits::KvTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int pair = 2 * (lane % 4);

  const int seqlen_q = static_cast<int>(params.seqlen_q);
  const int seqlen_k = static_cast<int>(params.seqlen_k);
  const int head_dim = static_cast<int>(params.head_dim);
  const int key_blocks = static_cast<int>(ceil_div(seqlen_k, kBlockN));
  const int m0 = static_cast<int>(blockIdx.x / key_blocks) * kBlockM;
  const int n0 = static_cast<int>(blockIdx.x % key_blocks) * kBlockN;
  const int64_t slice_head = blockIdx.y;   // h' of the dbias slice
  const int64_t slice_batch = blockIdx.z;  // b'
  const int64_t group_size = params.heads_q / params.heads_kv;
  // The pairs the slice sums, heads fastest: (batch, head) of pair i.
  const int64_t pair_heads = dbias.heads == 1 ? params.heads_q : 1;
  const int64_t pair_batches = dbias.batch == 1 ? params.batch : 1;
  const int64_t num_pairs = pair_heads * pair_batches;
  auto pair_batch = [&](int64_t i) { return dbias.batch == 1 ? i / pair_heads : slice_batch; };
  auto pair_head = [&](int64_t i) { return dbias.heads == 1 ? i % pair_heads : slice_head; };

  // A tile whose keys all lie after the band's right edge at its last query, or
  // before its left edge at its first query, has dS = 0.
  bool any_visible = true;
  if (band_bounds_right(params)) {
    const int64_t last_row = (m0 + kBlockM < seqlen_q ? m0 + kBlockM : seqlen_q) - 1;
    any_visible = n0 <= last_row + band_last_key_offset(params);
  }
  if (kModifiers && band_bounds_left(params)) {
    const int64_t last_key = (n0 + kBlockN < seqlen_k ? n0 + kBlockN : seqlen_k) - 1;
    any_visible = any_visible && last_key >= m0 + band_first_key_offset(params);
  }

  Element* smem = reinterpret_cast<Element*>(dynamic_shared_memory());
  float* float_smem = reinterpret_cast<float*>(dynamic_shared_memory() + Traits::kElementBytes);

  // Q, dO, K, V, lse, delta of pair i into `stage`.
  auto load_pair = [&](int64_t i, int stage) {
    const int64_t batch = pair_batch(i);
    const int64_t head = pair_head(i);
    const int64_t kv_head = head / group_size;
    Element* stage_smem = smem + stage * Traits::kStageElements;
    load_tile_async<kBlockM, kHeadDim, kThreads>(
        stage_smem, static_cast<const Element*>(params.q) + batch * params.q_batch_stride +
                        head * params.q_head_stride + m0 * params.q_row_stride,
        params.q_row_stride, seqlen_q - m0, head_dim, static_cast<const Element*>(params.q));
    load_tile_async<kBlockM, kHeadDim, kThreads>(
        stage_smem + Traits::kDoOffset, static_cast<const Element*>(params.grad_out) +
                                            batch * params.grad_out_batch_stride +
                                            head * params.grad_out_head_stride + m0 * params.grad_out_row_stride,
        params.grad_out_row_stride, seqlen_q - m0, head_dim, static_cast<const Element*>(params.grad_out));
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        stage_smem + Traits::kKOffset, static_cast<const Element*>(params.k) + batch * params.k_batch_stride +
                                           kv_head * params.k_head_stride + n0 * params.k_row_stride,
        params.k_row_stride, seqlen_k - n0, head_dim, static_cast<const Element*>(params.k));
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        stage_smem + Traits::kVOffset, static_cast<const Element*>(params.v) + batch * params.v_batch_stride +
                                           kv_head * params.v_head_stride + n0 * params.v_row_stride,
        params.v_row_stride, seqlen_k - n0, head_dim, static_cast<const Element*>(params.v));
    const int64_t row_offset = sequence_of<Element, false>(params, batch).lse_index(params, seqlen_q, head, m0);
    load_vector_async<kBlockM, kThreads>(float_smem + Traits::kLseOffset + stage * kBlockM,
                                         static_cast<const float*>(params.lse) + row_offset, seqlen_q - m0,
                                         static_cast<const float*>(params.lse));
    load_vector_async<kBlockM, kThreads>(float_smem + Traits::kDeltaOffset + stage * kBlockM,
                                         static_cast<const float*>(params.delta) + row_offset, seqlen_q - m0,
                                         static_cast<const float*>(params.delta));
  };

  const int local_row0 = warp * 16 + group;  // this thread's rows within the tile: local_row0 and local_row0 + 8
  const int row0 = m0 + local_row0;
  const int key_base = n0 + pair;  // element (j, e): row row0 + 8 (e / 2), key key_base + 8 j + e % 2

  float acc_dbias[Traits::kKeyTiles][4];
  zero_accumulators(acc_dbias);

  if (any_visible) {
    load_pair(0, 0);
    cp_async_commit();

    // The slice's bias tile in log2 units (0 outside the sequences, where every score is masked).
    float* bias_log2 = float_smem + Traits::kBiasOffset + threadIdx.x;  // element (j, e) at (4 j + e) kThreads
    {
      const ScoreContext<Element> slice_scores(params, sequence_of<Element, false>(params, slice_batch), slice_head);
      for_each_accumulator<Traits::kKeyTiles>(row0, key_base, [&](int j, int e, int row, int key) {
        store_shared(bias_log2 + (4 * j + e) * kThreads,
                     slice_scores.in_bounds(row, key) ? slice_scores.bias_value(row, key) * kLog2e : 0.0f);
      });
    }

    for (int64_t i = 0; i < num_pairs; ++i) {
      const int stage = static_cast<int>(i & 1);
      cp_async_wait<0>();
      block_sync();  // pair i has landed; every warp is done with pair i - 1 (the other stage)
      if (i + 1 < num_pairs) {
        load_pair(i + 1, stage ^ 1);
        cp_async_commit();
      }
      const Element* q_tile = smem + stage * Traits::kStageElements;
      const Element* do_tile = q_tile + Traits::kDoOffset;
      const Element* k_tile = q_tile + Traits::kKOffset;
      const Element* v_tile = q_tile + Traits::kVOffset;
      const float* lse_tile = float_smem + Traits::kLseOffset + stage * kBlockM;
      const float* delta_tile = float_smem + Traits::kDeltaOffset + stage * kBlockM;

      // S = Q K^T and dP = dO V^T, (16 x kBlockN) per warp.
      float acc_s[Traits::kKeyTiles][4];
      float acc_dp[Traits::kKeyTiles][4];
      scores_and_dprobs<KvTile, Traits::kDimSteps>(
          acc_s, acc_dp,
          [&](int kk, uint32_t(&a_q)[4], uint32_t(&a_do)[4]) {
            load_a_operand<QTile>(a_q, q_tile, warp * 16, kk * 16, lane);
            load_a_operand<QTile>(a_do, do_tile, warp * 16, kk * 16, lane);
          },
          k_tile, v_tile, lane);

      // lse in log2 units, +inf for rows that saw no key (their probabilities are all 0, never inf - inf).
      float lse_base[2];
      float delta[2];
      FA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const float lse = load_shared(lse_tile + local_row0 + r * 8);
        lse_base[r] = lse == negative_infinity() ? -negative_infinity() : lse * kLog2e;
        delta[r] = load_shared(delta_tile + local_row0 + r * 8);
      }
      const ScoreContext<Element, kModifiers> scores(params, sequence_of<Element, false>(params, pair_batch(i)),
                                                     pair_head(i));
      const bool masked = scores.needs_mask(m0, kBlockM, n0, kBlockN);
      if constexpr (kModifiers) {
        // S in log2 units through the softcap, plus ALiBi, ahead of the loop below
        // (in it, ptxas spills: 12 bytes at D 128 on sm_90a).
        FA_UNROLL
        for (int j = 0; j < Traits::kKeyTiles; ++j) {
          FA_UNROLL
          for (int e = 0; e < 4; ++e) {
            float slope;  // unused: dbias takes dS itself
            acc_s[j][e] = scores.scaled_log2(acc_s[j][e], slope);
            if (scores.alibi()) {
              acc_s[j][e] += scores.alibi_log2(row0 + (e >> 1) * 8, key_base + j * 8 + (e & 1));
            }
          }
        }
      }
      for_each_accumulator<Traits::kKeyTiles>(row0, key_base, [&](int j, int e, int row, int key) {
        float score = (kModifiers ? acc_s[j][e] : acc_s[j][e] * scores.scale_log2()) +
                      load_shared(bias_log2 + (4 * j + e) * kThreads);
        if (masked && !scores.visible(row, key)) {
          score = negative_infinity();
        }
        const float probability = exp2f(score - lse_base[e >> 1]);
        float dropout_factor = scores.dropout_keep_scale();
        if (scores.dropout() && scores.in_bounds(row, key) && !scores.keeps(row, key)) {
          dropout_factor = 0.0f;
        }
        acc_dbias[j][e] += probability * (acc_dp[j][e] * dropout_factor - delta[e >> 1]);
      });
    }
  }

  // The tile, once, for rows < Sq and keys < Sk (zeros where no key is visible).
  const int64_t slice = (slice_batch * dbias.heads + slice_head) * params.seqlen_q * params.seqlen_k;
  for_each_accumulator<Traits::kKeyTiles>(row0, key_base, [&](int j, int e, int row, int key) {
    if (row < seqlen_q && key < seqlen_k) {
      const int64_t index = slice + static_cast<int64_t>(row) * seqlen_k + key;
      if (params.bias_is_fp32) {
        store_global(static_cast<float*>(dbias.data) + index, acc_dbias[j][e]);
      } else {
        store_global(static_cast<Element*>(dbias.data) + index, ElementOps<Element>::from_float(acc_dbias[j][e]));
      }
    }
  });
}

template <ElementType kElement, int kHeadDim, bool kModifiers>
LaunchStatus run_attention_backward_dbias(const AttentionBackwardParams& params, const DbiasTiles& dbias,
                                          cudaStream_t stream) {
  using Traits = DbiasTraits<typename ElementOf<kElement>::type, kHeadDim>;
  const dim3 grid(static_cast<unsigned>(ceil_div(params.seqlen_q, Traits::kBlockM) *
                                        ceil_div(params.seqlen_k, Traits::kBlockN)),
                  static_cast<unsigned>(dbias.heads), static_cast<unsigned>(dbias.batch));
  return launch_kernel(attention_backward_dbias_kernel<Traits, kModifiers>, grid, dim3(Traits::kThreads), Traits::kSmemBytes,
                       stream, params, dbias);
}

}  // namespace fast_attn::cuda
