// The pybind11 module fast_attn._C: what was built, for fast_attn.info and
// dispatch. Importing it also loads the operator registrations of this library
// (schema.cpp, cpu/, cuda/). No tensor kernel is bound here: those are
// torch.library ops, visible to torch.compile.
#include <torch/extension.h>

#include "build_config.h"
#include "cpu/cpu_kernels.h"

namespace {

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
  m.doc() = "fast_attn compiled kernels: build information (the kernels are torch.ops.fast_attn.*)";
  m.def("build_info", &build_info, "What this extension was built with: versions, archs, head dims.");
}
