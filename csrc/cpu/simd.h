// Helpers for CPU loops that the compiler vectorizes.
//
// Wheels are built for the baseline x86-64 target (no -march=native), so hot loops are compiled
// several times with GCC/Clang function multiversioning (target_clones) and the loader picks the
// widest version the processor supports (AVX-512, AVX2+FMA, baseline SSE2). Only our own
// functions carry the attribute, and everything they call is inlined, so no library code is ever
// built for a wider target than the machine has.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(KEXUE_NO_CLONES)
#define KEXUE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KEXUE_CPU_CLONES
#endif

namespace kexue {
namespace cpu {

// exp(x) = 2^k * exp(r), x = k ln2 + r with |r| <= ln2/2: the range reduction and the degree-6
// polynomial for exp(r) (the classic Cephes expf coefficients) shared by the two exps below.
// Returns exp(r) and sets k; xc must already be clamped to the caller's range.
inline float exp_reduced(float xc, float& k) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;  // ln 2 split in two for an exact k*ln2 subtraction
  const float kLn2Lo = -2.12194440e-4f;
  k = __builtin_floorf(xc * kLog2e + 0.5f);
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// 2^k for an integral float k in [-126, 127], from the exponent bits.
inline float pow2_bits(int32_t k) {
  const int32_t bits = (k + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return s;
}

// Outside [lo, hi]: 0 below, +inf above; NaN stays NaN.
inline float exp_edges(float x, float y, float lo, float hi) {
  y = x < lo ? 0.0f : y;
  y = x > hi ? __builtin_inff() : y;
  return x != x ? x : y;
}

// exp(x) for float, written so that a loop calling it vectorizes (no calls, no branches).
// Within 2 ulp of std::exp for x in [-87.3, 88.7]; below that the result is flushed to +0 (the
// true value is a denormal, below 1.2e-38), above it it is +inf; exp(-inf) = 0 and exp(NaN) = NaN.
inline float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  float k;
  const float er = exp_reduced(x < lo ? lo : (x > hi ? hi : x), k);
  // 2^k as the product of two powers 2^k1 * 2^k2 with k1, k2 in [-63, 64]: k itself spans
  // [-126, 128], which one normal float cannot hold at both ends.
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;
  return exp_edges(x, er * pow2_bits(k1) * pow2_bits(ki - k1), lo, hi);
}

// exp(x) for a softmax's x = s - max (or s - lse), x <= 0 up to rounding: as fast_exp with 2^k
// built from one exponent field (one multiply less), valid for x in [-87.3, 88.0].
inline float softmax_exp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float k;
  const float er = exp_reduced(x < lo ? lo : (x > hi ? hi : x), k);
  return exp_edges(x, er * pow2_bits(static_cast<int32_t>(k)), lo, hi);
}

// log(x) for float, vectorizable like fast_exp. x = 2^e * m with m in [sqrt(1/2), sqrt(2)), then
// log(m) from the Cephes logf polynomial in (m - 1). log(0) = -inf, log(x < 0) = NaN,
// log(inf) = inf, log(NaN) = NaN; denormal inputs are scaled by 2^23 first. Within 2 ulp.
inline float fast_log(float x) {
  const bool denormal = x < 1.17549435e-38f;
  const float xs = denormal ? x * 8388608.0f : x;  // 2^23
  int32_t bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  const float f = small ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(denormal ? e - 23 : e);
  float y = p * f * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  y = f + y;
  y += 0.693359375f * fe;
  y = x == 0.0f ? -__builtin_inff() : y;
  y = x == __builtin_inff() ? x : y;
  return (x < 0.0f || x != x) ? __builtin_nanf("") : y;
}

}  // namespace cpu
}  // namespace kexue
