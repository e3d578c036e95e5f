// Hamming top-n on CUDA (contract: hamming_topk_cpu in csrc/cpu/hamming.cpp).
//
// One block per query computes its distances to every database code into a scratch row,
// histograms them (counting sort), and one warp places the first n in order of
// (distance, database index) with warp-wide match masks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <tuple>

#include "kexue/biohash_checks.h"
#include "kexue/biohash_cuda.cuh"
#include "kexue/ops.h"

namespace kexue {
using namespace biohash_cuda;

namespace {

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

}  // namespace

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
