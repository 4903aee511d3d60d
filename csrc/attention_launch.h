// Host-side glue shared by the CPU and CUDA implementations of the fast_attn
// ops: invariant checks, output allocation, and filling the params structs of
// attention_params.h from tensors. Kernels never see an at::Tensor.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "attention_params.h"

namespace fast_attn {

struct ForwardInputs {
  const at::Tensor& q;  // (B, Hq, Sq, D)
  const at::Tensor& k;  // (B, Hkv, Sk, D)
  const at::Tensor& v;  // (B, Hkv, Sk, D)
  const std::optional<at::Tensor>& bias;          // (Bb, Hb, Sqb, Skb), each dim 1 or full
  const std::optional<at::Tensor>& key_mask;      // bool (B or 1, Sk)
  const std::optional<at::Tensor>& alibi_slopes;  // float32 (B or 1, Hq) contiguous
  const std::optional<at::Tensor>& dropout_seed;  // int64 (1,) on q's device
  double scale;
  int64_t causal;  // CausalMode
  int64_t window_left;   // -1 = unbounded
  int64_t window_right;  // -1 = unbounded
  double softcap;        // 0 = none
  double dropout_p;
  // Varlen (both or neither): int32 (N + 1,) row offsets of the sequences in q and in
  // k/v, which then have batch 1; max_seqlen_* bound the sequences' lengths (-1: derived
  // from the offsets here, one device-to-host copy on a GPU).
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  int64_t max_seqlen_q;
  int64_t max_seqlen_k;
};

// The band of visible keys of a causal mode and a (left, right) window, as
// AttentionForwardParams holds it: fast_attn/causal.py::visible_band in C++.
struct Band {
  int64_t offset;
  int64_t left;
  int64_t right;
};
Band band_of(int64_t causal, int64_t window_left, int64_t window_right, int64_t seqlen_q, int64_t seqlen_k);

// Checks what a kernel relies on (ranks, shapes, dtypes, devices, unit last
// stride). The Python layer establishes all of it with friendlier messages;
// these checks keep a direct torch.ops call from reading out of bounds.
void check_forward_inputs(const ForwardInputs& in);

// The accumulation type's dtype of lse and delta: float64 for float64 inputs, else float32.
at::ScalarType accumulation_dtype(at::ScalarType input_dtype);

// out (B, Hq, Sq, D) stored (B, Sq, Hq, D)-contiguous, and lse (B, Hq, Sq) contiguous.
std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& q);

// A (B, H, S, D) tensor stored (B, S, H, D)-contiguous, like `like`'s shape.
at::Tensor empty_bshd_like(const at::Tensor& like);

// A problem without a single score (no query row or no key) never reaches a kernel; every backend
// answers it here. Forward: out 0 and lse -inf (each row sees no key). Backward: zero gradients
// (dbias in the bias's shape when compute_dbias, else an empty tensor).
bool has_no_scores(const at::Tensor& q, const at::Tensor& k);
void fill_forward_without_scores(at::Tensor& out, at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_without_scores(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    bool compute_dbias);

// The data of a 4-D tensor and its first three strides (of a (B, H, S, D) tensor: batch, head and
// row), into four fields of a params struct.
template <class Data>
void set_data_and_strides(const at::Tensor& t, Data& data, int64_t& stride0, int64_t& stride1, int64_t& stride2) {
  data = t.data_ptr();
  stride0 = t.stride(0);
  stride1 = t.stride(1);
  stride2 = t.stride(2);
}

AttentionForwardParams make_forward_params(const ForwardInputs& in, const at::Tensor& out, const at::Tensor& lse);

struct BackwardTensors {
  const at::Tensor& grad_out;  // (B, Hq, Sq, D), last dim contiguous
  const at::Tensor& out;
  const at::Tensor& lse;
  const at::Tensor& delta;  // (B, Hq, Sq) accumulation dtype, filled by the backend
  const at::Tensor& dq;
  const at::Tensor& dk;
  const at::Tensor& dv;
  const std::optional<at::Tensor>& dbias_partials;  // (num_splits, Bb, Hb, Sqb, Skb)
};

AttentionBackwardParams make_backward_params(const ForwardInputs& in, const BackwardTensors& t);

// Points p's dbias at partial sums (num_splits, Bb, Hb, Sqb, Skb) allocated after p was made.
void set_dbias_partials(AttentionBackwardParams& p, const at::Tensor& partials);

// delta = rowsum(grad_out * out) - grad_lse in the accumulation dtype, (B, Hq, Sq); grad_out's
// last dim contiguous (out is brought to grad_out's dtype and a contiguous last dim if it lacks them).
at::Tensor compute_delta(const at::Tensor& grad_out, const at::Tensor& out,
                         const std::optional<at::Tensor>& grad_lse);

// Zeroed partial sums (num_splits, Bb, Hb, Sqb, Skb) in the accumulation dtype.
at::Tensor allocate_dbias_partials(const at::Tensor& bias, int64_t num_splits);

// Sums the splits in index order (deterministic) and casts to the bias's dtype and shape.
at::Tensor finish_dbias(const at::Tensor& partials, const at::Tensor& bias);

}  // namespace fast_attn
