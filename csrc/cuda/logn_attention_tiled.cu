// Log-n attention on CUDA, tiled: the flash-attention kernels behind the C++ entry points of
// csrc/cuda/logn_attention.cu, for float16 / bfloat16 (tensor cores, mma.sync m16n8k16, fp32
// accumulation) and float32 (FMA units, full float32) with D % 8 == 0 and D <= 128, on sm_80+.
// The warp-per-row kernels of logn_attention.cu serve everything else (float64, other head sizes,
// older GPUs); docs/logn_attention.md ("The CUDA C++ kernels") gives the split.
//
// Contract and edge cases are those of logn_attention.cu: per-query scales come in as a (B, Lq)
// float32 table, key j is visible to query i when j < key_end(i) (causal: i + Lk - Lq + 1, clamped
// to [0, Lk]) and not padded; a query that sees no key gets zeros and lse = 0.
//
// Every block has 4 warps; a warp owns 16 rows (queries, or keys in dK/dV). The head size is
// padded in shared memory to kD = 32, 64, 96 or 128 (zero columns, not stored back). Logits are
// kept in base 2: x = s_i log2(e) q.k, so each probability is one ex2; lse is stored natural.
//
//   forward  block = (64 queries, q head, batch): S = Q K^T over 64-key tiles, online softmax.
//   dQ       block = (64 queries, q head, batch): P from lse, dS = P (dO V^T - delta), dQ = s_i dS K.
//   dK/dV    block = (64 keys, kv head, batch): loops over the GQA group's query heads and the
//            query tiles that see its keys (32 or 64 rows); dV = P^T dO, dK = (s dS)^T Q. Each
//            block owns its rows of dK and dV, so there are no atomics and the sum is deterministic.
//   (delta = rowsum(dO * O) - dlse comes from the warp-per-row delta kernel of logn_attention.cu.)
//
// Pipelining (cp.async, one buffer per operand): the forward loads V_j while it computes S_j and
// the softmax, and K_{j+1} while it computes P V_j; dQ loads V_{j+1} during dS and dS K_j; dK/dV
// loads the next dO tile during dS and dK, the next Q tile at the end of an iteration.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kexue/logn_attention_tiled.h"
#include "kexue/logn_attention_tiles.cuh"

