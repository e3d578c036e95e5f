// Lion / Tiger on CUDA: the fused multi-tensor step.
//
// Same contract and structure as triton_kernels/sign_optim.py: the host decodes the per-tensor
// table (csrc/include/kexue/sign_optim.h) into an array of jobs; a plan cut the tensors into work
// items of kChunk elements (whole rows for tensors updated row by row) when the call's structure
// was first seen, and is found again at later steps (sign_optim_plan.h), so that a step uploads
// at most its jobs array, in one non-blocking copy from page-locked memory, and builds nothing.
// One launch per (param dtype, momentum dtype) updates every item of every tensor, one block per
// item.
//
// Two reductions must be complete before the update that reads them: Tiger's whole-tensor
// RMS(theta) and the NaN guard's "any NaN or inf in grad". A pre-pass writes one partial per item,
// and a finishing kernel adds each tensor's partials in item order (no float atomics: two runs
// give the same bits) and raises the guard flag of the tensor's group with an integer atomic.
// Per-row values (row RMS, whether a row of an embedding table has any gradient) are reduced by
// the warp that owns the row, right before it updates the row.
//
// One-pass Tiger (kRmsCarried / kSsqOut, python/kexue/optim/_carried_rms.py): the step sums the
// squares of the theta it stores, in the order in which the pre-pass would read them -- per item
// the same groups per thread and block reduction, per row the same groups per lane and warp
// reduction -- and ssq_out_kernel adds the item partials in item order as finish_kernel does. The
// sum handed on is therefore bit for bit the one a pre-pass over the new theta would compute, and
// the next step reads it instead of theta.
//
// Memory accesses (sign_optim_access.cuh): every sweep takes groups of kGroup = 8 consecutive
// elements per thread; a tensor whose param, grad and momentum start on 16 bytes (mask: 8) moves
// its full groups as 128-bit loads and stores (Item::vec, decided by the plan), any other group
// element by element in the same order. So the choice changes no bit, sums of squares included,
// and an aligned tensor and an unaligned copy of it step alike.
//
// The element arithmetic comes from sign_optim.h, shared with the C++ CPU kernel; the checks and
// the decoding of the table into jobs from sign_optim_host.h. In capturable mode the rows flagged
// kDynamic take their per-step values from the dynamic table in device memory: every kernel
// applies them to its own copy of the row (row_of), the host never reads them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kexue/ops.h"
#include "kexue/sign_optim.h"
#include "kexue/sign_optim_access.cuh"
#include "kexue/sign_optim_host.h"
#include "kexue/sign_optim_plan.h"

