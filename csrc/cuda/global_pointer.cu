// GlobalPointer on CUDA: the fused multilabel loss and the dense scores op, forward and backward.
//
// The contract of csrc/cpu/global_pointer.cpp (same arguments, same results): q, k (B, H, L, d)
// with H = 1 (one pair shared by the T types) or H = T; start_bias, end_bias (B, T, L); mask
// (B, L) bool; loss labels as CSR over the rows (b, t, i) or dense (B, T, L, L) bool. The element
// math (RoPE pairs and angles, the candidate-span rule, dL/ds, the online log-sum-exp merge and
// its finish with the implicit logit 0) is csrc/include/kexue/global_pointer.h, shared with the
// CPU path; python/kexue/reference/global_pointer.py is the oracle.
//
// The launchers rotate q and k once (RoPE in the compute dtype A, 1/sqrt(d) folded into q) and
// rotate the gradients back (R^T) at the end, so the kernels only see dot products of rows.
// Every kernel works on 32 x 32 score tiles with 256 threads: lane = column of the tile, warp w
// = rows w, w + 8, w + 16, w + 24. A tile's dot products are accumulated over the head in chunks
// of 32 channels staged in shared memory, so any head size works for the forward kernels; the
// backward keeps its dq / dk rows in registers, NC chunks of 32 channels (head sizes up to 128).
//
//   scores forward      one block per (tile, b, head): the dot once, then for each type of the
//                       head the biases and masks, written as the (B, T, L, L) scores.
//   loss forward        one block per (row tile, b, head), looping over the column tiles: per
//                       row and type an online log-sum-exp of the negatives and of the negated
//                       positives, kept in a (B, T, L, 5) state the block owns (no atomics);
//                       one thread per (b, t) then merges the rows (loss_finish_kernel).
//   backward (both ops) two passes of one kernel: rows (the block owns query rows: d_start_bias
//                       and dq) and columns (the block owns keys: d_end_bias and dk). In the
//                       columns pass the tile is computed transposed (own index = key), so both
//                       passes reduce across lanes and accumulate into rows they own: no atomics.
//                       dL/ds comes from the loss (recomputing the scores) or is read (scores op).
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

#include "kexue/global_pointer.h"
#include "kexue/ops.h"

namespace kexue {
namespace {

namespace gp = global_pointer;

constexpr int kTile = 32;                        // rows and columns of a score tile
constexpr int kChunk = 32;                       // head channels staged in shared memory at once
constexpr int kWarps = 8;                        // block = (32 lanes, 8 warps)
constexpr int kThreads = kTile * kWarps;         // 256
constexpr int kRowsPerThread = kTile / kWarps;   // 4
constexpr int kMaxChunks = 4;                    // backward: head sizes up to kMaxChunks * kChunk
constexpr unsigned kFullMask = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = ::max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// ---------------------------------------------------------------------------------------------
// RoPE, once per call: dst = scale * R_p src (forward) or dst = scale * R_p^T src (gradients).
// One thread per (row, pair), or per element without RoPE; rows are (B * H * L) of size d and
// row r sits at position r % L.

template <typename X, typename Y, typename A, bool kInverse>
__global__ void rotate_kernel(const X* __restrict__ src, Y* __restrict__ dst, int64_t rows, int64_t L, int64_t d,
                              int layout, double base, A scale) {
  const int64_t per_row = layout == gp::kRopeNone ? d : d / 2;
  const int64_t n = rows * per_row;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / per_row, c = e % per_row;
    const X* s = src + r * d;
    Y* o = dst + r * d;
    if (layout == gp::kRopeNone) {
      o[c] = static_cast<Y>(scale * static_cast<A>(s[c]));
      continue;
    }
    long long a, b;
    gp::rope_pair(layout, c, d, &a, &b);
    double sn, cs;
    ::sincos(gp::rope_angle(r % L, c, d, base), &sn, &cs);
    A ra, rb;
    if (kInverse) {
      gp::rope_unrotate(static_cast<A>(s[a]), static_cast<A>(s[b]), static_cast<A>(cs), static_cast<A>(sn), &ra, &rb);
    } else {
      gp::rope_rotate(static_cast<A>(s[a]), static_cast<A>(s[b]), static_cast<A>(cs), static_cast<A>(sn), &ra, &rb);
    }
    o[a] = static_cast<Y>(scale * ra);
    o[b] = static_cast<Y>(scale * rb);
  }
}

template <typename X, typename Y, typename A, bool kInverse>
void launch_rotate(const at::Tensor& src, at::Tensor& dst, int64_t L, int64_t d, int64_t rope, double base, A scale) {
  const int64_t rows = src.numel() / std::max<int64_t>(d, 1);
  const int64_t n = rows * (rope == gp::kRopeNone ? d : d / 2);
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  rotate_kernel<X, Y, A, kInverse><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<X>(), dst.data_ptr<Y>(), rows, L, d, static_cast<int>(rope), base, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// One score tile of dot products: acc[k] = <own[o0 + w + 8k], other[x0 + lane]> over the head,
// with own / other the rotated rows of one (b, head) (rows past L read as 0).

struct TileIndex {
  int lane, warp;
};

template <typename A>
struct TileSmem {
  A own[kTile][kChunk + 1];  // +1: the column reads other[lane][c] hit distinct banks
  A other[kTile][kChunk + 1];
  A g[kTile][kTile + 1];  // the tile's dL/ds summed over the head's types (backward)
};

template <typename A>
__device__ __forceinline__ void stage_rows(A (*buf)[kChunk + 1], const A* rows, int64_t r0, int64_t L, int64_t d,
                                           int64_t c0) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t row = r0 + r, ch = c0 + c;
    buf[r][c] = (row < L && ch < d) ? rows[row * d + ch] : A(0);
  }
}

