// Warp-level building blocks of the tiled log-n attention kernels (csrc/cuda/logn_attention_tiled.cu):
// cp.async tile loads into padded shared memory, and two warp GEMMs whose accumulators share one
// register layout for every input type, so that the softmax and masking code is written once.
//
// Accumulator layout (that of mma.sync m16n8k16's C/D fragment). A warp owns a strip of 16 rows;
// an (16 x N) fp32 accumulator is `float acc[N / 8][4]`. With lane = 32 * warp + l, g = l / 4 (the
// "group") and t = l % 4 (the thread in the group), n-tile nt holds
//     acc[nt][0], acc[nt][1] = C[g][8 nt + 2t], C[g][8 nt + 2t + 1]
//     acc[nt][2], acc[nt][3] = C[g + 8][8 nt + 2t], C[g + 8][8 nt + 2t + 1]
// so a row's values are spread over the 4 threads of a group (reductions: shfl_xor 1 and 2).
//
// 16-bit inputs (half, bfloat16) run on tensor cores (mma.sync.m16n8k16, fp32 accumulation) with
// operands fetched by ldmatrix; float32 runs on the FMA units in full float32 (no TF32: the CUDA
// C++ backend ignores allow_tf32), each thread computing its own accumulator elements.
//
// Shared-memory tiles are row-major with a row stride of kD + 16 bytes' worth of elements: the 16
// bytes of padding put the 8 rows an ldmatrix (or a float4 load) reads at one column in 8 distinct
// 16-byte bank groups, for every kD in {32, 64, 96, 128} (kD * sizeof(T) is a multiple of 64 bytes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace kexue {
namespace logn_tiles {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 64;  // query rows of a forward / dQ block, key rows of a dK/dV block (16 a warp)
constexpr int kBlockN = 64;  // keys a forward / dQ block streams at a time
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
constexpr int chunk_elems() {  // elements in a 16-byte cp.async chunk
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int kD>
constexpr int row_stride() {  // elements between two rows of a shared-memory tile
  return kD + chunk_elems<T>();
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+). A chunk whose source is out of range is zero-filled (src-size 0): rows past
// the sequence and columns past the head size read as 0, so they add nothing to any dot product
// (and no NaN from stale shared memory can meet a zero probability).

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [r0, r0 + R) of a (rows, D) row-major matrix into a (R, kD) tile (stride row_stride), by the
// whole block; D is a multiple of chunk_elems<T>() (the host checks D % 8 == 0).
template <typename T, int kD, int R>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t r0, int64_t rows, int D) {
  constexpr int kCE = chunk_elems<T>(), kChunks = kD / kCE, kS = row_stride<T, kD>();
  static_assert((R * kChunks) % kThreads == 0, "tile chunks must split evenly over the block");
#pragma unroll
  for (int i = 0; i < R * kChunks / kThreads; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = e / kChunks, c = (e % kChunks) * kCE;
    const int64_t row = r0 + r;
    const bool ok = row < rows && c < D;
    cp_async16(tile + r * kS + c, ok ? base + row * D + c : base, ok);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core primitives (16-bit inputs).

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// C += A B for one m16n8k16 tile. A fragment (16 x 16, row-major), with g, t as above:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
// B fragment (16 x 8): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; the lower 16 bits of each
// register hold the element with the smaller k (or column) index.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as a 16-bit pair, `lo` in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// ---------------------------------------------------------------------------------------------
// Warp GEMMs. `a` and `b` point at shared-memory tiles (row strides kSA, kSB elements); `a` at
// the warp's first row.

// acc (16 x N) += A (16 x K) . B^T, with B stored (N x K) row-major: S = Q K^T, dP = dO V^T,
// S^T = K Q^T, dP^T = V dO^T.
template <typename T, int N, int K, int kSA, int kSB>
__device__ __forceinline__ void gemm_nt(float (&acc)[N / 8][4], const T* a, const T* b) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same_v<T, float>) {
    const int g = lane / 4, t = lane % 4;
    // Unrolled twice only: a full unroll let ptxas hoist loads until dQ at kD = 128 spilled.
#pragma unroll 2
    for (int k0 = 0; k0 < K; k0 += 4) {
      const float4 lo = *reinterpret_cast<const float4*>(a + g * kSA + k0);
      const float4 hi = *reinterpret_cast<const float4*>(a + (g + 8) * kSA + k0);
#pragma unroll
      for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 y = *reinterpret_cast<const float4*>(b + (8 * nt + 2 * t + e) * kSB + k0);
          acc[nt][e] = fmaf(lo.w, y.w, fmaf(lo.z, y.z, fmaf(lo.y, y.y, fmaf(lo.x, y.x, acc[nt][e]))));
          acc[nt][2 + e] = fmaf(hi.w, y.w, fmaf(hi.z, y.z, fmaf(hi.y, y.y, fmaf(hi.x, y.x, acc[nt][2 + e]))));
        }
      }
    }
  } else {
    static_assert(N % 16 == 0 && K % 16 == 0, "16-bit GEMM tiles are multiples of 16");
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      // A: ldmatrix 8x8 blocks 0..3 = (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7,
      // cols 8-15), (rows 8-15, cols 8-15) -> a[0..3]; lane l gives the address of row l % 16
      // (blocks 0/1 for l < 16, 2/3 above), column k0 + 8 (l / 16).
      uint32_t af[4];
      ldsm_x4(af, a + (lane % 16) * kSA + k0 + (lane / 16) * 8);
#pragma unroll
      for (int n0 = 0; n0 < N; n0 += 16) {
        // B = rows n0..n0+15 of the (N x K) tile. B[k][n] = tile[n][k], so b0 of n-tile n0 is
        // tile[n0 + g][k0 + 2t..]: the non-transposed 8x8 block (rows n0..+7, cols k0..+7).
        // Blocks: (n0, k0) -> b0 and (n0, k0+8) -> b1 of n-tile n0; (n0+8, k0), (n0+8, k0+8) ->
        // b0, b1 of n-tile n0+8. Lane l addresses block l / 8: row n0 + l % 8 + 8 (l / 16),
        // column k0 + 8 ((l / 8) % 2).
        uint32_t bf[4];
        ldsm_x4(bf, b + (n0 + lane % 8 + (lane / 16) * 8) * kSB + k0 + ((lane / 8) % 2) * 8);
        mma16816<T>(acc[n0 / 8], af, bf[0], bf[1]);
        mma16816<T>(acc[n0 / 8 + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// acc (16 x N) += P (16 x K, an fp32 accumulator of this warp, layout above) . B, with B stored
// (K x N) row-major: O += P V, dV += P^T dO, dQ += dS K, dK += dS^T Q.
template <typename T, int N, int K, int kSB>
__device__ __forceinline__ void gemm_rn(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* b) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same_v<T, float>) {
    // P[g][k] sits in lane 4g + (k % 8) / 2, register p[k / 8][k % 2] (row g + 8: p[k / 8][2 + k % 2]).
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kt = 0; kt < K / 8; ++kt) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const float lo = __shfl_sync(kFull, p[kt][kk % 2], 4 * g + kk / 2);
        const float hi = __shfl_sync(kFull, p[kt][2 + kk % 2], 4 * g + kk / 2);
        const float* row = b + (8 * kt + kk) * kSB + 2 * t;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) {
          const float2 y = *reinterpret_cast<const float2*>(row + 8 * nt);
          acc[nt][0] = fmaf(lo, y.x, acc[nt][0]);
          acc[nt][1] = fmaf(lo, y.y, acc[nt][1]);
          acc[nt][2] = fmaf(hi, y.x, acc[nt][2]);
          acc[nt][3] = fmaf(hi, y.y, acc[nt][3]);
        }
      }
    }
  } else {
    static_assert(N % 16 == 0 && K % 16 == 0, "16-bit GEMM tiles are multiples of 16");
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      // The C fragments of n-tiles k0/8 and k0/8 + 1 are exactly the A fragment of k-step k0
      // (a[0] = row g, cols 2t.., a[1] = row g+8, a[2], a[3] the same 8 columns on).
      const float(&p0)[4] = p[k0 / 8];
      const float(&p1)[4] = p[k0 / 8 + 1];
      const uint32_t af[4] = {pack2<T>(p0[0], p0[1]), pack2<T>(p0[2], p0[3]), pack2<T>(p1[0], p1[1]),
                              pack2<T>(p1[2], p1[3])};
#pragma unroll
      for (int n0 = 0; n0 < N; n0 += 16) {
        // b0 of n-tile n0 is B[k0 + 2t..][n0 + g]: two rows of the stored tile, so ldmatrix.trans
        // of the 8x8 block (rows k0..+7, cols n0..+7). Blocks: (k0, n0) -> b0, (k0+8, n0) -> b1
        // of n-tile n0; (k0, n0+8), (k0+8, n0+8) -> b0, b1 of n-tile n0+8. Lane l addresses
        // block l / 8: row k0 + l % 16, column n0 + 8 (l / 16).
        uint32_t bf[4];
        ldsm_x4_trans(bf, b + (k0 + lane % 16) * kSB + n0 + (lane / 16) * 8);
        mma16816<T>(acc[n0 / 8], af, bf[0], bf[1]);
        mma16816<T>(acc[n0 / 8 + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row helpers on the accumulator layout.

// Max and sum over a row's 4 threads (the group of lanes 4g .. 4g + 3).
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 2));
}

__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  return x + __shfl_xor_sync(kFull, x, 2);
}

