// Log-n attention on CUDA: the C++ fallback behind the Triton kernels (dense (B, H, L, D) inputs).
// The entry points below check the inputs, build the per-query scales and the backward's delta,
// then hand float16 / bfloat16 / float32 calls with D % 8 == 0, D <= 128 on sm_80+ to the tiled
// flash-attention kernels (csrc/cuda/logn_attention_tiled.cu); the warp-per-row kernels of this
// file serve the rest (float64, other head sizes up to 256, older GPUs, unaligned data).
//
// The contract is that of logn_attention_{forward,backward}_cpu (csrc/cpu/logn_attention.cpp); the
// per-query scale and the visible-key count come from csrc/include/kexue/logn_attention.h, shared
// with the CPU kernels; python/kexue/reference/logn_attention.py is the oracle.
//
// One warp per row, a block of kRows warps: the warp's lanes hold a row's D numbers (up to 8 each,
// D <= 256) in registers, a dot product is a butterfly over the warp, and every lane ends with the
// same value, so the online-softmax state is identical across the warp and no branch diverges.
// The key/value rows a warp streams are shared by the kRows warps of its block through shared
// memory, 16 (float) or 8 (double) at a time. Memory is O(L D); the (L, L) matrix is never formed.
//
//   forward    warp per query row: online softmax over its visible keys; out, lse = m + log(l)
//   backward   (1) delta_i = dO_i . O_i - dlse_i (warp per query row)
//              (2) warp per query row: dQ_i = scale_i sum_j P_ij (dO_i . V_j - delta_i) K_j
//              (3) warp per key row of a key/value head: dV_j = sum P_ij dO_i and
//                  dK_j = sum scale_i P_ij (dO_i . V_j - delta_i) Q_i over the group's query heads
//                  and the queries that see j; no atomics.
// Each query's visible-key count, hence its scale, comes from a per-batch prefix count of unpadded
// keys built on the device (one cumsum); a small kernel turns them into a (B, Lq) table of scales
// first, so padding and causality need no (L, L) mask either.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "kexue/logn_attention.h"
#include "kexue/logn_attention_checks.h"
#include "kexue/logn_attention_tiled.h"
#include "kexue/ops.h"

namespace kexue {
namespace {

using logn_attention::ScaleRule;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRows = 4;         // warps (rows) per block
constexpr int kMaxPerLane = 8;   // D <= 8 * 32 = 256

// Key rows staged in shared memory at a time: K and V tiles of D <= 256 stay within 32 KiB.
template <typename A>
__host__ __device__ constexpr int tile_rows() {
  return sizeof(A) == 8 ? 8 : 16;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

// A row of D numbers spread over a warp: lane l holds elements l, l + 32, ...
template <typename A>
struct Row {
  A v[kMaxPerLane];
};

template <typename T, typename A>
__device__ __forceinline__ Row<A> load_row(const T* p, int64_t D) {
  Row<A> r;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = threadIdx.x % kWarpSize + t * kWarpSize;
    r.v[t] = c < D ? static_cast<A>(p[c]) : A(0);
  }
  return r;
}

template <typename A>
__device__ __forceinline__ A dot(const Row<A>& a, const A* b, int64_t D) {
  A s = A(0);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = threadIdx.x % kWarpSize + t * kWarpSize;
    if (c < D) s += a.v[t] * b[c];
  }
  return warp_sum(s);
}

template <typename A>
__device__ __forceinline__ A dot(const Row<A>& a, const Row<A>& b) {
  A s = A(0);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) s += a.v[t] * b.v[t];
  return warp_sum(s);
}

// Geometry of one call.
struct Shape {
  int64_t B, Hq, Hkv, Lq, Lk, D, groups;
  bool causal;
};

// One past the last key position query i may see (padding aside).
__device__ __forceinline__ int64_t key_end(const Shape& s, int64_t i) {
  if (!s.causal) return s.Lk;
  const int64_t end = i + s.Lk - s.Lq + 1;
  return end < 0 ? 0 : (end > s.Lk ? s.Lk : end);
}

