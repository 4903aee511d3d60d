// Calls fast_attn from C++: causal GQA attention with a key-padding mask on the
// CPU kernels (CUDA tensors would run the CUDA kernels of a CUDA build).
#include <fast_attn/fast_attn.h>

#include <cstdio>

int main() {
  const at::Tensor q = at::randn({1, 8, 128, 64});
  const at::Tensor k = at::randn({1, 2, 128, 64});
  const at::Tensor v = at::randn({1, 2, 128, 64});
  at::Tensor key_mask = at::ones({1, 128}, at::kBool);
  key_mask.slice(1, 100).fill_(false);  // the last 28 keys are padding
  auto [out, lse] = fast_attn::attention_forward(q, k, v, std::nullopt, key_mask, fast_attn::Causal::kTopLeft);
  std::printf("out %s, lse of query 0 = %.4f (log of one visible key's weight: %.4f)\n",
              out.sizes() == q.sizes() ? "has q's shape" : "has the WRONG shape", lse[0][0][0].item<float>(),
              (at::dot(q[0][0][0], k[0][0][0]) / 8.0).item<float>());
  return out.isfinite().all().item<bool>() ? 0 : 1;
}
