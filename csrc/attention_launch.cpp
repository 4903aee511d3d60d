#include "attention_launch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fast_attn {
namespace {

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fast_attn: ", name, " must be 4-D, got ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "fast_attn: ", name,
              " must have a contiguous last dim, got strides ", t.strides());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fast_attn: ", name, " must be floating point");
}

// Stride of a dim, or 0 where the dim is broadcast (size 1 in the tensor).
int64_t broadcast_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 && cu.is_contiguous(),
              "fast_attn: ", name, " must be a contiguous 1-D int32 tensor of N + 1 offsets, got ",
              cu.scalar_type(), " of shape ", cu.sizes());
  TORCH_CHECK(cu.device() == q.device(), "fast_attn: ", name, " must be on q's device");
}

void check_varlen_inputs(const ForwardInputs& in) {
  TORCH_CHECK(in.cu_seqlens_q.has_value() == in.cu_seqlens_k.has_value(),
              "fast_attn: cu_seqlens_q and cu_seqlens_k go together");
  if (!in.cu_seqlens_q) return;
  check_cu_seqlens(*in.cu_seqlens_q, "cu_seqlens_q", in.q);
  check_cu_seqlens(*in.cu_seqlens_k, "cu_seqlens_k", in.q);
  TORCH_CHECK(in.cu_seqlens_q->numel() == in.cu_seqlens_k->numel(),
              "fast_attn: cu_seqlens_q and cu_seqlens_k must have the same length, got ", in.cu_seqlens_q->numel(),
              " and ", in.cu_seqlens_k->numel());
  TORCH_CHECK(in.q.size(0) == 1, "fast_attn: packed sequences have batch 1, got q of shape ", in.q.sizes());
  TORCH_CHECK(!in.bias && !in.key_mask, "fast_attn: packed sequences take no bias and no key_mask");
  TORCH_CHECK(in.max_seqlen_q >= -1 && in.max_seqlen_k >= -1,
              "fast_attn: max_seqlen_q and max_seqlen_k must be >= -1 (-1 = derived), got ", in.max_seqlen_q, " and ",
              in.max_seqlen_k);
}

// The longest sequence of a varlen problem: the given bound, or the offsets' largest step.
int64_t max_seqlen_of(const at::Tensor& cu_seqlens, int64_t given) {
  if (given >= 0 || cu_seqlens.numel() < 2) return std::max<int64_t>(given, 0);
  return (cu_seqlens.slice(0, 1) - cu_seqlens.slice(0, 0, -1)).max().item<int64_t>();
}

}  // namespace

Band band_of(int64_t causal, int64_t window_left, int64_t window_right, int64_t seqlen_q, int64_t seqlen_k) {
  const bool has_causal = causal != static_cast<int64_t>(CausalMode::kNone);
  const int64_t right = has_causal ? 0 : window_right;
  // A window without a causal mask is aligned bottom-right, as FlashAttention's.
  const int64_t offset = causal == static_cast<int64_t>(CausalMode::kTopLeft) ? 0 : seqlen_k - seqlen_q;
  return Band{offset, window_left, right};
}