namespace kexue {
namespace {

using namespace sign_optim;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The row of job t as this step sees it: the dynamic values applied where the row asks for them.
__device__ __forceinline__ Job row_of(const Job* __restrict__ jobs, const double* __restrict__ dyn, int64_t t) {
  Job j = jobs[t];
  if (dyn != nullptr && has(j, kDynamic)) apply_dynamic(j, dyn + t * kNumDyn);
  return j;
}

// ---------------------------------------------------------------------------------------------
// Reductions, in one fixed order wherever a sum of squares is formed: the pre-pass, the step that
// carries the sum and the row sweeps use these very functions, so equal inputs give equal bits.

// One explicit fused multiply-add, so that no contraction choice of the compiler can make two
// sums of the same values differ. Float32 arithmetic in this file goes through kexue/ieee_float.h,
// which keeps subnormals under --use_fast_math (-ftz=true), as the CPU step does.
__device__ __forceinline__ float add_square(float acc, float x) { return ieee::fma(x, x, acc); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v = ieee::add(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ int warp_or(int v) {
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The block's sum of one float per thread: warps by the xor tree, then the warps' sums in warp
// order, in double. Valid in thread 0; every thread of the block must call it (it synchronises).
__device__ __forceinline__ double block_sum(float v) {
  __shared__ double s_sum[kWarps];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) s_sum[threadIdx.x / 32] = ieee::widen(v);
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += s_sum[w];
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Every sweep over elements goes through for_groups (sign_optim_access.cuh): a thread of
// a block takes groups of kGroup consecutive elements, threadIdx.x, threadIdx.x + kThreads, ...; a
// lane of a row's warp takes groups lane, lane + 32, ... of the row. A group of a vectorizable
// item moves as 128-bit accesses (Vec), others element by element, in the same order.

// Per item: the sum of squares of theta (a whole-tensor RMS that is not carried, or the sum to
// hand on where theta stays) and whether the grads hold a NaN or inf. Reads the static flags: in
// capturable mode kUpdate means "may update" (an RMS computed on a micro-step that does not update
// is not used).
template <int PS>
__global__ void prepass_kernel(const Item* __restrict__ items, const Job* __restrict__ jobs, double* ssq_out,
                               int* nan_out) {
  const Item item = items[blockIdx.x];
  const Job& j = jobs[item.job];
  const bool rms = !has(j, kRmsCarried) &&
                   ((has(j, kRmsTensor) && has(j, kUpdate)) || (has(j, kSsqOut) && !per_row_sums(j)));
  const bool guard = j.nan_group >= 0;
  float ssq = 0.f;
  int nan = 0;
  for_groups(item.begin, item.end, threadIdx.x, kThreads, item.vec, [&](auto vec, int64_t i, int n) {
    constexpr bool V = decltype(vec)::value;
    float x[kGroupN];
    if (rms) {
      load_group<PS, V>(j.param, i, n, x);
#pragma unroll
      for (int e = 0; e < kGroupN; ++e) {
        if (V || e < n) ssq = add_square(ssq, x[e]);
      }
    }
    if (guard) {
      load_group<PS, V>(j.grad, i, n, x);  // zeros past n: finite
#pragma unroll
      for (int e = 0; e < kGroupN; ++e) nan |= non_finite(x[e]);  // NaN or +-inf (sign_optim.h)
    }
  });
  __shared__ int s_nan[kWarps];
  nan = warp_or(nan);
  if (threadIdx.x % 32 == 0) s_nan[threadIdx.x / 32] = nan;
  const double total = block_sum(ssq);  // its barrier publishes s_nan too
  if (threadIdx.x == 0) {
    int found = 0;
    for (int w = 0; w < kWarps; ++w) found |= s_nan[w];
    ssq_out[blockIdx.x] = total;
    nan_out[blockIdx.x] = found;
  }
}

// One thread per tensor: its partials in item order (deterministic), or the sum carried from the
// previous step; then lr * RMS, the sum for ssq_out_kernel, and the NaN flag of its group.
__global__ void finish_kernel(const Span* __restrict__ spans, int64_t n, const Job* __restrict__ jobs,
                              const double* __restrict__ dyn, const double* __restrict__ ssq,
                              const int* __restrict__ nan, double* lr_out, double* job_ssq, int* group_nan) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= n) return;
  const Span span = spans[s];
  const Job j = row_of(jobs, dyn, span.job);
  double total = 0.0;
  int found = 0;
  for (int64_t i = span.first; i < span.first + span.count; ++i) total += ssq[i], found |= nan[i];
  if (has(j, kRmsCarried)) total = *global(j.ssq);  // theta_{t-1}'s sum, left by the last call
  job_ssq[span.job] = total;
  lr_out[span.job] = j.lr * sqrt(total / static_cast<double>(j.numel));
  if (found && j.nan_group >= 0) atomicMax(group_nan + j.nan_group, 1);
}

// Whether the NaN guard shrinks job j in this step.
__device__ __forceinline__ bool shrinks(const Job& j, const int* __restrict__ group_nan) {
  return (j.nan_group >= 0 && group_nan[j.nan_group] != 0) || has(j, kShrinkNow);
}

// One thread per whole-tensor kSsqOut tensor: the sum of squares of theta as this call leaves it.
// Written: the step's partials in item order, as finish_kernel adds the pre-pass's. Kept: the
// pre-pass's sum, or the carried one (already in place). No dynamic rows here (refused on the host).
__global__ void ssq_out_kernel(const Span* __restrict__ outs, int64_t n, const Job* __restrict__ jobs,
                               const double* __restrict__ parts, const double* __restrict__ job_ssq,
                               const int* __restrict__ group_nan) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= n) return;
  const Span span = outs[s];
  const Job& j = jobs[span.job];
  if (shrinks(j, group_nan) || has(j, kUpdate)) {
    double total = 0.0;
    for (int64_t i = span.first; i < span.first + span.count; ++i) total += parts[i];
    *global(j.ssq) = total;
  } else if (!has(j, kRmsCarried)) {
    *global(j.ssq) = job_ssq[span.job];
  }
}

// The element update (sign_optim.h) of the group [i, i + n): momentum always, theta when `update`;
// adds to acc the squares of the theta stored, in element order (nothing when not stored).
template <int PS, int MS, bool V>
__device__ __forceinline__ void update_group(const Job& j, int64_t i, int n, const Coefs& k, bool update, bool live,
                                             bool freeze, bool gated, bool stochastic, float& acc) {
  float g[kGroupN], m[kGroupN], th[kGroupN];
  load_group<PS, V>(j.grad, i, n, g);
  load_group<MS, V>(j.mom, i, n, m);
  if (update) load_group<PS, V>(j.param, i, n, th);  // issued with the others, before any arithmetic
  bool keep[kGroupN];
  if (has(j, kMaskF)) {
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) {
      keep[e] = keep_element(element_bits(j.mask_k0, j.mask_k1, static_cast<uint64_t>(i + e)), j.mask_threshold);
    }
  } else if (gated) {
    uint8_t b[kGroupN];
    load_bytes<V>(j.mask, i, n, b);
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) keep[e] = b[e] != 0;
  } else {
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) keep[e] = true;
  }
  float mn[kGroupN];
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) {
    g[e] = keep[e] ? ieee::mul(g[e], j.gscale) : 0.f;
    mn[e] = new_momentum(m[e], g[e], k);
  }
  if (update) {
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) {
      const float tn = stepped(th[e], direction(m[e], mn[e], g[e], k, has(j, kUseNewMomentum)), k);
      const bool movable = live && (keep[e] || !(gated && has(j, kMaskUpdate)));
      th[e] = movable ? tn : th[e];
    }
    store_group<PS, V>(j.param, i, n, th, stochastic, j.round_k0, j.round_k1);
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) {
      if (V || e < n) acc = add_square(acc, th[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) mn[e] = freeze ? m[e] : mn[e];
  store_group<MS, V>(j.mom, i, n, mn, false, 0, 0);
}

__device__ __forceinline__ Coefs coefs_for(const Job& j, double lr) {
  Coefs k;
  k.lr = ieee::narrow(lr);
  k.decay = ieee::narrow(1.0 - lr * j.wd);
  k.c_m = j.c_m, k.c_g = j.c_g, k.m_m = j.m_m, k.m_g = j.m_g;
  return k;
}

// Theta of the group [i, i + n) pulled towards the centre (Tiger's NaN guard); adds the squares
// of what it stores to acc.
template <int PS, bool V>
__device__ __forceinline__ void shrink_group(const Job& j, int64_t i, int n, bool stochastic, float& acc) {
  float th[kGroupN];
  load_group<PS, V>(j.param, i, n, th);
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) th[e] = nan_shrink(th[e], j.shrink, j.centre);
  store_group<PS, V>(j.param, i, n, th, stochastic, j.round_k0, j.round_k1);
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) {
    if (V || e < n) acc = add_square(acc, th[e]);
  }
}

