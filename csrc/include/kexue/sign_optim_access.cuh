// Sign optimizers on CUDA: how the step's kernels read and write the tensors' elements.
//
// Every sweep over a tensor goes in groups of kGroup consecutive elements (sign_optim_plan.h): a
// thread (or a lane, for a row) takes groups first, first + stride, ... and handles the elements
// of each group in order. A full group of a vectorizable tensor (Item::vec) moves as 128-bit
// accesses -- 16 bytes of a 16-bit array, two times 16 bytes of a float32 one, 8 bytes of a mask;
// any other group (a tensor at an unaligned address, the last group of a tensor or item whose
// length is not a multiple of kGroup) element by element. The element arithmetic and the order in
// which a thread visits the elements are the same either way, so a vectorizable tensor and an
// unaligned copy of it give the same bits, sums of squares included.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kexue/sign_optim.h"
#include "kexue/sign_optim_host.h"
#include "kexue/sign_optim_plan.h"

namespace kexue {
namespace sign_optim {

constexpr int kGroupN = static_cast<int>(kGroup);

// The tensors' addresses come from the jobs array, not from kernel arguments, so the compiler
// cannot tell that they point to global memory and would emit generic accesses (LD/ST, which
// resolve the address space at run time); the assumption lets it emit LDG/STG.
__device__ __forceinline__ void assume_global(const void* p) { __builtin_assume(__isGlobal(p)); }

// p, known to point to global memory (only where p is dereferenced: null is not global).
template <typename T>
__device__ __forceinline__ T* global(T* p) {
  assume_global(p);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Vector accesses: N values of T as words of min(16, N * sizeof(T)) bytes, p aligned to one word.

template <int Bytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};

template <int N, typename T>
struct Words {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static constexpr int kWord = kBytes < 16 ? kBytes : 16;
  static_assert(kBytes % kWord == 0, "a group must be whole words");
  static constexpr int kCount = kBytes / kWord;
  using W = typename Word<kWord>::type;
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  using V = Words<N, T>;
  typename V::W w[V::kCount];
  assume_global(p);
#pragma unroll
  for (int k = 0; k < V::kCount; ++k) w[k] = reinterpret_cast<const typename V::W*>(p)[k];
  memcpy(out, w, V::kBytes);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  using V = Words<N, T>;
  typename V::W w[V::kCount];
  memcpy(w, in, V::kBytes);
  assume_global(p);
#pragma unroll
  for (int k = 0; k < V::kCount; ++k) reinterpret_cast<typename V::W*>(p)[k] = w[k];
}

// ---------------------------------------------------------------------------------------------
// Storage types: float32, or the bits of a bfloat16 / float16.

template <int S>
using raw_t = std::conditional_t<S == kF32, float, uint16_t>;

template <int S>
__device__ __forceinline__ float to_float(raw_t<S> r) {
  if constexpr (S == kF32) {
    return r;
  } else if constexpr (S == kBF16) {
    return bf16_bits_to_float(r);
  } else {
    return __half2float(__ushort_as_half(r));
  }
}

// x rounded to storage S; bfloat16 stochastically when `stochastic`, with the random bits of
// element i under the keys (k0, k1).
template <int S>
__device__ __forceinline__ raw_t<S> from_float(float x, bool stochastic, uint32_t k0, uint32_t k1, int64_t i) {
  if constexpr (S == kF32) {
    return x;
  } else if constexpr (S == kBF16) {
    return stochastic ? float_to_bf16_bits_stochastic(x, element_bits(k0, k1, static_cast<uint64_t>(i)))
                      : float_to_bf16_bits(x);
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}

// ---------------------------------------------------------------------------------------------
// Groups. `Vec`: a full group of a vectorizable tensor (n == kGroup); otherwise elements [i, i + n)
// one by one, n <= kGroup (the rest of the arrays is left alone).

// The elements [i, i + n) of the array p of storage S, as floats (the rest of x: zeros).
template <int S, bool Vec>
__device__ __forceinline__ void load_group(const void* p, int64_t i, int n, float (&x)[kGroupN]) {
  const raw_t<S>* q = static_cast<const raw_t<S>*>(p) + i;
  raw_t<S> r[kGroupN];
  if constexpr (Vec) {
    load_vec(q, r);
  } else {
    assume_global(q);
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) r[e] = e < n ? q[e] : raw_t<S>{};
  }
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) x[e] = to_float<S>(r[e]);
}

// Stores x[e] at element i + e of the array p of storage S, for e < n, and leaves in x the values
// stored (rounded to S), whose squares a carried sum adds.
template <int S, bool Vec>
__device__ __forceinline__ void store_group(void* p, int64_t i, int n, float (&x)[kGroupN], bool stochastic,
                                            uint32_t k0, uint32_t k1) {
  raw_t<S>* q = static_cast<raw_t<S>*>(p) + i;
  raw_t<S> r[kGroupN];
#pragma unroll
  for (int e = 0; e < kGroupN; ++e) {
    r[e] = from_float<S>(x[e], stochastic, k0, k1, i + e);
    x[e] = to_float<S>(r[e]);
  }
  if constexpr (Vec) {
    store_vec(q, r);
  } else {
    assume_global(q);
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) {
      if (e < n) q[e] = r[e];
    }
  }
}

// The bytes [i, i + n) of a mask (the rest of b: zeros).
template <bool Vec>
__device__ __forceinline__ void load_bytes(const uint8_t* p, int64_t i, int n, uint8_t (&b)[kGroupN]) {
  if constexpr (Vec) {
    load_vec(p + i, b);
  } else {
    assume_global(p);
#pragma unroll
    for (int e = 0; e < kGroupN; ++e) b[e] = e < n ? p[i + e] : uint8_t{0};
  }
}

// Calls f(vec, i, n) for the groups [i, i + n) of [begin, end) that sweeper `first` of `stride`
// takes, in order; vec is std::true_type for a full group of a vectorizable range (`vectorizable`:
// begin and every array group-aligned), else std::false_type. Every caller that forms a sum of
// squares sweeps with this function, so the pre-pass, the step and the row sweeps visit the
// elements of a thread in one order.
template <typename F>
__device__ __forceinline__ void for_groups(int64_t begin, int64_t end, int first, int stride, bool vectorizable,
                                           F&& f) {
  for (int64_t i = begin + static_cast<int64_t>(first) * kGroup; i < end; i += static_cast<int64_t>(stride) * kGroup) {
    const int64_t left = end - i;
    if (vectorizable && left >= kGroup) {
      f(std::true_type{}, i, kGroupN);
    } else {
      f(std::false_type{}, i, static_cast<int>(left < kGroup ? left : kGroup));
    }
  }
}

}  // namespace sign_optim
}  // namespace kexue
