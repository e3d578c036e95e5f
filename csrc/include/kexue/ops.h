// Declarations of every native entry point bound in csrc/bindings.cpp.
//
// Conventions (shared by every op family): inputs arrive contiguous and validated by the Python
// ops layer; outputs are allocated here; reductions accumulate in float32 (float64 for float64).
#pragma once

// ATen only, not torch/extension.h: the .cu files include this header, and the Python headers
// behind torch/extension.h double nvcc's compile time.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace kexue {

// Entropy normalization over rows. x: (R, n); target: (R,) in the compute dtype.
// Returns y (R, n) in x's dtype, gamma (R,) and stats (R, 2) = (row max, log normaliser).
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cpu(const at::Tensor& x,
                                                                             const at::Tensor& target, bool logits,
                                                                             int64_t max_iter, double tol);
// Returns grad_x (R, n) in x's dtype and grad_target (R,) in the compute dtype.
std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cpu(const at::Tensor& grad_y,
                                                                  const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                  const at::Tensor& gamma, const at::Tensor& stats,
                                                                  bool logits);

#ifdef KEXUE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cuda(const at::Tensor& x,
                                                                              const at::Tensor& target, bool logits,
                                                                              int64_t max_iter, double tol);
std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cuda(const at::Tensor& grad_y,
                                                                   const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                   const at::Tensor& gamma, const at::Tensor& stats,
                                                                   bool logits);
#endif

}  // namespace kexue
