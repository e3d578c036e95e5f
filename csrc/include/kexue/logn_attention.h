// Log-n attention: the per-query scale, shared by the CPU and CUDA kernels.
//
// A query sees n keys (csrc/cpu/logn_attention.cpp and python/kexue/reference/logn_attention.py
// say which); its softmax scale is base * ln(max(n, min_n, 1)) / ln(train_len), clipped below at
// base when `clip`, or just base when log-n is off; the "gradmax" rule replaces it by
// alpha*(n) / sqrt(d) with exp(alpha^2) (1 + 2 alpha^2) = n (docs/logn_attention.md, "The math").
#pragma once

#include <cmath>
#include <cstdint>

#include "kexue/macros.h"

namespace kexue {
namespace logn_attention {

// The scale rule of one call, in double; the kernels evaluate it per row in their compute type.
struct ScaleRule {
  double base;           // 1/sqrt(d) unless the caller gave a scale
  double inv_log_train;  // 1 / ln(train_len)
  double min_n;          // n is clamped to >= max(1, min_n) before the logarithm
  double inv_sqrt_d;     // for gradmax
  bool logn;
  bool clip;
  bool gradmax;
};

// The rule of a call from the op's arguments (host side).
inline ScaleRule make_rule(int64_t head_dim, double scale, double train_len, bool logn, bool clip, double min_n,
                           bool gradmax) {
  ScaleRule r;
  r.base = scale;
  r.inv_log_train = 1.0 / std::log(train_len);
  r.min_n = min_n;
  r.inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(head_dim));
  r.logn = logn;
  r.clip = clip;
  r.gradmax = gradmax;
  return r;
}

// How many keys query i (0-based, of lq) may see, from `prefix`: prefix[j] is the number of
// unpadded keys among the first j (prefix[0] = 0, prefix[lk] = all); nullptr when no key is
// padded (prefix[j] = j). A causal query sits at absolute position i + lk - lq (after a KV cache
// of lk - lq keys) and sees keys 0 .. that position; a query before the first key (lq > lk) sees
// none. For packed sequences, i, lq and lk are those of the query's own sequence.
KEXUE_HOST_DEVICE int64_t visible_keys(int64_t i, int64_t lq, int64_t lk, bool causal, const int64_t* prefix) {
  int64_t last = lk;  // one past the last visible key
  if (causal) {
    last = i + lk - lq + 1;
    last = last < 0 ? 0 : (last > lk ? lk : last);
  }
  return prefix == nullptr ? last : prefix[last];
}

// alpha*(n): root of x + log(1 + 2x) = log n in x = alpha^2, by Newton from x = 0. The function
// is increasing and concave, so the iterates rise monotonically to the root; 30 steps reach it
// to rounding for any n a float can count.
template <typename A>
KEXUE_HOST_DEVICE A gradmax_alpha(A n) {
  using std::log;
  using std::sqrt;
  const A log_n = log(n < A(1) ? A(1) : n);
  A x = A(0);
  for (int it = 0; it < 30; ++it) {
    const A f = x + log(A(1) + A(2) * x) - log_n;
    x -= f / (A(1) + A(2) / (A(1) + A(2) * x));
  }
  return sqrt(x);
}

// The softmax scale of a query that sees n keys.
template <typename A>
KEXUE_HOST_DEVICE A row_scale(int64_t n, const ScaleRule& rule) {
  using std::log;
  const A lo = rule.min_n > 1.0 ? A(rule.min_n) : A(1);
  A nn = static_cast<A>(n);
  nn = nn < lo ? lo : nn;
  if (rule.gradmax) return gradmax_alpha(nn) * A(rule.inv_sqrt_d);
  if (!rule.logn) return A(rule.base);
  A factor = log(nn) * A(rule.inv_log_train);
  if (rule.clip) factor = factor < A(1) ? A(1) : factor;
  return A(rule.base) * factor;
}

}  // namespace logn_attention
}  // namespace kexue
