// Entropy normalization on CUDA: forward and backward kernels and their launchers.
//
// The per-row arithmetic (row classification, the safeguarded Newton step, entropy and variance
// from the moment sums, the backward coefficient) lives in csrc/include/kexue/entropy_norm.h and
// is shared with the CPU kernels; python/kexue/reference/entropy_norm.py is the oracle. This file
// holds only what is specific to the GPU: loads and stores, row-wide reductions, and launches.
//
// One row is handled by a group of kRowThreads threads: a warp for short rows (several rows per
// block, no block barriers), the whole block for long ones. Every pass streams the row from
// global memory again (rows are small enough to stay in L2 between passes):
//
//   forward   1 scan pass (max, #ties at the max, #finite entries, NaN/+inf flag)
//             1 pass per Newton iteration (s0, s1, s2 at the current gamma)
//             1 pass for the normaliser s0 at the final gamma (Newton rows only), 1 pass writing y
//   backward  1 pass for the means (ubar, gbar), 1 for the centred sums (var, cov), 1 writing grad_x
//
// Reductions are butterflies (__shfl_xor_sync), after which every thread of the row holds the
// bitwise identical result. That matters: each thread runs the Newton iteration on its own copy
// of the state, and because the copies agree bit for bit, the loop exit (and every branch that
// depends on the row's kind) is uniform across the row, so block barriers inside it are safe.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "kexue/entropy_norm.h"
#include "kexue/ops.h"

