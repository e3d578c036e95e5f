// GlobalPointer: the arithmetic shared by the CPU and CUDA kernels.
//
// Span scores s(i, j) = <R_i q_i, R_j k_j> / sqrt(d) + start_bias(i) + end_bias(j), masked to -inf
// at padding and (tril) where i > j. The multilabel categorical cross-entropy of one (batch, type):
//
//   loss = log(1 + sum_{neg} e^{s}) + log(1 + sum_{pos} e^{-s}) = lse_neg + lse_pos
//
// is computed without the L x L score matrix: rows of scores are produced block by block and each
// sum is kept as an online log-sum-exp state (m, s) meaning e^m * s. The implicit "1 +" (an extra
// logit 0) is added once, at the end (finish_lse), so that partial states merge freely.
// Backward, with g the gradient of the loss of (b, t):
//
//   dL/ds = g * e^{s - lse_neg}  at negatives,   -g * e^{-s - lse_pos}  at positives,   0 masked.
//
// See shared/spec/global_pointer.md and python/kexue/reference/global_pointer.py (the oracle).
#pragma once

#include "kexue/macros.h"

#include <cmath>

namespace kexue {
namespace global_pointer {

// Rotary layouts, as the `rope` argument of the kernels.
enum RopeLayout : int { kRopeNone = 0, kRopeInterleaved = 1, kRopeHalf = 2 };

// Channels (a, b) of rotary pair c in a head of size d.
KEXUE_HOST_DEVICE void rope_pair(int layout, long long c, long long d, long long* a, long long* b) {
  if (layout == kRopeHalf) {
    *a = c;
    *b = c + d / 2;
  } else {
    *a = 2 * c;
    *b = 2 * c + 1;
  }
}

// Angle of pair c at position p: p * base^(-2c/d), in double on every backend so that the CPU,
// the GPU and the float64 reference rotate by the same angle.
KEXUE_HOST_DEVICE double rope_angle(long long p, long long c, long long d, double base) {
  return static_cast<double>(p) * ::pow(base, -2.0 * static_cast<double>(c) / static_cast<double>(d));
}

// An online log-sum-exp: the sum e^m * s over the terms seen so far (m = -inf, s = 0: none).
template <typename A>
struct LseState {
  A m;
  A s;
};

template <typename A>
KEXUE_HOST_DEVICE LseState<A> lse_empty() {
  return {static_cast<A>(-INFINITY), A(0)};
}

// Merges the state (m2, s2) into *st. Either may be empty; an empty one changes nothing.
template <typename A>
KEXUE_HOST_DEVICE void lse_merge(LseState<A>* st, A m2, A s2) {
  if (!(s2 > A(0))) return;
  if (!(st->s > A(0))) {
    st->m = m2;
    st->s = s2;
    return;
  }
  if (m2 > st->m) {
    st->s = st->s * ::exp(st->m - m2) + s2;
    st->m = m2;
  } else {
    st->s += s2 * ::exp(m2 - st->m);
  }
}

// log(1 + e^m * s): the sum with the implicit extra logit 0, computed without overflow.
template <typename A>
KEXUE_HOST_DEVICE A finish_lse(LseState<A> st) {
  if (!(st.s > A(0))) return A(0);
  const A top = st.m > A(0) ? st.m : A(0);
  return top + ::log(::exp(-top) + st.s * ::exp(st.m - top));
}

}  // namespace global_pointer
}  // namespace kexue
