// BioHash / FlyVec on CUDA: activations of sparse inputs, winner-take-all codes, Hamming top-n.
//
// The contract is the CPU kernels' (csrc/cpu/biohash.cpp) and the oracle is
// python/kexue/reference/biohash.py; the ranking keys, the bitwise k-th-key search and the code
// layout come from csrc/include/kexue/biohash.h, which both files share.
//
// One block per row. Its threads own units mu = tid, tid + blockDim, ... and sum the row's
// synapse columns token by token in row order, with round-to-nearest multiply and add intrinsics
// (never a fused multiply-add), so the activations, and hence the codes, equal the reference bit
// for bit. The keys of a row sit in shared memory when they fit (K <= kSharedKeys) and in a global
// scratch row otherwise. The k-th largest key is found bit by bit with block-wide counts; ties at
// the threshold go to the lowest unit index, resolved by one thread scanning the row (rare: it
// needs equal activations).
//
// Hamming search: one block per query computes its distances to every database code into a
// scratch row, histograms them (counting sort), and one warp places the first n in order of
// (distance, database index) with warp-wide match masks.
//
// The learning step (biohash_update) has no CUDA kernel: on CUDA tensors it runs the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "kexue/biohash.h"
#include "kexue/biohash_checks.h"
#include "kexue/ops.h"

