// BioHash / FlyVec on CUDA: activations of sparse inputs, winner-take-all codes, Hamming top-n.
//
// The contract is the CPU kernels' (csrc/cpu/{biohash,biohash_update,hamming}.cpp) and the oracle is
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
// The learning step (biohash_update): one block per CSR row picks the winner (and the rank-th unit)
// and writes each token's Hebbian contributions; one thread per unit sums xx over the batch in
// sample order; the contributions are stably sorted by input id (at::sort), so that one block per
// row of synapses_t sums each element's contributions in the CPU kernel's order, first for the
// global max |ds|, then to apply the step. No atomics, no (N, K) scratch: the result equals the CPU
// kernel's bit for bit (same roundings, same order).
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

// ---------------------------------------------------------------------------------------------
// The learning step (contract: biohash_update_cpu in csrc/cpu/biohash_update.cpp).

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

// The unit ranked `rank`-th by keys[0..n) (ties to the lowest index), rank in [1, n]: the rank-th
// largest key bit by bit, then thread 0 finds the tied unit in index order.
template <typename K>
__device__ int64_t unit_of_rank(const K* keys, int64_t n, int64_t rank, int64_t* scratch) {
  __shared__ int64_t s_unit;
  int64_t greater;
  const K threshold = kth_largest_key(keys, n, rank, scratch, greater);
  if (threadIdx.x == 0) {
    int64_t tie = rank - greater, unit = 0;
    for (int64_t mu = 0; mu < n; ++mu) {
      if (keys[mu] == threshold && --tie == 0) {
        unit = mu;
        break;
      }
    }
    s_unit = unit;
  }
  __syncthreads();
  const int64_t unit = s_unit;
  __syncthreads();  // s_unit is rewritten by the next call
  return unit;
}

// Per row: the winner (largest raw activation, lowest index), with `anti` the unit ranked `rank`-th,
// their scaled activations, and the row's Hebbian contributions: (winner, w_j) at slot j and, with
// `anti`, (ranked unit, -delta * w_j) at slot nnz + j.
template <typename A>
__global__ void update_rows_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ off,
                                   const A* __restrict__ w, const A* __restrict__ wt, int64_t rows, int64_t K,
                                   int64_t nnz, int64_t rank, A delta, bool anti, Key<A>* key_scratch,
                                   bool in_shared, int64_t* __restrict__ winners, A* __restrict__ s_win,
                                   int64_t* __restrict__ second, A* __restrict__ s_second,
                                   int64_t* __restrict__ unit, A* __restrict__ value) {
  __shared__ int64_t scratch[kThreads / kWarpSize];
  __shared__ uint64_t uscratch[kThreads / kWarpSize];
  const A* no_weights = nullptr;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t start = off[r], end = off[r + 1];
    Key<A>* keys = row_keys(key_scratch, blockIdx.x, K, in_shared);
    uint64_t best = 0;
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) {
      const Key<A> key = order_key(unit_activation(ids, no_weights, start, end, wt, K, mu));
      keys[mu] = key;
      best = key > best ? key : best;
    }
    best = block_reduce(best, MaxOp(), uscratch);  // its barriers also publish the keys
    uint64_t first = static_cast<uint64_t>(K);
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) {
      if (keys[mu] == static_cast<Key<A>>(best) && static_cast<uint64_t>(mu) < first) first = mu;
    }
    const int64_t winner = static_cast<int64_t>(block_reduce(first, MinOp(), uscratch));
    const int64_t ranked = anti ? (rank == 1 ? winner : unit_of_rank(keys, K, rank, scratch)) : winner;
    if (threadIdx.x == 0) {
      winners[r] = winner;
      s_win[r] = unit_activation(ids, w, start, end, wt, K, winner);
      if (anti) {
        second[r] = ranked;
        s_second[r] = unit_activation(ids, w, start, end, wt, K, ranked);
      }
    }
    for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
      const A wj = w == nullptr ? A(1) : w[j];
      unit[j] = winner;
      value[j] = wj;
      if (anti) {
        unit[nnz + j] = ranked;
        value[nnz + j] = mul_rn(-delta, wj);
      }
    }
    __syncthreads();  // the keys are rewritten by the next row
  }
}