// Stores acc * mul[row half] into rows row0 + g, row0 + g + 8 of a (rows, D) matrix, columns < D.
template <typename T, int N>
__device__ __forceinline__ void store_rows(const float (&acc)[N / 8][4], T* base, int64_t row0, int64_t rows, int D,
                                           const float (&mul)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    if (row >= rows) continue;
    T* dst = base + row * D;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      const int c = 8 * nt + 2 * t;  // D is even, so c < D means c + 1 < D
      if (c >= D) continue;
      const float x = acc[nt][2 * r] * mul[r], y = acc[nt][2 * r + 1] * mul[r];
      if constexpr (std::is_same_v<T, float>) {
        *reinterpret_cast<float2*>(dst + c) = make_float2(x, y);
      } else {
        *reinterpret_cast<uint32_t*>(dst + c) = pack2<T>(x, y);
      }
    }
  }
}

// store_rows through shared memory: the warp writes its fragments into `stage`, 16 rows of row
// stride kS that no other thread reads or copies into any more, then each lane stores whole
// 16-byte chunks of those rows: 128-bit global stores where the matrix's rows start on 16 bytes
// (base aligned, D a multiple of 16 / sizeof(T)), else the 4-byte (16-bit T) or 8-byte (float)
// stores of store_rows. Same values, same bounds. (A fragment row holds 2 elements per lane, so
// store_rows can store no more than 8 bytes at a time.)
template <typename T, int N, int kS>
__device__ __forceinline__ void store_rows_staged(const float (&acc)[N / 8][4], T* stage, T* base, int64_t row0,
                                                  int64_t rows, int D, const float (&mul)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    T* srow = stage + (g + 8 * r) * kS;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      const int c = 8 * nt + 2 * t;
      const float x = acc[nt][2 * r] * mul[r], y = acc[nt][2 * r + 1] * mul[r];
      if constexpr (std::is_same_v<T, float>) {
        *reinterpret_cast<float2*>(srow + c) = make_float2(x, y);
      } else {
        *reinterpret_cast<uint32_t*>(srow + c) = pack2<T>(x, y);
      }
    }
  }
  __syncwarp();
  constexpr int kCE = 16 / static_cast<int>(sizeof(T)), kPerRow = N / kCE;  // elements a chunk, chunks a row
  static_assert((16 * kPerRow) % 32 == 0, "a warp's chunks must split evenly over its lanes");
  const bool wide = D % kCE == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  const int left = rows - row0 < 16 ? static_cast<int>(rows - row0) : 16;  // the warp's rows in the matrix
  T* const first = base + row0 * D;
#pragma unroll
  for (int i = lane; i < 16 * kPerRow; i += 32) {
    const int rr = i / kPerRow, c = (i % kPerRow) * kCE;
    if (rr >= left || c >= D) continue;
    const T* src = stage + rr * kS + c;
    T* dst = first + rr * D + c;
    if (wide) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {  // pairs of elements (D is even), 4 or 8 bytes as store_rows stores them
      using Pair = std::conditional_t<std::is_same_v<T, float>, uint2, uint32_t>;
#pragma unroll
      for (int k = 0; k < kCE; k += 2) {
        if (c + k < D) *reinterpret_cast<Pair*>(dst + k) = *reinterpret_cast<const Pair*>(src + k);
      }
    }
  }
}

}  // namespace logn_tiles
}  // namespace kexue