namespace kexue {
namespace logn_attention {
namespace tiled {
namespace {

using namespace logn_tiles;

struct Problem {
  int64_t Hq, Hkv, Lq, Lk;
  int D, groups;
  bool causal;
};

// One past the last key position query i may see (padding aside).
__device__ __forceinline__ int64_t key_end(const Problem& s, int64_t i) {
  if (!s.causal) return s.Lk;
  const int64_t end = i + s.Lk - s.Lq + 1;
  return end < 0 ? 0 : (end > s.Lk ? s.Lk : end);
}

// The last row of the query block starting at q0 (q0 < Lq).
__device__ __forceinline__ int64_t last_row(int64_t q0, int64_t Lq) { return q0 + kBlockM < Lq ? q0 + kBlockM - 1 : Lq - 1; }

// What the forward and dQ kernels share (grid (ceil(Lq / 64), Hq, B)): their shared-memory
// tiles -- Q, the dQ kernel's dO (kDout), K, V, the keys' bias -- and where the block and the
// thread sit. Blocks run in reverse: with causal masking the last query blocks see the most keys.
// The kernels form their K, V and padding pointers themselves: formed in here, the padding
// pointer's select became a branch in the PTX and ptxas gave some kernels more registers.
template <typename T>
struct QueryBlock {
  T *qs, *dos, *ks, *vs;
  float* kbias;
  int warp, g, t;            // warp of the block; the lane's row g and column pair t in an mma tile
  int64_t b, head, kv_head;  // batch, query head, its KV head
  int64_t q0, row0;          // first query row of the block and of the warp
};

template <typename T, int kD, bool kDout>
__device__ __forceinline__ QueryBlock<T> query_block(const Problem& s) {
  constexpr int kS = row_stride<T, kD>();
  extern __shared__ __align__(16) unsigned char smem[];
  QueryBlock<T> qb;
  qb.qs = reinterpret_cast<T*>(smem);
  qb.dos = qb.qs + kBlockM * kS;
  qb.ks = qb.qs + (kDout ? 2 : 1) * kBlockM * kS;
  qb.vs = qb.ks + kBlockN * kS;
  qb.kbias = reinterpret_cast<float*>(qb.vs + kBlockN * kS);

  const int lane = threadIdx.x % 32;
  qb.warp = threadIdx.x / 32, qb.g = lane / 4, qb.t = lane % 4;
  qb.b = blockIdx.z, qb.head = qb.b * s.Hq + blockIdx.y, qb.kv_head = qb.b * s.Hkv + blockIdx.y / s.groups;
  qb.q0 = (static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x) * kBlockM, qb.row0 = qb.q0 + 16 * qb.warp;
  return qb;
}

// Keys the first row of the query block at q0 sees, and the key tiles its last row needs: key_end
// is non-decreasing in i, so the block's last row sees the most keys, its first the fewest.
struct KeyTiles {
  int64_t first_end, n_tiles;
};

__device__ __forceinline__ KeyTiles key_tiles(const Problem& s, int64_t q0) {
  const int64_t n_keys = key_end(s, last_row(q0, s.Lq));
  return {key_end(s, q0), (n_keys + kBlockN - 1) / kBlockN};
}

// 0 for a key a query may see (in range, not padded), -inf otherwise; one per key of a tile.
__device__ __forceinline__ void stage_key_bias(float* bias, const bool* pad, int64_t j0, int64_t Lk) {
  if (threadIdx.x < kBlockN) {
    const int64_t j = j0 + threadIdx.x;
    bias[threadIdx.x] = j < Lk && (pad == nullptr || !pad[j]) ? 0.f : -INFINITY;
  }
}

// Shared memory of each kernel, in bytes (host and device agree through these).
constexpr int64_t tile_bytes(int rows, int elem, int kD) { return int64_t{rows} * (kD + 16 / elem) * elem; }
constexpr int dkv_rows(int kD) { return kD <= 64 ? 64 : 32; }  // query rows a dK/dV step takes
constexpr int64_t forward_smem(int elem, int kD) { return tile_bytes(kBlockM + 2 * kBlockN, elem, kD) + 4 * kBlockN; }
constexpr int64_t dq_smem(int elem, int kD) { return tile_bytes(2 * kBlockM + 2 * kBlockN, elem, kD) + 4 * kBlockN; }
constexpr int64_t dkv_smem(int elem, int kD) {
  return tile_bytes(2 * kBlockM + 2 * dkv_rows(kD), elem, kD) + 4 * 4 * dkv_rows(kD);
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (ceil(Lq / 64), Hq, B).

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const bool* pad,
                   const float* __restrict__ scales, Problem s, T* __restrict__ out, float* __restrict__ lse) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host sends only sm_80+ devices here
#else
  constexpr int kS = row_stride<T, kD>();
  [[maybe_unused]] const auto [qs, dos, ks, vs, kbias, warp, g, t, b, head, kv_head, q0, row0] =
      query_block<T, kD, /*kDout=*/false>(s);  // dos: none here
  const T* kh = k + kv_head * s.Lk * s.D;
  const T* vh = v + kv_head * s.Lk * s.D;
  const bool* pb = pad == nullptr ? nullptr : pad + b * s.Lk;

  float c[2];  // s_i log2(e) of the thread's rows row0 + g, row0 + g + 8 (0 past Lq)
  int64_t end[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + g + 8 * r;
    c[r] = i < s.Lq ? scales[b * s.Lq + i] * kLog2e : 0.f;
    end[r] = key_end(s, i);
  }
  const auto [first_end, n_tiles] = key_tiles(s, q0);

  load_tile<T, kD, kBlockM>(qs, q + head * s.Lq * s.D, q0, s.Lq, s.D);
  if (n_tiles > 0) load_tile<T, kD, kBlockN>(ks, kh, 0, s.Lk, s.D);
  cp_async_commit();