template <typename A>
__device__ __forceinline__ void tile_dot(TileSmem<A>& sm, TileIndex ti, const A* own, int64_t o0, const A* other,
                                         int64_t x0, int64_t L, int64_t d, A (&acc)[kRowsPerThread]) {
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) acc[k] = A(0);
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    stage_rows(sm.own, own, o0, L, d, c0);
    stage_rows(sm.other, other, x0, L, d, c0);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kChunk; ++c) {
      const A x = sm.other[ti.lane][c];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) acc[k] += sm.own[ti.warp + kWarps * k][c] * x;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// The problem as the kernels see it.

template <typename A>
struct Geometry {
  int64_t H, T, L, d;
  bool tril;
  const bool* mask;  // (B, L)
  const A* qr;       // (B, H, L, d), rotated and scaled by 1/sqrt(d)
  const A* kr;       // (B, H, L, d), rotated
  const A* sb;       // (B, T, L)
  const A* eb;       // (B, T, L)

  __device__ int64_t type_begin(int64_t h) const { return H == 1 ? 0 : h; }
  __device__ int64_t type_end(int64_t h) const { return H == 1 ? T : h + 1; }
};

// ---------------------------------------------------------------------------------------------
// Scores forward. Grid (row tiles * column tiles, B * H).

template <typename X, typename A>
__global__ void __launch_bounds__(kThreads, 1) scores_fwd_kernel(Geometry<A> g, X* __restrict__ out) {
  __shared__ TileSmem<A> sm;
  const TileIndex ti{static_cast<int>(threadIdx.x % kTile), static_cast<int>(threadIdx.x / kTile)};
  const int64_t n_col = (g.L + kTile - 1) / kTile;
  const int64_t i0 = (blockIdx.x / n_col) * kTile, j0 = (blockIdx.x % n_col) * kTile;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t L = g.L;
  A acc[kRowsPerThread];
  // A tile entirely below the diagonal is all -inf with the tril mask: no dot needed there.
  if (g.tril && j0 + kTile <= i0) {
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) acc[k] = A(0);
  } else {
    tile_dot(sm, ti, g.qr + bh * L * g.d, i0, g.kr + bh * L * g.d, j0, L, g.d, acc);
  }
  const int64_t j = j0 + ti.lane;
  const bool col_ok = j < L && g.mask[b * L + j];
  for (int64_t t = g.type_begin(h); t < g.type_end(h); ++t) {
    const int64_t bt = b * g.T + t;
    const A ebj = j < L ? g.eb[bt * L + j] : A(0);
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t i = i0 + ti.warp + kWarps * k;
      if (i >= L || j >= L) continue;
      const bool ok = gp::span_ok(g.mask[b * L + i], col_ok, i, j, g.tril);
      const A s = ok ? acc[k] + g.sb[bt * L + i] + ebj : neg_inf<A>();
      out[(bt * L + i) * L + j] = static_cast<X>(s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Loss forward. Grid (row tiles, B * H). state (B, T, L, 5): per row (m_neg, s_neg, m_pos, s_pos,
// positives on masked spans), initialised to the empty states by the launcher.

template <typename A>
__global__ void __launch_bounds__(kThreads, 1) loss_fwd_kernel(Geometry<A> g, const bool* __restrict__ labels,
                                                            A* __restrict__ state) {
  __shared__ TileSmem<A> sm;
  const TileIndex ti{static_cast<int>(threadIdx.x % kTile), static_cast<int>(threadIdx.x / kTile)};
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t L = g.L;
  bool row_ok[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t i = i0 + ti.warp + kWarps * k;
    row_ok[k] = i < L && g.mask[b * L + i];
  }
  A acc[kRowsPerThread];
  for (int64_t j0 = 0; j0 < L; j0 += kTile) {
    // Below the diagonal (tril) nothing is a candidate: only look for misplaced positives.
    if (g.tril && j0 + kTile <= i0) {
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) acc[k] = A(0);
    } else {
      tile_dot(sm, ti, g.qr + bh * L * g.d, i0, g.kr + bh * L * g.d, j0, L, g.d, acc);
    }
    const int64_t j = j0 + ti.lane;
    const bool col_in = j < L;
    const bool col_ok = col_in && g.mask[b * L + j];
    for (int64_t t = g.type_begin(h); t < g.type_end(h); ++t) {
      const int64_t bt = b * g.T + t;
      const A ebj = col_in ? g.eb[bt * L + j] : A(0);
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int64_t i = i0 + ti.warp + kWarps * k;
        const bool row_in = i < L;
        const bool ok = gp::span_ok(row_ok[k], col_ok, i, j, g.tril);
        const bool y = row_in && col_in && labels[(bt * L + i) * L + j];
        const A s = ok ? acc[k] + g.sb[bt * L + i] + ebj : A(0);
        const A xn = ok && !y ? s : neg_inf<A>();
        const A xp = ok && y ? -s : neg_inf<A>();
        const A mn = warp_max(xn), mp = warp_max(xp);
        const A sn = warp_sum(mn == neg_inf<A>() ? A(0) : ::exp(xn - mn));
        const A sp = warp_sum(mp == neg_inf<A>() ? A(0) : ::exp(xp - mp));
        const A bad = warp_sum(static_cast<A>(y && !ok));
        if (ti.lane == 0 && row_in) {
          A* st = state + (bt * L + i) * 5;
          gp::LseState<A> neg{st[0], st[1]}, pos{st[2], st[3]};
          gp::lse_merge(&neg, mn, sn);
          gp::lse_merge(&pos, mp, sp);
          st[0] = neg.m, st[1] = neg.s, st[2] = pos.m, st[3] = pos.s, st[4] += bad;
        }
      }
    }
  }
}

// One thread per (b, t): the rows' states merged, the implicit logit 0 added.
template <typename A>
__global__ void loss_finish_kernel(const A* __restrict__ state, int64_t BT, int64_t L, A* __restrict__ loss,
                                   A* __restrict__ lse) {
  const int64_t bt = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bt >= BT) return;
  gp::LseState<A> neg = gp::lse_empty<A>(), pos = gp::lse_empty<A>();
  A bad = 0;
  for (int64_t i = 0; i < L; ++i) {
    const A* st = state + (bt * L + i) * 5;
    gp::lse_merge(&neg, st[0], st[1]);
    gp::lse_merge(&pos, st[2], st[3]);
    bad += st[4];
  }
  const A ln = gp::finish_lse(neg);
  const A lp = bad > A(0) ? std::numeric_limits<A>::infinity() : gp::finish_lse(pos);
  lse[2 * bt] = ln;
  lse[2 * bt + 1] = lp;
  loss[bt] = ln + lp;
}

