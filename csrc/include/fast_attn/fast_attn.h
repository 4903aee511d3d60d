// C++ API of fast_attn for libtorch users: calls the registered operators
// torch.ops.fast_attn.* through the dispatcher, so the CPU or CUDA kernel is
// chosen by the tensors' device exactly as from Python.
//
// Link the `fast_attn::fast_attn` target (find_package(fast_attn)); the library
// registers the operators when it is loaded (link it with --no-as-needed, which
// the package config does).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fast_attn {

// Causal alignment: query i sees key j iff j <= i (kTopLeft) or j <= i + Sk - Sq (kBottomRight).
enum class Causal : int64_t { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

// Score modifiers: a sliding window (query i sees key j iff j >= d - left and
// j <= d + right, -1 = unbounded; d = i under kTopLeft, i + Sk - Sq otherwise; a
// causal mask makes right 0), softcap (score = softcap * tanh(score / softcap),
// 0 = none) and ALiBi (float32 slopes (Hq,) or (B, Hq): score -= slope * |i + Sk - Sq - j|,
// no gradient).
struct ScoreModifiers {
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes = std::nullopt;
};

// out (B, Hq, Sq, D) and lse (B, Hq, Sq) for q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D).
// bias: 4-D with each dim 1 or full; key_mask: bool (B, Sk), true = attend.
// Differentiable: out and lse carry libtorch autograd to q, k, v and bias.
inline std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias = std::nullopt,
    const std::optional<at::Tensor>& key_mask = std::nullopt, Causal causal = Causal::kNone,
    std::optional<double> scale = std::nullopt, const ScoreModifiers& modifiers = {}) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fast_attn::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t, double,
              const std::optional<at::Tensor>&, int64_t, int64_t, double, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, int64_t, int64_t)>();
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(-1))));
  std::optional<at::Tensor> slopes = modifiers.alibi_slopes;
  if (slopes && slopes->dim() == 1) slopes = slopes->unsqueeze(0);  // (Hq,) -> (1, Hq)
  // The schema's last four arguments are packed sequences (varlen), not offered here: none.
  return op.call(q, k, v, bias, key_mask, std::nullopt, softmax_scale, static_cast<int64_t>(causal), 0.0, slopes,
                 modifiers.window_left, modifiers.window_right, modifiers.softcap, std::nullopt, std::nullopt, -1,
                 -1);
}

}  // namespace fast_attn
