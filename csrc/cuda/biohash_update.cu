// The BioHash learning step on CUDA (contract: biohash_update_cpu in csrc/cpu/biohash_update.cpp).
//
// One block per CSR row picks the winner (and the rank-th unit) and writes each token's Hebbian
// contributions; one thread per unit sums xx over the batch in sample order; the contributions are
// stably sorted by input id (at::sort), so that one block per row of synapses_t sums each element's
// contributions in the CPU kernel's order, first for the global max |ds|, then to apply the step.
// No atomics, no (N, K) scratch: the result equals the CPU kernel's bit for bit (same roundings,
// same order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "kexue/biohash_checks.h"
#include "kexue/biohash_cuda.cuh"
#include "kexue/ops.h"

namespace kexue {
using namespace biohash_cuda;

namespace {

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