at::ScalarType accumulation_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_forward_inputs(const ForwardInputs& in) {
  check_qkv(in.q, "q");
  check_qkv(in.k, "k");
  check_qkv(in.v, "v");
  TORCH_CHECK(in.q.scalar_type() == in.k.scalar_type() && in.q.scalar_type() == in.v.scalar_type(),
              "fast_attn: q, k, v must share a dtype");
  TORCH_CHECK(in.q.device() == in.k.device() && in.q.device() == in.v.device(),
              "fast_attn: q, k, v must be on one device");
  TORCH_CHECK(in.k.sizes() == in.v.sizes(), "fast_attn: k and v must have the same shape");
  TORCH_CHECK(in.q.size(0) == in.k.size(0) && in.q.size(3) == in.k.size(3),
              "fast_attn: q and k must agree in batch and head dim, got ", in.q.sizes(), " and ",
              in.k.sizes());
  TORCH_CHECK(in.k.size(1) >= 1 && in.q.size(1) % in.k.size(1) == 0,
              "fast_attn: Hq must be a multiple of Hkv, got ", in.q.sizes(), " and ", in.k.sizes());
  TORCH_CHECK(in.causal >= 0 && in.causal <= 2, "fast_attn: causal must be 0, 1 or 2, got ", in.causal);
  TORCH_CHECK(in.window_left >= -1 && in.window_right >= -1,
              "fast_attn: window_left and window_right must be >= -1 (-1 = unbounded), got ", in.window_left, " and ",
              in.window_right);
  TORCH_CHECK(std::isfinite(in.softcap) && in.softcap >= 0.0,
              "fast_attn: softcap must be finite and >= 0 (0 = none), got ", in.softcap);
  TORCH_CHECK(in.dropout_p >= 0.0 && in.dropout_p < 1.0, "fast_attn: dropout_p must be in [0, 1)");
  if (in.bias) {
    const at::Tensor& bias = *in.bias;
    TORCH_CHECK(bias.dim() == 4, "fast_attn: bias must be 4-D, got ", bias.sizes());
    TORCH_CHECK(bias.device() == in.q.device(), "fast_attn: bias must be on q's device");
    TORCH_CHECK(bias.scalar_type() == in.q.scalar_type() || bias.scalar_type() == at::kFloat,
                "fast_attn: bias must have q's dtype or float32, got ", bias.scalar_type());
    const int64_t full[4] = {in.q.size(0), in.q.size(1), in.q.size(2), in.k.size(2)};
    for (int64_t d = 0; d < 4; ++d) {
      TORCH_CHECK(bias.size(d) == 1 || bias.size(d) == full[d], "fast_attn: bias of shape ",
                  bias.sizes(), " does not broadcast to (B, Hq, Sq, Sk)");
    }
  }
  if (in.key_mask) {
    const at::Tensor& mask = *in.key_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, "fast_attn: key_mask must be bool");
    TORCH_CHECK(mask.device() == in.q.device(), "fast_attn: key_mask must be on q's device");
    TORCH_CHECK(mask.dim() == 2 && (mask.size(0) == 1 || mask.size(0) == in.q.size(0)) &&
                    mask.size(1) == in.k.size(2),
                "fast_attn: key_mask must have shape (B, Sk), got ", mask.sizes());
  }
  check_varlen_inputs(in);
  const int64_t batch = in.cu_seqlens_q ? in.cu_seqlens_q->numel() - 1 : in.q.size(0);
  if (in.alibi_slopes) {
    const at::Tensor& slopes = *in.alibi_slopes;
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, "fast_attn: alibi_slopes must be float32, got ",
                slopes.scalar_type());
    TORCH_CHECK(slopes.device() == in.q.device(), "fast_attn: alibi_slopes must be on q's device");
    TORCH_CHECK(slopes.dim() == 2 && (slopes.size(0) == 1 || slopes.size(0) == batch) &&
                    slopes.size(1) == in.q.size(1),
                "fast_attn: alibi_slopes must have shape (B or 1, Hq), got ", slopes.sizes());
    TORCH_CHECK(slopes.is_contiguous(), "fast_attn: alibi_slopes must be contiguous");
  }
  if (in.dropout_p > 0.0) {
    TORCH_CHECK(in.dropout_seed.has_value(), "fast_attn: dropout_p > 0 needs a dropout_seed");
  }
  if (in.dropout_seed) {
    const at::Tensor& seed = *in.dropout_seed;
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == in.q.device(),
                "fast_attn: dropout_seed must be one int64 on q's device");
  }
}

