// TORCH_LIBRARY_IMPL(fast_attn, CUDA): the CUDA kernels behind the op schemas
// of csrc/schema.cpp, on the current device and stream. Also the build-time
// list of compiled head dims (csrc/build_config.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_cuda_host.h"
#include "build_config.h"
#include "op_signatures.h"

namespace fast_attn {

std::vector<int> build_config::cuda_head_dims() { return cuda::compiled_head_dims(); }

namespace {

cuda::DeviceContext device_context(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "fast_attn CUDA kernels need CUDA tensors, got q on ", q.device());
  const cudaDeviceProp* properties = at::cuda::getDeviceProperties(q.get_device());
  TORCH_CHECK(properties->major >= 8, "fast_attn CUDA kernels need compute capability 8.0 or newer, device ",
              q.get_device(), " has ", properties->major, ".", properties->minor);
  return {at::cuda::getCurrentCUDAStream(q.get_device()).stream(), properties->multiProcessorCount};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const ForwardInputs& in) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  return cuda::attention_forward(in, device_context(in.q));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const ForwardInputs& in,
                                                                                  const BackwardInputs& grads) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  return cuda::attention_backward(in, grads, device_context(in.q));
}

std::tuple<at::Tensor, at::Tensor> decode_forward_cuda(const DecodeInputs& in) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  return cuda::decode_forward(in, device_context(in.q));
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("attention_forward", &attention_forward_op<&attention_forward_cuda>);
  m.impl("attention_backward", &attention_backward_op<&attention_backward_cuda>);
  m.impl("decode_forward", &decode_forward_op<&decode_forward_cuda>);
}

}  // namespace fast_attn
