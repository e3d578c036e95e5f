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

// exp(x) for float, written so that a loop calling it vectorizes (no calls, no branches).
// Range reduction x = k ln2 + r with |r| <= ln2/2 and a degree-6 polynomial for exp(r) (the
// classic Cephes expf coefficients), then 2^k built from the exponent bits. Within 2 ulp of
// std::exp for x in [-87.3, 88.7]; below that the result is flushed to +0 (the true value is a
// denormal, below 1.2e-38), above it it is +inf; exp(-inf) = 0 and exp(NaN) = NaN.
inline float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;        // ln 2 split in two for an exact k*ln2 subtraction
  const float kLn2Lo = -2.12194440e-4f;
  const float lo_limit = -87.33654f;
  const float hi_limit = 88.72283f;
  const float xc = x < lo_limit ? lo_limit : (x > hi_limit ? hi_limit : x);
  const float k = __builtin_floorf(xc * kLog2e + 0.5f);
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  // 2^k as the product of two powers 2^k1 * 2^k2 with k1, k2 in [-63, 64], each built from its
  // exponent bits: k itself spans [-126, 128], which one normal float cannot hold at both ends.
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;
  const int32_t bits1 = (k1 + 127) << 23;
  const int32_t bits2 = (ki - k1 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &bits1, sizeof(s1));
  std::memcpy(&s2, &bits2, sizeof(s2));
  float y = er * s1 * s2;
  y = x < lo_limit ? 0.0f : y;
  y = x > hi_limit ? __builtin_inff() : y;
  return x != x ? x : y;
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