// The scale of every query row, (B, Lq): its visible-key count from the per-batch prefix count of
// unpadded keys, then the rule. Computed once, in its own kernel, so that the logarithms and the
// gradmax Newton loop stay out of the attention kernels' registers.
template <typename A>
__global__ void scale_kernel(const int64_t* prefix, Shape s, ScaleRule rule, A* __restrict__ scales) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= s.B * s.Lq) return;
  const int64_t b = r / s.Lq, i = r % s.Lq;
  const int64_t* p = prefix == nullptr ? nullptr : prefix + b * (s.Lk + 1);
  scales[r] = logn_attention::row_scale<A>(logn_attention::visible_keys(i, s.Lq, s.Lk, s.causal, p), rule);
}

// Stages key rows [j0, j0 + tile_rows<A>()) of one (b, kv head) as A in shared memory (zeros past Lk), and
// whether each is padding. Called by the whole block.
template <typename T, typename A>
__device__ void stage_keys(const T* rows, const bool* pad, int64_t j0, int64_t Lk, int64_t D, A* tile,
                           bool* tile_pad) {
  constexpr int kTile = tile_rows<A>();
  const int64_t n = kTile * D;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t j = j0 + e / D;
    tile[e] = j < Lk ? static_cast<A>(rows[j * D + e % D]) : A(0);
  }
  for (int64_t t = threadIdx.x; t < kTile; t += blockDim.x) {
    const int64_t j = j0 + t;
    tile_pad[t] = j >= Lk || (pad != nullptr && pad[j]);
  }
}

// The query row a warp of a row kernel (forward, dQ) owns, and its batch's key/value head.
template <typename T, typename A>
struct QueryRow {
  bool live;          // i < Lq (a block's last warps may have no row)
  int64_t r;          // the row's index in (B, Hq, Lq) (row 0 of the head when not live)
  int64_t end;        // one past its last visible key position
  int64_t block_end;  // the block's last row sees the most keys: the tiles stream that many
  A scale;
  const T* kb;
  const T* vb;
  const bool* pb;  // the batch's key padding, or null
};

template <typename T, typename A>
__device__ __forceinline__ QueryRow<T, A> query_row(const T* k, const T* v, const bool* pad, const A* scales,
                                                    const Shape& s) {
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / s.groups;
  const int64_t i = blockIdx.x * kRows + threadIdx.x / kWarpSize;
  const int64_t last = blockIdx.x * kRows + kRows - 1 < s.Lq ? blockIdx.x * kRows + kRows - 1 : s.Lq - 1;
  QueryRow<T, A> w;
  w.live = i < s.Lq;
  w.r = (b * s.Hq + h) * s.Lq + (w.live ? i : 0);
  w.end = w.live ? key_end(s, i) : 0;
  w.block_end = key_end(s, last);
  w.scale = w.live ? scales[b * s.Lq + i] : A(0);
  w.kb = k + (b * s.Hkv + hk) * s.Lk * s.D;
  w.vb = v + (b * s.Hkv + hk) * s.Lk * s.D;
  w.pb = pad == nullptr ? nullptr : pad + b * s.Lk;
  return w;
}

