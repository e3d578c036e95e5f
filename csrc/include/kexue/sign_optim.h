// Sign optimizers (Lion, Tiger): the per-element arithmetic and the step table shared by the CPU
// and CUDA kernels. The table layout is defined once in python/kexue/_sign_table.py; this header
// spells the same numbers for C++ (tests/sign_optim/test_table.py checks that they agree). The
// oracle is python/kexue/reference/sign_optim.py; python/kexue/optim/_sign_base.py fills the table.
//
// One fused step updates a list of tensors. Each tensor i has a row of doubles and a row of
// int64s in two (T, kNumFloats) / (T, kNumInts) tables, so that one call can serve every param
// group: Lion and Tiger are the same element update with different coefficients,
//
//   g' = g * gscale                   gscale: -1 for maximize, 1/p for ChildTuning, 0 where masked
//   m' = m_m * m + m_g * g'           Lion: (beta2, 1 - beta2); Tiger: (b1, b2) of its accumulation rule
//   c  = Tiger ? m' : c_m * m + c_g * g'    Lion: (beta1, 1 - beta1), from the OLD momentum
//   theta' = theta * (1 - lr*wd) - lr * sign(c)      only where the element may move
//
// lr is the table's lr times RMS(theta) (whole tensor, or per row) when Tiger asks for it. A
// tensor flagged by the NaN guard instead keeps m and shrinks theta towards a centre.
//
// Capturable mode: a row flagged kDynamic takes the values that change from step to step (lr,
// Tiger's momentum coefficient and update switch, the gradient scale with GradScaler's 1/scale,
// GradScaler's skip flag, the keys of the random bits) from a third table, a (T, kNumDyn) float64
// tensor on the tensors' device, computed there by torch ops. The host tables then stay the same
// from step to step and nothing the host decides depends on a device value: no synchronisation,
// and the step can be captured in a CUDA graph. The host-side table handling is in
// sign_optim_host.h.
#pragma once

#include "kexue/ieee_float.h"
#include "kexue/macros.h"

#include <cstdint>
#include <cstring>

