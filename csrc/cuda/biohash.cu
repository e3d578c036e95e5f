// BioHash hashing on CUDA: activations of sparse inputs and their winner-take-all codes.
//
// The contract is the CPU kernel's (csrc/cpu/biohash.cpp) and the oracle is
// python/kexue/reference/biohash.py; the ranking keys, the bitwise k-th-key search and the code
// layout come from csrc/include/kexue/biohash.h, the device pieces from biohash_cuda.cuh.
//
// One block per row. Its threads own units mu = tid, tid + blockDim, ... and sum the row's
// synapse columns token by token in row order, with round-to-nearest multiply and add intrinsics
// (never a fused multiply-add), so the activations, and hence the codes, equal the reference bit
// for bit. The keys of a row sit in shared memory when they fit (K <= kSharedKeys) and in a global
// scratch row otherwise. The k-th largest key is found bit by bit with block-wide counts; ties at
// the threshold go to the lowest unit index, resolved by one thread scanning the row (rare: it
// needs equal activations).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <type_traits>

#include "kexue/biohash_checks.h"
#include "kexue/biohash_cuda.cuh"
#include "kexue/ops.h"

namespace kexue {
using namespace biohash_cuda;

namespace {

#define KEXUE_DISPATCH_SYNAPSES(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

// Writes the code of one row from its keys: packed (code_bytes(K) bytes) or dense (K bytes of 0/1).
// Unit mu wins when key > t, or key == t and mu <= last_tie.
template <typename K>
__device__ void write_code(const K* keys, int64_t n, int64_t k, bool packed, uint8_t* out, int64_t* scratch) {
  constexpr int kBits = static_cast<int>(sizeof(K) * 8);
  __shared__ K s_threshold;
  __shared__ int64_t s_last_tie;
  K t = 0;
  int64_t last_tie = -1;  // no tie rule: every unit with key >= t wins
  bool exact = k == n;    // every key is >= 0
  if (!exact) {
    // A threshold that exactly k keys reach (no tie at the k-th key): most rows stop after
    // ~log2(K) + a few passes.
    K threshold = 0;
    for (int b = kBits - 1; b >= 0 && !exact; --b) {
      const K candidate = threshold | (K(1) << b);
      const int64_t count = count_at_least(keys, n, candidate, scratch);
      if (count == k) {
        t = candidate;
        exact = true;
      }
      threshold = count > k ? candidate : threshold;
    }
  }
  if (!exact) {
    // The k-th key is tied with the (k+1)-th: t = the k-th key, and of the units equal to it the
    // lowest-indexed ones win until k are chosen.
    int64_t greater;
    const K threshold = kth_largest_key(keys, n, k, scratch, greater);
    if (threadIdx.x == 0) {
      int64_t ties_left = k - greater, last = -1;
      for (int64_t mu = 0; mu < n && ties_left > 0; ++mu) {
        if (keys[mu] == threshold) {
          last = mu;
          --ties_left;
        }
      }
      s_threshold = threshold;
      s_last_tie = last;
    }
    __syncthreads();
    t = s_threshold;
    last_tie = s_last_tie;
  }
  const bool tie_rule = last_tie >= 0;
  auto wins = [&](int64_t mu) {
    const K key = keys[mu];
    return tie_rule ? (key > t || (key == t && mu <= last_tie)) : key >= t;
  };
  if (!packed) {
    for (int64_t mu = threadIdx.x; mu < n; mu += blockDim.x) out[mu] = wins(mu) ? 1 : 0;
    return;
  }
  const int64_t nb = biohash::code_bytes(n);
  for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
    unsigned byte = 0;
    const int64_t len = n - 8 * j < 8 ? n - 8 * j : 8;
    for (int64_t b = 0; b < len; ++b) byte |= static_cast<unsigned>(wins(8 * j + b)) << b;
    out[j] = static_cast<uint8_t>(byte);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels. Grid: one block per row (a grid-stride loop over rows beyond the grid).

template <typename T, typename A>
__global__ void activations_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ off,
                                   const A* __restrict__ w, const T* __restrict__ wt, int64_t rows, int64_t K,
                                   A* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) {
      out[r * K + mu] = unit_activation(ids, w, off[r], off[r + 1], wt, K, mu);
    }
  }
}