// ---------------------------------------------------------------------------------------------
// Backward. dL/ds at one span, from the loss (recomputed score) or read (scores op).

template <typename A>
struct LossGrad {
  static constexpr bool kNeedsDot = true;
  const bool* labels;  // (B, T, L, L)
  const A* grad;       // (B, T)
  const A* lse;        // (B, T, 2)
  __device__ A operator()(const Geometry<A>& g, int64_t bt, int64_t i, int64_t j, bool ok, A dot) const {
    if (!ok) return A(0);  // positives on masked spans included: the forward reported them
    const A s = dot + g.sb[bt * g.L + i] + g.eb[bt * g.L + j];
    if (labels[(bt * g.L + i) * g.L + j]) return gp::positive_grad(s, grad[bt], lse[2 * bt + 1]);
    return gp::negative_grad(s, grad[bt], lse[2 * bt]);
  }
};

template <typename X, typename A>
struct ScoresGrad {
  static constexpr bool kNeedsDot = false;
  const X* grad;  // (B, T, L, L); masked spans are the constant -inf: their gradient is dropped
  __device__ A operator()(const Geometry<A>& g, int64_t bt, int64_t i, int64_t j, bool ok, A) const {
    return ok ? static_cast<A>(grad[(bt * g.L + i) * g.L + j]) : A(0);
  }
};