// Tiger's NaN guard over one item: momentum untouched, theta pulled towards the centre. Row sums
// to hand on are formed row by row, a warp per row, in the order of the step's row sweeps.
template <int PS>
__device__ void shrink_item(const Job& j, const Item& item, bool stochastic, double* part) {
  if (per_row_sums(j) && has(j, kSsqOut)) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t len = j.row_len;
    for (int64_t r = item.begin / len + warp; r < item.end / len; r += kWarps) {
      float acc = 0.f;
      for_groups(r * len, (r + 1) * len, lane, 32, item.vec, [&](auto vec, int64_t i, int n) {
        shrink_group<PS, decltype(vec)::value>(j, i, n, stochastic, acc);
      });
      acc = warp_sum(acc);
      if (lane == 0) global(j.ssq)[r] = ieee::widen(acc);
    }
    return;
  }
  float acc = 0.f;
  for_groups(item.begin, item.end, threadIdx.x, kThreads, item.vec, [&](auto vec, int64_t i, int n) {
    shrink_group<PS, decltype(vec)::value>(j, i, n, stochastic, acc);
  });
  if (has(j, kSsqOut)) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) *part = total;
  }
}

// One item of a tensor updated row by row, one warp per row: a first sweep for the row's values
// (any gradient, sum of squares unless carried), then the update, which sums the squares it stores.
template <int PS, int MS>
__device__ void update_rows(const Job& j, const Item& item, double lr, bool update, bool gated, bool stochastic) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t len = j.row_len;
  const bool lazy = has(j, kLazyRows), carried = has(j, kRmsCarried);
  const bool out = has(j, kSsqOut) && has(j, kRmsRow);
  const bool row_rms = has(j, kRmsRow) && update;
  const bool read = has(j, kRmsRow) && !carried && (update || out);
  for (int64_t r = item.begin / len + warp; r < item.end / len; r += kWarps) {
    const int64_t s = r * len;
    int present = 0;
    float ssq = 0.f;
    for_groups(s, s + len, lane, 32, item.vec, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float x[kGroupN];
      if (lazy) {
        load_group<PS, V>(j.grad, i, n, x);  // zeros past n: absent
#pragma unroll
        for (int e = 0; e < kGroupN; ++e) present |= ieee::nonzero(x[e]);  // NaN counts as present
      }
      if (read) {
        load_group<PS, V>(j.param, i, n, x);
#pragma unroll
        for (int e = 0; e < kGroupN; ++e) {
          if (V || e < n) ssq = add_square(ssq, x[e]);
        }
      }
    });
    present = warp_or(present);
    const double before = carried ? global(j.ssq)[r] : ieee::widen(warp_sum(ssq));
    bool live = true, freeze = false;
    if (lazy) {
      live = present || (j.seen != nullptr && global(j.seen)[r] != 0);
      if (j.seen != nullptr && lane == 0) global(j.seen)[r] = update ? 0 : static_cast<uint8_t>(live);
      freeze = !present && has(j, kFreezeAbsent);
    }
    const double row_lr = row_rms ? lr * sqrt(before / static_cast<double>(len)) : lr;
    const Coefs k = coefs_for(j, row_lr);
    float after = 0.f;
    for_groups(s, s + len, lane, 32, item.vec, [&](auto vec, int64_t i, int n) {
      update_group<PS, MS, decltype(vec)::value>(j, i, n, k, update && live, live, freeze, gated, stochastic, after);
    });
    after = warp_sum(after);
    if (out && lane == 0) global(j.ssq)[r] = update && live ? ieee::widen(after) : before;
  }
}

