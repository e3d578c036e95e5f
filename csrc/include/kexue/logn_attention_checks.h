// Host-side checks of the log-n attention kernels' native boundary, shared by the CPU and CUDA
// entry points (the Python layer validates user input; these guard against a wrong call from it).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace kexue {
namespace logn_attention {

// float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
inline at::ScalarType acc_type_of(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims,
                         c10::DeviceType device) {
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims, "logn_attention: q, k, v must be ", dims, "-d");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "logn_attention: inputs must be contiguous");
  TORCH_CHECK(q.device().type() == device && k.device().type() == device && v.device().type() == device,
              "logn_attention: the ", c10::DeviceTypeName(device), " kernels take ", c10::DeviceTypeName(device),
              " tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "logn_attention: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(dims - 1) == k.size(dims - 1),
              "logn_attention: shapes of q, k, v do not match");
  // the heads are dimension 1 in both layouts
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "logn_attention: Hq must be a multiple of Hkv");
}

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& pad, c10::DeviceType device) {
  check_common(q, k, v, 4, device);
  TORCH_CHECK(q.size(0) == k.size(0), "logn_attention: q and k must have the same batch");
  if (pad.has_value()) {
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 &&
                    pad->size(0) == q.size(0) && pad->size(1) == k.size(2) && pad->device() == q.device(),
                "logn_attention: key_padding_mask must be a contiguous bool (B, Lk) tensor");
  }
}

inline void check_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                           const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse, int64_t lse_numel) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "logn_attention_backward: grad_out must be contiguous and shaped and typed like q");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "logn_attention_backward: bad out");
  const auto acc_type = acc_type_of(q);
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.is_contiguous() && lse.numel() == lse_numel,
              "logn_attention_backward: bad lse");
  if (grad_lse.has_value())
    TORCH_CHECK(grad_lse->scalar_type() == acc_type && grad_lse->is_contiguous() && grad_lse->numel() == lse_numel,
                "logn_attention_backward: bad grad_lse");
}

}  // namespace logn_attention
}  // namespace kexue