// kCols = false (rows pass): the block owns query rows o = i; other index x = j (the keys);
//   own_bias_grad = d_start_bias, own_grad = dq (rotated, to be scaled by 1/sqrt(d) and R^T).
// kCols = true (columns pass): the block owns keys o = j; x = i; d_end_bias and dk.
// Grid (own tiles, B * H). own_bias_grad must be zero on entry (the block adds to its rows).
template <typename A, int NC, bool kCols, typename Grad>
__global__ void __launch_bounds__(kThreads, 1) bwd_pass_kernel(Geometry<A> g, Grad dlds, A* __restrict__ own_grad,
                                                            A* __restrict__ own_bias_grad) {
  __shared__ TileSmem<A> sm;
  const TileIndex ti{static_cast<int>(threadIdx.x % kTile), static_cast<int>(threadIdx.x / kTile)};
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t L = g.L, d = g.d;
  const A* own = (kCols ? g.kr : g.qr) + bh * L * d;
  const A* other = (kCols ? g.qr : g.kr) + bh * L * d;
  bool own_ok[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t o = o0 + ti.warp + kWarps * k;
    own_ok[k] = o < L && g.mask[b * L + o];
  }
  A dacc[kRowsPerThread][NC];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
#pragma unroll
    for (int c = 0; c < NC; ++c) dacc[k][c] = A(0);
  }
  // With the tril mask only j >= i are candidates: rows pass from the diagonal tile on, columns
  // pass up to it.
  const int64_t x_begin = (!kCols && g.tril) ? o0 : 0;
  const int64_t x_end = (kCols && g.tril && o0 + kTile < L) ? o0 + kTile : L;
  A acc[kRowsPerThread];
  for (int64_t x0 = x_begin; x0 < x_end; x0 += kTile) {
    if (Grad::kNeedsDot) {
      tile_dot(sm, ti, own, o0, other, x0, L, d, acc);
    } else {
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) acc[k] = A(0);
    }
    const int64_t x = x0 + ti.lane;
    const bool x_ok = x < L && g.mask[b * L + x];
    A gsum[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) gsum[k] = A(0);
    for (int64_t t = g.type_begin(h); t < g.type_end(h); ++t) {
      const int64_t bt = b * g.T + t;
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int64_t o = o0 + ti.warp + kWarps * k;
        const int64_t i = kCols ? x : o, j = kCols ? o : x;
        const bool ok = gp::span_ok(kCols ? x_ok : own_ok[k], kCols ? own_ok[k] : x_ok, i, j, g.tril);
        const A p = dlds(g, bt, i, j, ok, acc[k]);
        gsum[k] += p;
        const A row = warp_sum(p);
        if (ti.lane == 0 && o < L) own_bias_grad[bt * L + o] += row;
      }
    }
    // own_grad[o] += sum_x P[o, x] other[x]: the tile's P through shared memory, the other rows
    // staged chunk by chunk; lane = channel within the chunk.
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) sm.g[ti.warp + kWarps * k][ti.lane] = gsum[k];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      stage_rows(sm.other, other, x0, L, d, static_cast<int64_t>(c) * kChunk);
      __syncthreads();