namespace kexue {
namespace {

namespace en = entropy_norm;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Values reduced across a row. Plain aggregates (no constructors) so that they can live in
// __shared__ memory; each has a lane-exchange `shfl_xor` and an associative, commutative `combine`.

__device__ __forceinline__ float shfl_xor(float v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }
__device__ __forceinline__ int shfl_xor(int v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }

// N float sums.
template <int N>
struct Sums {
  float v[N];
};

template <int N>
__device__ __forceinline__ Sums<N> zero_sums() {
  Sums<N> s;
#pragma unroll
  for (int j = 0; j < N; ++j) s.v[j] = 0.f;
  return s;
}

template <int N>
__device__ __forceinline__ Sums<N> shfl_xor(const Sums<N>& a, int offset) {
  Sums<N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = shfl_xor(a.v[j], offset);
  return r;
}

template <int N>
__device__ __forceinline__ Sums<N> combine(const Sums<N>& a, const Sums<N>& b) {
  Sums<N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = a.v[j] + b.v[j];
  return r;
}

// What the forward's first pass learns about a row of logits z.
struct RowScan {
  float max;    // maximum over the finite entries (z > -inf); -inf if there is none
  int ties;     // number of finite entries equal to max
  int support;  // number of finite entries
  int bad;      // 1 if some entry is NaN or +inf (the reference's has_nan: z - max is NaN there)
};

__device__ __forceinline__ RowScan shfl_xor(const RowScan& a, int offset) {
  return {shfl_xor(a.max, offset), shfl_xor(a.ties, offset), shfl_xor(a.support, offset), shfl_xor(a.bad, offset)};
}

__device__ __forceinline__ RowScan combine(const RowScan& a, const RowScan& b) {
  // max is exact, so comparing each side's max with the joint one counts the ties exactly;
  // two empty sides (-inf, 0 ties) stay empty.
  const float m = fmaxf(a.max, b.max);
  const int ties = (a.max == m ? a.ties : 0) + (b.max == m ? b.ties : 0);
  return {m, ties, a.support + b.support, a.bad | b.bad};
}

// ---------------------------------------------------------------------------------------------
// Row-wide all-reduce.

template <typename T>
__device__ __forceinline__ T warp_allreduce(T v) {
  // Butterfly: at each step lanes l and l^offset add the same two operands (in swapped order,
  // and + is commutative), so all 32 lanes end with the same bits.
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = combine(v, shfl_xor(v, offset));
  return v;
}

// All-reduce over the kRowThreads threads of a row; every one of them gets the same bits.
// For kRowThreads > 32 the row is the whole block: every thread of the block must call this.
template <int kRowThreads, typename T>
__device__ __forceinline__ T row_allreduce(T v) {
  v = warp_allreduce(v);
  if constexpr (kRowThreads > kWarpSize) {
    constexpr int kWarps = kRowThreads / kWarpSize;
    static_assert(kRowThreads % kWarpSize == 0 && (kWarps & (kWarps - 1)) == 0 && kWarps <= kWarpSize,
                  "a block-wide row needs a power-of-two number of warps, at most 32");
    __shared__ T partial[kWarps];  // one per instantiation; reused by every call
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    // Every warp reduces the same kWarps partials (lane l reads partial[l % kWarps], and the
    // butterfly over offsets < kWarps stays inside groups of kWarps lanes), so every thread of
    // the block ends with the same bits without a second broadcast through shared memory.
    v = partial[lane % kWarps];
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) v = combine(v, shfl_xor(v, offset));
    // The next call (same T) overwrites partial: wait until every warp has read it.
    __syncthreads();
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Row layout: kRowThreads threads per row, kBlockThreads / kRowThreads rows per block.

template <int kRowThreads, int kBlockThreads>
struct RowLayout {
  static_assert(kBlockThreads % kRowThreads == 0, "rows must tile the block");
  static_assert(kRowThreads == kWarpSize || kRowThreads == kBlockThreads,
                "a row is either one warp (no block barriers) or the whole block");
  static constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;

  __device__ static int64_t row() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  }
  __device__ static int thread() { return threadIdx.x % kRowThreads; }
};

// Logit z of entry i: x itself, or log x for probabilities (log 0 = -inf masks the entry).
template <typename scalar_t>
__device__ __forceinline__ float load_logit(const scalar_t* __restrict__ row, int i, bool logits) {
  const float v = static_cast<float>(row[i]);
  return logits ? v : logf(v);
}

// An entry takes part in the row iff its logit is finite or +inf (z > -inf, false for NaN), as
// in the reference. Every loop tests this before touching z - max, so that masked entries never
// produce 0 * inf = NaN.
__device__ __forceinline__ bool in_support(float z) { return z > -INFINITY; }

// Unnormalised output weight of an entry in the support of a valid row (as on the CPU): the
// Newton kind uses its gamma, the uniform kind is gamma = 0, the argmax kind keeps the maxima.
__device__ __forceinline__ float output_weight(int kind, float gamma, float z, float max) {
  if (kind == en::kUniform) return 1.f;
  if (kind == en::kArgmax) return z == max ? 1.f : 0.f;
  return expf(gamma * (z - max));
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, int kRowThreads, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    entropy_norm_forward_kernel(const scalar_t* __restrict__ x, const float* __restrict__ target,
                                scalar_t* __restrict__ y, float* __restrict__ gamma_out,
                                float* __restrict__ stats, int64_t rows, int n, bool logits, int max_iter,
                                float tol) {
  using Layout = RowLayout<kRowThreads, kBlockThreads>;
  const int64_t row = Layout::row();
  if (row >= rows) return;  // a whole warp in warp mode; never taken in block mode (grid = rows)
  const int t = Layout::thread();
  const scalar_t* __restrict__ xr = x + row * n;
  scalar_t* __restrict__ yr = y + row * n;

  // Pass 1: max, ties, support, NaN flag.
  RowScan scan = {-INFINITY, 0, 0, 0};
  for (int i = t; i < n; i += kRowThreads) {
    const float z = load_logit(xr, i, logits);
    if (in_support(z)) {
      ++scan.support;
      if (z > scan.max) {
        scan.max = z;
        scan.ties = 1;
      } else if (z == scan.max) {
        ++scan.ties;
      }
    }
    scan.bad |= (isnan(z) || z == INFINITY) ? 1 : 0;
  }
  scan = row_allreduce<kRowThreads>(scan);
  const float m = scan.max;
  const float tgt = target[row];
  const int kind = en::classify_row<float>(tgt, scan.support, scan.ties, scan.bad != 0);

  // Passes 2..: safeguarded Newton on gamma, one pass per iteration. Each thread holds its own
  // copy of the state; the copies agree bit for bit (see the top of the file).
  float gamma = 1.f;
  if (kind == en::kNewton) {
    en::NewtonState<float> st = en::newton_init<float>();
    for (int it = 0; it < max_iter && !st.done; ++it) {
      Sums<3> mo = zero_sums<3>();
      for (int i = t; i < n; i += kRowThreads) {
        const float z = load_logit(xr, i, logits);
        if (in_support(z)) {
          const float u = z - m;  // <= 0, so e <= 1 and nothing overflows
          const float e = expf(st.gamma * u);
          const float eu = e * u;
          mo.v[0] += e;
          mo.v[1] += eu;
          mo.v[2] += eu * u;
        }
      }
      mo = row_allreduce<kRowThreads>(mo);
      float entropy, variance;
      en::entropy_and_variance(mo.v[0], mo.v[1], mo.v[2], st.gamma, &entropy, &variance);
      en::newton_step(&st, entropy, variance, tgt, tol);
    }
    gamma = st.gamma;
  }

  // Normaliser of the output weights: counted for the two ends, summed for a Newton row (the last
  // Newton pass measured s0 at the gamma before its step, so this needs a pass of its own).
  float total = kind == en::kUniform ? static_cast<float>(scan.support) : static_cast<float>(scan.ties);
  if (kind == en::kNewton) {
    Sums<1> s0 = zero_sums<1>();
    for (int i = t; i < n; i += kRowThreads) {
      const float z = load_logit(xr, i, logits);
      if (in_support(z)) s0.v[0] += output_weight(kind, gamma, z, m);
    }
    total = row_allreduce<kRowThreads>(s0).v[0];  // >= 1: the maximum contributes exp(0)
  }

  // Output pass. An invalid row is NaN throughout, as softmax of a row holding NaN would be.
  const bool invalid = kind == en::kInvalid;
  const float inv_total = 1.f / total;
  for (int i = t; i < n; i += kRowThreads) {
    float v = NAN;
    if (!invalid) {
      const float z = load_logit(xr, i, logits);
      v = in_support(z) ? output_weight(kind, gamma, z, m) * inv_total : 0.f;
    }
    yr[i] = static_cast<scalar_t>(v);
  }

  if (t == 0) {
    float g = gamma;
    if (kind == en::kUniform) g = 0.f;
    if (kind == en::kArgmax) g = INFINITY;
    if (invalid) g = NAN;
    gamma_out[row] = g;
    stats[2 * row] = invalid ? NAN : m;
    stats[2 * row + 1] = invalid ? NAN : logf(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: y is rebuilt in float32 from x, gamma and stats = (max, log s0); then the centred
// sums give the coefficient k of csrc/include/kexue/entropy_norm.h (backward_coefficient).

template <typename scalar_t, int kRowThreads, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    entropy_norm_backward_kernel(const scalar_t* __restrict__ grad_y, const float* __restrict__ grad_gamma,
                                 const scalar_t* __restrict__ x, const float* __restrict__ gamma_in,
                                 const float* __restrict__ stats, scalar_t* __restrict__ grad_x,
                                 float* __restrict__ grad_target, int64_t rows, int n, bool logits) {
  using Layout = RowLayout<kRowThreads, kBlockThreads>;
  const int64_t row = Layout::row();
  if (row >= rows) return;
  const int t = Layout::thread();
  const scalar_t* __restrict__ xr = x + row * n;
  const scalar_t* __restrict__ gr = grad_y + row * n;
  scalar_t* __restrict__ dxr = grad_x + row * n;

  // Rows solved at an end (gamma = 0 or inf) or invalid (NaN) have zero gradient; skip their sums.
  const float g = gamma_in[row];
  const bool live_gamma = g > 0.f && g < INFINITY;
  const float m = stats[2 * row];
  const float log_s0 = stats[2 * row + 1];

  float ubar = 0.f, gbar = 0.f, k = 0.f;
  bool live = false;
  if (live_gamma) {  // uniform across the row: every thread reads the same gamma
    // Means under y. Entries outside the support have y = 0 and their grad_y is ignored.
    Sums<2> means = zero_sums<2>();
    for (int i = t; i < n; i += kRowThreads) {
      const float z = load_logit(xr, i, logits);
      if (in_support(z)) {
        const float u = z - m;
        const float yv = expf(g * u - log_s0);
        means.v[0] += yv * u;
        means.v[1] += yv * static_cast<float>(gr[i]);
      }
    }
    means = row_allreduce<kRowThreads>(means);
    ubar = means.v[0];
    gbar = means.v[1];

    // Centred second moments: var = E_y[(u-ubar)^2], cov = E_y[(G-gbar)(u-ubar)]. Centring first
    // avoids the cancellation of E[u^2] - E[u]^2.
    Sums<2> centred = zero_sums<2>();
    for (int i = t; i < n; i += kRowThreads) {
      const float z = load_logit(xr, i, logits);
      if (in_support(z)) {
        const float u = z - m;
        const float yv = expf(g * u - log_s0);
        const float du = u - ubar;
        const float ydu = yv * du;
        centred.v[0] += ydu * du;
        centred.v[1] += ydu * (static_cast<float>(gr[i]) - gbar);
      }
    }
    centred = row_allreduce<kRowThreads>(centred);
    live = en::backward_coefficient(g, centred.v[0], centred.v[1], grad_gamma[row], &k);
  }

  // dL/dz_i = gamma * y_i * ((G_i - gbar) - k (u_i - ubar)); for probabilities z = log p, so
  // dL/dp_i = dL/dz_i / p_i (p_i > 0 wherever z_i is in the support).
  for (int i = t; i < n; i += kRowThreads) {
    float d = 0.f;
    if (live) {
      const float xv = static_cast<float>(xr[i]);
      const float z = logits ? xv : logf(xv);
      if (in_support(z)) {
        const float u = z - m;
        const float yv = expf(g * u - log_s0);
        d = g * yv * ((static_cast<float>(gr[i]) - gbar) - k * (u - ubar));
        if (!logits) d /= xv;
      }
    }
    dxr[i] = static_cast<scalar_t>(d);
  }
  if (t == 0) grad_target[row] = live ? -k / g : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

// Threads per row by row length: a warp while each lane has at most 32 entries, then a block of
// 256, then 1024 threads for long rows (few rows of a large vocabulary, as in sampling).
template <typename F>
void with_row_config(int64_t n, F&& launch) {
  using std::integral_constant;
  if (n <= 1024) {
    launch(integral_constant<int, 32>{}, integral_constant<int, 256>{});
  } else if (n <= 8192) {
    launch(integral_constant<int, 256>{}, integral_constant<int, 256>{});
  } else {
    launch(integral_constant<int, 1024>{}, integral_constant<int, 1024>{});
  }
}

template <int kRowThreads, int kBlockThreads>
dim3 grid_for(int64_t rows) {
  constexpr int64_t per_block = kBlockThreads / kRowThreads;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "entropy_normalize (CUDA): too many rows (", rows, ")");
  return dim3(static_cast<unsigned>(blocks));
}

// fp16, bf16 and fp32 storage; the arithmetic is float32 for all three.
#define KEXUE_DISPATCH_ENTROPY_NORM_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "entropy_normalize (CUDA): ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "entropy_normalize (CUDA): ", name, " must be (R, n), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "entropy_normalize (CUDA): ", name, " must be contiguous");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "entropy_normalize (CUDA): ", name, " must be float16, bfloat16 or float32, got ", dt);
  // Row indices are int within a row (the per-row counts are int too); row offsets are int64.
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max() - 1024,
              "entropy_normalize (CUDA): rows of ", x.size(1), " entries are too long");
}

void check_per_row(const at::Tensor& t, const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), "entropy_normalize (CUDA): ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "entropy_normalize (CUDA): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "entropy_normalize (CUDA): ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "entropy_normalize (CUDA): ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cuda(const at::Tensor& x,
                                                                              const at::Tensor& target, bool logits,
                                                                              int64_t max_iter, double tol) {
  check_rows(x, "x");
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  check_per_row(target, x, "target", {rows});
  TORCH_CHECK(max_iter >= 0 && max_iter <= std::numeric_limits<int32_t>::max(),
              "entropy_normalize (CUDA): max_iter must be a non-negative int, got ", max_iter);

  const c10::cuda::CUDAGuard device_guard(x.device());
  auto y = at::empty_like(x);
  auto gamma = at::empty({rows}, x.options().dtype(at::kFloat));
  auto stats = at::empty({rows, 2}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, gamma, stats};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KEXUE_DISPATCH_ENTROPY_NORM_TYPES(x.scalar_type(), "entropy_normalize_forward_cuda", [&] {
    with_row_config(n, [&](auto row_threads, auto block_threads) {
      constexpr int kRow = decltype(row_threads)::value;
      constexpr int kBlock = decltype(block_threads)::value;
      entropy_norm_forward_kernel<scalar_t, kRow, kBlock><<<grid_for<kRow, kBlock>(rows), kBlock, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), target.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(),
          gamma.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), rows, static_cast<int>(n), logits,
          static_cast<int>(max_iter), static_cast<float>(tol));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, gamma, stats};
}

std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cuda(const at::Tensor& grad_y,
                                                                   const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                   const at::Tensor& gamma, const at::Tensor& stats,
                                                                   bool logits) {
  check_rows(x, "x");
  check_rows(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "entropy_normalize (CUDA): grad_y must match x in shape, dtype and device: got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " on ", grad_y.device(), " for x ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device());
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  check_per_row(grad_gamma, x, "grad_gamma", {rows});
  check_per_row(gamma, x, "gamma", {rows});
  check_per_row(stats, x, "stats", {rows, 2});

  const c10::cuda::CUDAGuard device_guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_target = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {grad_x, grad_target};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KEXUE_DISPATCH_ENTROPY_NORM_TYPES(x.scalar_type(), "entropy_normalize_backward_cuda", [&] {
    with_row_config(n, [&](auto row_threads, auto block_threads) {
      constexpr int kRow = decltype(row_threads)::value;
      constexpr int kBlock = decltype(block_threads)::value;
      entropy_norm_backward_kernel<scalar_t, kRow, kBlock><<<grid_for<kRow, kBlock>(rows), kBlock, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_gamma.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(),
          gamma.const_data_ptr<float>(), stats.const_data_ptr<float>(), grad_x.mutable_data_ptr<scalar_t>(),
          grad_target.mutable_data_ptr<float>(), rows, static_cast<int>(n), logits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_target};
}

}  // namespace kexue
