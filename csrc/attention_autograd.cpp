// TORCH_LIBRARY_IMPL(fast_attn, Autograd): the gradient of fast_attn::attention_forward
// through fast_attn::attention_backward, for every device the ops are built for.
//
// It is the formula of fast_attn/ops/autograd.py (which the Triton ops use), written
// in C++ so that a training step through the C++ ops runs no Python in autograd:
// torch's generic Python wrapper for register_autograd cost more host time than the
// CPU kernels of a small problem (benchmarks/launch_overhead.py). C++ (libtorch) users
// get the same gradients. torch.compile traces it like any autograd kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fast_attn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The score modifiers' arguments, in the order the schemas end with them.
struct ScoreModifiers {
  std::optional<at::Tensor> alibi_slopes;
  int64_t window_left;
  int64_t window_right;
  double softcap;
};

// The packed sequences' arguments (varlen), which follow the modifiers.
struct PackedSequences {
  std::optional<at::Tensor> cu_seqlens_q;
  std::optional<at::Tensor> cu_seqlens_k;
  int64_t max_seqlen_q;
  int64_t max_seqlen_k;
};

std::tuple<at::Tensor, at::Tensor> call_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& key_mask,
                                                   const std::optional<at::Tensor>& dropout_seed, double scale,
                                                   int64_t causal, double dropout_p, const ScoreModifiers& mods,
                                                   const PackedSequences& packed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fast_attn::attention_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, double, int64_t, double,
                                 const std::optional<at::Tensor>&, int64_t, int64_t, double,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                 int64_t)>();
  return op.call(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p, mods.alibi_slopes,
                 mods.window_left, mods.window_right, mods.softcap, packed.cu_seqlens_q, packed.cu_seqlens_k,
                 packed.max_seqlen_q, packed.max_seqlen_k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward_op(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
    const std::optional<at::Tensor>& dropout_seed, const at::Tensor& out, const at::Tensor& lse, double scale,
    int64_t causal, double dropout_p, bool compute_dbias, bool deterministic, const ScoreModifiers& mods,
    const PackedSequences& packed) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fast_attn::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, int64_t, double, bool,
              bool, const std::optional<at::Tensor>&, int64_t, int64_t, double, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse, scale, causal, dropout_p,
                 compute_dbias, deterministic, mods.alibi_slopes, mods.window_left, mods.window_right, mods.softcap,
                 packed.cu_seqlens_q, packed.cu_seqlens_k, packed.max_seqlen_q, packed.max_seqlen_k);
}

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  // Returns {out, lse}; both are differentiable (lse's gradient enters through delta).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
                               const std::optional<at::Tensor>& dropout_seed, double scale, int64_t causal,
                               double dropout_p, const std::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                               int64_t window_right, double softcap, const std::optional<at::Tensor>& cu_seqlens_q,
                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                               int64_t max_seqlen_k) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_forward_op(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p,
                                      {alibi_slopes, window_left, window_right, softcap},
                                      {cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k});
    ctx->save_for_backward({q, k, v, bias.value_or(at::Tensor()), key_mask.value_or(at::Tensor()),
                            dropout_seed.value_or(at::Tensor()), out, lse, alibi_slopes.value_or(at::Tensor()),
                            cu_seqlens_q.value_or(at::Tensor()), cu_seqlens_k.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    // An unused output's gradient stays undefined instead of a tensor of zeros:
    // grad_lse is absent unless lse was used.
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  // One gradient per forward argument: dq, dk, dv, dbias, then none for
  // key_mask, dropout_seed, scale, causal, dropout_p, the score modifiers
  // (ALiBi's slopes have no gradient by the contract) and the packed sequences.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[6], &lse = saved[7];
    const std::optional<at::Tensor> bias = present(saved[3]);
    at::Tensor grad_out = grads[0];
    // Sizes through sym_* accessors: under torch.compile they may be symbolic.
    if (!grad_out.defined() || grad_out.sym_numel() == 0) {
      grad_out = at::zeros_like(out);  // out's layout: a contiguous last dim even when empty
    } else if (grad_out.sym_stride(-1) != 1) {
      grad_out = grad_out.contiguous();
    }
    // Edges exist for the tensors given: q, k, v, then bias at index 3 when there is one.
    const bool compute_dbias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dbias] = call_backward_op(
        grad_out, present(grads[1]), q, k, v, bias, present(saved[4]), present(saved[5]), out, lse,
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["causal"].toInt(),
        ctx->saved_data["dropout_p"].toDouble(), compute_dbias, at::globalContext().deterministicAlgorithms(),
        {present(saved[8]), ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
         ctx->saved_data["softcap"].toDouble()},
        {present(saved[9]), present(saved[10]), ctx->saved_data["max_seqlen_q"].toInt(),
         ctx->saved_data["max_seqlen_k"].toInt()});
    variable_list grads_of_inputs(17);
    grads_of_inputs[0] = dq;
    grads_of_inputs[1] = dk;
    grads_of_inputs[2] = dv;
    if (compute_dbias) grads_of_inputs[3] = dbias;
    return grads_of_inputs;
  }
};

// Whether autograd would record this call: grad mode on and a differentiable input (q, k, v, the
// bias) requiring grad.
bool records_gradient(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  return q.requires_grad() || k.requires_grad() || v.requires_grad() || (bias && bias->requires_grad());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& dropout_seed, double scale,
    int64_t causal, double dropout_p, const std::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  if (!records_gradient(q, k, v, bias)) {
    // Nothing to differentiate: the device kernel directly, without the Function's node, saved
    // tensors and saved data (a few microseconds, as much as a decoding-sized problem's math).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward_op(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p,
                           {alibi_slopes, window_left, window_right, softcap},
                           {cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k});
  }
  variable_list outputs =
      AttentionFunction::apply(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p, alibi_slopes,
                               window_left, window_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace fast_attn

TORCH_LIBRARY_IMPL(fast_attn, Autograd, m) {
  m.impl("attention_forward", &fast_attn::attention_forward_autograd);
}