// 3 blocks of 256 threads per SM (at most 85 registers; 80 used, no spills on sm_80 / sm_90),
// as the element-by-element float32 step had: uncapped, the groups' registers took 96 (2 blocks).
template <int PS, int MS>
__global__ void __launch_bounds__(kThreads, 3) step_kernel(const Item* __restrict__ items, const Job* __restrict__ jobs,
                            const double* __restrict__ dyn, const double* __restrict__ lr_eff,
                            const int* __restrict__ group_nan, double* parts) {
  const Item item = items[blockIdx.x];
  const Job j = row_of(jobs, dyn, item.job);
  if (j.skip) return;  // GradScaler found an inf/NaN (capturable mode)
  const bool stochastic = PS == kBF16 && has(j, kStochasticRound);
  const bool update = has(j, kUpdate);
  if (shrinks(j, group_nan)) {
    shrink_item<PS>(j, item, stochastic, parts + blockIdx.x);
    return;
  }
  const double lr = has(j, kRmsTensor) && update ? lr_eff[item.job] : j.lr;
  const bool gated = has(j, kMaskF) || (has(j, kMaskD) && j.mask != nullptr);
  if (by_rows(j)) {
    update_rows<PS, MS>(j, item, lr, update, gated, stochastic);
    return;
  }
  const Coefs k = coefs_for(j, lr);
  float acc = 0.f;
  for_groups(item.begin, item.end, threadIdx.x, kThreads, item.vec, [&](auto vec, int64_t i, int n) {
    update_group<PS, MS, decltype(vec)::value>(j, i, n, k, update, true, false, gated, stochastic, acc);
  });
  if (has(j, kSsqOut)) {  // the partial of the theta stored (ssq_out_kernel ignores it without kUpdate)
    const double total = block_sum(acc);
    if (threadIdx.x == 0) parts[blockIdx.x] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Bytes on the device, copied without making the host wait: a copy from pageable memory
// synchronises with the stream (the host would stall until the backward pass has drained), one
// from page-locked memory with non_blocking does not. The pinned block comes from torch's caching
// host allocator, which records the copy's stream and does not hand the block out again before
// the copy has run, so it may be released as soon as this returns. A copy cannot be made while a
// CUDA graph is being captured (the graph would replay it from a block since reused).
at::Tensor upload(const void* data, size_t bytes, const at::Device& device, cudaStream_t stream) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  TORCH_CHECK(capturing == cudaStreamCaptureStatusNone,
              "sign_optim_step (cuda): the step tables changed while a CUDA graph was being captured; run one "
              "step of the capturable optimizer before capturing");
  const auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(1, bytes))}, pinned);
  if (bytes > 0) std::memcpy(host.data_ptr(), data, bytes);
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

