// The pybind11 module fast_attn._C: what was built, for fast_attn.info and
// dispatch, and typed entries into two ops. Importing it also loads the operator
// registrations of this library (schema.cpp, cpu/, cuda/). No kernel is bound here:
// the kernels are torch.library ops, visible to torch.compile.
//
// The typed entries call torch.ops.fast_attn.attention_forward / decode_forward through
// the dispatcher's typed handle: the same op (autograd, devices, fake tensors and
// dispatch modes all as through torch.ops), entered without packing each argument
// into a boxed stack. From Python that is ~4 us less a call (one decoding-sized CPU
// call: 20 -> 16 us), the difference between our host path and SDPA's.
// fast_attn/ops/cpp_ops.py uses them outside torch.compile and __torch_function__.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "build_config.h"
#include "cpu/cpu_kernels.h"

namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The schemas' C++ types (csrc/schema.cpp): SymInt where the schema says SymInt.
using AttentionForwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, double, int64_t, double, const OptionalTensor&, int64_t, int64_t, double,
    const OptionalTensor&, const OptionalTensor&, c10::SymInt, c10::SymInt);
using DecodeForwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double, bool,
    const OptionalTensor&, int64_t, int64_t, double, int64_t);

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptionalTensor& bias,
    const OptionalTensor& key_mask, const OptionalTensor& dropout_seed, double scale, int64_t causal,
    double dropout_p, const OptionalTensor& alibi_slopes, int64_t window_left, int64_t window_right,
    double softcap, const OptionalTensor& cu_seqlens_q, const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fast_attn::attention_forward", "")
                             .typed<AttentionForwardSignature>();
  return op.call(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p, alibi_slopes, window_left,
                 window_right, softcap, cu_seqlens_q, cu_seqlens_k, c10::SymInt(max_seqlen_q),
                 c10::SymInt(max_seqlen_k));
}

std::tuple<at::Tensor, at::Tensor> decode_forward(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const OptionalTensor& k_new,
    const OptionalTensor& v_new, const at::Tensor& cache_seqlens, const OptionalTensor& cache_leftpad,
    const OptionalTensor& block_table, const OptionalTensor& cache_batch_idx, double scale, bool causal,
    const OptionalTensor& alibi_slopes, int64_t window_left, int64_t window_right, double softcap,
    int64_t num_splits) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fast_attn::decode_forward", "").typed<DecodeForwardSignature>();
  return op.call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table, cache_batch_idx,
                 scale, causal, alibi_slopes, window_left, window_right, softcap, num_splits);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FAST_ATTN_VERSION;
  info["torch_version"] = FAST_ATTN_TORCH_VERSION;
  info["cuda_version"] = FAST_ATTN_CUDA_VERSION;
  info["with_cuda"] = fast_attn::build_config::kWithCuda;
  info["cuda_archs"] = FAST_ATTN_CUDA_ARCHS;
  pybind11::list head_dims;
  for (int d : fast_attn::build_config::cuda_head_dims()) {
    head_dims.append(d);
  }
  info["cuda_head_dims"] = head_dims;
  info["cxx_flags"] = FAST_ATTN_CXX_FLAGS;
  info["cpu_instruction_set"] = fast_attn::cpu::instruction_set_in_use();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "fast_attn compiled kernels: build information and typed op entries (the kernels are torch.ops.fast_attn.*)";
  m.def("build_info", &build_info, "What this extension was built with: versions, archs, head dims.");
  // Positional, the schema's arguments in its order; the trailing ones (modifiers, packed
  // sequences) default as in the schema.
  m.def("attention_forward", &attention_forward, "torch.ops.fast_attn.attention_forward, entered typed.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("key_mask"), py::arg("dropout_seed"),
        py::arg("scale"), py::arg("causal"), py::arg("dropout_p"), py::arg("alibi_slopes") = py::none(),
        py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = -1,
        py::arg("max_seqlen_k") = -1);
  m.def("decode_forward", &decode_forward, "torch.ops.fast_attn.decode_forward, entered typed.");
}
