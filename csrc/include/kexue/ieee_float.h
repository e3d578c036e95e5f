// Float32 arithmetic that keeps subnormals in CUDA code built with --use_fast_math.
//
// setup.py compiles every .cu file with --use_fast_math, which implies -ftz=true: every float32
// add, multiply, fused multiply-add, comparison, negation and float/double conversion the
// compiler emits flushes subnormal inputs and results to zero (FADD.FTZ, FFMA.FTZ, FSETP.GT.FTZ
// ... in SASS). The C++ CPU kernels and the torch reference keep subnormals. Device code whose
// results must equal the CPU's to the bit (the sign-optimizer step) does its float32 arithmetic
// through these functions instead of the operators; each is spelled with operations that ignore
// -ftz:
//
//   fma(a, b, c)  __fmaf_ieee_rn: fma.rn.f32, the float32 intrinsic documented to ignore -ftz
//   mul(a, b)     fma(a, b, -0): a * b + (-0) is a * b rounded once, the sign of a zero product kept
//   add(a, b)     fma(a, 1, b): a * 1 is exact;  sub(a, b): fma(b, -1, a)
//   fms(a, b, c)  fma(a, b, -c), with -c a neg.f32 in inline PTX (ptxas folds it into the FFMA)
//   is_nan, nonzero, positive, negative: on the bits (a comparison instruction would flush too)
//   widen, narrow: cvt.f64.f32 / cvt.rn.f32.f64 in inline PTX, without .ftz
//
// ptxas keeps a .rn operation as it is written and never contracts it with another, so fma() is
// the only fusing: a formula states its contraction. Shared host/device formulas (sign_optim.h)
// keep their host expressions as they were and use these on the device only (#ifdef
// __CUDA_ARCH__), written as the host compiler contracts the host expression (GCC in the
// FMA-capable CPU clones: a * b + c * d -> fma(a, b, c * d), a * b - c * d -> fma(a, b, -(c * d))),
// which is also what ptxas did with them under -fmad=true.
// .ci/sass_counts.py --sign-optim fails if a sign-optimizer kernel holds an .FTZ instruction.
#pragma once

#ifdef __CUDACC__

#include <cstdint>

namespace kexue {
namespace ieee {

__device__ __forceinline__ uint32_t bits_of(float x) { return __float_as_uint(x); }

__device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_ieee_rn(a, b, c); }

__device__ __forceinline__ float mul(float a, float b) { return __fmaf_ieee_rn(a, b, -0.0f); }

__device__ __forceinline__ float add(float a, float b) { return __fmaf_ieee_rn(a, 1.0f, b); }

__device__ __forceinline__ float sub(float a, float b) { return __fmaf_ieee_rn(b, -1.0f, a); }

// a * b - c, rounded once.
__device__ __forceinline__ float fms(float a, float b, float c) {
  float minus_c;  // the operator would be neg.ftz.f32
  asm("neg.f32 %0, %1;" : "=f"(minus_c) : "f"(c));
  return __fmaf_ieee_rn(a, b, minus_c);
}

__device__ __forceinline__ bool is_nan(float x) { return (bits_of(x) & 0x7fffffffu) > 0x7f800000u; }

// x != 0 (true for NaN), x > 0, x < 0 (false for zeros and NaN), subnormals included.
__device__ __forceinline__ bool nonzero(float x) { return (bits_of(x) & 0x7fffffffu) != 0u; }

__device__ __forceinline__ bool positive(float x) {
  const uint32_t u = bits_of(x);
  return u != 0u && u <= 0x7f800000u;
}

__device__ __forceinline__ bool negative(float x) {
  const uint32_t u = bits_of(x);
  return u > 0x80000000u && u <= 0xff800000u;
}

// Exact widening, and narrowing rounded to nearest.
__device__ __forceinline__ double widen(float x) {
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
}

__device__ __forceinline__ float narrow(double x) {
  float f;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(x));
  return f;
}

}  // namespace ieee
}  // namespace kexue

#endif  // __CUDACC__