  float o[kD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this thread's part of the row sum
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t j0 = it * kBlockN;
    stage_key_bias(kbias, pb, j0, s.Lk);  // the previous tile's readers passed the loop's last barrier
    load_tile<T, kD, kBlockN>(vs, vh, j0, s.Lk, s.D);
    cp_async_commit();
    cp_async_wait<1>();  // all but the newest group (V_it): Q and K_it are in
    __syncthreads();     // ... for every thread's chunks; kbias is visible

    float x[kBlockN / 8][4] = {};
    gemm_nt<T, kBlockN, kD, kS, kS>(x, qs + 16 * warp * kS, ks);
    const bool diag = s.causal && j0 + kBlockN > first_end;  // some key here is hidden from some row
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * nt + 2 * t + e;
          float y = fmaf(x[nt][2 * r + e], c[r], kbias[col]);
          if (diag && j0 + col >= end[r]) y = -INFINITY;
          x[nt][2 * r + e] = y;
          mx = fmaxf(mx, y);
        }
      }
      const float m_new = fmaxf(m[r], group_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: p = 0, not NaN
      const float corr = exp2f(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(x[nt][2 * r + e] - m_use);
          x[nt][2 * r + e] = p;
          sum += p;
        }
      }
      l[r] = l[r] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[dt][2 * r] *= corr;
        o[dt][2 * r + 1] *= corr;
      }
    }

