// What turns a raw q.k dot product into the score the softmax sees, for one
// (batch or packed sequence, query head): scale, bias read through strides, causal and key
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

// The problem a CTA (or a unit of the dK/dV kernel) works on: batch b of the params' problem or,
// for varlen, packed sequence n as sequence_view (attention_params.h) makes it, a problem of
// batch 1 whose rows start at row q_begin of q (out, grad_out, dq, lse, delta) and k_begin of k
// (v, dk, dv), with its own lengths and band. Kernels keep the view's few facts in 32 bits
// rather than a copy of the params (whose moved pointers and 64-bit lengths take registers the
// dK/dV kernel does not have), and compute lse_index and dropout_index of the view from them (the
// params a kernel gets have packed offsets 0). Without varlen (kVarlen false) every accessor reads
// the params where the kernels always did, or is the constant 0: those kernels compile to what
// they were.
template <bool kVarlen>
struct Sequence {
  int64_t batch;      // index into the batch dim of the tensors: b, or 0 for varlen (the packed batch)
  int64_t alibi_row;  // the row of alibi_slopes: b, or n for varlen
  int32_t varlen_seqlen_q, varlen_seqlen_k;  // varlen only, as the accessors below
  int32_t varlen_q_begin, varlen_k_begin;
  int32_t varlen_band_shift;

  FA_DEVICE int64_t seqlen_q(const AttentionForwardParams& p) const { return kVarlen ? varlen_seqlen_q : p.seqlen_q; }
  FA_DEVICE int64_t seqlen_k(const AttentionForwardParams& p) const { return kVarlen ? varlen_seqlen_k : p.seqlen_k; }
  FA_DEVICE int64_t q_begin() const { return kVarlen ? varlen_q_begin : 0; }
  FA_DEVICE int64_t k_begin() const { return kVarlen ? varlen_k_begin : 0; }

  // The band's edges (band_first_key_offset, band_last_key_offset of the view).
  FA_DEVICE int64_t band_first_key(const AttentionForwardParams& p) const {
    return band_first_key_offset(p) + (kVarlen ? varlen_band_shift : 0);
  }
  FA_DEVICE int64_t band_last_key(const AttentionForwardParams& p) const {
    return band_last_key_offset(p) + (kVarlen ? varlen_band_shift : 0);
  }

  // lse_index(view, 0, head, i): the index of row i in lse and delta (lse_index(p, b, head, i)
  // without varlen). seqlen_q: the kernel's query length, which without varlen is also the
  // number of rows of lse per head (Tq for varlen).
  FA_DEVICE int64_t lse_index(const AttentionForwardParams& p, int seqlen_q, int64_t head, int i) const {
    return (batch * p.heads_q + head) * (kVarlen ? p.packed_seqlen_q : seqlen_q) + q_begin() + i;
  }

  // dropout_index(view, 0, head, i, j) = dropout_index_base(p, head) + i * dropout_keys(p) + j.
  FA_DEVICE int64_t dropout_keys(const AttentionForwardParams& p) const {
    return kVarlen ? p.packed_seqlen_k : p.seqlen_k;
  }
  FA_DEVICE uint64_t dropout_index_base(const AttentionForwardParams& p, int64_t head) const {
    return static_cast<uint64_t>(batch * p.heads_q + head) *
               static_cast<uint64_t>(kVarlen ? p.packed_seqlen_q : p.seqlen_q) *
               static_cast<uint64_t>(dropout_keys(p)) +
           static_cast<uint64_t>(q_begin()) * static_cast<uint64_t>(dropout_keys(p)) + static_cast<uint64_t>(k_begin());
  }
};

// Batch b of a problem without varlen, or (kVarlen) packed sequence b.
template <typename Element, bool kVarlen>
FA_DEVICE Sequence<kVarlen> sequence_of(const AttentionForwardParams& p, int64_t b) {
  if constexpr (kVarlen) {
    const AttentionForwardParams view = sequence_view<Element>(p, b);
    return {0,
            b,
            static_cast<int32_t>(view.seqlen_q),
            static_cast<int32_t>(view.seqlen_k),
            static_cast<int32_t>(view.packed_offset_q),
            static_cast<int32_t>(view.packed_offset_k),
            static_cast<int32_t>(view.band_last_key - p.band_last_key)};
  } else {
    return {b, b, 0, 0, 0, 0, 0};
  }
}

template <typename Element, bool kModifiers = false, bool kVarlen = false>
struct ScoreContext {
  const AttentionForwardParams& params;
  const Sequence<kVarlen> sequence;
  const void* bias;         // at (batch, head); nullptr when absent
  const uint8_t* key_mask;  // at batch; nullptr when absent
  uint64_t dropout_seed;
  uint64_t dropout_head_base;  // dropout_index of score (0, 0) of (sequence, head)
  float alibi_slope_log2;      // ALiBi's slope(b, h) in log2 units (kModifiers; 0 without ALiBi)

  FA_DEVICE ScoreContext(const AttentionForwardParams& p, const Sequence<kVarlen>& s, int64_t head)
      : params(p), sequence(s) {
    bias = nullptr;
    if (!kVarlen && p.bias != nullptr) {  // packed sequences take no bias and no key mask
      const int64_t offset = s.batch * p.bias_batch_stride + head * p.bias_head_stride;
      bias = p.bias_is_fp32 ? static_cast<const void*>(static_cast<const float*>(p.bias) + offset)
                            : static_cast<const void*>(static_cast<const Element*>(p.bias) + offset);
    }
    key_mask = kVarlen || p.key_mask == nullptr ? nullptr : p.key_mask + s.batch * p.key_mask_batch_stride;
    dropout_seed = p.dropout_seed != nullptr ? static_cast<uint64_t>(load_global(p.dropout_seed)) : 0;
    dropout_head_base = s.dropout_index_base(p, head);
    alibi_slope_log2 = 0.0f;
    if constexpr (kModifiers) {
      if (p.alibi_slopes != nullptr) {
        alibi_slope_log2 = load_global(p.alibi_slopes + s.alibi_row * p.alibi_batch_stride + head) * kLog2e;
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
    return key_mask != nullptr || q0 + rows > sequence.seqlen_q(params) || k0 + cols > sequence.seqlen_k(params) ||
           (band_bounds_right(params) && k0 + cols - 1 > q0 + sequence.band_last_key(params)) ||
           (kModifiers && band_bounds_left(params) && k0 < q0 + rows - 1 + sequence.band_first_key(params));
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
    return query < sequence.seqlen_q(params) && key < sequence.seqlen_k(params) &&
           !(band_bounds_right(params) && key > query + sequence.band_last_key(params)) &&
           !(kModifiers && band_bounds_left(params) && key < query + sequence.band_first_key(params)) &&
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
    const int distance =
        (query - static_cast<int>(sequence.seqlen_q(params))) + (static_cast<int>(sequence.seqlen_k(params)) - key);
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

  // Dropout keeps score (query, key) when the hash of its dropout_index reaches the threshold
  // (csrc/attention_params.h, bit-identical to fast_attn/dropout.py).
  FA_DEVICE bool keeps(int query, int key) const {
    const uint64_t index = dropout_head_base +
                           static_cast<uint64_t>(query) * static_cast<uint64_t>(sequence.dropout_keys(params)) +
                           static_cast<uint64_t>(key);
    return dropout_hash(dropout_seed, index) >= params.dropout_keep_threshold;
  }

  FA_DEVICE bool in_bounds(int query, int key) const {
    return query < sequence.seqlen_q(params) && key < sequence.seqlen_k(params);
  }
};

}  // namespace fast_attn::cuda