#pragma unroll 8
      for (int xx = 0; xx < kTile; ++xx) {
        const A v = sm.other[xx][ti.lane];
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) dacc[k][c] += sm.g[ti.warp + kWarps * k][xx] * v;
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t o = o0 + ti.warp + kWarps * k;
    if (o >= L) continue;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int64_t ch = static_cast<int64_t>(c) * kChunk + ti.lane;
      if (ch < d) own_grad[(bh * L + o) * d + ch] = dacc[k][c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sb, const at::Tensor& eb,
                  const at::Tensor& mask) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(k.device() == q.device() && sb.device() == q.device() && eb.device() == q.device() &&
                  mask.device() == q.device(),
              "q, k, start_bias, end_bias and mask must be on one device");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  k.scalar_type() == q.scalar_type(),
              "q and k must be contiguous (B, H, L, d) tensors of one dtype");
  TORCH_CHECK(sb.dim() == 3 && sb.size(0) == q.size(0) && sb.size(2) == q.size(2) && eb.sizes() == sb.sizes() &&
                  sb.scalar_type() == q.scalar_type() && eb.scalar_type() == q.scalar_type(),
              "start_bias and end_bias must be (B, T, L) tensors of q's dtype");
  TORCH_CHECK(q.size(1) == 1 || q.size(1) == sb.size(1), "q must have 1 or T heads");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                  mask.size(1) == q.size(2) && mask.is_contiguous(),
              "mask must be a contiguous (B, L) bool tensor");
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, "B * H must be at most 65535 (the grid's y dimension)");
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The prepared problem: rotated (and for q scaled) rows and the biases in the compute dtype.
template <typename X, typename A>
struct Prepared {
  at::Tensor qr, kr, sb, eb;
  Geometry<A> geometry(const at::Tensor& q, const at::Tensor& mask, bool tril) const {
    Geometry<A> g;
    g.H = q.size(1), g.T = sb.size(1), g.L = q.size(2), g.d = q.size(3), g.tril = tril;
    g.mask = mask.data_ptr<bool>();
    g.qr = qr.data_ptr<A>(), g.kr = kr.data_ptr<A>(), g.sb = sb.data_ptr<A>(), g.eb = eb.data_ptr<A>();
    return g;
  }
};

template <typename X, typename A>
Prepared<X, A> prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sb, const at::Tensor& eb,
                       const at::Tensor& mask, int64_t rope, double base) {
  Prepared<X, A> p;
  const int64_t L = q.size(2), d = q.size(3);
  const auto opts = q.options().dtype(acc_type(q));
  p.qr = at::empty(q.sizes(), opts);
  p.kr = at::empty(k.sizes(), opts);
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(d, 1))));
  launch_rotate<X, A, A, false>(q, p.qr, L, d, rope, base, scale);
  launch_rotate<X, A, A, false>(k, p.kr, L, d, rope, base, A(1));
  // Padded tokens may hold anything (NaN, inf): their rows and biases become 0, so that 0 * NaN
  // in the tile products cannot reach a real span (the kernels still mask them by `mask`).
  const at::Tensor padded = mask.logical_not();
  const at::Tensor padded_rows = padded.view({q.size(0), 1, L, 1});
  p.qr.masked_fill_(padded_rows, 0);
  p.kr.masked_fill_(padded_rows, 0);
  p.sb = sb.to(acc_type(q)).masked_fill(padded.unsqueeze(1), 0).contiguous();
  p.eb = eb.to(acc_type(q)).masked_fill(padded.unsqueeze(1), 0).contiguous();
  return p;
}

