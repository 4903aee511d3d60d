// Split-KV decoding against a KV cache (decode_forward, csrc/schema.cpp; decode_params.h): one
// CTA per (split, kv head x block of kDecodeRows query rows, sequence). The rows are the
// g = Hq / Hkv query heads x Sq queries that read the same kv head (GQA packing), so each key is
// loaded once for all of them. Decoding is memory-bound: no tensor cores, the keys stream with
// 16-byte vector loads straight into registers.
//
// Threads form groups of kGroupThreads lanes; lane c of a group holds columns 8c .. 8c + 7 of
// a key row (and of every query row, in registers). Per step the CTA covers kBlockN keys, group
// g taking keys g, g + kGroups, ... (kKeysPerGroup of them, loaded together so that their loads
// are in flight at once):
//   s = q . k       8 products per lane, summed over the group with xor shuffles
//   s -> log2 units  scale, softcap, ALiBi, band and length masks (score_context.cuh)
//   online softmax   per row, in float32; acc (8 columns per lane) += p v
// At the end the groups' (max, sum, acc) are merged through shared memory: the split's out and
// lse, written to out / lse directly with one split, else to the partial buffers that the
// combine kernel (decode_combine.cu) merges by the lse rule.
//
// The key range of a CTA is the keys any query of its sequence may see (bottom-right causal and
// window edges of rows 0 and Sq - 1), cut into num_splits ranges of whole kBlockN blocks. A split
// (or sequence) without keys writes out 0 and lse -inf.
#pragma once

#include "decode_cache.cuh"
#include "decode_merge.cuh"
#include "score_context.cuh"

namespace fast_attn::cuda {

template <typename Element_, int kHeadDim_>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = kDecodeThreads;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte vectors of a row
  static constexpr int kGroupThreads = decode_group_threads(kHeadDim);  // a power of two >= kChunks
  static constexpr int kGroups = kThreads / kGroupThreads;
  static constexpr int kKeysPerGroup = kDecodeKeysPerGroup;
  static constexpr int kBlockN = decode_block_n(kHeadDim);
  static_assert(kChunks <= kGroupThreads && kWarpSize % kGroupThreads == 0, "a group covers a row within a warp");
  static_assert(kBlockN == kGroups * kKeysPerGroup, "a step is every group's keys");
  // Merge area: per group and row, the accumulator row (kHeadDim floats), then its max and sum;
  // a pitch of a whole number of float4.
  static constexpr int kMergePitch = kHeadDim + 4;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kGroups) * kRows * kMergePitch * sizeof(float);
};

