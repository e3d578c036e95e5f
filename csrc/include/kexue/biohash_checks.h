// Host-side checks of the BioHash kernels' native boundary, shared by the CPU and CUDA entry points
// (the Python layer validates user input; these guard against a wrong call from it).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace kexue {
namespace biohash {

// CSR rows (indices (nnz,), offsets (B+1,), optional weights (nnz,) in the compute dtype) over
// synapses_t (N, K), all contiguous and on `device`.
inline void check_csr(const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& weights,
                      const at::Tensor& wt, c10::DeviceType device) {
  const bool on_device = indices.device().type() == device && offsets.device().type() == device &&
                         wt.device().type() == device && (!weights.has_value() || weights->device().type() == device);
  TORCH_CHECK(on_device, "biohash ", c10::DeviceTypeName(device), " kernels take ", c10::DeviceTypeName(device),
              " tensors");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be a contiguous int64 (nnz,) tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              "offsets must be a contiguous int64 (B+1,) tensor");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "synapses_t must be a contiguous (N, K) tensor");
  if (weights.has_value()) {
    const auto acc = wt.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == indices.size(0) && weights->scalar_type() == acc &&
                    weights->is_contiguous(),
                "weights must be a contiguous (nnz,) tensor of the compute dtype");
  }
}

// Packed codes for Hamming search: queries (Q, nb) and database (D, nb), contiguous uint8 on `device`.
inline void check_codes(const at::Tensor& queries, const at::Tensor& database, int64_t n, c10::DeviceType device) {
  TORCH_CHECK(queries.device().type() == device && database.device().type() == device, "hamming_topk ",
              c10::DeviceTypeName(device), " takes ", c10::DeviceTypeName(device), " tensors");
  TORCH_CHECK(queries.dim() == 2 && database.dim() == 2 && queries.scalar_type() == at::kByte &&
                  database.scalar_type() == at::kByte && queries.is_contiguous() && database.is_contiguous() &&
                  queries.size(1) == database.size(1),
              "queries and database must be contiguous uint8 (Q, nb) and (D, nb) tensors");
  TORCH_CHECK(n >= 0 && n <= database.size(0), "n must lie in [0, D]");
}

}  // namespace biohash
}  // namespace kexue
