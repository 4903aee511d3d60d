// The fast_attn operator schemas, declared once. Each device registers its
// implementation with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda), autograd is
// registered in C++ (csrc/attention_autograd.cpp), and the fake kernels from
// Python (fast_attn/ops/cpp_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fast_attn, m) {
  // out: (B, Hq, Sq, D) in q's dtype, stored (B, Sq, Hq, D)-contiguous.
  // lse: (B, Hq, Sq) float32 (float64 for float64 inputs), -inf for rows with no visible key.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_mask, "
      "Tensor? dropout_seed, float scale, int causal, float dropout_p) -> (Tensor out, Tensor lse)");
  // dq, dk, dv like q, k, v (stored (B, S, H, D)-contiguous); dbias in the bias's
  // own (4-D) shape and dtype, or an empty tensor when compute_dbias is false.
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor? bias, Tensor? key_mask, Tensor? dropout_seed, Tensor out, Tensor lse, float scale, "
      "int causal, float dropout_p, bool compute_dbias, bool deterministic) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}