// nx[mu] = -xx[mu] on active units (xx != 0), 0 elsewhere; xx summed in sample order, winners
// first, then the ranked units (the CPU kernel's order). The batch goes through shared memory in
// tiles that every thread of the block scans.
template <typename A>
__global__ void update_xx_kernel(const int64_t* __restrict__ winners, const A* __restrict__ s_win,
                                 const int64_t* __restrict__ second, const A* __restrict__ s_second, int64_t rows,
                                 int64_t K, A delta, bool anti, A* __restrict__ nx) {
  __shared__ int64_t t_unit[kThreads];
  __shared__ A t_value[kThreads];
  const int64_t mu = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A xx = A(0);
  for (int pass = 0; pass < (anti ? 2 : 1); ++pass) {
    const int64_t* units = pass == 0 ? winners : second;
    const A* values = pass == 0 ? s_win : s_second;
    for (int64_t r0 = 0; r0 < rows; r0 += kThreads) {
      const int64_t n = rows - r0 < kThreads ? rows - r0 : kThreads;
      __syncthreads();  // the previous tile has been read
      if (threadIdx.x < n) {
        t_unit[threadIdx.x] = units[r0 + threadIdx.x];
        const A v = values[r0 + threadIdx.x];
        t_value[threadIdx.x] = pass == 0 ? v : mul_rn(-delta, v);
      }
      __syncthreads();
      for (int64_t t = 0; t < n; ++t) {
        if (t_unit[t] == mu) xx = add_rn(xx, t_value[t]);
      }
    }
  }
  if (mu < K) nx[mu] = xx != A(0) ? -xx : A(0);
}

