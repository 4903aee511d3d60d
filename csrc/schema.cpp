// The fast_attn operator schemas, declared once. Each device registers its
// implementation with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); fake kernels are
// registered from Python (fast_attn/ops/cpp_ops.py), autograd in C++
// (csrc/attention_autograd.cpp).
//
// The score modifiers come last, with defaults that mean "none", so that calls
// written before them (positional ones included) keep their meaning:
//   alibi_slopes: float32 (B or 1, Hq), adds -slope * |i + Sk - Sq - j| (no gradient);
//   window_left, window_right: the sliding window, -1 = unbounded on that side; with
//     causal != 0 the window's right side is 0, and its diagonal follows causal's
//     alignment (bottom-right without causal);
//   softcap: score = softcap * tanh(scale * q.k / softcap) when > 0, before the bias.
// Then packed variable-length sequences (varlen), none by default:
//   cu_seqlens_q, cu_seqlens_k: int32 (N + 1,) row offsets of the sequences in q and in k/v,
//     which have batch 1 (q (1, Hq, Tq, D)); each sequence is its own problem (causal,
//     window and ALiBi aligned per sequence); no bias or key_mask; alibi_slopes (N or 1, Hq);
//     lse (1, Hq, Tq); dropout hashes each score's index in the packed (1, Hq, Tq, Tk) problem;
//   max_seqlen_q, max_seqlen_k: bounds on the sequences' lengths, -1 = derived from the offsets.
// Decoding against a KV cache (forward only; fast_attn/decode.py), in flash-attn's layout:
//   q (B, Sq, Hq, D); k_cache, v_cache (Bc, S_cache, Hkv, D), or pages (num_pages, page_size, Hkv, D)
//     when block_table (int32 (B, max_pages), page ids) is given; any strides but a contiguous last
//     dim (transformers interleaves K and V pages, so the page stride is not page_size * Hkv * D);
//   k_new, v_new (B, S_new, Hkv, D) or none: written in place at positions
//     cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 of sequence b before attending; nothing else
//     in the caches changes;
//   cache_seqlens int32 (B,): where sequence b's keys end before that write; cache_leftpad int32 (B,)
//     or none: where they start (0). Sequence b attends its Lk = cache_seqlens[b] + S_new -
//     cache_leftpad[b] keys, positions counted from cache_leftpad[b];
//   cache_batch_idx int32 (B,) or none: sequence b lives in cache row cache_batch_idx[b] (contiguous
//     caches only; default b);
//   causal: bottom-right per sequence (query i sees key j <= i + Lk - Sq); window, softcap and
//     alibi_slopes (float32 (B or 1, Hq)) as in attention_forward with Sk = Lk; no bias, mask or dropout;
//   num_splits: how many key ranges one (sequence, kv head) is split into and merged by the lse
//     rule; 0 = chosen by the kernel.
//   out (B, Sq, Hq, D) contiguous in q's dtype; lse (B, Hq, Sq) float32 (float64 for float64),
//   -inf for rows with no visible key (out 0).
#include <torch/library.h>

TORCH_LIBRARY(fast_attn, m) {
  // out: (B, Hq, Sq, D) in q's dtype, stored (B, Sq, Hq, D)-contiguous.
  // lse: (B, Hq, Sq) float32 (float64 for float64 inputs), -inf for rows with no visible key.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_mask, "
      "Tensor? dropout_seed, float scale, int causal, float dropout_p, Tensor? alibi_slopes=None, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=-1, SymInt max_seqlen_k=-1) -> (Tensor out, Tensor lse)");
  // dq, dk, dv like q, k, v (stored (B, S, H, D)-contiguous); dbias in the bias's
  // own (4-D) shape and dtype, or an empty tensor when compute_dbias is false.
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor? bias, Tensor? key_mask, Tensor? dropout_seed, Tensor out, Tensor lse, float scale, "
      "int causal, float dropout_p, bool compute_dbias, bool deterministic, Tensor? alibi_slopes=None, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=-1, SymInt max_seqlen_k=-1) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def(
      "decode_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor cache_seqlens, Tensor? cache_leftpad, Tensor? block_table, Tensor? cache_batch_idx, "
      "float scale, bool causal, Tensor? alibi_slopes, int window_left, int window_right, float softcap, "
      "int num_splits) -> (Tensor out, Tensor lse)");
}