// The next K and V tiles of a (b, kv head) into shared memory, between two block barriers (the
// previous tile is no longer read, the new one is complete).
template <typename T, typename A>
__device__ void stage_tile(const T* kb, const T* vb, const bool* pb, int64_t j0, const Shape& s, A* k_tile, A* v_tile,
                           bool* tile_pad) {
  __syncthreads();
  stage_keys<T, A>(kb, pb, j0, s.Lk, s.D, k_tile, tile_pad);
  stage_keys<T, A>(vb, nullptr, j0, s.Lk, s.D, v_tile, tile_pad + tile_rows<A>());
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Forward. Block: kRows query rows of one (b, q head); grid (ceil(Lq / kRows), Hq, B). The row
// kernels declare a minimum of one block per SM: without it ptxas 13 kept their register count low
// and spilled (forward fp16/bf16, dQ fp32).

template <typename T, typename A>
__global__ void __launch_bounds__(kRows * kWarpSize, 1)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const bool* pad,
                   const A* __restrict__ scales, Shape s, T* __restrict__ out, A* __restrict__ lse) {
  constexpr int kTile = tile_rows<A>();
  extern __shared__ __align__(16) unsigned char smem[];
  A* k_tile = reinterpret_cast<A*>(smem);
  A* v_tile = k_tile + kTile * s.D;
  bool* tile_pad = reinterpret_cast<bool*>(v_tile + kTile * s.D);
  const QueryRow<T, A> w = query_row(k, v, pad, scales, s);
  const bool live = w.live;
  const int64_t end = w.end, q_off = w.r * s.D;
  const A scale = w.scale;
  const T *kb = w.kb, *vb = w.vb;
  const bool* pb = w.pb;
  const Row<A> qi = load_row<T, A>(q + q_off, s.D);
  Row<A> acc{};
  A m = -INFINITY, l = A(0);
  const int64_t block_end = w.block_end;
  for (int64_t j0 = 0; j0 < block_end; j0 += kTile) {
    stage_tile<T, A>(kb, vb, pb, j0, s, k_tile, v_tile, tile_pad);
    for (int t = 0; t < kTile; ++t) {
      const int64_t j = j0 + t;
      if (!live || j >= end || tile_pad[t]) continue;  // uniform across the warp
      const A x = scale * dot(qi, k_tile + t * s.D, s.D);
      const A m_new = x > m ? x : m;
      const A corr = exp_of(m - m_new);  // 0 on the first visible key (m = -inf)
      const A p = exp_of(x - m_new);
      l = l * corr + p;
#pragma unroll
      for (int u = 0; u < kMaxPerLane; ++u) {
        const int64_t c = threadIdx.x % kWarpSize + u * kWarpSize;
        acc.v[u] = acc.v[u] * corr + (c < s.D ? p * v_tile[t * s.D + c] : A(0));
      }
      m = m_new;
    }
  }
  if (!live) return;
  const bool none = l == A(0);  // a query that sees no key: zeros and lse = 0
  const A inv = none ? A(0) : A(1) / l;
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int64_t c = threadIdx.x % kWarpSize + u * kWarpSize;
    if (c < s.D) out[q_off + c] = static_cast<T>(acc.v[u] * inv);
  }
  if (threadIdx.x % kWarpSize == 0) lse[w.r] = none ? A(0) : m + log_of(l);
}

// ---------------------------------------------------------------------------------------------
// Backward.

// delta_i = dO_i . O_i - dlse_i. Grid (ceil(Lq / kRows), Hq, B).
template <typename T, typename A>
__global__ void __launch_bounds__(kRows * kWarpSize) delta_kernel(const T* __restrict__ dout,
                                                                  const T* __restrict__ out, const A* dlse, Shape s,
                                                                  A* __restrict__ delta) {
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = blockIdx.x * kRows + threadIdx.x / kWarpSize;
  if (i >= s.Lq) return;
  const int64_t r = (b * s.Hq + h) * s.Lq + i;
  const A d = dot(load_row<T, A>(dout + r * s.D, s.D), load_row<T, A>(out + r * s.D, s.D));
  if (threadIdx.x % kWarpSize == 0) delta[r] = d - (dlse == nullptr ? A(0) : dlse[r]);
}

// dQ. Grid (ceil(Lq / kRows), Hq, B).
template <typename T, typename A>
__global__ void __launch_bounds__(kRows * kWarpSize, 1)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const A* __restrict__ lse, const A* __restrict__ delta, const bool* pad, const A* __restrict__ scales,
              Shape s, T* __restrict__ dq) {
  constexpr int kTile = tile_rows<A>();
  extern __shared__ __align__(16) unsigned char smem[];
  A* k_tile = reinterpret_cast<A*>(smem);
  A* v_tile = k_tile + kTile * s.D;
  bool* tile_pad = reinterpret_cast<bool*>(v_tile + kTile * s.D);
  const QueryRow<T, A> w = query_row(k, v, pad, scales, s);
  const bool live = w.live;
  const int64_t end = w.end, r = w.r;
  const A scale = w.scale;
  const T *kb = w.kb, *vb = w.vb;
  const bool* pb = w.pb;
  const Row<A> qi = load_row<T, A>(q + r * s.D, s.D);
  const Row<A> doi = load_row<T, A>(dout + r * s.D, s.D);
  const A lse_i = live ? lse[r] : A(0), delta_i = live ? delta[r] : A(0);
  Row<A> acc{};
  const int64_t block_end = w.block_end;
  for (int64_t j0 = 0; j0 < block_end; j0 += kTile) {
    stage_tile<T, A>(kb, vb, pb, j0, s, k_tile, v_tile, tile_pad);
    for (int t = 0; t < kTile; ++t) {
      const int64_t j = j0 + t;
      if (!live || j >= end || tile_pad[t]) continue;
      const A p = exp_of(scale * dot(qi, k_tile + t * s.D, s.D) - lse_i);
      const A ds = p * (dot(doi, v_tile + t * s.D, s.D) - delta_i);
#pragma unroll
      for (int u = 0; u < kMaxPerLane; ++u) {
        const int64_t c = threadIdx.x % kWarpSize + u * kWarpSize;
        if (c < s.D) acc.v[u] += ds * k_tile[t * s.D + c];
      }
    }
  }
  if (!live) return;
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int64_t c = threadIdx.x % kWarpSize + u * kWarpSize;
    if (c < s.D) dq[r * s.D + c] = static_cast<T>(acc.v[u] * scale);
  }
}

