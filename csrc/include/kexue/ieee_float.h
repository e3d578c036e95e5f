// Float32 arithmetic that keeps subnormals in CUDA code built with --use_fast_math.
//
// setup.py compiles every .cu file with --use_fast_math, which implies -ftz=true: every float32
// add, multiply, fused multiply-add, comparison and float/double conversion the compiler emits
// flushes subnormal inputs and results to zero (FADD.FTZ, FFMA.FTZ, FSETP.*.FTZ ... in SASS). The
// C++ CPU kernels and the torch reference keep subnormals. Kernels whose results must equal the
// CPU's to the bit (the sign-optimizer step) do their float32 arithmetic through these functions
// instead of the operators. On the host they are the plain operators, so a CPU kernel compiles to
// exactly what it did before; on the device they are spelled with operations that ignore -ftz:
//
//   fma(a, b, c)  __fmaf_ieee_rn: fma.rn.f32, the one float32 intrinsic documented to ignore -ftz
//   mul(a, b)     fma(a, b, -0): a * b + (-0) is a * b rounded once, the sign of a zero product kept
//   add(a, b)     fma(a, 1, b): a * 1 is exact
//   sub(a, b)     fma(b, -1, a);  fms(a, b, c): fma(a, b, -c), with -c a neg.f32 in inline PTX
//   is_nan, nonzero, positive, negative: on the bits (a comparison instruction would flush too)
//   widen, narrow: cvt.f64.f32 / cvt.rn.f32.f64 in inline PTX, without .ftz
//
// ptxas keeps a .rn operation as it is written: it never contracts it with another, so fma() is
// the only fusing on the device. The host expressions are contracted by the C++ compiler as the
// build allows (GCC fuses a * b + c in the FMA-capable CPU clones): write fma(a, b, mul(c, d))
// where the host writes a * b + c * d, the form GCC and ptxas both contract that expression to.
// .ci/sass_counts.py --sign-optim fails if a sign-optimizer kernel holds an .FTZ instruction.
#pragma once

#include <cstdint>
#include <cstring>

#include "kexue/macros.h"

namespace kexue {
namespace ieee {

KEXUE_HOST_DEVICE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

KEXUE_HOST_DEVICE float fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_ieee_rn(a, b, c);
#else
  return a * b + c;
#endif
}

KEXUE_HOST_DEVICE float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmaf_ieee_rn(a, b, -0.0f);
#else
  return a * b;
#endif
}

KEXUE_HOST_DEVICE float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmaf_ieee_rn(a, 1.0f, b);
#else
  return a + b;
#endif
}

KEXUE_HOST_DEVICE float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmaf_ieee_rn(b, -1.0f, a);
#else
  return a - b;
#endif
}

KEXUE_HOST_DEVICE bool is_nan(float x) {
#ifdef __CUDA_ARCH__
  return (bits_of(x) & 0x7fffffffu) > 0x7f800000u;
#else
  return x != x;
#endif
}

// x > 0 and x < 0, false for zeros and NaN (subnormals included on the device).
KEXUE_HOST_DEVICE bool positive(float x) {
#ifdef __CUDA_ARCH__
  const uint32_t u = bits_of(x);
  return u != 0u && u <= 0x7f800000u;
#else
  return x > 0.f;
#endif
}

KEXUE_HOST_DEVICE bool negative(float x) {
#ifdef __CUDA_ARCH__
  const uint32_t u = bits_of(x);
  return u > 0x80000000u && u <= 0xff800000u;
#else
  return x < 0.f;
#endif
}

// a * b - c (the host contracts the expression a * b - c * d to fms(a, b, mul(c, d))).
KEXUE_HOST_DEVICE float fms(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  float minus_c;  // the operator would be neg.ftz.f32; this one ptxas folds into the FFMA's operand
  asm("neg.f32 %0, %1;" : "=f"(minus_c) : "f"(c));
  return __fmaf_ieee_rn(a, b, minus_c);
#else
  return a * b - c;
#endif
}

// x != 0, true for NaN.
KEXUE_HOST_DEVICE bool nonzero(float x) {
#ifdef __CUDA_ARCH__
  return (bits_of(x) & 0x7fffffffu) != 0u;
#else
  return x != 0.f;
#endif
}

// Exact widening, and narrowing rounded to nearest (the compiler's conversions flush subnormals).
KEXUE_HOST_DEVICE double widen(float x) {
#ifdef __CUDA_ARCH__
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
#else
  return x;
#endif
}

KEXUE_HOST_DEVICE float narrow(double x) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(x));
  return f;
#else
  return static_cast<float>(x);
#endif
}

}  // namespace ieee
}  // namespace kexue
