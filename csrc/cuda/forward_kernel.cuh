// Fused attention forward on tensor cores (sm_80+): one CTA per (query block,
// query head, batch or packed sequence), 16 x warp_m_tiles query rows per warp, online softmax in
// registers. With two m16 tiles per warp each K/V fragment read from shared
// memory feeds two MMAs, halving shared-memory traffic per FLOP. The kFast and
// kCausal kernels have a tile of their own (ForwardTraits, tile_configs.h).
//
// Per K/V tile (descending, so the tiles that need masks come first):
//   S = Q K^T          mma.m16n8k16, Q fragments in registers or re-read from shared memory
//   S -> log2 units     scale, softcap, bias, ALiBi, band / key / bound masks (masked tiles;
//                       kFast, kCausal: the key bound and band's right edge, one compare per score);
//                       scale only (the others)
//   online softmax      row max over the quad (2 shuffles), rescale O and the row sums,
//                       P packed into the A fragments of P V as soon as it is computed
//   O += P V            P from registers
// K and V tiles are copied with cp.async (ForwardTraits::kKvStages), double-buffered where
// the shared memory allows: the copy of tile i + 1 is issued right after the barrier that
// opens tile i, so it overlaps all of tile i's math, and one barrier per tile guards both
// stages. Single-buffered (FlashAttention-2's pipeline, where two stages would cost the
// second CTA per SM): the barrier that opens tile i issues V of tile i, which lands during
// S and the softmax; a second barrier, once V has landed and every warp is done with K,
// issues K of tile i + 1, which lands during O += P V. Every key tile but the block's
// first (its last, end_tile - 1) lies below Sk, so only the first copies bound rows.
//
// kPath (kernel_api.h): the kGeneral and kModifiers kernels decide per tile at run time
// which elementwise code it needs; the kFast and kCausal kernels run the masked tiles
// (the first ones) in one loop (kFast: at most one tile, run without a loop) and the rest
// in a second loop whose body has no mask, bias or dropout code at all.
#pragma once

#include <type_traits>

#include "query_block.cuh"
#include "tile_configs.h"

namespace fast_attn::cuda {

// kSpecialized: the tile of the kFast and kCausal kernels (forward_tile_config), else that of the
// kGeneral and kModifiers kernels (forward_general_tile_config).
template <bool kSpecialized>
constexpr ForwardTileConfig forward_path_tile_config(int head_dim) {
  return kSpecialized ? forward_tile_config(head_dim) : forward_general_tile_config(head_dim);
}

template <typename Element_, int kHeadDim_, bool kSpecialized>
struct ForwardTraits : MmaKernelTraits<Element_, kHeadDim_, forward_path_tile_config<kSpecialized>> {
  using Base = MmaKernelTraits<Element_, kHeadDim_, forward_path_tile_config<kSpecialized>>;
  static constexpr int kMinBlocksPerSm = Base::kConfig.min_blocks_per_sm;
  static constexpr bool kQInRegisters = Base::kConfig.q_in_registers;
  static constexpr int kMTiles = Base::kConfig.warp_m_tiles;  // m16 tiles of query rows per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static_assert(Base::kBlockM == kWarpRows * Base::kWarps, "each warp owns 16 x warp_m_tiles query rows");

  // K/V stages: two where the shared memory of kMinBlocksPerSm CTAs allows them on sm_80 (164 KiB
  // per SM, 1 KiB of it reserved per CTA), else one (the pipelines: the comment at the top).
  static constexpr size_t kQBytes = Base::QTile::kElements * sizeof(Element_);
  static constexpr size_t kKvStageBytes = 2 * Base::KvTile::kElements * sizeof(Element_);
  static constexpr int kKvStages = (kQBytes + 2 * kKvStageBytes + 1024) * kMinBlocksPerSm <= 167936 ? 2 : 1;