// One block per row i of synapses_t: ds[i, mu] = nx[mu] * W[i, mu] + (the sum of input i's
// contributions to unit mu, in bucket order) on active units. Without `apply`: partial[i] = the
// row's max |ds| (NaN ignored, as on the CPU). With `apply`: W += lr / max(nc, prec) * ds where the
// change exceeds tiny in magnitude.
template <typename A>
__global__ void update_ds_kernel(A* __restrict__ wt, const A* __restrict__ nx, const int64_t* __restrict__ bucket,
                                 const int64_t* __restrict__ unit, const A* __restrict__ value, int64_t N, int64_t K,
                                 bool apply, A* __restrict__ partial, const A* __restrict__ nc, A lr, A prec,
                                 A tiny) {
  __shared__ A scratch[kThreads / kWarpSize];
  const A scale = apply ? div_rn(lr, *nc > prec ? *nc : prec) : A(0);
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const int64_t b = bucket[i], e = bucket[i + 1];
    A row_max = A(0);
    for (int64_t mu = threadIdx.x; mu < K; mu += blockDim.x) {
      const A n = nx[mu];
      if (n == A(0)) continue;  // an inactive unit never changes
      A* p = wt + i * K + mu;
      const A w0 = *p;
      A ds = mul_rn(n, w0);
      A sum = A(0);
      bool touched = false;
      for (int64_t s = b; s < e; ++s) {
        if (unit[s] == mu) {
          sum = add_rn(sum, value[s]);
          touched = true;
        }
      }
      if (touched) ds = add_rn(ds, sum);
      if (apply) {
        const A change = mul_rn(scale, ds);
        if (fabs(change) > tiny) *p = add_rn(w0, change);
      } else {
        const A a = fabs(ds);
        row_max = a > row_max ? a : row_max;
      }
    }
    if (!apply) {
      row_max = block_reduce(row_max, MaxOp(), scratch);
      if (threadIdx.x == 0) partial[i] = row_max;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (the contracts of the _cpu functions in csrc/cpu/{biohash,biohash_update,hamming}.cpp).

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

// The learning step: winners and contributions, xx, the buckets (a stable sort by input id), then
// the two ds passes with the global max between them (at::amax of the per-row maxima).
std::tuple<at::Tensor, at::Tensor> biohash_update_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                                                       const std::optional<at::Tensor>& weights,
                                                       at::Tensor synapses_t, double lr, double delta, int64_t rank,
                                                       double prec, double tiny) {
  biohash::check_csr(indices, offsets, weights, synapses_t, at::kCUDA);
  TORCH_CHECK(synapses_t.scalar_type() == at::kFloat || synapses_t.scalar_type() == at::kDouble,
              "biohash_update_cuda takes float32 or float64 synapses");
  TORCH_CHECK(synapses_t.size(1) >= 1, "K must be at least 1");
  TORCH_CHECK(rank >= 1 && rank <= synapses_t.size(1), "rank must lie in [1, K]");
  const c10::cuda::CUDAGuard guard(synapses_t.device());
  const int64_t rows = offsets.size(0) - 1, N = synapses_t.size(0), K = synapses_t.size(1);
  const int64_t nnz = indices.size(0);
  auto winners = at::empty({rows}, offsets.options());
  auto s_win = at::empty({rows}, synapses_t.options());
  if (rows == 0) return {winners, s_win};  // no winner, no active unit: nothing moves
  const bool anti = delta != 0.0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(synapses_t.scalar_type(), "biohash_update_cuda", [&] {
    using A = scalar_t;
    const A* w = weights.has_value() ? weights->data_ptr<A>() : nullptr;
    A* wt = synapses_t.data_ptr<A>();
    auto second = at::empty({anti ? rows : 1}, offsets.options());
    auto s_second = at::empty({anti ? rows : 1}, synapses_t.options());
    auto unit = at::empty({(anti ? 2 : 1) * nnz}, offsets.options());
    auto value = at::empty({(anti ? 2 : 1) * nnz}, synapses_t.options());
    const int64_t grid = grid_for(rows);
    const KeyBuffer<A> keys = key_buffer<A>(grid, K, synapses_t);
    update_rows_kernel<A><<<grid, kThreads, keys.shared_bytes, stream>>>(
        indices.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w, wt, rows, K, nnz, rank, static_cast<A>(delta),
        anti, key_ptr(keys), keys.shared_bytes > 0, winners.data_ptr<int64_t>(), s_win.data_ptr<A>(),
        second.data_ptr<int64_t>(), s_second.data_ptr<A>(), unit.data_ptr<int64_t>(), value.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto nx = at::empty({K}, synapses_t.options());
    update_xx_kernel<A><<<(K + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        winners.data_ptr<int64_t>(), s_win.data_ptr<A>(), second.data_ptr<int64_t>(), s_second.data_ptr<A>(), rows,
        K, static_cast<A>(delta), anti, nx.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Buckets: slot j (and nnz + j) belongs to input indices[j]; a stable sort keeps sample order.
    const at::Tensor inputs = anti ? at::cat({indices, indices}) : indices;
    const auto [sorted_inputs, order] = at::sort(inputs, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted_unit = unit.index_select(0, order);
    const at::Tensor sorted_value = value.index_select(0, order);
    const at::Tensor bucket = at::searchsorted(sorted_inputs, at::arange(N + 1, indices.options()));

    auto partial = at::empty({N}, synapses_t.options());
    const int64_t ds_grid = grid_for(N);
    auto ds_pass = [&](bool apply, const A* nc) {
      update_ds_kernel<A><<<ds_grid, kThreads, 0, stream>>>(
          wt, nx.data_ptr<A>(), bucket.data_ptr<int64_t>(), sorted_unit.data_ptr<int64_t>(),
          sorted_value.data_ptr<A>(), N, K, apply, partial.data_ptr<A>(), nc, static_cast<A>(lr),
          static_cast<A>(prec), static_cast<A>(tiny));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    ds_pass(false, nullptr);
    const at::Tensor nc = partial.amax();
    ds_pass(true, nc.data_ptr<A>());
  });
  return {winners, s_win};
}

}  // namespace kexue
