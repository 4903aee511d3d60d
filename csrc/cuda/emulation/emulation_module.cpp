// Test-only extension (built by tests/test_cuda.py with a host compiler,
// FAST_ATTN_CUDA_EMULATION defined): the CUDA implementation of the fast_attn
// ops (attention_cuda_host.cpp and the kernel sources) running on CPU tensors
// through the warp emulator. Not part of the package and not a torch op.
//
// While a call runs, every CPU allocation goes through a tracking allocator
// that fills it with NaN bytes (an output element the kernels never write
// stays NaN) and registers it, so that the emulator can check each
// global-memory access of the kernels against the allocations that exist.
#include <c10/core/CPUAllocator.h>
#include <torch/extension.h>

#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "../attention_cuda_host.h"
#include "../kernel_api.h"
#include "../tile_configs.h"
#include "attention_launch.h"
#include "emulated_device.h"
#include "op_signatures.h"

namespace {

struct TrackedAllocation {
  at::DataPtr inner;
};

void delete_tracked(void* context) {
  auto* tracked = static_cast<TrackedAllocation*>(context);
  fast_attn::emu::unregister_global_range(tracked->inner.get());
  delete tracked;
}

class TrackingAllocator final : public at::Allocator {
 public:
  explicit TrackingAllocator(at::Allocator* base) : base_(base) {}