namespace kexue {
namespace sign_optim {

// Columns of the float table (doubles; the kernels round them to float32 once per tensor).
enum FloatSlot : int {
  kLr = 0,      // learning rate before any RMS factor (0 on Tiger's accumulation micro-steps)
  kWd = 1,      // decoupled weight decay lambda
  kCm = 2,      // coefficient of the old momentum in c (Lion)
  kCg = 3,      // coefficient of the gradient in c (Lion)
  kMm = 4,      // coefficient of the old momentum in the new momentum
  kMg = 5,      // coefficient of the gradient in the new momentum
  kGscale = 6,  // multiplier of every kept gradient element (sign: maximize; 1/p: ChildTuning)
  kShrink = 7,  // NaN guard: theta <- (theta - centre) * shrink + centre
  kCentre = 8,
  kNumFloats = 9,
};

// Columns of the int table.
enum IntSlot : int {
  kFlags = 0,
  kNanGroup = 1,       // -1: no NaN guard; tensors sharing a group id share one "found NaN" flag
  kRowLen = 2,         // elements per row (last dimension) for row-wise RMS / lazy rows, else 0
  kMaskK0 = 3,         // ChildTuning-F: keys of the counter-based hash, and the keep threshold
  kMaskK1 = 4,
  kMaskThreshold = 5,  // keep an element iff (bits >> 8) < threshold, threshold = round(p * 2^24)
  kRoundK0 = 6,        // stochastic rounding of bfloat16 params: keys of the hash
  kRoundK1 = 7,
  kNumInts = 8,
};

enum Flag : int64_t {
  kUseNewMomentum = 1 << 0,  // Tiger: the direction is sign(m'), not sign(c)
  kUpdate = 1 << 1,          // theta is stepped by this call (Tiger skips it on accumulation micro-steps)
  kRmsTensor = 1 << 2,       // lr *= RMS(theta) over the whole tensor
  kRmsRow = 1 << 3,          // lr *= RMS(theta) over each row
  kLazyRows = 1 << 4,        // embedding-drift guard: rows whose gradient is all zero do not move
  kFreezeAbsent = 1 << 5,    // ... and keep their momentum too
  kMaskF = 1 << 6,           // ChildTuning-F: Bernoulli(p) gradient mask from the hash
  kMaskD = 1 << 7,           // ChildTuning-D: fixed mask tensor
  kMaskUpdate = 1 << 8,      // masked elements are not stepped either (they never move)
  kStochasticRound = 1 << 9, // bfloat16 params are stored with stochastic rounding
  kShrinkNow = 1 << 10,       // NaN guard decided on the host (sharded tensors): shrink this call
  kDynamic = 1 << 11,         // the DynSlot values come from the dynamic table (capturable mode)
  // One-pass Tiger: the tensor's float64 ssq buffer (one value, or one per row with kRmsRow)
  // holds the sum of squares of theta as the previous call left it; the RMS factor is read from
  // it instead of from a pre-pass over theta ...
  kRmsCarried = 1 << 12,
  // ... and after the call it holds the sum of squares of theta as stored now (computed while
  // theta is written, or read where this call does not write theta and nothing was carried).
  kSsqOut = 1 << 13,
};

// Columns of the dynamic table (float64; the keys are uint32 values, exact in a double).
enum DynSlot : int {
  kDLr = 0,       // replaces kLr
  kDMm = 1,       // replaces kMm
  kDGscale = 2,   // replaces kGscale
  kDUpdate = 3,   // 0: clears kUpdate for this step (Tiger's accumulation micro-steps)
  kDSkip = 4,     // nonzero: the row is left untouched (GradScaler found an inf/NaN)
  kDMaskK0 = 5,   // replace kMaskK0 / kMaskK1 / kRoundK0 / kRoundK1 (the keys follow the step)
  kDMaskK1 = 6,
  kDRoundK0 = 7,
  kDRoundK1 = 8,
  kNumDyn = 9,
};

// The scalar columns of one table row, decoded once per call by the CPU and CUDA hosts. The
// coefficients are rounded to float32 here, once per tensor; lr and wd stay double because the
// decay 1 - lr*wd is formed in double after any RMS factor.
struct TableRow {
  int64_t flags, nan_group, row_len;
  double lr, wd;
  float c_m, c_g, m_m, m_g, gscale, shrink, centre;
  uint32_t mask_k0, mask_k1, mask_threshold, round_k0, round_k1;
  bool skip;  // set from the dynamic table only
};

KEXUE_HOST_DEVICE bool has(const TableRow& r, int64_t flag) { return (r.flags & flag) != 0; }

// Whether the tensor is updated row by row (per-row RMS or lazy rows of an embedding table).
KEXUE_HOST_DEVICE bool by_rows(const TableRow& r) { return r.row_len > 0 && has(r, kRmsRow | kLazyRows); }

// Whether the tensor's sums of squares (carried ones included) are one per row, else one in all.
KEXUE_HOST_DEVICE bool per_row_sums(const TableRow& r) { return by_rows(r) && has(r, kRmsRow); }

inline TableRow decode_row(const double* h, const int64_t* i) {
  TableRow r{};  // zeroed, padding included: a row's bytes are a cache key on CUDA
  r.flags = i[kFlags];
  r.nan_group = i[kNanGroup];
  r.row_len = i[kRowLen];
  r.lr = h[kLr];
  r.wd = h[kWd];
  r.c_m = static_cast<float>(h[kCm]);
  r.c_g = static_cast<float>(h[kCg]);
  r.m_m = static_cast<float>(h[kMm]);
  r.m_g = static_cast<float>(h[kMg]);
  r.gscale = static_cast<float>(h[kGscale]);
  r.shrink = static_cast<float>(h[kShrink]);
  r.centre = static_cast<float>(h[kCentre]);
  r.mask_k0 = static_cast<uint32_t>(i[kMaskK0]);
  r.mask_k1 = static_cast<uint32_t>(i[kMaskK1]);
  r.mask_threshold = static_cast<uint32_t>(i[kMaskThreshold]);
  r.round_k0 = static_cast<uint32_t>(i[kRoundK0]);
  r.round_k1 = static_cast<uint32_t>(i[kRoundK1]);
  r.skip = false;
  return r;
}

// The values of a kDynamic row for this step, from its row `d` of the dynamic table. The host
// applies it on CPU (where the table is host memory); on CUDA every kernel applies it on device.
// Rounded as decode_row rounds the host table, so a dynamic row computes the same bits.
KEXUE_HOST_DEVICE void apply_dynamic(TableRow& r, const double* d) {
  r.lr = d[kDLr];
#ifdef __CUDA_ARCH__
  r.m_m = ieee::narrow(d[kDMm]);  // the cast below, without the device's flush to zero
  r.gscale = ieee::narrow(d[kDGscale]);
#else
  r.m_m = static_cast<float>(d[kDMm]);
  r.gscale = static_cast<float>(d[kDGscale]);
#endif
  if (d[kDUpdate] == 0.0) r.flags &= ~static_cast<int64_t>(kUpdate);
  r.skip = d[kDSkip] != 0.0;
  r.mask_k0 = static_cast<uint32_t>(d[kDMaskK0]);
  r.mask_k1 = static_cast<uint32_t>(d[kDMaskK1]);
  r.round_k0 = static_cast<uint32_t>(d[kDRoundK0]);
  r.round_k1 = static_cast<uint32_t>(d[kDRoundK1]);
}

// ---------------------------------------------------------------------------------------------
// Counter-based random bits: a pure function of (key, element index), so masks and rounding are
// reproducible and independent of threads, chunking and device. The keys come from the host
// (splitmix64 of seed, parameter index, step and stream; see the reference).

// "lowbias32" integer hash (C. Wellons): a bijection on 32 bits with good avalanche.
KEXUE_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

KEXUE_HOST_DEVICE uint32_t element_bits(uint32_t k0, uint32_t k1, uint64_t index) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(index >> 32);
  return mix32(mix32(lo ^ k0) ^ hi ^ k1);
}

// ChildTuning-F keeps an element with probability threshold / 2^24.
KEXUE_HOST_DEVICE bool keep_element(uint32_t bits, uint32_t threshold) { return (bits >> 8) < threshold; }

// ---------------------------------------------------------------------------------------------
// bfloat16 storage as raw bits (the CPU and CUDA code share one definition of rounding).

KEXUE_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

KEXUE_HOST_DEVICE float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Round to nearest even (as torch's .to(torch.bfloat16)); NaN stays a quiet NaN.
KEXUE_HOST_DEVICE uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#ifdef __CUDA_ARCH__
  return ieee::is_nan(x) ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
#else
  return x != x ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
#endif
}

// Stochastic rounding: add 16 random bits below the kept mantissa and truncate, so x rounds up
// with probability equal to its distance from the lower neighbour. Unbiased: E[round(x)] = x.
KEXUE_HOST_DEVICE uint16_t float_to_bf16_bits_stochastic(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t finite = (u & 0x7f800000u) != 0x7f800000u;
  const uint32_t rounded = (u + (bits & 0xffffu)) >> 16;
  return finite ? static_cast<uint16_t>(rounded) : float_to_bf16_bits(x);
}

// ---------------------------------------------------------------------------------------------
// The element update. On the device each formula is spelled with kexue/ieee_float.h, which keeps
// subnormals under --use_fast_math, contracted as the host compiler contracts the host expression.

// sign(0) = 0 (a zero interpolation gives no step), sign(+-inf) = +-1, and NaN stays NaN so that
// a diverged momentum shows up in the parameters instead of being silently ignored (the rule of
// every backend; torch.sign(NaN) is 0, so the torch backend spells it out).
KEXUE_HOST_DEVICE float sign_of(float c) {
#ifdef __CUDA_ARCH__
  return ieee::positive(c) ? 1.f : (ieee::negative(c) ? -1.f : c);
#else
  return c > 0.f ? 1.f : (c < 0.f ? -1.f : c);
#endif
}

// Coefficients of one tensor (or one row, when the RMS factor is per row), rounded to float32.
struct Coefs {
  float lr;     // lr including the RMS factor
  float decay;  // 1 - lr * wd, formed in double before rounding
  float c_m, c_g, m_m, m_g;
};

// New momentum from the (already scaled/masked) gradient.
KEXUE_HOST_DEVICE float new_momentum(float m, float g, const Coefs& k) {
#ifdef __CUDA_ARCH__
  return ieee::fma(k.m_m, m, ieee::mul(k.m_g, g));
#else
  return k.m_m * m + k.m_g * g;
#endif
}

// Direction of the step: Lion interpolates the OLD momentum with the gradient; Tiger uses m'.
KEXUE_HOST_DEVICE float direction(float m, float m_new, float g, const Coefs& k, bool use_new_momentum) {
#ifdef __CUDA_ARCH__
  return sign_of(use_new_momentum ? m_new : ieee::fma(k.c_m, m, ieee::mul(k.c_g, g)));
#else
  return sign_of(use_new_momentum ? m_new : k.c_m * m + k.c_g * g);
#endif
}

// Decoupled weight decay from theta_{t-1} and the sign step: theta (1 - lr wd) - lr sign(c),
// the order of the official Lion code (decay first).
KEXUE_HOST_DEVICE float stepped(float theta, float s, const Coefs& k) {
#ifdef __CUDA_ARCH__
  return ieee::fms(theta, k.decay, ieee::mul(k.lr, s));
#else
  return theta * k.decay - k.lr * s;
#endif
}

// What Tiger's NaN guard looks for in a gradient: NaN or +-inf (the exponent all ones). On the
// bits, so that no fast-math flag can fold the test away.
KEXUE_HOST_DEVICE bool non_finite(float x) { return (float_bits(x) & 0x7f800000u) == 0x7f800000u; }

// Tiger's NaN guard: momentum untouched, theta pulled towards the centre (1 for norm gains).
KEXUE_HOST_DEVICE float nan_shrink(float theta, float shrink, float centre) {
#ifdef __CUDA_ARCH__
  return ieee::fma(ieee::sub(theta, centre), shrink, centre);
#else
  return (theta - centre) * shrink + centre;
#endif
}

}  // namespace sign_optim
}  // namespace kexue
