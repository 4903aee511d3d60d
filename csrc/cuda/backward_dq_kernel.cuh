// Attention backward, deterministic dQ kernel (the op's deterministic=True):
// one CTA per (query block, query head, batch or packed sequence), warps own 16 query rows like
// the forward, and dQ is accumulated in registers over the key tiles:
//   S  = Q K^T -> P = exp2(S - lse)   (forward's masks, log2 units)
//   dP = dO V^T
//   dS = P (dP Z - delta)             Z = dropout keep / (1 - p)
//   dQ += dS (1 - t^2) K              softcap's t = tanh(scale q.k / c), 1 - t^2 = 1 without it
//                                     (scale applied once at the end)
// It recomputes S and dP that the dK/dV kernel also computes (two extra
// matmuls of the five), the price of not accumulating dq with atomics.
#pragma once

#include "query_block.cuh"
#include "tile_configs.h"

namespace fast_attn::cuda {

template <typename Element_, int kHeadDim_>
struct DqTraits : MmaKernelTraits<Element_, kHeadDim_, dq_tile_config> {
  using Base = MmaKernelTraits<Element_, kHeadDim_, dq_tile_config>;
  static constexpr bool kInRegisters = Base::kConfig.q_do_in_registers;
  static_assert(Base::kBlockM == 16 * Base::kWarps, "each warp owns 16 query rows");

  // Q, dO, K stages 0 and 1, V stages 0 and 1.
  static constexpr int kDoOffset = Base::QTile::kElements;
  static constexpr int kKOffset = 2 * Base::QTile::kElements;
  static constexpr int kVOffset = kKOffset + 2 * Base::KvTile::kElements;
  static constexpr size_t kSmemBytes = (kVOffset + 2 * Base::KvTile::kElements) * sizeof(Element_);
};

// kModifiers: the band's left edge, softcap and ALiBi (score_context.cuh). kVarlen: packed
// sequences, grid dim z being the sequence's index; a query block beyond its sequence exits.
template <typename Traits, bool kModifiers, bool kVarlen>
FA_KERNEL(Traits::kThreads, 1)
void attention_backward_dq_kernel(const AttentionBackwardParams params) {
  using Element = typename Traits::Element;
  using QTile = typename Traits::QTile;
  using KvTile = typename Traits::KvTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;
  const int pair = 2 * (lane % 4);

  // The query block, its key tiles and its rows in the tensors, as the forward's (query_block.cuh).
  const QueryBlock<Traits, kModifiers, kVarlen> block(params);
  if (block.past_end()) {
    return;
  }
  const int m0 = block.m0;
  const int seqlen_q = block.seqlen_q;
  const int end_tile = block.end_tile;
  const int num_tiles = block.num_tiles;
  const Element* grad_out = block.query_rows(static_cast<const Element*>(params.grad_out),
                                             params.grad_out_batch_stride, params.grad_out_head_stride,
                                             params.grad_out_row_stride);

  Element* smem = reinterpret_cast<Element*>(dynamic_shared_memory());
  Element* q_smem = smem;
  Element* do_smem = smem + Traits::kDoOffset;
  Element* k_smem = smem + Traits::kKOffset;
  Element* v_smem = smem + Traits::kVOffset;

  const ScoreContext<Element, kModifiers, kVarlen> scores(params, block.sequence, block.head);

  const int row0 = m0 + warp * 16 + group;  // this thread's rows: row0 and row0 + 8
  float lse_base[2];                            // lse in log2 units, +inf for rows that saw no key
  float delta[2];
  FA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + r * 8;
    const int64_t index = block.sequence.lse_index(params, seqlen_q, block.head, row);
    const float lse = row < seqlen_q ? load_global(static_cast<const float*>(params.lse) + index) : 0.0f;
    lse_base[r] = lse == negative_infinity() ? -negative_infinity() : lse * kLog2e;
    delta[r] = row < seqlen_q ? load_global(static_cast<const float*>(params.delta) + index) : 0.0f;
  }

  float acc_dq[Traits::kDimTiles][4];
  zero_accumulators(acc_dq);
  uint32_t q_fragments[Traits::kInRegisters ? Traits::kDimSteps : 1][4];
  uint32_t do_fragments[Traits::kInRegisters ? Traits::kDimSteps : 1][4];

  if (num_tiles > 0) {
    block.load_query_tile(q_smem, block.q, params.q_row_stride, params.q);
    block.load_query_tile(do_smem, grad_out, params.grad_out_row_stride, params.grad_out);
    block.load_kv_tile(k_smem, v_smem, end_tile - 1, 0);
    cp_async_commit();
  }

