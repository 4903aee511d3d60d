"""torch.library registrations: fake kernels and autograd of the C++ ops
(cpp_ops) and the Triton ops (triton_ops)."""