// The positives as a dense (B, T, L, L) bool tensor: `dense` itself, or built from the CSR.
at::Tensor dense_labels(const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& dense, int64_t B,
                        int64_t T, int64_t L) {
  if (dense.dim() == 4) {
    TORCH_CHECK(dense.scalar_type() == at::kBool && dense.is_contiguous() && dense.size(0) == B && dense.size(1) == T &&
                    dense.size(2) == L && dense.size(3) == L,
                "dense labels must be a contiguous (B, T, L, L) bool tensor");
    return dense;
  }
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) == B * T * L + 1,
              "row_ptr must be a (B*T*L + 1,) int64 tensor");
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.dim() == 1, "cols must be a (N,) int64 tensor");
  auto out = at::zeros({B * T * L * L}, row_ptr.options().dtype(at::kBool));
  if (cols.numel() > 0) {
    const at::Tensor rows = at::repeat_interleave(row_ptr.slice(0, 1) - row_ptr.slice(0, 0, -1));
    out.index_fill_(0, rows * L + cols, true);
  }
  return out.view({B, T, L, L});
}

// Runs the two backward passes with NC register chunks for the head size.
template <typename A, int NC, typename Grad>
void launch_bwd_passes(const Geometry<A>& g, int64_t B, const Grad& dlds, at::Tensor& dqr, at::Tensor& dkr,
                       at::Tensor& dsb, at::Tensor& deb) {
  const dim3 grid(static_cast<unsigned>((g.L + kTile - 1) / kTile), static_cast<unsigned>(B * g.H));
  auto stream = at::cuda::getCurrentCUDAStream();
  bwd_pass_kernel<A, NC, false, Grad><<<grid, kThreads, 0, stream>>>(g, dlds, dqr.data_ptr<A>(), dsb.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bwd_pass_kernel<A, NC, true, Grad><<<grid, kThreads, 0, stream>>>(g, dlds, dkr.data_ptr<A>(), deb.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A, typename Grad>
void run_bwd(const Geometry<A>& g, int64_t B, const Grad& dlds, at::Tensor& dqr, at::Tensor& dkr, at::Tensor& dsb,
             at::Tensor& deb) {
  const int64_t chunks = (g.d + kChunk - 1) / kChunk;
  if (chunks <= 1) {
    launch_bwd_passes<A, 1>(g, B, dlds, dqr, dkr, dsb, deb);
  } else if (chunks <= 2) {
    launch_bwd_passes<A, 2>(g, B, dlds, dqr, dkr, dsb, deb);
  } else {
    launch_bwd_passes<A, kMaxChunks>(g, B, dlds, dqr, dkr, dsb, deb);
  }
}

// dq = R^T (dqr / sqrt(d)), dk = R^T dkr in the inputs' dtypes; the bias gradients cast.
template <typename X, typename A>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_bwd(const at::Tensor& q, const at::Tensor& sb,
                                                                      const at::Tensor& dqr, const at::Tensor& dkr,
                                                                      const at::Tensor& dsb, const at::Tensor& deb,
                                                                      int64_t rope, double base) {
  const int64_t L = q.size(2), d = q.size(3);
  auto dq = at::empty_like(q), dk = at::empty_like(q);
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(d, 1))));
  launch_rotate<A, X, A, true>(dqr, dq, L, d, rope, base, scale);
  launch_rotate<A, X, A, true>(dkr, dk, L, d, rope, base, A(1));
  return {dq, dk, dsb.to(sb.scalar_type()), deb.to(sb.scalar_type())};
}