at::Tensor empty_bshd_like(const at::Tensor& like) {
  // Stored (B, S, H, D) so that (B, S, H * D) views are free, as models want; allocated with those
  // strides at once (an empty tensor and a transposed view of it cost one op more per call).
  const int64_t batch = like.size(0), heads = like.size(1), seqlen = like.size(2), head_dim = like.size(3);
  return at::empty_strided({batch, heads, seqlen, head_dim},
                           {seqlen * heads * head_dim, head_dim, heads * head_dim, 1}, like.options());
}

bool has_no_scores(const at::Tensor& q, const at::Tensor& k) {
  return q.size(0) * q.size(1) * q.size(2) == 0 || k.size(2) == 0;
}

void fill_forward_without_scores(at::Tensor& out, at::Tensor& lse) {
  out.zero_();
  lse.fill_(-std::numeric_limits<double>::infinity());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_without_scores(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    bool compute_dbias) {
  at::Tensor dbias = compute_dbias ? at::zeros_like(*bias, at::MemoryFormat::Contiguous) : q.new_empty({0});
  return {empty_bshd_like(q).zero_(), empty_bshd_like(k).zero_(), empty_bshd_like(v).zero_(), dbias};
}

std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& q) {
  at::Tensor out = empty_bshd_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(accumulation_dtype(q.scalar_type())));
  return {out, lse};
}

