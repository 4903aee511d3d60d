// The one description of an attention problem that every C++ and CUDA kernel
// reads. Plain C++ only (no ATen, no CUDA headers), so kernel translation units
// that include it can be compiled by nvcc on a machine whose torch has no CUDA.
//
// Layout conventions (all strides in elements, not bytes):
//   q, out, grad_out, dq : (B, Hq, Sq, D), last dim contiguous
//   k, v, dk, dv         : (B, Hkv, Sk, D), last dim contiguous
//   lse, delta           : (B, Hq, Sq) contiguous, float32 (float64 for float64 inputs)
//   bias                 : read as (B, Hq, Sq, Sk) through four strides; a
//                          broadcast dim has stride 0
//   key_mask             : read as (B, Sk) bytes through two strides, 1 = attend
//   dbias                : (num_splits, Bb, Hb, Sqb, Skb) contiguous partial sums in
//                          the accumulation type, each dim either 1 (broadcast) or
//                          full; the launcher sums the splits in a fixed order.
//
// Packed variable-length sequences (varlen) use the same layout with one batch of Tq
// (Tk) rows: q (1, Hq, Tq, D), k/v (1, Hkv, Tk, D), lse (1, Hq, Tq), sequence n being
// rows cu_seqlens[n] .. cu_seqlens[n + 1]. A kernel works on sequence_view(p, n), an
// ordinary problem of batch 1, and indexes lse and dropout through lse_index and
// dropout_index, which place that view's scores in the packed problem.
#pragma once

#include <cstdint>

namespace fast_attn {

// Causal alignment (the op's `causal` argument): a causal mask is the band's
// right edge at 0 on the diagonal i for kTopLeft, i + Sk - Sq for kBottomRight.
enum class CausalMode : int64_t { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

struct AttentionForwardParams {
  int64_t batch;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t seqlen_q;
  int64_t seqlen_k;
  int64_t head_dim;

  const void* q;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  const void* k;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const void* v;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  void* out;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  void* lse;  // (B, Hq, Sq) contiguous

  // Optional additive bias; nullptr when absent.
  const void* bias;
  bool bias_is_fp32;  // else the bias has the inputs' dtype
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;

  // Optional key-padding mask (bool bytes); nullptr when absent.
  const uint8_t* key_mask;
  int64_t key_mask_batch_stride, key_mask_col_stride;

  float scale;  // multiplies q.k before the softcap and the bias
  // The band of visible keys (causal mask and sliding window, from band_of in
  // attention_launch.cpp) as its two edges relative to the query row: query i sees key j iff
  //   (!band_has_first_key || j >= i + band_first_key) and (!band_has_last_key || j <= i + band_last_key).
  // A causal mask is the last-key edge on the diagonal. Stored as edges (not as offset and
  // window) so that a kernel's test costs what the causal test did: the CUDA dK/dV kernel sits at
  // its register limit.
  bool band_has_first_key;
  bool band_has_last_key;
  int64_t band_first_key;
  int64_t band_last_key;

  // score = softcap * tanh(scale q.k / softcap) when softcap > 0 (0 = no cap), before the bias.
  float softcap;

  // ALiBi: score += -slope(b, h) * |i + Sk - Sq - j| after the bias; nullptr when absent.
  // float32 (B or 1, Hq) contiguous; batch stride 0 for one row of slopes shared by the batch.
  const float* alibi_slopes;
  int64_t alibi_batch_stride;

  // Dropout on the attention probabilities; dropout_seed points at one int64
  // seed in the inputs' memory space, nullptr when p == 0. A score is kept when
  // its dropout_hash is >= dropout_keep_threshold, then scaled by 1 / (1 - p).
  const int64_t* dropout_seed;
  uint32_t dropout_keep_threshold;
  float dropout_keep_scale;