template <typename T, typename A>
__global__ void hash_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ off,
                            const A* __restrict__ w, const T* __restrict__ wt, int64_t rows, int64_t K, int64_t k,
                            bool packed, int64_t width, Key<A>* key_scratch, bool in_shared,
                            uint8_t* __restrict__ out) {
  __shared__ int64_t scratch[kThreads / kWarpSize];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    Key<A>* keys = row_keys(key_scratch, blockIdx.x, K, in_shared);
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) {
      keys[mu] = order_key(unit_activation(ids, w, off[r], off[r + 1], wt, K, mu));
    }
    __syncthreads();
    write_code(keys, K, k, packed, out + r * width, scratch);
    __syncthreads();  // the keys are rewritten by the next row
  }
}

template <typename A>
__global__ void topk_kernel(const A* __restrict__ activations, int64_t rows, int64_t K, int64_t k, bool packed,
                            int64_t width, Key<A>* key_scratch, bool in_shared, uint8_t* __restrict__ out) {
  __shared__ int64_t scratch[kThreads / kWarpSize];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    Key<A>* keys = row_keys(key_scratch, blockIdx.x, K, in_shared);
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) keys[mu] = order_key(activations[r * K + mu]);
    __syncthreads();
    write_code(keys, K, k, packed, out + r * width, scratch);
    __syncthreads();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (the contracts of the _cpu functions in csrc/cpu/biohash.cpp).

at::Tensor biohash_activations_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t) {
  biohash::check_csr(indices, offsets, weights, synapses_t, at::kCUDA);
  const c10::cuda::CUDAGuard guard(synapses_t.device());
  const int64_t rows = offsets.size(0) - 1, K = synapses_t.size(1);
  const auto acc_dtype = synapses_t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({rows, K}, synapses_t.options().dtype(acc_dtype));
  if (rows == 0 || K == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  KEXUE_DISPATCH_SYNAPSES(synapses_t.scalar_type(), "biohash_activations_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* w = weights.has_value() ? weights->data_ptr<A>() : nullptr;
    activations_kernel<scalar_t, A><<<grid_for(rows), kThreads, 0, stream>>>(
        indices.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w, synapses_t.data_ptr<scalar_t>(), rows, K,
        out.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor biohash_sparse_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t, int64_t k,
                               bool packed) {
  biohash::check_csr(indices, offsets, weights, synapses_t, at::kCUDA);
  const c10::cuda::CUDAGuard guard(synapses_t.device());
  const int64_t rows = offsets.size(0) - 1, K = synapses_t.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "k must lie in [1, K]");
  const int64_t width = packed ? biohash::code_bytes(K) : K;
  auto out = at::empty({rows, width}, synapses_t.options().dtype(at::kByte));
  if (rows == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(rows);
  KEXUE_DISPATCH_SYNAPSES(synapses_t.scalar_type(), "biohash_sparse_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* w = weights.has_value() ? weights->data_ptr<A>() : nullptr;
    const KeyBuffer<A> keys = key_buffer<A>(grid, K, synapses_t);
    hash_kernel<scalar_t, A><<<grid, kThreads, keys.shared_bytes, stream>>>(
        indices.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w, synapses_t.data_ptr<scalar_t>(), rows, K, k,
        packed, width, key_ptr(keys), keys.shared_bytes > 0, out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor biohash_topk_cuda(const at::Tensor& activations, int64_t k, bool packed) {
  TORCH_CHECK(activations.is_cuda() && activations.dim() == 2 && activations.is_contiguous() &&
                  (activations.scalar_type() == at::kFloat || activations.scalar_type() == at::kDouble),
              "activations must be a contiguous float32 or float64 (B, K) CUDA tensor");
  const c10::cuda::CUDAGuard guard(activations.device());
  const int64_t rows = activations.size(0), K = activations.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "k must lie in [1, K]");
  const int64_t width = packed ? biohash::code_bytes(K) : K;
  auto out = at::empty({rows, width}, activations.options().dtype(at::kByte));
  if (rows == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(rows);
  AT_DISPATCH_FLOATING_TYPES(activations.scalar_type(), "biohash_topk_cuda", [&] {
    const KeyBuffer<scalar_t> keys = key_buffer<scalar_t>(grid, K, activations);
    topk_kernel<scalar_t><<<grid, kThreads, keys.shared_bytes, stream>>>(
        activations.data_ptr<scalar_t>(), rows, K, k, packed, width, key_ptr(keys), keys.shared_bytes > 0,
        out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace kexue