void check_head(int64_t d) {
  TORCH_CHECK(d <= kMaxChunks * kChunk, "the CUDA GlobalPointer backward serves head sizes up to ",
              kMaxChunks * kChunk, ", got ", d);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points: the contracts of the *_cpu functions in csrc/cpu/global_pointer.cpp.

std::tuple<at::Tensor, at::Tensor> global_pointer_loss_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& start_bias,
                                                                    const at::Tensor& end_bias, const at::Tensor& mask,
                                                                    const at::Tensor& row_ptr, const at::Tensor& cols,
                                                                    const at::Tensor& dense, int64_t rope,
                                                                    double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = start_bias.size(1), L = q.size(2);
  auto loss = at::zeros({B, T}, q.options().dtype(acc_type(q)));
  auto lse = at::zeros({B, T, 2}, q.options().dtype(acc_type(q)));
  if (B == 0 || T == 0 || L == 0) return {loss, lse};
  const at::Tensor labels = dense_labels(row_ptr, cols, dense, B, T, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_loss_forward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto p = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base);
    const Geometry<A> g = p.geometry(q, mask, tril_mask);
    auto state = at::zeros({B, T, L, 5}, p.qr.options());
    state.select(3, 0).fill_(-std::numeric_limits<double>::infinity());
    state.select(3, 2).fill_(-std::numeric_limits<double>::infinity());
    auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>((L + kTile - 1) / kTile), static_cast<unsigned>(B * H));
    loss_fwd_kernel<A><<<grid, kThreads, 0, stream>>>(g, labels.data_ptr<bool>(), state.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 128;
    loss_finish_kernel<A><<<static_cast<unsigned>((B * T + threads - 1) / threads), threads, 0, stream>>>(
        state.data_ptr<A>(), B * T, L, loss.data_ptr<A>(), lse.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& cols,
    const at::Tensor& dense, const at::Tensor& lse, int64_t rope, double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), T = start_bias.size(1), L = q.size(2), d = q.size(3);
  TORCH_CHECK(grad.scalar_type() == acc_type(q) && grad.dim() == 2 && grad.size(0) == B && grad.size(1) == T &&
                  grad.is_contiguous() && grad.device() == q.device(),
              "grad must be a contiguous (B, T) tensor of the compute dtype on q's device");
  TORCH_CHECK(lse.scalar_type() == acc_type(q) && lse.dim() == 3 && lse.size(0) == B && lse.size(1) == T &&
                  lse.size(2) == 2 && lse.is_contiguous() && lse.device() == q.device(),
              "lse must be a contiguous (B, T, 2) tensor of the compute dtype on q's device");
  if (q.numel() == 0 || start_bias.numel() == 0) {
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(start_bias), at::zeros_like(end_bias)};
  }
  check_head(d);
  const at::Tensor labels = dense_labels(row_ptr, cols, dense, B, T, L);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_loss_backward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto p = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base);
    const Geometry<A> g = p.geometry(q, mask, tril_mask);
    auto dqr = at::empty_like(p.qr), dkr = at::empty_like(p.kr);
    auto dsb = at::zeros({B, T, L}, p.qr.options()), deb = at::zeros({B, T, L}, p.qr.options());
    const LossGrad<A> dlds{labels.data_ptr<bool>(), grad.data_ptr<A>(), lse.data_ptr<A>()};
    run_bwd(g, B, dlds, dqr, dkr, dsb, deb);
    out = finish_bwd<scalar_t, A>(q, start_bias, dqr, dkr, dsb, deb, rope, rope_base);
  });
  return out;
}

at::Tensor global_pointer_scores_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
                                              const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope,
                                              double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = start_bias.size(1), L = q.size(2);
  auto out = at::empty({B, T, L, L}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_scores_forward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto p = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base);
    const Geometry<A> g = p.geometry(q, mask, tril_mask);
    const int64_t tiles = (L + kTile - 1) / kTile;
    TORCH_CHECK(tiles * tiles <= std::numeric_limits<int32_t>::max(), "L is too large for the scores grid");
    const dim3 grid(static_cast<unsigned>(tiles * tiles), static_cast<unsigned>(B * H));
    auto stream = at::cuda::getCurrentCUDAStream();
    scores_fwd_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(g, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope, double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), T = start_bias.size(1), L = q.size(2), d = q.size(3);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == L && grad.size(3) == L &&
                  grad.scalar_type() == q.scalar_type() && grad.is_contiguous() && grad.device() == q.device(),
              "grad must be a contiguous (B, T, L, L) tensor of q's dtype on q's device");
  if (q.numel() == 0 || start_bias.numel() == 0) {
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(start_bias), at::zeros_like(end_bias)};
  }
  check_head(d);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "global_pointer_scores_backward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto p = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base);
    const Geometry<A> g = p.geometry(q, mask, tril_mask);
    auto dqr = at::empty_like(p.qr), dkr = at::empty_like(p.kr);
    auto dsb = at::zeros({B, T, L}, p.qr.options()), deb = at::zeros({B, T, L}, p.qr.options());
    const ScoresGrad<scalar_t, A> dlds{grad.data_ptr<scalar_t>()};
    run_bwd(g, B, dlds, dqr, dkr, dsb, deb);
    out = finish_bwd<scalar_t, A>(q, start_bias, dqr, dkr, dsb, deb, rope, rope_base);
  });
  return out;
}

}  // namespace kexue