  // Varlen: int32 (N + 1,) row offsets of each sequence in q and in k/v, nullptr otherwise.
  // Then `batch` is N and seqlen_q / seqlen_k bound the sequences' lengths (max_seqlen).
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  // Varlen with a bottom-right alignment: the band's edges above are relative to the
  // top-left diagonal and sequence_view adds each sequence's own offset Sk_n - Sq_n.
  bool band_offset_per_sequence;
  // Where this problem's rows sit in the packed one, for lse_index and dropout_index:
  // offsets 0 and packed lengths seqlen_q / seqlen_k, except in a sequence_view.
  int64_t packed_offset_q, packed_offset_k;
  int64_t packed_seqlen_q, packed_seqlen_k;
};

struct AttentionBackwardParams : AttentionForwardParams {
  const void* grad_out;
  int64_t grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride;
  // delta = rowsum(grad_out * out) - grad_lse, (B, Hq, Sq) contiguous, lse's type.
  void* delta;

  void* dq;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  void* dk;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  void* dv;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;

  // dbias partial sums, nullptr when the bias needs no gradient. Sizes of the
  // bias's own dims (each 1 or full) give the reduction: a dim of size 1 that
  // is larger in the problem is summed over.
  void* dbias;
  int64_t dbias_batch, dbias_heads, dbias_rows, dbias_cols;
  int64_t dbias_num_splits;
};

#if defined(__CUDACC__)
#define FAST_ATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FAST_ATTN_HOST_DEVICE inline
#endif

// The band's edges as offsets from the query index: query i sees keys
// j >= i + band_first_key_offset(p) when band_bounds_left(p), and keys
// j <= i + band_last_key_offset(p) when band_bounds_right(p).
FAST_ATTN_HOST_DEVICE bool band_bounds_left(const AttentionForwardParams& p) { return p.band_has_first_key; }
FAST_ATTN_HOST_DEVICE bool band_bounds_right(const AttentionForwardParams& p) { return p.band_has_last_key; }
FAST_ATTN_HOST_DEVICE int64_t band_first_key_offset(const AttentionForwardParams& p) { return p.band_first_key; }
FAST_ATTN_HOST_DEVICE int64_t band_last_key_offset(const AttentionForwardParams& p) { return p.band_last_key; }

FAST_ATTN_HOST_DEVICE bool is_varlen(const AttentionForwardParams& p) { return p.cu_seqlens_q != nullptr; }

// Index in lse (and delta) of query row i of head h in batch b.
FAST_ATTN_HOST_DEVICE int64_t lse_index(const AttentionForwardParams& p, int64_t b, int64_t h, int64_t i) {
  return (b * p.heads_q + h) * p.packed_seqlen_q + p.packed_offset_q + i;
}

// The linear index of score (b, h, i, j) that dropout_hash takes: the score's index in
// the (B, Hq, Sq, Sk) problem, for varlen in the packed (1, Hq, Tq, Tk) one.
FAST_ATTN_HOST_DEVICE uint64_t dropout_index(const AttentionForwardParams& p, int64_t b, int64_t h, int64_t i,
                                             int64_t j) {
  return static_cast<uint64_t>(lse_index(p, b, h, i)) * static_cast<uint64_t>(p.packed_seqlen_k) +
         static_cast<uint64_t>(p.packed_offset_k + j);
}

// Moves the row pointers of q, out (and grad_out, dq) by q_rows rows, of k, v (and dk,
// dv) by k_rows rows; T is the inputs' element type.
template <class T>
FAST_ATTN_HOST_DEVICE void advance_rows(AttentionForwardParams& p, int64_t q_rows, int64_t k_rows) {
  p.q = static_cast<const T*>(p.q) + q_rows * p.q_row_stride;
  p.out = static_cast<T*>(p.out) + q_rows * p.out_row_stride;
  p.k = static_cast<const T*>(p.k) + k_rows * p.k_row_stride;
  p.v = static_cast<const T*>(p.v) + k_rows * p.v_row_stride;
}

template <class T>
FAST_ATTN_HOST_DEVICE void advance_rows(AttentionBackwardParams& p, int64_t q_rows, int64_t k_rows) {
  advance_rows<T>(static_cast<AttentionForwardParams&>(p), q_rows, k_rows);
  p.grad_out = static_cast<const T*>(p.grad_out) + q_rows * p.grad_out_row_stride;
  p.dq = static_cast<T*>(p.dq) + q_rows * p.dq_row_stride;
  p.dk = static_cast<T*>(p.dk) + k_rows * p.dk_row_stride;
  p.dv = static_cast<T*>(p.dv) + k_rows * p.dv_row_stride;
}

// Sequence n of a varlen problem as a problem of batch 1 (run it with b = 0): row
// pointers and ALiBi slopes moved to the sequence, its own lengths and band. Offsets are
// clamped to [0, T] so that bad cu_seqlens never read out of bounds; a length above the
// max_seqlen bound is cut to it. The lse and delta pointers stay: lse_index places the rows.
// T is the inputs' element type; Params is AttentionForwardParams or AttentionBackwardParams.
template <class T, class Params>
FAST_ATTN_HOST_DEVICE Params sequence_view(const Params& p, int64_t n) {
  const auto clamp = [](int64_t x, int64_t hi) { return x < 0 ? int64_t{0} : (x > hi ? hi : x); };
  const int64_t q_begin = clamp(p.cu_seqlens_q[n], p.packed_seqlen_q);
  const int64_t k_begin = clamp(p.cu_seqlens_k[n], p.packed_seqlen_k);
  const int64_t q_end = clamp(p.cu_seqlens_q[n + 1], p.packed_seqlen_q);
  const int64_t k_end = clamp(p.cu_seqlens_k[n + 1], p.packed_seqlen_k);
  Params s = p;
  s.batch = 1;
  s.seqlen_q = clamp(q_end - q_begin, p.seqlen_q);
  s.seqlen_k = clamp(k_end - k_begin, p.seqlen_k);
  s.packed_offset_q = q_begin;
  s.packed_offset_k = k_begin;
  if (p.band_offset_per_sequence) {
    s.band_first_key += s.seqlen_k - s.seqlen_q;
    s.band_last_key += s.seqlen_k - s.seqlen_q;
  }
  if (p.alibi_slopes != nullptr) s.alibi_slopes += n * p.alibi_batch_stride;
  advance_rows<T>(s, q_begin, k_begin);
  return s;
}

// Whether a problem has a score modifier beyond the band's right edge, bias,
// key mask and dropout: the band's left edge, a softcap or ALiBi. The CUDA host
// runs such problems on the kernels instantiated for them (kModifiers), which
// keeps that code out of the others'.
FAST_ATTN_HOST_DEVICE bool has_score_modifiers(const AttentionForwardParams& p) {
  return band_bounds_left(p) || p.softcap > 0.0f || p.alibi_slopes != nullptr;
}

// Dropout keep-decision shared bit for bit by every backend and by the Python
// reference (fast_attn/dropout.py, dropout_keep_mask): a 32-bit hash of the
// seed and the linear index ((b * Hq + h) * Sq + i) * Sk + j of the score.
// The mixing function is the "lowbias32" integer hash (two multiply-xorshift rounds).

FAST_ATTN_HOST_DEVICE uint32_t dropout_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

FAST_ATTN_HOST_DEVICE uint32_t dropout_hash(uint64_t seed, uint64_t linear_index) {
  uint32_t h = dropout_mix32(static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(linear_index));
  h = dropout_mix32(h ^ static_cast<uint32_t>(linear_index >> 32) ^ static_cast<uint32_t>(seed >> 32));
  return h;
}

// Keep the score when its hash is at or above p * 2^32 (computed in double on
// the host, as fast_attn/dropout.py does).
inline uint32_t dropout_threshold(double dropout_p) {
  const double t = dropout_p * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffU : static_cast<uint32_t>(t);
}

}  // namespace fast_attn
