// What turns a raw q.k dot product into the score the softmax sees, for one
// (batch, query head): scale, bias read through strides, causal and key
// masks, sequence bounds, and the dropout keep decision of the contract.
//
// Scores are kept in log2 units (s * log2(e)) so that probabilities are one
// exp2; log2(e) is folded into the scale once. Query and key positions are
// 32-bit (the launcher refuses sequences of 2^31 - 2^16 or more); memory
// offsets and the dropout index are 64-bit. Strides are read from the kernel
// parameters at use, which keeps them out of the registers the MMA
// accumulators need.
#pragma once

#include "attention_params.h"
#include "device_runtime.cuh"

namespace fast_attn::cuda {

template <typename Element>
struct ScoreContext {
  const AttentionForwardParams& params;
  const void* bias;         // at (batch, head); nullptr when absent
  const uint8_t* key_mask;  // at batch; nullptr when absent
  uint64_t dropout_seed;
  uint64_t dropout_head_base;  // ((b * Hq + h) * Sq) * Sk: linear index of score (b, h, 0, 0)

  FA_DEVICE ScoreContext(const AttentionForwardParams& p, int64_t batch, int64_t head) : params(p) {
    bias = nullptr;
    if (p.bias != nullptr) {
      const int64_t offset = batch * p.bias_batch_stride + head * p.bias_head_stride;
      bias = p.bias_is_fp32 ? static_cast<const void*>(static_cast<const float*>(p.bias) + offset)
                            : static_cast<const void*>(static_cast<const Element*>(p.bias) + offset);
    }
    key_mask = p.key_mask == nullptr ? nullptr : p.key_mask + batch * p.key_mask_batch_stride;
    dropout_seed = p.dropout_seed != nullptr ? static_cast<uint64_t>(load_global(p.dropout_seed)) : 0;
    dropout_head_base = static_cast<uint64_t>(batch * p.heads_q + head) * static_cast<uint64_t>(p.seqlen_q) *
                        static_cast<uint64_t>(p.seqlen_k);
  }

  // Read from the kernel parameters at each use (constant-bank operands, no registers).
  FA_DEVICE float scale_log2() const { return params.scale * kLog2e; }
  FA_DEVICE bool dropout() const { return params.dropout_seed != nullptr; }
  FA_DEVICE float dropout_keep_scale() const { return dropout() ? params.dropout_keep_scale : 1.0f; }

  // Whether some score of the tile [q0, q0 + rows) x [k0, k0 + cols) is masked
  // (sequence bounds, the band's right edge, key mask).
  FA_DEVICE bool needs_mask(int q0, int rows, int k0, int cols) const {
    return key_mask != nullptr || q0 + rows > params.seqlen_q || k0 + cols > params.seqlen_k ||
           (band_bounds_right(params) && k0 + cols - 1 > q0 + band_last_key_offset(params));
  }

  // Whether some score of the tile is masked or biased (else every score is
  // just the scaled dot product).
  FA_DEVICE bool needs_elementwise(int q0, int rows, int k0, int cols) const {
    return bias != nullptr || needs_mask(q0, rows, k0, cols);
  }

  FA_DEVICE float bias_value(int query, int key) const {
    const int64_t offset = query * params.bias_row_stride + key * params.bias_col_stride;
    if (params.bias_is_fp32) {
      return load_global(static_cast<const float*>(bias) + offset);
    }
    return ElementOps<Element>::to_float(load_global(static_cast<const Element*>(bias) + offset));
  }

  FA_DEVICE bool visible(int query, int key) const {
    return query < params.seqlen_q && key < params.seqlen_k &&
           !(band_bounds_right(params) && key > query + band_last_key_offset(params)) &&
           (key_mask == nullptr || load_global(key_mask + key * params.key_mask_col_stride) != 0);
  }

  // The score of (query, key) in log2 units, -inf where masked.
  FA_DEVICE float score_log2(float dot, int query, int key) const {
    if (!visible(query, key)) {
      return negative_infinity();
    }
    float score = dot * scale_log2();
    if (bias != nullptr) {
      score += bias_value(query, key) * kLog2e;
    }
    return score;
  }

  // Dropout keeps score (query, key) when its hash reaches the threshold
  // (csrc/attention_params.h, bit-identical to fast_attn/dropout.py).
  FA_DEVICE bool keeps(int query, int key) const {
    const uint64_t index = dropout_head_base +
                           static_cast<uint64_t>(query) * static_cast<uint64_t>(params.seqlen_k) +
                           static_cast<uint64_t>(key);
    return dropout_hash(dropout_seed, index) >= params.dropout_keep_threshold;
  }

  FA_DEVICE bool in_bounds(int query, int key) const { return query < params.seqlen_q && key < params.seqlen_k; }
};

}  // namespace fast_attn::cuda
