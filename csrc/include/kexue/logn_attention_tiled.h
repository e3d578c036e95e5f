// The tiled (flash-attention) CUDA kernels of log-n attention, csrc/cuda/logn_attention_tiled.cu,
// called by the entry points in csrc/cuda/logn_attention.cu once those have checked the inputs and
// computed the per-query scales. Dense (B, H, L, D) contiguous tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

namespace kexue {
namespace logn_attention {
namespace tiled {

// Whether the tiled kernels take a call: float16, bfloat16 or float32; D a multiple of 8 and at
// most 128; a GPU of compute capability 8.0 or newer with the shared memory the kernels ask for;
// 16-byte aligned data. Otherwise the warp-per-row kernels serve it (float64, other head sizes).
// `backward` asks about the two backward kernels (which need more shared memory than the forward).
bool serves(const at::Tensor& q, std::initializer_list<at::Tensor> tensors, bool backward);

// out, lse (B, Hq, Lq) float32 from q, k, v, the optional (B, Lk) padding mask and the (B, Lq)
// float32 per-query scales.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* pad, const float* scales,
             bool causal, at::Tensor& out, at::Tensor& lse);

// dq, dk, dv from the forward's lse and delta = rowsum(dO * O) - dlse (both (B, Hq, Lq) float32).
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, const bool* pad, const float* scales, bool causal,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace tiled
}  // namespace logn_attention
}  // namespace kexue
