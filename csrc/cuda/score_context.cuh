// What turns a raw q.k dot product into the score the softmax sees, for one
// (batch, query head): scale, bias read through strides, causal and key
// masks, sequence bounds, and the dropout keep decision of the contract.
// Kernels instantiated with kModifiers (problems with the band's left edge, a
// softcap or ALiBi) add those; without it they compile to exactly the code
// of the problems that use none of them, whose registers sit at the limit.
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

// tanh(x) = 1 - 2 / (2^(2 x log2(e)) + 1): one ex2.approx (relative error 2^-22) where tanhf
// under --use_fast_math is tanh.approx (2^-11, too coarse for a logit cap of 30 or more).
// Saturates to +-1 without a NaN (2 / inf = 0).
FA_DEVICE float tanh_by_exp2(float x) { return 1.0f - 2.0f / (exp2f(2.0f * kLog2e * x) + 1.0f); }

template <typename Element, bool kModifiers = false>
struct ScoreContext {
  const AttentionForwardParams& params;
  const void* bias;         // at (batch, head); nullptr when absent
  const uint8_t* key_mask;  // at batch; nullptr when absent
  uint64_t dropout_seed;
  uint64_t dropout_head_base;  // ((b * Hq + h) * Sq) * Sk: linear index of score (b, h, 0, 0)
  float alibi_slope_log2;      // ALiBi's slope(b, h) in log2 units (kModifiers; 0 without ALiBi)

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
    alibi_slope_log2 = 0.0f;
    if constexpr (kModifiers) {
      if (p.alibi_slopes != nullptr) {
        alibi_slope_log2 = load_global(p.alibi_slopes + batch * p.alibi_batch_stride + head) * kLog2e;
      }
    }
  }

  // Read from the kernel parameters at each use (constant-bank operands, no registers).
  FA_DEVICE float scale_log2() const { return params.scale * kLog2e; }
  FA_DEVICE bool dropout() const { return params.dropout_seed != nullptr; }
  FA_DEVICE float dropout_keep_scale() const { return dropout() ? params.dropout_keep_scale : 1.0f; }

  FA_DEVICE bool softcap() const { return kModifiers && params.softcap > 0.0f; }
  FA_DEVICE bool alibi() const { return kModifiers && params.alibi_slopes != nullptr; }

  // Whether some score of the tile [q0, q0 + rows) x [k0, k0 + cols) is masked
  // (sequence bounds, the band's edges, key mask).
  FA_DEVICE bool needs_mask(int q0, int rows, int k0, int cols) const {
    return key_mask != nullptr || q0 + rows > params.seqlen_q || k0 + cols > params.seqlen_k ||
           (band_bounds_right(params) && k0 + cols - 1 > q0 + band_last_key_offset(params)) ||
           (kModifiers && band_bounds_left(params) && k0 < q0 + rows - 1 + band_first_key_offset(params));
  }

  // Whether some score of the tile is masked, capped or biased (else every
  // score is just the scaled dot product).
  FA_DEVICE bool needs_elementwise(int q0, int rows, int k0, int cols) const {
    return bias != nullptr || softcap() || alibi() || needs_mask(q0, rows, k0, cols);
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
           !(kModifiers && band_bounds_left(params) && key < query + band_first_key_offset(params)) &&
           (key_mask == nullptr || load_global(key_mask + key * params.key_mask_col_stride) != 0);
  }

  // scale q.k in log2 units, through the softcap c t, t = tanh(scale q.k / c), when there
  // is one; `slope` = d score / d (scale q.k): 1 - t^2 under the cap, else 1.
  FA_DEVICE float scaled_log2(float dot, float& slope) const {
    if (softcap()) {
      const float t = tanh_by_exp2(dot * (params.scale / params.softcap));
      slope = 1.0f - t * t;
      return t * (params.softcap * kLog2e);
    }
    slope = 1.0f;
    return dot * scale_log2();
  }

  // ALiBi's term of (query, key) in log2 units: -slope |query + Sk - Sq - key| (in bounds only).
  FA_DEVICE float alibi_log2(int query, int key) const {
    const int distance = (query - static_cast<int>(params.seqlen_q)) + (static_cast<int>(params.seqlen_k) - key);
    return -alibi_slope_log2 * static_cast<float>(distance < 0 ? -distance : distance);
  }

  // The score of (query, key) in log2 units, -inf where masked; `slope` as scaled_log2's
  // (0 where masked).
  FA_DEVICE float score_log2(float dot, int query, int key, float& slope) const {
    if (!visible(query, key)) {
      slope = 0.0f;
      return negative_infinity();
    }
    float score = scaled_log2(dot, slope);
    if (bias != nullptr) {
      score += bias_value(query, key) * kLog2e;
    }
    if (alibi()) {
      score += alibi_log2(query, key);
    }
    return score;
  }

  FA_DEVICE float score_log2(float dot, int query, int key) const {
    float slope;
    return score_log2(dot, query, key, slope);
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