template <typename Traits>
FA_KERNEL(Traits::kThreads, 1)
void decode_split_kernel(const DecodeParams params) {
  using Element = typename Traits::Element;
  constexpr int kRows = Traits::kRows;
  constexpr int kGroupThreads = Traits::kGroupThreads;
  constexpr int kKeysPerGroup = Traits::kKeysPerGroup;
  constexpr int kHeadDim = Traits::kHeadDim;

  const int group = static_cast<int>(threadIdx.x) / kGroupThreads;
  const int chunk = static_cast<int>(threadIdx.x) % kGroupThreads;  // columns 8 chunk .. 8 chunk + 7
  const int head_dim = static_cast<int>(params.head_dim);
  const bool chunk_valid = chunk * 8 < head_dim;

  const int split = static_cast<int>(blockIdx.x);
  const int64_t row_blocks = decode_row_blocks(params);
  const int64_t kv_head = blockIdx.y / row_blocks;
  const int heads_per_kv = static_cast<int>(params.heads_q / params.heads_kv);
  const int seqlen_q = static_cast<int>(params.seqlen_q);
  const int row0 = static_cast<int>(blockIdx.y % row_blocks) * kRows;  // of the heads_per_kv * Sq rows
  const int rows = heads_per_kv * seqlen_q - row0 < kRows ? heads_per_kv * seqlen_q - row0 : kRows;
  const int64_t b = blockIdx.z;
  // Row r of the CTA: query head kv_head * g + (row0 + r) / Sq, query (row0 + r) % Sq.
  auto head_of = [&](int r) { return kv_head * heads_per_kv + (row0 + r) / seqlen_q; };
  auto query_of = [&](int r) { return (row0 + r) % seqlen_q; };

  const DecodeKeyRange positions = decode_key_range(params, b);
  const int seqlen_k = positions.length();
  // The sequence as a packed sequence of one problem (score_context.cuh): its ALiBi row, lengths
  // and the band moved to its bottom-right diagonal.
  const Sequence<true> sequence{b, b, seqlen_q, seqlen_k, 0, 0, seqlen_k - seqlen_q};
  const AttentionForwardParams& score_params = params.scores;

  int key_begin = 0;
  int key_end = seqlen_k;
  if (band_bounds_right(score_params)) {
    const int64_t band_end = seqlen_q + sequence.band_last_key(score_params);  // last row's, exclusive
    key_end = band_end < key_end ? static_cast<int>(band_end > 0 ? band_end : 0) : key_end;
  }
  if (band_bounds_left(score_params)) {
    const int64_t band_begin = sequence.band_first_key(score_params);  // row 0's
    key_begin = band_begin > 0 ? static_cast<int>(band_begin < key_end ? band_begin : key_end) : 0;
  }
  const int blocks = key_end > key_begin ? static_cast<int>(ceil_div(key_end - key_begin, Traits::kBlockN)) : 0;
  const int split_keys = static_cast<int>(ceil_div(blocks, params.num_splits)) * Traits::kBlockN;
  const int split_begin = key_begin + split * split_keys;
  const int split_end = split_begin + split_keys < key_end ? split_begin + split_keys : key_end;

  // q rows: this lane's 8 columns of each (zero past the head dim and the rows).
  uint4 q_vectors[kRows];
  FA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    q_vectors[r] = make_uint4(0, 0, 0, 0);
    if (r < rows && chunk_valid) {
      const Element* q = static_cast<const Element*>(params.q.data) + b * params.q.batch_stride +
                         query_of(r) * params.q.row_stride + head_of(r) * params.q.head_stride + chunk * 8;
      q_vectors[r] = load_global(reinterpret_cast<const uint4*>(q));
    }
  }

  float acc[kRows][8];
  float row_max[kRows];  // log2 units; the same in every lane of the group
  float row_sum[kRows];
  FA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    FA_UNROLL
    for (int c = 0; c < 8; ++c) {
      acc[r][c] = 0.0f;
    }
    row_max[r] = negative_infinity();
    row_sum[r] = 0.0f;
  }

  const Element* k_cache = static_cast<const Element*>(params.k_cache.data);
  const Element* v_cache = static_cast<const Element*>(params.v_cache.data);
  for (int k0 = split_begin; k0 < split_end; k0 += Traits::kBlockN) {
    uint4 k_vectors[kKeysPerGroup];
    uint4 v_vectors[kKeysPerGroup];
    FA_UNROLL
    for (int j = 0; j < kKeysPerGroup; ++j) {
      const int key = k0 + j * Traits::kGroups + group;
      k_vectors[j] = v_vectors[j] = make_uint4(0, 0, 0, 0);
      if (key < split_end && chunk_valid) {
        const DecodeSlot slot = decode_slot(params, b, positions.begin + key);
        k_vectors[j] = load_global(
            reinterpret_cast<const uint4*>(k_cache + decode_cache_offset(params.k_cache, slot, kv_head) + chunk * 8));
        v_vectors[j] = load_global(
            reinterpret_cast<const uint4*>(v_cache + decode_cache_offset(params.v_cache, slot, kv_head) + chunk * 8));
      }
    }
    FA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) {
        continue;  // the same in every thread: the shuffles below stay uniform
      }
      const ScoreContext<Element, true, true> scores(score_params, sequence, head_of(r));
      float s[kKeysPerGroup];
      float step_max = negative_infinity();
      FA_UNROLL
      for (int j = 0; j < kKeysPerGroup; ++j) {
        float dot = dot8<Element>(q_vectors[r], k_vectors[j]);
        FA_UNROLL
        for (int mask = kGroupThreads / 2; mask >= 1; mask /= 2) {
          dot += shfl_xor(dot, mask);
        }
        const int key = k0 + j * Traits::kGroups + group;
        s[j] = key < split_end ? scores.score_log2(dot, query_of(r), key) : negative_infinity();
        step_max = fmaxf(step_max, s[j]);
      }
      // As the forward kernel: a row without a visible key so far keeps max -inf and base 0.
      const float new_max = fmaxf(row_max[r], step_max);
      const float base = new_max == negative_infinity() ? 0.0f : new_max;
      const float correction = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      row_sum[r] *= correction;
      FA_UNROLL
      for (int c = 0; c < 8; ++c) {
        acc[r][c] *= correction;
      }
      FA_UNROLL
      for (int j = 0; j < kKeysPerGroup; ++j) {
        const float p = exp2f(s[j] - base);
        row_sum[r] += p;
        float v[8];
        unpack8<Element>(v_vectors[j], v);
        FA_UNROLL
        for (int c = 0; c < 8; ++c) {
          acc[r][c] += p * v[c];
        }
      }
    }
  }

  // Merge the groups: group g's row r at merge + (g kRows + r) kMergePitch, its max and sum after.
  float* merge = reinterpret_cast<float*>(dynamic_shared_memory());
  FA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float* slot = merge + (group * kRows + r) * Traits::kMergePitch;
    if (r < rows && chunk < Traits::kChunks) {
      store_shared(reinterpret_cast<float4*>(slot + chunk * 8),
                   make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      store_shared(reinterpret_cast<float4*>(slot + chunk * 8 + 4),
                   make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]));
      if (chunk == 0) {
        store_shared(slot + kHeadDim, row_max[r]);
        store_shared(slot + kHeadDim + 1, row_sum[r]);
      }
    }
  }
  block_sync();

  const int64_t lse_rows = decode_lse_rows(params);
  for (int task = static_cast<int>(threadIdx.x); task < rows * Traits::kChunks; task += Traits::kThreads) {
    const int r = task / Traits::kChunks;
    const int c = task % Traits::kChunks;
    if (c * 8 >= head_dim) {
      continue;
    }
    const float* row = merge + r * Traits::kMergePitch;  // of group 0
    constexpr int kGroupPitch = kRows * Traits::kMergePitch;
    float max = negative_infinity();
    for (int g = 0; g < Traits::kGroups; ++g) {
      max = fmaxf(max, load_shared(row + g * kGroupPitch + kHeadDim));
    }
    const float base = max == negative_infinity() ? 0.0f : max;
    SoftmaxMerge merged;
    for (int g = 0; g < Traits::kGroups; ++g) {
      const float* group_row = row + g * kGroupPitch;
      merged.add(exp2f(load_shared(group_row + kHeadDim) - base), load_shared(group_row + kHeadDim + 1),
                 load_shared(reinterpret_cast<const float4*>(group_row + c * 8)),
                 load_shared(reinterpret_cast<const float4*>(group_row + c * 8 + 4)));
    }
    merged.normalize();
    const float lse = merged.sum == 0.0f ? negative_infinity() : (base + log2f(merged.sum)) * kLn2;
    const int64_t head = head_of(r);
    const int query = query_of(r);
    const int64_t lse_row = (b * params.heads_q + head) * seqlen_q + query;
    if (params.num_splits == 1) {
      merged.store(static_cast<Element*>(params.out) + decode_out_offset(params, b, query, head) + c * 8);
      if (c == 0) {
        store_global(params.lse + lse_row, lse);
      }
    } else {
      merged.store(params.out_partial + (split * lse_rows + lse_row) * head_dim + c * 8);
      if (c == 0) {
        store_global(params.lse_partial + split * lse_rows + lse_row, lse);
      }
    }
  }
}

template <ElementType kElement, int kHeadDim>
LaunchStatus run_decode(const DecodeParams& params, cudaStream_t stream) {
  using Traits = DecodeTraits<typename ElementOf<kElement>::type, kHeadDim>;
  const dim3 grid(static_cast<unsigned>(params.num_splits),
                  static_cast<unsigned>(params.heads_kv * decode_row_blocks(params)),
                  static_cast<unsigned>(params.batch));
  return launch_kernel(decode_split_kernel<Traits>, grid, dim3(Traits::kThreads), Traits::kSmemBytes, stream, params);
}

}  // namespace fast_attn::cuda
