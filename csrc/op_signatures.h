// The C++ signatures of csrc/schema.cpp's ops, written once. A device's TORCH_LIBRARY_IMPL
// registers these templates instantiated with its implementation, which receives the
// arguments gathered as the schema orders them:
//   attention_forward_op<run>:  run(const ForwardInputs&)                        (attention_launch.h)
//   attention_backward_op<run>: run(const ForwardInputs&, const BackwardInputs&)
//   decode_forward_op<run>:     run(const DecodeInputs&)                         (decode_launch.h)
// Arguments beyond the schema's (`Extra`, named as template arguments: the CUDA emulator's
// sm_count) come last and are passed on after the gathered ones.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "attention_launch.h"
#include "decode_launch.h"

namespace fast_attn {

// What the backward takes beyond the forward's inputs (attention_backward's schema).
struct BackwardInputs {
  const at::Tensor& grad_out;                 // (B, Hq, Sq, D) like q
  const std::optional<at::Tensor>& grad_lse;  // float32 (B, Hq, Sq)
  const at::Tensor& out;                      // the forward's out and lse
  const at::Tensor& lse;
  bool compute_dbias;
  bool deterministic;
};

template <auto kRun, typename... Extra>
auto attention_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
                          const std::optional<at::Tensor>& dropout_seed, double scale, int64_t causal,
                          double dropout_p, const std::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                          int64_t window_right, double softcap, const std::optional<at::Tensor>& cu_seqlens_q,
                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, Extra... extra) {
  return kRun(ForwardInputs{q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left,
                            window_right, softcap, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k},
              extra...);
}

template <auto kRun, typename... Extra>
auto attention_backward_op(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                           const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
                           const std::optional<at::Tensor>& dropout_seed, const at::Tensor& out,
                           const at::Tensor& lse, double scale, int64_t causal, double dropout_p,
                           bool compute_dbias, bool deterministic, const std::optional<at::Tensor>& alibi_slopes,
                           int64_t window_left, int64_t window_right, double softcap,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, Extra... extra) {
  return kRun(ForwardInputs{q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left,
                            window_right, softcap, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k},
              BackwardInputs{grad_out, grad_lse, out, lse, compute_dbias, deterministic}, extra...);
}

template <auto kRun, typename... Extra>
auto decode_forward_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                       const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                       const std::optional<at::Tensor>& block_table,
                       const std::optional<at::Tensor>& cache_batch_idx, double scale, bool causal,
                       const std::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right,
                       double softcap, int64_t num_splits, Extra... extra) {
  return kRun(DecodeInputs{q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table,
                           cache_batch_idx, scale, causal, alibi_slopes, window_left, window_right, softcap,
                           num_splits},
              extra...);
}

}  // namespace fast_attn
