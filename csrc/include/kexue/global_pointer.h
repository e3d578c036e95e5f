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
// The math: kexue.fm/archives/8373, 8877, 7359; python/kexue/reference/global_pointer.py is the oracle.
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

// Rotation of one pair (xa, xb) by the angle whose cosine and sine are (ca, sa): R x.
template <typename A>
KEXUE_HOST_DEVICE void rope_rotate(A xa, A xb, A ca, A sa, A* oa, A* ob) {
  *oa = xa * ca - xb * sa;
  *ob = xb * ca + xa * sa;
}

// The transpose (= inverse) rotation R^T g: the gradient through rope_rotate.
template <typename A>
KEXUE_HOST_DEVICE void rope_unrotate(A ga, A gb, A ca, A sa, A* oa, A* ob) {
  *oa = ga * ca + gb * sa;
  *ob = gb * ca - ga * sa;
}

// Whether span (i, j) is a candidate: both tokens real and, with the tril mask, i <= j.
KEXUE_HOST_DEVICE bool span_ok(bool row_ok, bool col_ok, long long i, long long j, bool tril) {
  return row_ok && col_ok && (!tril || j >= i);
}

// dL/ds of the multilabel loss at one candidate span of score s, for the loss gradient g of its
// (batch, type) and the saved lse_neg / lse_pos: g e^{s - lse_neg} for a negative span,
// -g e^{-s - lse_pos} for a positive one.
template <typename A>
KEXUE_HOST_DEVICE A negative_grad(A s, A g, A lse_neg) {
  return g * ::exp(s - lse_neg);
}
template <typename A>
KEXUE_HOST_DEVICE A positive_grad(A s, A g, A lse_pos) {
  return -g * ::exp(-s - lse_pos);
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