// Plans of every call; never destroyed, so no device memory is freed after CUDA shuts down.
PlanCache<at::Tensor>& plans() {
  static auto* cache = new PlanCache<at::Tensor>();
  return *cache;
}

template <int PS>
void launch_prepass(const Item* items, int64_t n, const Job* jobs, double* ssq, int* nan, cudaStream_t stream) {
  prepass_kernel<PS><<<n, kThreads, 0, stream>>>(items, jobs, ssq, nan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int PS, int MS>
void launch_step(const Item* items, int64_t n, const Job* jobs, const double* dyn, const double* lr_eff,
                 const int* group_nan, double* parts, cudaStream_t stream) {
  step_kernel<PS, MS><<<n, kThreads, 0, stream>>>(items, jobs, dyn, lr_eff, group_nan, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

void run_step(const Call& call, const at::Device& device) {
  const int64_t T = static_cast<int64_t>(call.jobs.size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_plan_jobs("sign_optim_step (cuda)", call.jobs);
  const Plan<at::Tensor> plan =
      plans().prepare(call.jobs, "cuda:" + std::to_string(device.index()), call.dyn != nullptr,
                      [&](const void* data, size_t bytes) { return upload(data, bytes, device, stream); });
  const Layout& l = *plan.layout;
  const Job* jobs = reinterpret_cast<const Job*>(plan.jobs.data_ptr());
  const uint8_t* tables = plan.tables.data_ptr<uint8_t>();
  const Item* pre_items = reinterpret_cast<const Item*>(tables);
  const Item* step_items = pre_items + l.prepass_slots;

  // Scratch of this step, one allocation: doubles (pre-pass and step partials, lr * RMS and the
  // sums per tensor), then ints (pre-pass NaN flags, the NaN flag of each guard group).
  const int64_t n_double = l.prepass_slots + l.step_slots + 2 * T, n_int = l.prepass_slots + T;
  at::Tensor scratch = at::empty({n_double * 8 + n_int * 4}, at::TensorOptions().device(device).dtype(at::kByte));
  double* pre_ssq = reinterpret_cast<double*>(scratch.data_ptr());
  double* step_parts = pre_ssq + l.prepass_slots;
  double* lr_eff = step_parts + l.step_slots;
  double* job_ssq = lr_eff + T;
  int* pre_nan = reinterpret_cast<int*>(job_ssq + T);
  int* group_nan = pre_nan + l.prepass_slots;
  C10_CUDA_CHECK(cudaMemsetAsync(group_nan, 0, T * sizeof(int), stream));

  for (const Launch& p : l.prepass) {
    const Item* it = pre_items + p.first;
    if (p.ps == kF32) launch_prepass<kF32>(it, p.count, jobs, pre_ssq + p.first, pre_nan + p.first, stream);
    else if (p.ps == kBF16) launch_prepass<kBF16>(it, p.count, jobs, pre_ssq + p.first, pre_nan + p.first, stream);
    else launch_prepass<kF16>(it, p.count, jobs, pre_ssq + p.first, pre_nan + p.first, stream);
  }
  if (!l.spans.empty()) {
    const int64_t n = static_cast<int64_t>(l.spans.size());
    finish_kernel<<<blocks_for(n), kThreads, 0, stream>>>(reinterpret_cast<const Span*>(tables + l.spans_at), n, jobs,
                                                          call.dyn, pre_ssq, pre_nan, lr_eff, job_ssq, group_nan);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const double* dyn = call.dyn;
  for (const Launch& s : l.steps) {
    const Item* it = step_items + s.first;
    double* parts = step_parts + s.first;
    const int64_t n = s.count;
    if (s.ps == kF32 && s.ms == kF32) launch_step<kF32, kF32>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
    else if (s.ps == kF32) launch_step<kF32, kBF16>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
    else if (s.ps == kBF16 && s.ms == kF32) launch_step<kBF16, kF32>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
    else if (s.ps == kBF16) launch_step<kBF16, kBF16>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
    else if (s.ms == kF32) launch_step<kF16, kF32>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
    else launch_step<kF16, kBF16>(it, n, jobs, dyn, lr_eff, group_nan, parts, stream);
  }
  if (!l.outs.empty()) {
    const int64_t n = static_cast<int64_t>(l.outs.size());
    ssq_out_kernel<<<blocks_for(n), kThreads, 0, stream>>>(reinterpret_cast<const Span*>(tables + l.outs_at), n, jobs,
                                                           step_parts, job_ssq, group_nan);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void sign_optim_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                          const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "sign_optim_step_cuda: the tensors are on ", device, ", not a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  run_step(decode_jobs("sign_optim_step_cuda", params, grads, exp_avgs, masks, row_seen, hyper, ints, std::nullopt,
                       device),
           device);
}

void sign_optim_step_dyn_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& exp_avgs,
                              const std::vector<std::optional<at::Tensor>>& masks,
                              const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                              const at::Tensor& hyper, const at::Tensor& ints, const std::optional<at::Tensor>& dyn) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "sign_optim_step_dyn_cuda: the tensors are on ", device, ", not a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  run_step(decode_jobs("sign_optim_step_dyn_cuda", params, grads, exp_avgs, masks, row_seen, hyper, ints, dyn, device,
                       &ssq),
           device);
}

}  // namespace kexue