namespace kexue {
namespace {

using biohash::KeyOf;
using biohash::order_key;

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kSharedKeyBytes = 32 * 1024;  // keys of rows up to 8192 (float) / 4096 (double) units

template <typename A>
using Key = typename KeyOf<A>::type;

// ---------------------------------------------------------------------------------------------
// Exact arithmetic: the reference computes w * col and acc + product as two roundings.

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Activation of unit mu for the CSR row [start, end).
template <typename T, typename A>
__device__ A unit_activation(const int64_t* ids, const A* w, int64_t start, int64_t end, const T* wt, int64_t K,
                             int64_t mu) {
  A acc = A(0);
  for (int64_t j = start; j < end; ++j) {
    const A v = static_cast<A>(wt[ids[j] * K + mu]);
    acc = add_rn(acc, w == nullptr ? v : mul_rn(w[j], v));
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Block-wide helpers. Every thread of the block must call them (they hold barriers) and every
// thread gets the same result.

__device__ int64_t block_sum(int64_t v, int64_t* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t total = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x) / kWarpSize; ++i) total += scratch[i];
  return total;
}

template <typename K>
__device__ int64_t count_at_least(const K* keys, int64_t n, K c, int64_t* scratch) {
  int64_t count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) count += keys[i] >= c ? 1 : 0;
  return block_sum(count, scratch);
}

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
    K threshold = 0;
    for (int b = kBits - 1; b >= 0; --b) {
      const K bit = K(1) << b;
      threshold = biohash::refine_threshold(threshold, bit, count_at_least(keys, n, threshold | bit, scratch), k);
    }
    const int64_t greater = threshold == ~K(0) ? 0 : count_at_least(keys, n, K(threshold + 1), scratch);
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

// The row's key buffer: shared memory when it fits, else the row's slice of the global scratch.
template <typename K>
__device__ K* row_keys(K* global_scratch, int64_t row, int64_t n, bool in_shared) {
  extern __shared__ __align__(16) unsigned char shared_keys[];
  return in_shared ? reinterpret_cast<K*>(shared_keys) : global_scratch + row * n;
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

// Hamming distances of query q to every database code, then the first n by (distance, index).
// `slots` holds max_dist + 2 counters (shared memory, or the block's slice of a global scratch).
__global__ void hamming_kernel(const uint8_t* __restrict__ queries, const uint8_t* __restrict__ db, int64_t q0,
                               int64_t Q, int64_t D, int64_t nb, int64_t n, int32_t* dist_scratch,
                               int32_t* slot_scratch, bool slots_in_shared, int64_t* __restrict__ dist_out,
                               int64_t* __restrict__ idx_out) {
  extern __shared__ __align__(16) unsigned char shared_slots[];
  const int64_t bins = nb * 8 + 2;
  for (int64_t q = q0 + blockIdx.x; q < Q; q += gridDim.x) {
    int32_t* dist = dist_scratch + blockIdx.x * D;
    int32_t* slot = slots_in_shared ? reinterpret_cast<int32_t*>(shared_slots) : slot_scratch + blockIdx.x * bins;
    const uint8_t* qp = queries + q * nb;
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) slot[i] = 0;
    __syncthreads();
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const uint8_t* code = db + d * nb;
      int32_t h = 0;
      for (int64_t b = 0; b < nb; ++b) h += __popc(static_cast<unsigned>(qp[b] ^ code[b]));
      dist[d] = h;
      atomicAdd(&slot[h + 1], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // slot[v] = the first output position of distance v
      for (int64_t v = 0; v + 1 < bins; ++v) slot[v + 1] += slot[v];
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      // 32 database entries at a time, in index order: entries with equal distances take
      // consecutive positions by lane, and the lowest lane of each group advances the slot.
      const int lane = threadIdx.x;
      const unsigned lower = (1u << lane) - 1u;
      for (int64_t base = 0; base < D; base += kWarpSize) {
        const int64_t d = base + lane;
        const bool valid = d < D;
        const int32_t h = valid ? dist[d] : -1 - lane;  // invalid lanes match nobody
        const unsigned group = __match_any_sync(kFullMask, h);
        if (valid) {
          const int64_t pos = slot[h] + __popc(group & lower);
          if (pos < n) {
            dist_out[q * n + pos] = h;
            idx_out[q * n + pos] = d;
          }
        }
        __syncwarp();
        if (valid && (group & lower) == 0) slot[h] += __popc(group);
        __syncwarp();
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

int64_t grid_for(int64_t rows) {
  const int64_t max_blocks = 65535;
  return rows < max_blocks ? (rows > 0 ? rows : 1) : max_blocks;
}

#define KEXUE_DISPATCH_SYNAPSES(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

template <typename A>
struct KeyBuffer {
  at::Tensor scratch;  // empty when the keys fit in shared memory
  int64_t shared_bytes;
};

template <typename A>
KeyBuffer<A> key_buffer(int64_t grid, int64_t K, const at::Tensor& like) {
  const int64_t bytes = K * static_cast<int64_t>(sizeof(Key<A>));
  if (bytes <= kSharedKeyBytes) return {at::Tensor(), bytes};
  return {at::empty({grid * bytes}, like.options().dtype(at::kByte)), 0};
}

template <typename A>
Key<A>* key_ptr(const KeyBuffer<A>& b) {
  return b.scratch.defined() ? reinterpret_cast<Key<A>*>(b.scratch.template data_ptr<uint8_t>()) : nullptr;
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

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& queries, const at::Tensor& database,
                                                     int64_t n) {
  biohash::check_codes(queries, database, n, at::kCUDA);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t Q = queries.size(0), D = database.size(0), nb = queries.size(1);
  auto dist_out = at::empty({Q, n}, queries.options().dtype(at::kLong));
  auto idx_out = at::empty({Q, n}, queries.options().dtype(at::kLong));
  if (Q == 0 || n == 0) return {dist_out, idx_out};
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Queries go in chunks so that the distance scratch stays at most ~64 MB.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(grid_for(Q), (int64_t{16} << 20) / D));
  const int64_t bins = nb * 8 + 2;
  const int64_t slot_bytes = bins * static_cast<int64_t>(sizeof(int32_t));
  const bool slots_in_shared = slot_bytes <= kSharedKeyBytes;
  auto dist_scratch = at::empty({chunk, D}, queries.options().dtype(at::kInt));
  auto slot_scratch = slots_in_shared ? at::Tensor() : at::empty({chunk, bins}, queries.options().dtype(at::kInt));
  for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
    const int64_t grid = std::min(chunk, Q - q0);
    hamming_kernel<<<grid, kThreads, slots_in_shared ? slot_bytes : 0, stream>>>(
        queries.data_ptr<uint8_t>(), database.data_ptr<uint8_t>(), q0, q0 + grid, D, nb, n,
        dist_scratch.data_ptr<int32_t>(), slots_in_shared ? nullptr : slot_scratch.data_ptr<int32_t>(),
        slots_in_shared, dist_out.data_ptr<int64_t>(), idx_out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dist_out, idx_out};
}

}  // namespace kexue