// dK, dV for key rows of one (b, kv head), summed over the group's query heads. Grid
// (ceil(Lk / kRows), Hkv, B). The queries that see key j: i >= j - (Lk - Lq) when causal.
template <typename T, typename A>
__global__ void __launch_bounds__(kRows * kWarpSize, 1)
    dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
               const A* __restrict__ lse, const A* __restrict__ delta, const bool* pad, const A* __restrict__ scales,
               Shape s, T* __restrict__ dk, T* __restrict__ dv) {
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t j = blockIdx.x * kRows + threadIdx.x / kWarpSize;
  if (j >= s.Lk) return;  // whole warps leave: no block barrier below
  const int64_t kr = (b * s.Hkv + hk) * s.Lk + j;
  Row<A> gk{}, gv{};
  const bool padded = pad != nullptr && pad[b * s.Lk + j];
  if (!padded) {
    const Row<A> kj = load_row<T, A>(k + kr * s.D, s.D);
    const Row<A> vj = load_row<T, A>(v + kr * s.D, s.D);
    int64_t first = s.causal ? j - (s.Lk - s.Lq) : 0;
    first = first < 0 ? 0 : first;
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t h = hk * s.groups + g;
      for (int64_t i = first; i < s.Lq; ++i) {
        const int64_t r = (b * s.Hq + h) * s.Lq + i;
        const A scale = scales[b * s.Lq + i];
        const Row<A> qi = load_row<T, A>(q + r * s.D, s.D);
        const Row<A> doi = load_row<T, A>(dout + r * s.D, s.D);
        const A p = exp_of(scale * dot(qi, kj) - lse[r]);
        const A ds = p * (dot(doi, vj) - delta[r]);
#pragma unroll
        for (int u = 0; u < kMaxPerLane; ++u) {
          gv.v[u] += p * doi.v[u];
          gk.v[u] += scale * ds * qi.v[u];
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int64_t c = threadIdx.x % kWarpSize + u * kWarpSize;
    if (c < s.D) {
      dk[kr * s.D + c] = static_cast<T>(gk.v[u]);
      dv[kr * s.D + c] = static_cast<T>(gv.v[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

Shape shape_of(const at::Tensor& q, const at::Tensor& k, bool causal) {
  return Shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), q.size(1) / k.size(1), causal};
}

// prefix[b][j] = unpadded keys among the first j of batch b, (B, Lk + 1) int64; undefined if no mask.
at::Tensor prefix_of(const std::optional<at::Tensor>& pad) {
  if (!pad.has_value()) return at::Tensor();
  const at::Tensor kept = pad->logical_not().to(at::kLong).cumsum(1);
  return at::constant_pad_nd(kept, {1, 0}, 0).contiguous();
}

template <typename A>
int64_t tile_bytes(int64_t D) {
  return 2 * tile_rows<A>() * D * static_cast<int64_t>(sizeof(A)) + 2 * tile_rows<A>();
}

dim3 row_grid(int64_t rows, int64_t heads, int64_t batch) {
  TORCH_CHECK(heads <= 65535 && batch <= 65535, "logn_attention CUDA fallback: at most 65535 heads and batches");
  return dim3(static_cast<unsigned>((rows + kRows - 1) / kRows), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

// The (B, Lq) scales of the call, in the compute type (the dtype of `like`).
template <typename A>
at::Tensor scales_of(const int64_t* prefix, const Shape& s, const ScaleRule& rule, const at::Tensor& like) {
  at::Tensor scales = at::empty({s.B, s.Lq}, like.options());
  const int64_t n = s.B * s.Lq, threads = 256;
  scale_kernel<A><<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0,
                    at::cuda::getCurrentCUDAStream()>>>(prefix, s, rule, scales.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scales;
}

template <typename Fn>
void dispatch(const at::Tensor& q, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "logn_attention_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, A{});
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> logn_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const std::optional<at::Tensor>& key_padding_mask,
                                                               bool causal, double scale, double train_len, bool logn,
                                                               bool clip, double min_n, bool gradmax) {
  logn_attention::check_inputs(q, k, v, key_padding_mask, at::kCUDA);
  TORCH_CHECK(q.size(3) <= kMaxPerLane * kWarpSize, "logn_attention: head_dim must be at most 256");
  const c10::cuda::CUDAGuard guard(q.device());
  const Shape s = shape_of(q, k, causal);
  const ScaleRule rule = logn_attention::make_rule(s.D, scale, train_len, logn, clip, min_n, gradmax);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(logn_attention::acc_type_of(q)));
  if (q.numel() == 0) return {out, lse};
  const at::Tensor prefix = prefix_of(key_padding_mask);
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t* pre = prefix.defined() ? prefix.data_ptr<int64_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool tiled = logn_attention::tiled::serves(q, {q, k, v}, /*backward=*/false);
  dispatch(q, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const at::Tensor scales = scales_of<A>(pre, s, rule, lse);
    if constexpr (std::is_same_v<A, float>) {
      if (tiled) return logn_attention::tiled::forward(q, k, v, pad, scales.data_ptr<float>(), causal, out, lse);
    }
    forward_kernel<T, A><<<row_grid(s.Lq, s.Hq, s.B), kRows * kWarpSize, tile_bytes<A>(s.D), stream>>>(
        q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), pad, scales.data_ptr<A>(), s, out.data_ptr<T>(),
        lse.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double train_len, bool logn,
    bool clip, double min_n, bool gradmax) {
  logn_attention::check_inputs(q, k, v, key_padding_mask, at::kCUDA);
  logn_attention::check_backward(grad_out, grad_lse, q, out, lse, q.size(0) * q.size(1) * q.size(2));
  TORCH_CHECK(q.size(3) <= kMaxPerLane * kWarpSize, "logn_attention: head_dim must be at most 256");
  const c10::cuda::CUDAGuard guard(q.device());
  const Shape s = shape_of(q, k, causal);
  const ScaleRule rule = logn_attention::make_rule(s.D, scale, train_len, logn, clip, min_n, gradmax);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty_like(lse);
  const at::Tensor prefix = prefix_of(key_padding_mask);
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t* pre = prefix.defined() ? prefix.data_ptr<int64_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool tiled = logn_attention::tiled::serves(q, {q, k, v, grad_out}, /*backward=*/true);
  dispatch(q, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const A* dlse = grad_lse.has_value() ? grad_lse->data_ptr<A>() : nullptr;
    const at::Tensor scales = scales_of<A>(pre, s, rule, lse);
    const dim3 q_grid = row_grid(s.Lq, s.Hq, s.B);
    delta_kernel<T, A><<<q_grid, kRows * kWarpSize, 0, stream>>>(grad_out.data_ptr<T>(), out.data_ptr<T>(), dlse, s,
                                                                delta.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (std::is_same_v<A, float>) {
      if (tiled) {
        return logn_attention::tiled::backward(grad_out, q, k, v, lse, delta, pad, scales.data_ptr<float>(), causal,
                                               dq, dk, dv);
      }
    }
    dq_kernel<T, A><<<q_grid, kRows * kWarpSize, tile_bytes<A>(s.D), stream>>>(
        q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), grad_out.data_ptr<T>(), lse.data_ptr<A>(),
        delta.data_ptr<A>(), pad, scales.data_ptr<A>(), s, dq.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dkv_kernel<T, A><<<row_grid(s.Lk, s.Hkv, s.B), kRows * kWarpSize, 0, stream>>>(
        q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), grad_out.data_ptr<T>(), lse.data_ptr<A>(),
        delta.data_ptr<A>(), pad, scales.data_ptr<A>(), s, dk.data_ptr<T>(), dv.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace kexue