  // Q, then the K stages, then the V stages.
  static constexpr int kKOffset = Base::QTile::kElements;
  static constexpr int kVOffset = kKOffset + kKvStages * Base::KvTile::kElements;
  static constexpr size_t kSmemBytes = (kVOffset + kKvStages * Base::KvTile::kElements) * sizeof(Element_);
};

// tile_max[r] = the max of row r (0: the C fragment's row group, 1: group + 8) of an m16 tile's
// scores acc (kTiles n8 tiles of keys) over the quad of lanes that holds the row (2 shuffles):
// every lane of the quad gets the whole row's max.
template <int kTiles>
FA_DEVICE void quad_row_max(float (&tile_max)[2], const float (&acc)[kTiles][4]) {
  tile_max[0] = tile_max[1] = negative_infinity();
  FA_UNROLL
  for (int j = 0; j < kTiles; ++j) {
    FA_UNROLL
    for (int e = 0; e < 4; ++e) {
      tile_max[e >> 1] = fmaxf(tile_max[e >> 1], acc[j][e]);
    }
  }
  FA_UNROLL
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], shfl_xor(tile_max[r], 2));
  }
}

// kPath: the problems it runs (kernel_api.h); kModifiers adds the band's left edge, softcap and
// ALiBi (score_context.cuh). kVarlen (kGeneral, kModifiers): packed sequences, grid dim z being
// the sequence's index; a query block beyond its sequence exits.
template <typename Traits, KernelPath kPath, bool kVarlen>
FA_KERNEL(Traits::kThreads, Traits::kMinBlocksPerSm)
void attention_forward_kernel(const AttentionForwardParams params) {
  constexpr bool kModifiers = kPath == KernelPath::kModifiers;
  constexpr bool kSpecialized = is_specialized(kPath);
  static_assert(!(kSpecialized && kVarlen), "packed sequences run the kGeneral and kModifiers kernels");
  using Element = typename Traits::Element;
  using QTile = typename Traits::QTile;
  using KvTile = typename Traits::KvTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4;       // C fragment rows group, group + 8
  const int pair = 2 * (lane % 4);  // C fragment columns pair, pair + 1

  const QueryBlock<Traits, kModifiers, kVarlen> block(params);
  if (block.past_end()) {
    return;
  }
  const int m0 = block.m0;
  const int end_tile = block.end_tile;
  const int num_tiles = block.num_tiles;

  Element* smem = reinterpret_cast<Element*>(dynamic_shared_memory());
  Element* q_smem = smem;
  Element* k_smem = smem + Traits::kKOffset;
  Element* v_smem = smem + Traits::kVOffset;

  const ScoreContext<Element, kModifiers, kVarlen> scores(params, block.sequence, block.head);

  constexpr int kMTiles = Traits::kMTiles;
  float acc_o[kMTiles][Traits::kDimTiles][4];
  float row_max[kMTiles][2];  // log2 units (kFast, kCausal: q.k units), rows group and group + 8 of each m16 tile
  float row_sum[kMTiles][2];  // this thread's columns only, until the end
  FA_UNROLL
  for (int mt = 0; mt < kMTiles; ++mt) {
    zero_accumulators(acc_o[mt]);
    row_max[mt][0] = row_max[mt][1] = negative_infinity();
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  uint32_t q_fragments[kMTiles][Traits::kQInRegisters ? Traits::kDimSteps : 1][4];

  if (num_tiles > 0) {
    block.load_query_tile(q_smem, block.q, params.q_row_stride, params.q);
    // The block's last key tile, the only one that may hold keys past seqlen_k: K and V into stage 0.
    block.template load_k_tile<false>(k_smem, end_tile - 1);
    block.template load_v_tile<false>(v_smem, end_tile - 1);
    cp_async_commit();
  }

  const int warp_row0 = warp * Traits::kWarpRows;  // the warp's first row in the block
  // This thread's rows in m16 tile mt: row0 + 16 mt and row0 + 16 mt + 8.
  const int row0 = m0 + warp_row0 + group;

  // Key tile `it` of the block's (descending), kMasked: whether masks may apply to its scores.
  const auto key_tile = [&](int it, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int n_block = end_tile - 1 - it;
    const int stage = Traits::kKvStages == 2 ? it & 1 : 0;
    const Element* k_tile = k_smem + stage * KvTile::kElements;
    const Element* v_tile = v_smem + stage * KvTile::kElements;
    cp_async_wait<0>();
    block_sync();
    if constexpr (Traits::kKvStages == 2) {
      // Tile `it` has landed; every warp is done with tile it - 1, whose stage takes tile it + 1.
      if (it + 1 < num_tiles) {
        block.template load_k_tile<true>(k_smem + (stage ^ 1) * KvTile::kElements, n_block - 1);
        block.template load_v_tile<true>(v_smem + (stage ^ 1) * KvTile::kElements, n_block - 1);
        cp_async_commit();
      }
    } else if (it > 0) {
      // K of tile `it` has landed; every warp is done with V of tile it - 1: V of tile `it` follows
      // (tile 0's came with its K).
      block.template load_v_tile<true>(v_smem, n_block);
      cp_async_commit();
    }
    if constexpr (Traits::kQInRegisters) {
      if (it == 0) {
        FA_UNROLL
        for (int mt = 0; mt < kMTiles; ++mt) {
          FA_UNROLL
          for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
            load_a_operand<QTile>(q_fragments[mt][kk], q_smem, warp_row0 + mt * 16, kk * 16, lane);
          }
        }
      }
    }

    // S = Q K^T, (kWarpRows x kBlockN) per warp: each K fragment serves every m16 tile.
    float acc_s[kMTiles][Traits::kKeyTiles][4];
    FA_UNROLL
    for (int mt = 0; mt < kMTiles; ++mt) {
      zero_accumulators(acc_s[mt]);
    }
    FA_UNROLL
    for (int kk = 0; kk < Traits::kDimSteps; ++kk) {
      uint32_t a[kMTiles][4];
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (Traits::kQInRegisters) {
          FA_UNROLL
          for (int i = 0; i < 4; ++i) {
            a[mt][i] = q_fragments[mt][kk][i];
          }
        } else {
          load_a_operand<QTile>(a[mt], q_smem, warp_row0 + mt * 16, kk * 16, lane);
        }
      }
      FA_UNROLL
      for (int nn = 0; nn < Traits::kKeySteps; ++nn) {
        uint32_t b[4];
        load_b_operands_n_major<KvTile>(b, k_tile, nn * 16, kk * 16, lane);
        mma_pair_each_m_tile<Element>(acc_s, a, b, nn);
      }
    }

    // Scores in log2 units; element (mt, j, e) is row row0 + 16 mt + 8 (e / 2), key key_base + 8 j + e % 2.
    const int n0 = n_block * kBlockN;
    const int key_base = n0 + pair;
    if constexpr (kSpecialized) {
      // kFast, kCausal: scores stay q.k (the scale is folded into the softmax's exponent below).
      // Masked tiles: row `row` sees keys up to last_key, Sk - 1 or (kCausal) row + band_last_key if
      // smaller; per row one limit, last_key - key_base, per score one compare with the constant 8 j + e % 2.
      FA_UNROLL
      for (int mt = 0; kMasked && mt < kMTiles; ++mt) {
        FA_UNROLL
        for (int r = 0; r < 2; ++r) {
          int limit = block.seqlen_k - 1 - key_base;  // 32-bit: keys and Sk are
          if constexpr (kPath == KernelPath::kCausal) {
            const int64_t band_offset = row0 + mt * 16 + r * 8 - key_base + params.band_last_key;
            limit = band_offset < limit ? (band_offset < -1 ? -1 : static_cast<int>(band_offset)) : limit;
          }
          FA_UNROLL
          for (int j = 0; j < Traits::kKeyTiles; ++j) {
            FA_UNROLL
            for (int c = 0; c < 2; ++c) {
              float& score = acc_s[mt][j][2 * r + c];
              score = 8 * j + c > limit ? negative_infinity() : score;
            }
          }
        }
      }
    } else if (kMasked && scores.needs_elementwise(m0, kBlockM, n0, kBlockN)) {
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        for_each_accumulator<Traits::kKeyTiles>(row0 + mt * 16, key_base, [&](int j, int e, int row, int key) {
          acc_s[mt][j][e] = scores.score_log2(acc_s[mt][j][e], row, key);
        });
      }
    } else {
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        for_each_accumulator<Traits::kKeyTiles>(row0, key_base, [&](int j, int e, int, int) {
          acc_s[mt][j][e] *= scores.scale_log2();
        });
      }
    }

    uint32_t p_frag[Traits::kKeySteps][kMTiles][4];  // P as A fragments of O += P V, per k16 step and m16 tile
    // Online softmax, per m16 tile. A row whose scores are all -inf so far keeps
    // max -inf and uses 0 as its exponent base, so that no -inf - -inf (NaN) is formed.
    if constexpr (kSpecialized) {
      // Scores in q.k units (scale > 0 keeps their order), c = scale log2(e): p = exp2(s c - m c), one
      // FFMA and one exp2 per score, the row max m in q.k units too. The row sums are rescaled by
      // each row's factor exp2((m_old - m_new) c); O only when the max of some row of the warp grew
      // (otherwise every factor is exp2(0) = 1 exactly, and skipping it changes no bit), after P is
      // packed, when the scores no longer hold registers.
      const float scale_log2 = scores.scale_log2();
      float new_max[kMTiles][2];
      bool grew = false;
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        float tile_max[2];
        quad_row_max(tile_max, acc_s[mt]);
        FA_UNROLL
        for (int r = 0; r < 2; ++r) {
          new_max[mt][r] = fmaxf(row_max[mt][r], tile_max[r]);
          grew = grew || new_max[mt][r] > row_max[mt][r];
        }
      }
      float correction[kMTiles][2];
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        float scaled_base[2];
        FA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const float base = new_max[mt][r] == negative_infinity() ? 0.0f : new_max[mt][r];
          scaled_base[r] = base * scale_log2;
          correction[mt][r] = exp2f((row_max[mt][r] - base) * scale_log2);
          row_max[mt][r] = new_max[mt][r];
          row_sum[mt][r] *= correction[mt][r];
        }
        FA_UNROLL
        for (int j = 0; j < Traits::kKeyTiles; ++j) {
          FA_UNROLL
          for (int e = 0; e < 4; ++e) {
            const float probability = exp2f(fmaf(acc_s[mt][j][e], scale_log2, -scaled_base[e >> 1]));
            row_sum[mt][e >> 1] += probability;
            acc_s[mt][j][e] = probability;
          }
        }
        FA_UNROLL
        for (int kk = 0; kk < Traits::kKeySteps; ++kk) {
          accumulators_to_a_operand<Element>(p_frag[kk][mt], acc_s[mt], kk);
        }
      }
      if (warp_any(grew)) {
        FA_UNROLL
        for (int mt = 0; mt < kMTiles; ++mt) {
          FA_UNROLL
          for (int j = 0; j < Traits::kDimTiles; ++j) {
            FA_UNROLL
            for (int e = 0; e < 4; ++e) {
              acc_o[mt][j][e] *= correction[mt][e >> 1];
            }
          }
        }
      }
    } else {
      FA_UNROLL
      for (int mt = 0; mt < kMTiles; ++mt) {
        float tile_max[2];
        quad_row_max(tile_max, acc_s[mt]);
        float base[2];
        FA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const float new_max = fmaxf(row_max[mt][r], tile_max[r]);
          base[r] = new_max == negative_infinity() ? 0.0f : new_max;
          const float correction = exp2f(row_max[mt][r] - base[r]);
          row_max[mt][r] = new_max;
          row_sum[mt][r] *= correction;
          FA_UNROLL
          for (int j = 0; j < Traits::kDimTiles; ++j) {
            acc_o[mt][j][2 * r] *= correction;
            acc_o[mt][j][2 * r + 1] *= correction;
          }
        }
        FA_UNROLL
        for (int j = 0; j < Traits::kKeyTiles; ++j) {
          FA_UNROLL
          for (int e = 0; e < 4; ++e) {
            const float probability = exp2f(acc_s[mt][j][e] - base[e >> 1]);
            row_sum[mt][e >> 1] += probability;  // the softmax denominator counts dropped scores too
            acc_s[mt][j][e] = probability;
          }
        }
        if (scores.dropout()) {
          for_each_accumulator<Traits::kKeyTiles>(row0 + mt * 16, key_base, [&](int j, int e, int row, int key) {
            if (scores.in_bounds(row, key) && !scores.keeps(row, key)) {
              acc_s[mt][j][e] = 0.0f;  // kept ones are scaled by 1 / (1 - p) once, at the end
            }
          });
        }
        FA_UNROLL
        for (int kk = 0; kk < Traits::kKeySteps; ++kk) {
          accumulators_to_a_operand<Element>(p_frag[kk][mt], acc_s[mt], kk);
        }
      }
    }

    if constexpr (Traits::kKvStages == 1) {
      cp_async_wait<0>();
      block_sync();  // V of tile `it` has landed; every warp is done with K of tile `it`: K of tile it + 1 follows
      if (it + 1 < num_tiles) {
        block.template load_k_tile<true>(k_smem, n_block - 1);
        cp_async_commit();
      }
    }

    // O += P V, P (kWarpRows x kBlockN) from registers: each V fragment serves every m16 tile.
    FA_UNROLL
    for (int kk = 0; kk < Traits::kKeySteps; ++kk) {
      FA_UNROLL
      for (int dn = 0; dn < Traits::kDimSteps; ++dn) {
        uint32_t b[4];
        load_b_operands_k_major<KvTile>(b, v_tile, kk * 16, dn * 16, lane);
        mma_pair_each_m_tile<Element>(acc_o, p_frag[kk], b, dn);
      }
    }
  };

  // kFast, kCausal: the tiles some score of the block is masked in come first, the rest run
  // unmasked: [first_masked, end_tile) are the tiles with keys past Sk, or (kCausal) past the band's
  // right edge at the block's first row m0, which sees keys [0, m0 + band_last_key + 1).
  int masked_tiles = num_tiles;
  if constexpr (kSpecialized) {
    int64_t first_masked = block.seqlen_k / kBlockN;
    if constexpr (kPath == KernelPath::kCausal) {
      const int64_t visible_end = m0 + block.sequence.band_last_key(params) + 1;
      const int64_t first_crossed = visible_end > 0 ? visible_end / kBlockN : 0;
      first_masked = first_crossed < first_masked ? first_crossed : first_masked;
    }
    const int64_t masked = end_tile - first_masked;
    masked_tiles = masked < 0 ? 0 : (masked < num_tiles ? static_cast<int>(masked) : num_tiles);
  }
  int it = 0;
  if constexpr (kPath == KernelPath::kFast) {
    // kFast masks only the tile holding key Sk - 1 (masked_tiles <= 1), run without a loop: as
    // a loop of at most one iteration it cost 16-24 bytes of spills at D 128.
    if (masked_tiles > 0) {
      key_tile(it++, std::true_type{});
    }
  } else {
    for (; it < masked_tiles; ++it) {
      key_tile(it, std::true_type{});
    }
  }
  if constexpr (kSpecialized) {
    for (; it < num_tiles; ++it) {
      key_tile(it, std::false_type{});
    }
  }

  // out = O / rowsum (0 for rows with no visible key), lse = ln(sum exp(s)).
  Element* out = block.query_rows(static_cast<Element*>(params.out), params.out_batch_stride, params.out_head_stride,
                                  params.out_row_stride);
  float* lse = static_cast<float*>(params.lse) + block.sequence.lse_index(params, block.seqlen_q, block.head, 0);
  FA_UNROLL
  for (int mt = 0; mt < kMTiles; ++mt) {
    FA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      const int row = row0 + mt * 16 + r * 8;
      if (row >= block.seqlen_q) {
        continue;
      }
      const float keep_scale = kSpecialized ? 1.0f : scores.dropout_keep_scale();
      const float out_scale = sum == 0.0f ? 0.0f : keep_scale / sum;
      store_accumulator_row(out + row * params.out_row_stride, acc_o[mt], r, out_scale, pair, block.head_dim);
      if (lane % 4 == 0) {
        // kFast, kCausal: the row max in log2 units is m c (m in q.k units).
        const float max_log2 = kSpecialized ? row_max[mt][r] * scores.scale_log2() : row_max[mt][r];
        const float base = row_max[mt][r] == negative_infinity() ? 0.0f : max_log2;
        store_global(lse + row, sum == 0.0f ? negative_infinity() : (base + log2f(sum)) * kLn2);
      }
    }
  }
}

template <ElementType kElement, int kHeadDim, KernelPath kPath>
LaunchStatus run_attention_forward(const AttentionForwardParams& params, cudaStream_t stream) {
  using Traits = ForwardTraits<typename ElementOf<kElement>::type, kHeadDim, is_specialized(kPath)>;
  if constexpr (is_specialized(kPath)) {
    if (kernel_path(params) != kPath) {
      return {false, "forward kernel path does not match the problem"};
    }
    // No varlen kernel: packed sequences take the kGeneral path (kernel_path).
    const auto kernel = attention_forward_kernel<Traits, kPath, false>;
    return launch_per_query_block<Traits>(kernel, kernel, params, stream);
  } else {
    return launch_per_query_block<Traits>(attention_forward_kernel<Traits, kPath, false>,
                                          attention_forward_kernel<Traits, kPath, true>, params, stream);
  }
}

}  // namespace fast_attn::cuda