  for (int it = 0; it < num_tiles; ++it) {
    const int n_block = end_tile - 1 - it;
    const int stage = it & 1;
    cp_async_wait<0>();
    block_sync();  // tile `it` has landed; every warp is done with tile it - 1
    if (it + 1 < num_tiles) {
      block.load_kv_tile(k_smem, v_smem, n_block - 1, stage ^ 1);
      cp_async_commit();
    }
    const Element* k_tile = k_smem + stage * KvTile::kElements;
    const Element* v_tile = v_smem + stage * KvTile::kElements;
    if constexpr (Traits::kInRegisters) {
      if (it == 0) {
        FA_UNROLL
        for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
          load_a_operand<QTile>(q_fragments[kk], q_smem, warp * 16, kk * 16, lane);
          load_a_operand<QTile>(do_fragments[kk], do_smem, warp * 16, kk * 16, lane);
        }
      }
    }

    // S = Q K^T and dP = dO V^T, (16 x kBlockN) per warp.
    float acc_s[Traits::kKeyTiles][4];
    float acc_dp[Traits::kKeyTiles][4];
    scores_and_dprobs<KvTile, Traits::kDimSteps>(
        acc_s, acc_dp,
        [&](int kk, uint32_t(&a_q)[4], uint32_t(&a_do)[4]) {
          if constexpr (Traits::kInRegisters) {
            FA_UNROLL
            for (int i = 0; i < 4; ++i) {
              a_q[i] = q_fragments[kk][i];
              a_do[i] = do_fragments[kk][i];
            }
          } else {
            load_a_operand<QTile>(a_q, q_smem, warp * 16, kk * 16, lane);
            load_a_operand<QTile>(a_do, do_smem, warp * 16, kk * 16, lane);
          }
        },
        k_tile, v_tile, lane);

    // dS (1 - t^2) = P (dP Z - delta) (1 - t^2), into acc_s. Element (j, e): row row0 + 8 (e / 2),
    // key key_base + 8 j + e % 2.
    const int n0 = n_block * kBlockN;
    const int key_base = n0 + pair;
    const bool elementwise = scores.needs_elementwise(m0, kBlockM, n0, kBlockN);
    FA_UNROLL
    for (int j = 0; j < Traits::kKeyTiles; ++j) {
      FA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + (e >> 1) * 8;
        const int key = key_base + j * 8 + (e & 1);
        float softcap_slope = 1.0f;
        const float score = elementwise ? scores.score_log2(acc_s[j][e], row, key, softcap_slope)
                                        : acc_s[j][e] * scores.scale_log2();
        const float probability = exp2f(score - lse_base[e >> 1]);
        float dropout_factor = scores.dropout_keep_scale();
        if (scores.dropout() && scores.in_bounds(row, key) && !scores.keeps(row, key)) {
          dropout_factor = 0.0f;
        }
        acc_s[j][e] = probability * (acc_dp[j][e] * dropout_factor - delta[e >> 1]);
        if (scores.softcap()) {
          acc_s[j][e] *= softcap_slope;
        }
      }
    }

    // dQ += dS K.
    FA_UNROLL
    for (int kk = 0; kk < Traits::kKeySteps; ++kk) {
      uint32_t a[4];
      accumulators_to_a_operand<Element>(a, acc_s, kk);
      FA_UNROLL
      for (int dn = 0; dn < Traits::kDimSteps; ++dn) {
        uint32_t b[4];
        load_b_operands_k_major<KvTile>(b, k_tile, kk * 16, dn * 16, lane);
        mma_m16n8k16<Element>(acc_dq[2 * dn], a, b[0], b[1]);
        mma_m16n8k16<Element>(acc_dq[2 * dn + 1], a, b[2], b[3]);
      }
    }
  }

  Element* dq = block.query_rows(static_cast<Element*>(params.dq), params.dq_batch_stride, params.dq_head_stride,
                                 params.dq_row_stride);
  FA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + r * 8;
    if (row >= seqlen_q) {
      continue;
    }
    store_accumulator_row(dq + row * params.dq_row_stride, acc_dq, r, params.scale, pair, block.head_dim);
  }
}

template <ElementType kElement, int kHeadDim, bool kModifiers>
LaunchStatus run_attention_backward_dq(const AttentionBackwardParams& params, cudaStream_t stream) {
  using Traits = DqTraits<typename ElementOf<kElement>::type, kHeadDim>;
  return launch_per_query_block<Traits>(attention_backward_dq_kernel<Traits, kModifiers, false>,
                                        attention_backward_dq_kernel<Traits, kModifiers, true>, params, stream);
}

}  // namespace fast_attn::cuda