    cp_async_wait<0>();  // V_it is in
    __syncthreads();     // for every thread; and no warp reads K_it any more
    if (it + 1 < n_tiles) {
      load_tile<T, kD, kBlockN>(ks, kh, j0 + kBlockN, s.Lk, s.D);
      cp_async_commit();
    }
    gemm_rn<T, kD, kBlockN, kS>(o, x, vs);
    __syncthreads();  // no warp reads V_it or kbias any more
  }
  cp_async_wait<0>();  // Q's group when no key tile ran

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = group_sum(l[r]);
    inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];  // a query that sees no key: zeros, lse = 0
  }
  store_rows<T, kD>(o, out + head * s.Lq * s.D, row0, s.Lq, s.D, inv);
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + g + 8 * r;
      if (i < s.Lq) lse[head * s.Lq + i] = l[r] == 0.f ? 0.f : m[r] * kLn2 + logf(l[r]);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// dQ. Grid (ceil(Lq / 64), Hq, B).

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, const bool* pad,
              const float* __restrict__ scales, Problem s, T* __restrict__ dq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kS = row_stride<T, kD>();
  const auto [qs, dos, ks, vs, kbias, warp, g, t, b, head, kv_head, q0, row0] =
      query_block<T, kD, /*kDout=*/true>(s);
  const T* kh = k + kv_head * s.Lk * s.D;
  const T* vh = v + kv_head * s.Lk * s.D;
  const bool* pb = pad == nullptr ? nullptr : pad + b * s.Lk;

  // Per row: s_i, s_i log2(e), -lse_i log2(e) (-inf past Lq: p = 0 there) and delta_i.
  float scale[2], c[2], nl[2], dl[2];
  int64_t end[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + g + 8 * r;
    const bool live = i < s.Lq;
    scale[r] = live ? scales[b * s.Lq + i] : 0.f;
    c[r] = scale[r] * kLog2e;
    nl[r] = live ? -lse[head * s.Lq + i] * kLog2e : -INFINITY;
    dl[r] = live ? delta[head * s.Lq + i] : 0.f;
    end[r] = key_end(s, i);
  }
  const auto [first_end, n_tiles] = key_tiles(s, q0);

  load_tile<T, kD, kBlockM>(qs, q + head * s.Lq * s.D, q0, s.Lq, s.D);
  load_tile<T, kD, kBlockM>(dos, dout + head * s.Lq * s.D, q0, s.Lq, s.D);
  if (n_tiles > 0) {
    load_tile<T, kD, kBlockN>(ks, kh, 0, s.Lk, s.D);
    load_tile<T, kD, kBlockN>(vs, vh, 0, s.Lk, s.D);
  }
  cp_async_commit();

  float acc[kD / 8][4] = {};
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t j0 = it * kBlockN;
    stage_key_bias(kbias, pb, j0, s.Lk);
    cp_async_wait<0>();  // K_it and V_it (and Q, dO) are in
    __syncthreads();

    float x[kBlockN / 8][4] = {}, dp[kBlockN / 8][4] = {};
    gemm_nt<T, kBlockN, kD, kS, kS>(x, qs + 16 * warp * kS, ks);
    gemm_nt<T, kBlockN, kD, kS, kS>(dp, dos + 16 * warp * kS, vs);
    __syncthreads();  // no warp reads V_it any more
    if (it + 1 < n_tiles) {
      load_tile<T, kD, kBlockN>(vs, vh, j0 + kBlockN, s.Lk, s.D);
      cp_async_commit();
    }
    const bool diag = s.causal && j0 + kBlockN > first_end;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int r = e4 / 2, col = 8 * nt + 2 * t + e4 % 2;
        float y = fmaf(x[nt][e4], c[r], kbias[col] + nl[r]);
        if (diag && j0 + col >= end[r]) y = -INFINITY;
        x[nt][e4] = exp2f(y) * (dp[nt][e4] - dl[r]);  // dS / s_i
      }
    }
    gemm_rn<T, kD, kBlockN, kS>(acc, x, ks);
    __syncthreads();  // no warp reads K_it or kbias any more
    if (it + 1 < n_tiles) {
      load_tile<T, kD, kBlockN>(ks, kh, j0 + kBlockN, s.Lk, s.D);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
  if constexpr (std::is_same_v<T, float>) {  // staged, float32 d32 took 212 registers instead of 168
    store_rows<T, kD>(acc, dq + head * s.Lq * s.D, row0, s.Lq, s.D, scale);
  } else {
    // 128-bit stores, staged in the K tile: every warp read it for the last time before the loop's
    // last barrier, and no copy into it is pending (none was issued when no key tile ran).
    store_rows_staged<T, kD, kS>(acc, ks + 16 * warp * kS, dq + head * s.Lq * s.D, row0, s.Lq, s.D, scale);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// dK, dV. Grid (ceil(Lk / 64), Hkv, B); kBQ query rows a step.

template <typename T, int kD, int kBQ>
__global__ void __launch_bounds__(kThreads)
    dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
               const float* __restrict__ lse, const float* __restrict__ delta, const bool* pad,
               const float* __restrict__ scales, Problem s, T* __restrict__ dk, T* __restrict__ dv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kS = row_stride<T, kD>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kBlockM * kS;
  T* qs = vs + kBlockM * kS;
  T* dos = qs + kBQ * kS;
  float* st_c = reinterpret_cast<float*>(dos + kBQ * kS);  // per query of the step: s_i log2(e)
  float* st_nl = st_c + kBQ;                               // -lse_i log2(e), -inf past Lq
  float* st_d = st_nl + kBQ;                               // delta_i
  float* st_s = st_d + kBQ;                                // s_i

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.z, kv_head = b * s.Hkv + blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBlockM, key0 = k0 + 16 * warp;
  const int64_t shift = s.Lk - s.Lq;  // causal: query i sees key j iff j <= i + shift

  float rb[2];  // 0 for the thread's key rows key0 + g, key0 + g + 8 if real and unpadded, else -inf
  int64_t j[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    j[r] = key0 + g + 8 * r;
    rb[r] = j[r] < s.Lk && (pad == nullptr || !pad[b * s.Lk + j[r]]) ? 0.f : -INFINITY;
  }
  // Query steps: the group's heads, each from the first query tile that sees key k0.
  const int64_t i_first = s.causal && k0 > shift ? k0 - shift : 0;
  const int64_t qb_first = i_first / kBQ;
  const int64_t n_qb = i_first < s.Lq ? (s.Lq + kBQ - 1) / kBQ - qb_first : 0;
  const int64_t steps = s.groups * n_qb;
  const int64_t head0 = b * s.Hq + static_cast<int64_t>(blockIdx.y) * s.groups;
  const auto step_head = [&](int64_t st) { return head0 + st / n_qb; };
  const auto step_i0 = [&](int64_t st) { return (qb_first + st % n_qb) * kBQ; };

  load_tile<T, kD, kBlockM>(ks, k + kv_head * s.Lk * s.D, k0, s.Lk, s.D);
  load_tile<T, kD, kBlockM>(vs, v + kv_head * s.Lk * s.D, k0, s.Lk, s.D);
  if (steps > 0) {
    load_tile<T, kD, kBQ>(qs, q + step_head(0) * s.Lq * s.D, step_i0(0), s.Lq, s.D);
    load_tile<T, kD, kBQ>(dos, dout + step_head(0) * s.Lq * s.D, step_i0(0), s.Lq, s.D);
  }
  cp_async_commit();

  float dka[kD / 8][4] = {}, dva[kD / 8][4] = {};
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t head = step_head(st), i0 = step_i0(st);
    if (threadIdx.x < kBQ) {  // the previous step's readers passed its last barrier
      const int64_t i = i0 + threadIdx.x;
      const bool live = i < s.Lq;
      const float sc = live ? scales[b * s.Lq + i] : 0.f;
      st_c[threadIdx.x] = sc * kLog2e;
      st_nl[threadIdx.x] = live ? -lse[head * s.Lq + i] * kLog2e : -INFINITY;
      st_d[threadIdx.x] = live ? delta[head * s.Lq + i] : 0.f;
      st_s[threadIdx.x] = sc;
    }
    cp_async_wait<0>();  // Q and dO of this step (and K, V) are in
    __syncthreads();

    float x[kBQ / 8][4] = {}, dp[kBQ / 8][4] = {};
    gemm_nt<T, kBQ, kD, kS, kS>(x, ks + 16 * warp * kS, qs);   // S^T = K Q^T
    gemm_nt<T, kBQ, kD, kS, kS>(dp, vs + 16 * warp * kS, dos);  // dP^T = V dO^T
    // Some (key, query) pair here is causally hidden unless the first query sees the last key.
    const bool diag = s.causal && i0 < k0 + kBlockM - 1 - shift;
#pragma unroll
    for (int nt = 0; nt < kBQ / 8; ++nt) {
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int r = e4 / 2, col = 8 * nt + 2 * t + e4 % 2;
        float y = fmaf(x[nt][e4], st_c[col], rb[r] + st_nl[col]);
        if (diag && j[r] - (i0 + col) > shift) y = -INFINITY;
        x[nt][e4] = exp2f(y);  // P^T
      }
    }
    gemm_rn<T, kD, kBQ, kS>(dva, x, dos);  // dV += P^T dO
    __syncthreads();                        // no warp reads this dO tile any more
    if (st + 1 < steps) {
      load_tile<T, kD, kBQ>(dos, dout + step_head(st + 1) * s.Lq * s.D, step_i0(st + 1), s.Lq, s.D);
      cp_async_commit();
    }
#pragma unroll
    for (int nt = 0; nt < kBQ / 8; ++nt) {
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int col = 8 * nt + 2 * t + e4 % 2;
        x[nt][e4] *= (dp[nt][e4] - st_d[col]) * st_s[col];  // dS^T, with the query's scale
      }
    }
    gemm_rn<T, kD, kBQ, kS>(dka, x, qs);  // dK += dS^T Q
    __syncthreads();                       // no warp reads this Q tile or the stats any more
    if (st + 1 < steps) {
      load_tile<T, kD, kBQ>(qs, q + step_head(st + 1) * s.Lq * s.D, step_i0(st + 1), s.Lq, s.D);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
  const float one[2] = {1.f, 1.f};
  store_rows<T, kD>(dka, dk + kv_head * s.Lk * s.D, key0, s.Lk, s.D, one);
  store_rows<T, kD>(dva, dv + kv_head * s.Lk * s.D, key0, s.Lk, s.D, one);
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.

Problem problem_of(const at::Tensor& q, const at::Tensor& k, bool causal) {
  return Problem{q.size(1), k.size(1), q.size(2), k.size(2), static_cast<int>(q.size(3)),
                 static_cast<int>(q.size(1) / k.size(1)), causal};
}

int padded_head(int64_t D) { return static_cast<int>((D + 31) / 32 * 32); }

dim3 grid_of(int64_t rows, int64_t heads, int64_t batch) {
  TORCH_CHECK(heads <= 65535 && batch <= 65535, "logn_attention CUDA fallback: at most 65535 heads and batches");
  return dim3(static_cast<unsigned>((rows + kBlockM - 1) / kBlockM), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

template <typename T>
T* mut(at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T, int kD>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* pad,
                    const float* scales, bool causal, at::Tensor& out, at::Tensor& lse) {
  const Problem s = problem_of(q, k, causal);
  const int64_t smem = forward_smem(sizeof(T), kD);
  allow_smem(forward_kernel<T, kD>, smem);
  forward_kernel<T, kD><<<grid_of(s.Lq, s.Hq, q.size(0)), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      ptr<T>(q), ptr<T>(k), ptr<T>(v), pad, scales, s, mut<T>(out), lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kD>
void launch_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lse, const at::Tensor& delta, const bool* pad, const float* scales, bool causal,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Problem s = problem_of(q, k, causal);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t dq_bytes = dq_smem(sizeof(T), kD), dkv_bytes = dkv_smem(sizeof(T), kD);
  allow_smem(dq_kernel<T, kD>, dq_bytes);
  dq_kernel<T, kD><<<grid_of(s.Lq, s.Hq, q.size(0)), kThreads, dq_bytes, stream>>>(
      ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(dout), lse.data_ptr<float>(), delta.data_ptr<float>(), pad, scales, s,
      mut<T>(dq));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kBQ = dkv_rows(kD);
  allow_smem(dkv_kernel<T, kD, kBQ>, dkv_bytes);
  dkv_kernel<T, kD, kBQ><<<grid_of(s.Lk, s.Hkv, q.size(0)), kThreads, dkv_bytes, stream>>>(
      ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(dout), lse.data_ptr<float>(), delta.data_ptr<float>(), pad, scales, s,
      mut<T>(dk), mut<T>(dv));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fn(T{}, std::integral_constant<int, kD>{}) for the call's device element type and padded head.
template <typename Fn>
void dispatch(const at::Tensor& q, const Fn& fn) {
  const auto with_head = [&](auto t) {
    switch (padded_head(q.size(3))) {
      case 32: return fn(t, std::integral_constant<int, 32>{});
      case 64: return fn(t, std::integral_constant<int, 64>{});
      case 96: return fn(t, std::integral_constant<int, 96>{});
      case 128: return fn(t, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, "logn_attention tiled: unsupported head size ", q.size(3));
    }
  };
  switch (q.scalar_type()) {
    case at::kHalf: return with_head(__half{});
    case at::kBFloat16: return with_head(__nv_bfloat16{});
    case at::kFloat: return with_head(float{});
    default: TORCH_CHECK(false, "logn_attention tiled: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

bool serves(const at::Tensor& q, std::initializer_list<at::Tensor> tensors, bool backward) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return false;
  const int64_t D = q.size(3);
  if (D % 8 != 0 || D > 128) return false;
  for (const at::Tensor& t : tensors)
    if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
  if (prop->major < 8) return false;
  const int elem = static_cast<int>(q.element_size()), kD = padded_head(D);
  const int64_t need = backward ? std::max(dq_smem(elem, kD), dkv_smem(elem, kD)) : forward_smem(elem, kD);
  return need <= static_cast<int64_t>(prop->sharedMemPerBlockOptin);
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* pad, const float* scales,
             bool causal, at::Tensor& out, at::Tensor& lse) {
  dispatch(q, [&](auto t, auto head) {
    launch_forward<decltype(t), decltype(head)::value>(q, k, v, pad, scales, causal, out, lse);
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, const bool* pad, const float* scales, bool causal,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  dispatch(q, [&](auto t, auto head) {
    launch_backward<decltype(t), decltype(head)::value>(grad_out, q, k, v, lse, delta, pad, scales, causal, dq, dk,
                                                        dv);
  });
}

}  // namespace tiled
}  // namespace logn_attention
}  // namespace kexue
