// Host-side checks of the BioHash kernels' native boundary, shared by the CPU and CUDA entry points.
// The Python layer checks user input; these guard every direct call (torch.ops.kexue.*, kexue._C,
// torch.compile, where Python's value checks are not traced). On CPU the values that decide where
// a kernel reads and writes (offsets, ids) are checked here too, in one cheap pass over them: a
// bad one is a ValueError, never an access out of bounds.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <optional>

namespace kexue {
namespace biohash {

// The values of CPU CSR rows (the messages are those of python/kexue/ops/_biohash_inputs.py):
// offsets start at 0, never decrease, end at nnz and leave no row empty; ids lie in [0, N).
inline void check_rows_cpu(const at::Tensor& indices, const at::Tensor& offsets, int64_t num_inputs) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t rows = offsets.size(0) - 1, nnz = indices.size(0);
  TORCH_CHECK_VALUE(off[0] == 0 && off[rows] == nnz, "offsets must start at 0, never decrease and end at nnz = ",
                    nnz);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(off[r + 1] >= off[r], "offsets must start at 0, never decrease and end at nnz = ", nnz);
    TORCH_CHECK_VALUE(off[r + 1] > off[r], "row ", r,
                      " of the batch has no tokens (an empty window); every row needs at least one");
  }
  const int64_t* ids = indices.data_ptr<int64_t>();
  int64_t low = 0, high = 0;
  if (nnz > 0) {
    low = high = ids[0];
    for (int64_t j = 1; j < nnz; ++j) {  // min and max only: a loop the compiler vectorizes
      low = std::min(low, ids[j]);
      high = std::max(high, ids[j]);
    }
  }
  TORCH_CHECK_VALUE(low >= 0 && high < num_inputs, "indices must lie in [0, N) = [0, ", num_inputs,
                    ") for synapses of N = ", num_inputs, " inputs; found ", low < 0 ? low : high);
}

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
  if (device == c10::DeviceType::CPU) check_rows_cpu(indices, offsets, wt.size(0));
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
