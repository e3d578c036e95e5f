// Lion / Tiger on CUDA: the fused multi-tensor step (the fallback of the Triton kernel).
//
// Same contract and structure as triton_kernels/sign_optim.py: the host decodes the per-tensor
// table (csrc/include/kexue/sign_optim.h) into an array of jobs and cuts the tensors into work
// items of kChunk elements (whole rows for tensors updated row by row); one launch per
// (param dtype, momentum dtype) updates every item of every tensor, one block per item.
//
// Two reductions must be complete before the update that reads them: Tiger's whole-tensor
// RMS(theta) and the NaN guard's "any NaN or inf in grad". A pre-pass writes one partial per item, and a
// finishing kernel adds each tensor's partials in item order (no float atomics: two runs give the
// same bits) and raises the guard flag of the tensor's group with an integer atomic. Per-row
// values (row RMS, whether a row of an embedding table has any gradient) are reduced by the warp
// that owns the row, right before it updates the row.
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
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kexue/ops.h"
#include "kexue/sign_optim.h"
#include "kexue/sign_optim_host.h"

namespace kexue {
namespace {

using namespace sign_optim;

constexpr int64_t kChunk = 65536;  // elements per work item (as ATen's multi_tensor_apply)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Item {
  int64_t job, begin, end;
};

struct Span {  // the pre-pass items of one tensor
  int64_t job, first, count;
};

// The row of job t as this step sees it: the dynamic values applied where the row asks for them.
__device__ __forceinline__ Job row_of(const Job* __restrict__ jobs, const double* __restrict__ dyn, int64_t t) {
  Job j = jobs[t];
  if (dyn != nullptr && has(j, kDynamic)) apply_dynamic(j, dyn + t * kNumDyn);
  return j;
}

// ---------------------------------------------------------------------------------------------
// Storage.

template <int S>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if constexpr (S == kF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (S == kBF16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
}

template <int S>
__device__ __forceinline__ void store(void* p, int64_t i, float x, bool stochastic, uint32_t k0, uint32_t k1) {
  if constexpr (S == kF32) {
    static_cast<float*>(p)[i] = x;
  } else if constexpr (S == kBF16) {
    static_cast<uint16_t*>(p)[i] =
        stochastic ? float_to_bf16_bits_stochastic(x, element_bits(k0, k1, static_cast<uint64_t>(i)))
                   : float_to_bf16_bits(x);
  } else {
    static_cast<__half*>(p)[i] = __float2half_rn(x);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ int warp_or(int v) {
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// Reads the static flags: in capturable mode "may update" (an RMS computed on a micro-step that
// does not update is not used).
template <int PS>
__global__ void prepass_kernel(const Item* __restrict__ items, const Job* __restrict__ jobs, double* ssq_out,
                               int* nan_out) {
  const Item item = items[blockIdx.x];
  const Job& j = jobs[item.job];
  const bool rms = has(j, kRmsTensor) && has(j, kUpdate);
  const bool guard = j.nan_group >= 0;
  float ssq = 0.f;
  int nan = 0;
  for (int64_t i = item.begin + threadIdx.x; i < item.end; i += kThreads) {
    if (rms) {
      const float x = load<PS>(j.param, i);
      ssq += x * x;
    }
    if (guard) {
      const float g = load<PS>(j.grad, i);
      nan |= non_finite(g);  // NaN or +-inf (sign_optim.h)
    }
  }
  __shared__ double s_ssq[kWarps];
  __shared__ int s_nan[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ssq = warp_sum(ssq);
  nan = warp_or(nan);
  if (lane == 0) s_ssq[warp] = ssq, s_nan[warp] = nan;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    int found = 0;
    for (int w = 0; w < kWarps; ++w) total += s_ssq[w], found |= s_nan[w];
    ssq_out[blockIdx.x] = total;
    nan_out[blockIdx.x] = found;
  }
}

// One thread per tensor: its partials in item order (deterministic), then lr * RMS and the flag.
__global__ void finish_kernel(const Span* __restrict__ spans, int64_t n, const Job* __restrict__ jobs,
                              const double* __restrict__ dyn, const double* __restrict__ ssq,
                              const int* __restrict__ nan, double* lr_out, int* group_nan) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= n) return;
  const Span span = spans[s];
  const Job j = row_of(jobs, dyn, span.job);
  double total = 0.0;
  int found = 0;
  for (int64_t i = span.first; i < span.first + span.count; ++i) total += ssq[i], found |= nan[i];
  lr_out[span.job] = j.lr * sqrt(total / static_cast<double>(j.numel));
  if (found && j.nan_group >= 0) atomicMax(group_nan + j.nan_group, 1);
}

// The element update (sign_optim.h): momentum always, theta when `update`.
template <int PS, int MS>
__device__ __forceinline__ void update_element(const Job& j, int64_t i, const Coefs& k, bool update, bool live,
                                               bool freeze, bool gated, bool stochastic) {
  float g = load<PS>(j.grad, i);
  const float m = load<MS>(j.mom, i);
  bool keep = true;
  if (has(j, kMaskF)) {
    keep = keep_element(element_bits(j.mask_k0, j.mask_k1, static_cast<uint64_t>(i)), j.mask_threshold);
  } else if (gated) {
    keep = j.mask[i] != 0;
  }
  g = keep ? g * j.gscale : 0.f;
  const float mn = new_momentum(m, g, k);
  if (update) {
    const float th = load<PS>(j.param, i);
    const float tn = stepped(th, direction(m, mn, g, k, has(j, kUseNewMomentum)), k);
    const bool movable = live && (keep || !(gated && has(j, kMaskUpdate)));
    store<PS>(j.param, i, movable ? tn : th, stochastic, j.round_k0, j.round_k1);
  }
  store<MS>(j.mom, i, freeze ? m : mn, false, 0, 0);
}

__device__ __forceinline__ Coefs coefs_for(const Job& j, double lr) {
  Coefs k;
  k.lr = static_cast<float>(lr);
  k.decay = static_cast<float>(1.0 - lr * j.wd);
  k.c_m = j.c_m, k.c_g = j.c_g, k.m_m = j.m_m, k.m_g = j.m_g;
  return k;
}

template <int PS, int MS>
__global__ void step_kernel(const Item* __restrict__ items, const Job* __restrict__ jobs,
                            const double* __restrict__ dyn, const double* __restrict__ lr_eff,
                            const int* __restrict__ group_nan) {
  const Item item = items[blockIdx.x];
  const Job j = row_of(jobs, dyn, item.job);
  if (j.skip) return;  // GradScaler found an inf/NaN (capturable mode)
  const bool stochastic = PS == kBF16 && has(j, kStochasticRound);
  const bool update = has(j, kUpdate);
  const bool shrink = (j.nan_group >= 0 && group_nan[j.nan_group] != 0) || has(j, kShrinkNow);
  if (shrink) {  // Tiger's NaN guard: momentum untouched, theta pulled towards the centre
    for (int64_t i = item.begin + threadIdx.x; i < item.end; i += kThreads) {
      store<PS>(j.param, i, nan_shrink(load<PS>(j.param, i), j.shrink, j.centre), stochastic, j.round_k0,
                j.round_k1);
    }
    return;
  }
  const double lr = has(j, kRmsTensor) && update ? lr_eff[item.job] : j.lr;
  const bool gated = has(j, kMaskF) || (has(j, kMaskD) && j.mask != nullptr);
  if (!by_rows(j)) {
    const Coefs k = coefs_for(j, lr);
    for (int64_t i = item.begin + threadIdx.x; i < item.end; i += kThreads) {
      update_element<PS, MS>(j, i, k, update, true, false, gated, stochastic);
    }
    return;
  }
  // Row by row, one warp per row: a first sweep for the row's values, then the update.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t len = j.row_len;
  for (int64_t r = item.begin / len + warp; r < item.end / len; r += kWarps) {
    const int64_t s = r * len;
    int present = 0;
    float ssq = 0.f;
    const bool row_rms = has(j, kRmsRow) && update;
    for (int64_t c = lane; c < len; c += 32) {
      present |= load<PS>(j.grad, s + c) != 0.f;  // NaN counts as present
      if (row_rms) {
        const float x = load<PS>(j.param, s + c);
        ssq += x * x;
      }
    }
    present = warp_or(present);
    ssq = warp_sum(ssq);
    bool live = true, freeze = false;
    if (has(j, kLazyRows)) {
      live = present || (j.seen != nullptr && j.seen[r] != 0);
      if (j.seen != nullptr && lane == 0) j.seen[r] = update ? 0 : static_cast<uint8_t>(live);
      freeze = !present && has(j, kFreezeAbsent);
    }
    const double row_lr = row_rms ? lr * sqrt(static_cast<double>(ssq) / static_cast<double>(len)) : lr;
    const Coefs k = coefs_for(j, row_lr);
    for (int64_t c = lane; c < len; c += 32) {
      update_element<PS, MS>(j, s + c, k, update && live, live, freeze, gated, stochastic);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// A vector of plain structs as a device tensor (bytes), copied without making the host wait: a
// copy from pageable memory synchronises with the stream (the host would stall until the backward
// pass has drained), one from page-locked memory with non_blocking does not. The pinned block comes
// from torch's caching host allocator, which records the copy's stream and does not hand the block
// out again before the copy has run, so it may be released as soon as this returns.
template <typename T>
at::Tensor to_device(const std::vector<T>& v, const at::Device& device) {
  const auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(1, v.size() * sizeof(T)))}, pinned);
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

std::vector<Item> make_items(const std::vector<Job>& jobs, const std::vector<int64_t>& which, bool rows) {
  std::vector<Item> items;
  for (int64_t i : which) {
    const Job& j = jobs[i];
    const int64_t step = rows && by_rows(j) ? std::max<int64_t>(1, kChunk / j.row_len) * j.row_len : kChunk;
    for (int64_t b = 0; b < j.numel; b += step) items.push_back({i, b, std::min(j.numel, b + step)});
  }
  return items;
}

template <int PS>
void launch_prepass(const at::Tensor& items, int64_t n, const Job* jobs, double* ssq, int* nan, cudaStream_t stream) {
  prepass_kernel<PS><<<n, kThreads, 0, stream>>>(reinterpret_cast<const Item*>(items.data_ptr()), jobs, ssq, nan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int PS, int MS>
void launch_step(const at::Tensor& items, int64_t n, const Job* jobs, const double* dyn, const double* lr_eff,
                 const int* group_nan, cudaStream_t stream) {
  step_kernel<PS, MS><<<n, kThreads, 0, stream>>>(reinterpret_cast<const Item*>(items.data_ptr()), jobs, dyn, lr_eff,
                                                   group_nan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The device tables of one call: the jobs, and the work items of every launch. In capturable mode
// the jobs do not change from step to step (the host never applies the dynamic rows on CUDA), so
// a plan is kept and reused: a later step copies nothing from the host, which CUDA graph capture
// requires (a copy from pageable host memory cannot be captured).
struct Plan {
  at::Tensor jobs;
  std::vector<std::pair<int, at::Tensor>> prepass;  // (param storage, items) per launch
  int64_t prepass_slots = 0;
  at::Tensor spans;  // undefined: no pre-pass
  std::vector<std::pair<std::pair<int, int>, at::Tensor>> steps;  // ((param, momentum storage), items)
};

Plan make_plan(const std::vector<Job>& jobs, const at::Device& device) {
  const int64_t T = static_cast<int64_t>(jobs.size());
  // Buckets by (param storage, momentum storage): one launch each.
  std::map<std::pair<int, int>, std::vector<int64_t>> buckets;
  for (int64_t i = 0; i < T; ++i) {
    if (jobs[i].numel > 0) buckets[{jobs[i].ps, jobs[i].ms}].push_back(i);
  }
  Plan plan;
  plan.jobs = to_device(jobs, device);
  std::vector<Span> spans;
  for (const auto& [key, which] : buckets) {
    // Static flags: in capturable mode kUpdate means "may update".
    std::vector<int64_t> pre;
    for (int64_t i : which) {
      if ((has(jobs[i], kRmsTensor) && has(jobs[i], kUpdate)) || jobs[i].nan_group >= 0) pre.push_back(i);
    }
    if (pre.empty()) continue;
    const std::vector<Item> items = make_items(jobs, pre, false);
    for (size_t a = 0; a < items.size();) {
      size_t b = a;
      while (b < items.size() && items[b].job == items[a].job) ++b;
      spans.push_back({items[a].job, plan.prepass_slots + static_cast<int64_t>(a), static_cast<int64_t>(b - a)});
      a = b;
    }
    plan.prepass_slots += static_cast<int64_t>(items.size());
    plan.prepass.emplace_back(key.first, to_device(items, device));
  }
  if (!spans.empty()) plan.spans = to_device(spans, device);
  for (const auto& [key, which] : buckets) {
    plan.steps.emplace_back(key, to_device(make_items(jobs, which, true), device));
  }
  return plan;
}

int64_t count_of(const at::Tensor& bytes, size_t size) { return bytes.numel() / static_cast<int64_t>(size); }

// Plans of capturable calls by the bytes of their jobs (addresses, sizes, static table rows; the
// padding is zero, see decode_jobs). Returned by value (tensor handles) so a concurrent clear is
// harmless; the map is never destroyed, so no device memory is freed after CUDA shuts down.
Plan cached_plan(const std::vector<Job>& jobs, const at::Device& device) {
  static std::mutex mutex;
  static auto* plans = new std::map<std::string, Plan>();
  std::string key(reinterpret_cast<const char*>(jobs.data()), jobs.size() * sizeof(Job));
  key.append(reinterpret_cast<const char*>(&device), sizeof(device));
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = plans->find(key);
  if (found == plans->end()) {
    if (plans->size() >= 16) plans->clear();  // a bound, not an LRU: plans change only with the model
    found = plans->emplace(std::move(key), make_plan(jobs, device)).first;
  }
  return found->second;
}

}  // namespace

void sign_optim_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                          const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints) {
  sign_optim_step_dyn_cuda(params, grads, exp_avgs, masks, row_seen, hyper, ints, std::nullopt);
}

void sign_optim_step_dyn_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& exp_avgs,
                              const std::vector<std::optional<at::Tensor>>& masks,
                              const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints,
                              const std::optional<at::Tensor>& dyn) {
  const int64_t T = static_cast<int64_t>(params.size());
  if (T == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "sign_optim_step_dyn_cuda: the tensors are on ", device, ", not a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  const Call call =
      decode_jobs("sign_optim_step_dyn_cuda", params, grads, exp_avgs, masks, row_seen, hyper, ints, dyn, device);
  const Plan plan = call.dyn != nullptr ? cached_plan(call.jobs, device) : make_plan(call.jobs, device);
  const Job* jobs_d = reinterpret_cast<const Job*>(plan.jobs.data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dopts = at::TensorOptions().device(device);
  at::Tensor group_nan = at::zeros({T}, dopts.dtype(at::kInt));
  at::Tensor lr_eff = at::empty({T}, dopts.dtype(at::kDouble));

  if (plan.spans.defined()) {
    at::Tensor ssq = at::empty({plan.prepass_slots}, dopts.dtype(at::kDouble));
    at::Tensor nan = at::empty({plan.prepass_slots}, dopts.dtype(at::kInt));
    int64_t offset = 0;
    for (const auto& [ps, items] : plan.prepass) {
      const int64_t n = count_of(items, sizeof(Item));
      double* s = ssq.data_ptr<double>() + offset;
      int* f = nan.data_ptr<int>() + offset;
      if (ps == kF32) launch_prepass<kF32>(items, n, jobs_d, s, f, stream);
      else if (ps == kBF16) launch_prepass<kBF16>(items, n, jobs_d, s, f, stream);
      else launch_prepass<kF16>(items, n, jobs_d, s, f, stream);
      offset += n;
    }
    const int64_t n = count_of(plan.spans, sizeof(Span));
    finish_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        reinterpret_cast<const Span*>(plan.spans.data_ptr()), n, jobs_d, call.dyn, ssq.data_ptr<double>(),
        nan.data_ptr<int>(), lr_eff.data_ptr<double>(), group_nan.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const double* lr = lr_eff.data_ptr<double>();
  const int* gn = group_nan.data_ptr<int>();
  for (const auto& [key, items] : plan.steps) {
    const int64_t n = count_of(items, sizeof(Item));
    const auto [ps, ms] = key;
    if (ps == kF32 && ms == kF32) launch_step<kF32, kF32>(items, n, jobs_d, call.dyn, lr, gn, stream);
    else if (ps == kF32) launch_step<kF32, kBF16>(items, n, jobs_d, call.dyn, lr, gn, stream);
    else if (ps == kBF16 && ms == kF32) launch_step<kBF16, kF32>(items, n, jobs_d, call.dyn, lr, gn, stream);
    else if (ps == kBF16) launch_step<kBF16, kBF16>(items, n, jobs_d, call.dyn, lr, gn, stream);
    else if (ms == kF32) launch_step<kF16, kF32>(items, n, jobs_d, call.dyn, lr, gn, stream);
    else launch_step<kF16, kBF16>(items, n, jobs_d, call.dyn, lr, gn, stream);
  }
}

}  // namespace kexue
