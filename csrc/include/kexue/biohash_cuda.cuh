// Device pieces shared by the BioHash CUDA kernels (csrc/cuda/{biohash,biohash_update,hamming}.cu):
// launch constants, the exact (round-to-nearest, never fused) arithmetic that makes activations equal
// the reference bit for bit, block-wide reductions, the bitwise k-th-largest key search and the
// per-row key buffers. Included by .cu files only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "kexue/biohash.h"

namespace kexue {
namespace biohash_cuda {

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
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }  // exact under --use_fast_math
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

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

__device__ inline int64_t block_sum(int64_t v, int64_t* scratch) {
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

// The k-th largest of keys[0..n) (k in [1, n]), found bit by bit from the top, and how many keys
// are larger than it. Every thread of the block gets both.
template <typename K>
__device__ K kth_largest_key(const K* keys, int64_t n, int64_t k, int64_t* scratch, int64_t& greater) {
  constexpr int kBits = static_cast<int>(sizeof(K) * 8);
  K threshold = 0;
  for (int b = kBits - 1; b >= 0; --b) {
    const K bit = K(1) << b;
    threshold = biohash::refine_threshold(threshold, bit, count_at_least(keys, n, threshold | bit, scratch), k);
  }
  greater = threshold == ~K(0) ? 0 : count_at_least(keys, n, K(threshold + 1), scratch);
  return threshold;
}

// The row's key buffer: shared memory when it fits, else the row's slice of the global scratch.
template <typename K>
__device__ K* row_keys(K* global_scratch, int64_t row, int64_t n, bool in_shared) {
  extern __shared__ __align__(16) unsigned char shared_keys[];
  return in_shared ? reinterpret_cast<K*>(shared_keys) : global_scratch + row * n;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers: one block per row, the rows' key buffers.

inline int64_t grid_for(int64_t rows) {
  const int64_t max_blocks = 65535;
  return rows < max_blocks ? (rows > 0 ? rows : 1) : max_blocks;
}

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

// ---------------------------------------------------------------------------------------------
// Block-wide reduction with any associative operator.

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Block-wide reduction of one value per thread (every thread calls it and gets the result).
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int i = 1; i < static_cast<int>(blockDim.x) / kWarpSize; ++i) total = op(total, scratch[i]);
  return total;
}

}  // namespace biohash_cuda
}  // namespace kexue