AttentionForwardParams make_forward_params(const ForwardInputs& in, const at::Tensor& out,
                                           const at::Tensor& lse) {
  AttentionForwardParams p{};
  p.batch = in.q.size(0);
  p.heads_q = in.q.size(1);
  p.heads_kv = in.k.size(1);
  p.seqlen_q = in.q.size(2);
  p.seqlen_k = in.k.size(2);
  p.head_dim = in.q.size(3);

  set_data_and_strides(in.q, p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set_data_and_strides(in.k, p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set_data_and_strides(in.v, p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  set_data_and_strides(out, p.out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.lse = lse.data_ptr();

  p.bias = nullptr;
  if (in.bias) {
    const at::Tensor& bias = *in.bias;
    p.bias = bias.data_ptr();
    p.bias_is_fp32 = bias.scalar_type() == at::kFloat && in.q.scalar_type() != at::kFloat;
    p.bias_batch_stride = broadcast_stride(bias, 0);
    p.bias_head_stride = broadcast_stride(bias, 1);
    p.bias_row_stride = broadcast_stride(bias, 2);
    p.bias_col_stride = broadcast_stride(bias, 3);
  }

  p.key_mask = nullptr;
  if (in.key_mask) {
    const at::Tensor& mask = *in.key_mask;
    p.key_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    p.key_mask_batch_stride = broadcast_stride(mask, 0);
    p.key_mask_col_stride = mask.stride(1);
  }

  p.scale = static_cast<float>(in.scale);
  p.packed_seqlen_q = p.seqlen_q;
  p.packed_seqlen_k = p.seqlen_k;
  p.packed_offset_q = p.packed_offset_k = 0;
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  p.band_offset_per_sequence = false;
  Band band = band_of(in.causal, in.window_left, in.window_right, p.seqlen_q, p.seqlen_k);
  if (in.cu_seqlens_q) {
    p.cu_seqlens_q = in.cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_seqlens_k->data_ptr<int32_t>();
    p.batch = in.cu_seqlens_q->numel() - 1;
    p.seqlen_q = std::min(max_seqlen_of(*in.cu_seqlens_q, in.max_seqlen_q), p.packed_seqlen_q);
    p.seqlen_k = std::min(max_seqlen_of(*in.cu_seqlens_k, in.max_seqlen_k), p.packed_seqlen_k);
    p.band_offset_per_sequence = in.causal != static_cast<int64_t>(CausalMode::kTopLeft);
    band.offset = 0;
  }
  p.band_has_first_key = band.left >= 0;
  p.band_has_last_key = band.right >= 0;
  p.band_first_key = band.offset - band.left;
  p.band_last_key = band.offset + band.right;
  p.softcap = static_cast<float>(in.softcap);

  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (in.alibi_slopes) {
    const at::Tensor& slopes = *in.alibi_slopes;
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = broadcast_stride(slopes, 0);
  }

  p.dropout_seed = nullptr;
  p.dropout_keep_threshold = 0;
  p.dropout_keep_scale = 1.0f;
  if (in.dropout_p > 0.0) {
    p.dropout_seed = in.dropout_seed->data_ptr<int64_t>();
    p.dropout_keep_threshold = dropout_threshold(in.dropout_p);
    p.dropout_keep_scale = static_cast<float>(1.0 / (1.0 - in.dropout_p));
  }
  return p;
}

AttentionBackwardParams make_backward_params(const ForwardInputs& in, const BackwardTensors& t) {
  AttentionBackwardParams p{};
  static_cast<AttentionForwardParams&>(p) = make_forward_params(in, t.out, t.lse);
  set_data_and_strides(t.grad_out, p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride);
  p.delta = t.delta.data_ptr();
  set_data_and_strides(t.dq, p.dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  set_data_and_strides(t.dk, p.dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  set_data_and_strides(t.dv, p.dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  p.dbias = nullptr;
  if (t.dbias_partials) {
    set_dbias_partials(p, *t.dbias_partials);
  }
  return p;
}

void set_dbias_partials(AttentionBackwardParams& p, const at::Tensor& partials) {
  p.dbias = partials.data_ptr();
  p.dbias_num_splits = partials.size(0);
  p.dbias_batch = partials.size(1);
  p.dbias_heads = partials.size(2);
  p.dbias_rows = partials.size(3);
  p.dbias_cols = partials.size(4);
}

at::Tensor compute_delta(const at::Tensor& grad_out, const at::Tensor& out_in,
                         const std::optional<at::Tensor>& grad_lse) {
  const at::Tensor out = out_in.scalar_type() == grad_out.scalar_type() && out_in.stride(3) == 1
                             ? out_in
                             : out_in.to(grad_out.scalar_type()).contiguous();
  const at::ScalarType acc = accumulation_dtype(out.scalar_type());
  const int64_t batch = out.size(0), heads = out.size(1), rows = out.size(2), head_dim = out.size(3);
  at::Tensor delta = at::empty({batch, heads, rows}, out.options().dtype(acc));
  // One pass over the rows of grad_out and out where they lie (the last dims contiguous, any
  // other strides), each product and sum in the accumulation type: no converted copies.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fast_attn_delta", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dout = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* o = out.const_data_ptr<scalar_t>();
    acc_t* d = delta.mutable_data_ptr<acc_t>();
    at::parallel_for(0, batch * heads * rows, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (heads * rows), h = r / rows % heads, i = r % rows;
        const scalar_t* dout_row = dout + b * grad_out.stride(0) + h * grad_out.stride(1) + i * grad_out.stride(2);
        const scalar_t* o_row = o + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        acc_t sum = 0;
        for (int64_t c = 0; c < head_dim; ++c) sum += static_cast<acc_t>(dout_row[c]) * static_cast<acc_t>(o_row[c]);
        d[r] = sum;
      }
    });
  });
  if (grad_lse) delta.sub_(grad_lse->to(acc));
  return delta;
}

at::Tensor allocate_dbias_partials(const at::Tensor& bias, int64_t num_splits) {
  return at::zeros({num_splits, bias.size(0), bias.size(1), bias.size(2), bias.size(3)},
                   bias.options().dtype(accumulation_dtype(bias.scalar_type())));
}

at::Tensor finish_dbias(const at::Tensor& partials, const at::Tensor& bias) {
  at::Tensor summed = partials.size(0) == 1 ? partials[0] : partials.sum(0);
  return summed.to(bias.scalar_type()).contiguous();
}

}  // namespace fast_attn
