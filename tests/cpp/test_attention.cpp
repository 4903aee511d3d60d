// ctest: the fast_attn operators, called from C++ through the public header,
// against a plain ATen formulation of the same attention.
#include <fast_attn/fast_attn.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <cstdio>
#include <limits>

namespace {

// Scores scale * q k^T + bias with -inf where the key mask (or bottom-right causal) hides a key.
at::Tensor naive_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias, const at::Tensor& key_mask,
                        bool causal_bottom_right) {
  const int64_t group = q.size(1) / k.size(1);
  at::Tensor scores =
      at::matmul(q, k.repeat_interleave(group, 1).transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(-1))) +
      bias;
  at::Tensor visible = key_mask.view({key_mask.size(0), 1, 1, key_mask.size(1)});
  if (causal_bottom_right) {
    const int64_t sq = q.size(2), sk = k.size(2);
    at::Tensor rows = at::arange(sq, q.options().dtype(at::kLong)).view({sq, 1});
    at::Tensor cols = at::arange(sk, q.options().dtype(at::kLong)).view({1, sk});
    visible = at::logical_and(visible, cols <= rows + (sk - sq));
  }
  return scores.masked_fill(at::logical_not(visible), -std::numeric_limits<double>::infinity());
}

at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                           const at::Tensor& key_mask, bool causal_bottom_right) {
  const int64_t group = q.size(1) / k.size(1);
  return at::matmul(at::softmax(naive_scores(q, k, bias, key_mask, causal_bottom_right), -1),
                    v.repeat_interleave(group, 1));
}

// Sliding window (left, right) aligned bottom-right, softcap and ALiBi by their definitions, no mask.
at::Tensor naive_modified_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const fast_attn::ScoreModifiers& mods) {
  const int64_t group = q.size(1) / k.size(1);
  const int64_t sq = q.size(2), sk = k.size(2);
  at::Tensor scores = at::matmul(q, k.repeat_interleave(group, 1).transpose(-1, -2)) /
                      std::sqrt(static_cast<double>(q.size(-1)));
  scores = mods.softcap * at::tanh(scores / mods.softcap);
  at::Tensor diagonal = at::arange(sq, q.options()).view({sq, 1}) + static_cast<double>(sk - sq);
  at::Tensor cols = at::arange(sk, q.options()).view({1, sk});
  scores = scores - mods.alibi_slopes->to(q.scalar_type()).view({1, -1, 1, 1}) * (diagonal - cols).abs();
  at::Tensor visible = at::logical_and(cols >= diagonal - static_cast<double>(mods.window_left),
                                       cols <= diagonal + static_cast<double>(mods.window_right));
  scores = scores.masked_fill(at::logical_not(visible), -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(scores, -1), v.repeat_interleave(group, 1));
}

int check(const char* name, const at::Tensor& actual, const at::Tensor& expected, double tolerance) {
  const double error = (actual - expected).abs().max().item<double>();
  std::printf("%-32s max error %.3e (tolerance %.1e)\n", name, error, tolerance);
  return error <= tolerance ? 0 : 1;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor q = at::randn({2, 4, 13, 16}, options);
  at::Tensor k = at::randn({2, 2, 21, 16}, options);
  at::Tensor v = at::randn({2, 2, 21, 16}, options);
  at::Tensor bias = at::randn({1, 4, 13, 21}, options);
  at::Tensor key_mask = at::rand({2, 21}) < 0.8;
  key_mask.select(1, 20).fill_(true);

  int failures = 0;
  auto [out, lse] = fast_attn::attention_forward(q, k, v, bias, key_mask, fast_attn::Causal::kBottomRight);
  failures += check("float64 bias+mask+causal+GQA", out, naive_attention(q, k, v, bias, key_mask, true), 1e-10);

  auto [out32, lse32] = fast_attn::attention_forward(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat),
                                                     bias.to(at::kFloat), key_mask);
  failures += check("float32 bias+mask+GQA", out32.to(at::kDouble), naive_attention(q, k, v, bias, key_mask, false),
                    1e-4);

  // Gradients through the operators' autograd (csrc/attention_autograd.cpp), of out
  // and lse both, against autograd through the plain formulation.
  for (at::Tensor* t : {&q, &k, &v, &bias}) t->requires_grad_(true);
  const at::Tensor grad_out = at::randn_like(out);
  const at::Tensor grad_lse = at::randn_like(lse);
  auto [out_g, lse_g] = fast_attn::attention_forward(q, k, v, bias, key_mask, fast_attn::Causal::kBottomRight);
  const at::Tensor loss = (out_g * grad_out).sum() + (lse_g * grad_lse).sum();
  const auto grads = torch::autograd::grad({loss}, {q, k, v, bias});
  const at::Tensor expected_out = naive_attention(q, k, v, bias, key_mask, true);
  const at::Tensor expected_lse = at::logsumexp(naive_scores(q, k, bias, key_mask, true), -1);
  const at::Tensor expected_loss = (expected_out * grad_out).sum() + (expected_lse * grad_lse).sum();
  const auto expected = torch::autograd::grad({expected_loss}, {q, k, v, bias});
  const char* names[] = {"float64 dq", "float64 dk", "float64 dv", "float64 dbias (summed over batch)"};
  for (int i = 0; i < 4; ++i) failures += check(names[i], grads[i], expected[i], 1e-10);

  fast_attn::ScoreModifiers mods;
  mods.window_left = 3;
  mods.window_right = 2;
  mods.softcap = 1.5;
  mods.alibi_slopes = at::rand({4}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor qd = q.detach(), kd = k.detach(), vd = v.detach();
  auto [out_m, lse_m] = fast_attn::attention_forward(qd, kd, vd, std::nullopt, std::nullopt, fast_attn::Causal::kNone,
                                                     std::nullopt, mods);
  failures += check("float64 window+softcap+ALiBi+GQA", out_m, naive_modified_attention(qd, kd, vd, mods), 1e-10);
  std::printf(failures == 0 ? "all checks passed\n" : "%d check(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}