  at::DataPtr allocate(size_t bytes) override {
    auto* tracked = new TrackedAllocation{base_->allocate(bytes)};
    void* data = tracked->inner.get();
    if (data != nullptr) {
      std::memset(data, 0xff, bytes);  // NaN in every float format: an output element never written shows
      fast_attn::emu::register_global_range(data, bytes);
    }
    return {data, tracked, &delete_tracked, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  at::Allocator* base_;
};

// Routes CPU allocations through the tracker and registers the inputs'
// storages for the duration of one call; afterwards no range stays registered.
class TrackingScope {
 public:
  explicit TrackingScope(std::initializer_list<std::optional<at::Tensor>> inputs) {
    static TrackingAllocator tracker(c10::GetDefaultCPUAllocator());
    previous_ = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&tracker);
    TORCH_CHECK(c10::GetCPUAllocator() == &tracker,
                "fast_attn CUDA emulator: another CPU allocator has priority; cannot bounds-check");
    for (const std::optional<at::Tensor>& t : inputs) {
      if (t && t->defined() && t->storage().data() != nullptr) {
        fast_attn::emu::register_global_range(t->storage().data(), t->storage().nbytes());
      }
    }
  }
  ~TrackingScope() {
    c10::SetCPUAllocator(previous_);
    fast_attn::emu::clear_global_ranges();
  }
  TrackingScope(const TrackingScope&) = delete;
  TrackingScope& operator=(const TrackingScope&) = delete;

 private:
  at::Allocator* previous_;
};

std::tuple<at::Tensor, at::Tensor> forward(const fast_attn::ForwardInputs& in, int64_t sm_count) {
  const TrackingScope scope(
      {in.q, in.k, in.v, in.bias, in.key_mask, in.dropout_seed, in.alibi_slopes, in.cu_seqlens_q, in.cu_seqlens_k});
  return fast_attn::cuda::attention_forward(in, {nullptr, static_cast<int>(sm_count)});
}

// The path of the forward and dK/dV kernels (KernelPath, kernel_api.h) that the host picks
// for the forward op's arguments: "fast", "causal", "general" or "modifiers".
std::string kernel_path(const fast_attn::ForwardInputs& in) {
  const auto [out, lse] = fast_attn::allocate_forward_outputs(in.q);
  switch (fast_attn::cuda::kernel_path(fast_attn::make_forward_params(in, out, lse))) {
    case fast_attn::cuda::KernelPath::kFast: return "fast";
    case fast_attn::cuda::KernelPath::kCausal: return "causal";
    case fast_attn::cuda::KernelPath::kGeneral: return "general";
    case fast_attn::cuda::KernelPath::kModifiers: return "modifiers";
  }
  return "none";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const fast_attn::ForwardInputs& in,
                                                                    const fast_attn::BackwardInputs& grads,
                                                                    int64_t sm_count) {
  const TrackingScope scope({grads.grad_out, grads.grad_lse, in.q, in.k, in.v, in.bias, in.key_mask, in.dropout_seed,
                             grads.out, grads.lse, in.alibi_slopes, in.cu_seqlens_q, in.cu_seqlens_k});
  return fast_attn::cuda::attention_backward(in, grads, {nullptr, static_cast<int>(sm_count)});
}

std::tuple<at::Tensor, at::Tensor> decode(const fast_attn::DecodeInputs& in, int64_t sm_count) {
  const TrackingScope scope({in.q, in.k_cache, in.v_cache, in.k_new, in.v_new, in.cache_seqlens, in.cache_leftpad,
                             in.block_table, in.cache_batch_idx, in.alibi_slopes});
  return fast_attn::cuda::decode_forward(in, {nullptr, static_cast<int>(sm_count)});
}

// dkdv_splits (attention_cuda_host.h) for these sizes; dbias_shape (Bb, Hb, Sqb, Skb) of a bias whose
// gradient the dK/dV kernel reduces, or empty.
int64_t dkdv_splits(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                    int64_t head_dim, int64_t dq_slices, bool deterministic, std::vector<int64_t> dbias_shape,
                    int64_t sm_count) {
  TORCH_CHECK(dbias_shape.empty() || dbias_shape.size() == 4, "dbias_shape: (Bb, Hb, Sqb, Skb) or empty");
  const bool dbias = !dbias_shape.empty();
  return fast_attn::cuda::dkdv_splits({batch, heads_q, heads_kv, seqlen_q, seqlen_k, static_cast<int>(head_dim),
                                       dq_slices, deterministic, dbias ? dbias_shape[0] : 0,
                                       dbias ? dbias_shape[1] : 0, dbias ? dbias_shape[2] : 0,
                                       dbias ? dbias_shape[3] : 0},
                                      static_cast<int>(sm_count));
}

// dq_accum's blocked layout (DqAccumLayout, kernel_api.h) of the staged dK/dV kernels at kernel head
// dim head_dim, with `vector` floats per lane and instruction (4 or 1), for the tests: offsets
// (block_m, head_dim), the place of each row and column in a block (as the convert kernel reads it),
// elements (warps, quads, 32, 4), the place of each register of each lane of each dQ warp (as the
// dK/dV kernel writes it), and the dQ warp grid's warps along the queries.
std::tuple<at::Tensor, at::Tensor, int64_t> dq_accum_layout(int64_t head_dim, int64_t vector) {
  using fast_attn::cuda::DqAccumLayout;
  const int dim = static_cast<int>(head_dim);
  TORCH_CHECK(fast_attn::cuda::dkdv_staged(dim), "no staged dK/dV kernel at head dim ", head_dim);
  TORCH_CHECK(vector == 1 || vector == 4, "vector: 1 or 4 floats per lane");
  const fast_attn::cuda::DkdvStagedTileConfig tile = fast_attn::cuda::dkdv_staged_tile_config(dim);
  const DqAccumLayout layout{tile.block_m, dim, tile.dq_query_warps, tile.warps / tile.dq_query_warps};
  at::Tensor offsets = at::empty({layout.block_m, dim}, at::kLong);
  for (int r = 0; r < layout.block_m; ++r) {
    for (int c = 0; c < dim; ++c) {
      offsets[r][c] = vector == 4 ? layout.offset<4>(r, c) : layout.offset<1>(r, c);
    }
  }
  const int warps = layout.query_warps * layout.col_warps;
  at::Tensor elements = at::empty({warps, layout.quads(), 32, 4}, at::kLong);
  for (int w = 0; w < warps; ++w) {
    for (int q = 0; q < layout.quads(); ++q) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int e = 0; e < 4; ++e) {
          elements[w][q][lane][e] = vector == 4 ? layout.element_offset<4>(w, q, lane, e)
                                                : layout.element_offset<1>(w, q, lane, e);
        }
      }
    }
  }
  return {offsets, elements, layout.query_warps};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fast_attn CUDA kernels on the CPU warp emulator (tests only)";
  // The ops' arguments as their schemas (csrc/schema.cpp) name them, the packed sequences'
  // with the schemas' defaults, then sm_count by keyword.
  namespace py = pybind11;
  m.def("forward", &fast_attn::attention_forward_op<&forward, int64_t>,
        "attention_forward of the CUDA implementation, emulated", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("bias"), py::arg("key_mask"), py::arg("dropout_seed"), py::arg("scale"), py::arg("causal"),
        py::arg("dropout_p"), py::arg("alibi_slopes"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        py::arg("max_seqlen_q") = -1, py::arg("max_seqlen_k") = -1, py::kw_only(), py::arg("sm_count"));
  m.def("backward", &fast_attn::attention_backward_op<&backward, int64_t>,
        "attention_backward of the CUDA implementation, emulated", py::arg("grad_out"), py::arg("grad_lse"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("key_mask"), py::arg("dropout_seed"),
        py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("causal"), py::arg("dropout_p"),
        py::arg("compute_dbias"), py::arg("deterministic"), py::arg("alibi_slopes"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = -1, py::arg("max_seqlen_k") = -1,
        py::kw_only(), py::arg("sm_count"));
  m.def("decode", &fast_attn::decode_forward_op<&decode, int64_t>,
        "decode_forward of the CUDA implementation, emulated", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k_new"), py::arg("v_new"), py::arg("cache_seqlens"), py::arg("cache_leftpad"),
        py::arg("block_table"), py::arg("cache_batch_idx"), py::arg("scale"), py::arg("causal"),
        py::arg("alibi_slopes"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("num_splits"), py::kw_only(), py::arg("sm_count"));
  m.def("kernel_path", &fast_attn::attention_forward_op<&kernel_path>,
        "the forward and dK/dV kernels' path for the forward op's arguments", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("key_mask"), py::arg("dropout_seed"), py::arg("scale"),
        py::arg("causal"), py::arg("dropout_p"), py::arg("alibi_slopes"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = -1, py::arg("max_seqlen_k") = -1);
  m.def("dkdv_splits", &dkdv_splits, "the dK/dV kernel's splits (dbias partial sums, deterministic dq_accum)",
        py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"),
        py::arg("head_dim"), py::arg("dq_slices"), py::arg("deterministic"), py::arg("dbias_shape"),
        py::arg("sm_count"));
  m.def("dq_accum_layout", &dq_accum_layout, "the staged dK/dV kernels' blocked dq_accum layout (offsets, elements, query warps)",
        py::arg("head_dim"), py::arg("vector"));
  m.def("launch_count", &fast_attn::emu::launch_count, "kernel launches emulated so far");
  m.def("compiled_head_dims", &fast_attn::cuda::compiled_head_dims, "head dims with kernels");
}
