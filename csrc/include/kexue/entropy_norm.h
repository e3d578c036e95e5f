// Entropy normalization: the per-row arithmetic shared by the CPU and CUDA kernels.
//
// A row z (logits, or log p for probabilities) is mapped to y = softmax(gamma * z) with gamma >= 0
// chosen so that the entropy of y equals a target H*. Rows are shifted by their maximum m, so
// u = z - m <= 0 and every exponential is at most 1. With e_i = exp(gamma * u_i):
//
//   s0 = sum e,  s1 = sum e*u,  s2 = sum e*u^2
//   H(gamma) = log s0 - gamma * s1/s0,    dH/dgamma = -gamma * Var_y(u)
//
// H decreases monotonically from log(#finite entries) at gamma = 0 to log(#entries equal to the
// maximum) as gamma -> inf. Targets at or beyond those ends are answered exactly (uniform over
// the support, or uniform over the maxima); everything in between is solved by Newton's method on
// gamma, safeguarded by a bracket so that a bad step falls back to doubling or bisection.
// See docs/entropy_norm.md and python/kexue/reference/entropy_norm.py (the oracle).
#pragma once

#include "kexue/macros.h"

#include <cmath>

namespace kexue {
namespace entropy_norm {

// How a row is solved.
enum RowKind : int {
  kNewton = 0,    // target strictly inside (log t, log s): solve for a finite gamma > 0
  kUniform = 1,   // target >= log s: gamma = 0, uniform over the finite entries
  kArgmax = 2,    // target <= log t: gamma = inf, uniform over the entries equal to the maximum
  kInvalid = 3,   // NaN in the row, or no finite entry: the output row is NaN
};

// support: number of finite entries; ties: number of entries equal to the row maximum.
// The two thresholds are compared in double on every backend, so that a target of exactly
// float(log n) lands in the same class on the CPU, in CUDA (where fast-math logf is approximate)
// and in the reference. A NaN target makes the row invalid.
template <typename T>
KEXUE_HOST_DEVICE int classify_row(T target, long long support, long long ties, bool has_nan) {
  const double t = static_cast<double>(target);
  if (has_nan || support == 0 || t != t) return kInvalid;
  if (t >= ::log(static_cast<double>(support))) return kUniform;
  if (t <= ::log(static_cast<double>(ties))) return kArgmax;
  return kNewton;
}

// State of the safeguarded Newton iteration for one row. The root lies in (lo, hi).
template <typename T>
struct NewtonState {
  T gamma;
  T lo;
  T hi;  // +inf until an iterate overshoots
  bool done;
};

template <typename T>
KEXUE_HOST_DEVICE NewtonState<T> newton_init() {
  // gamma = 1 is the input distribution itself: the natural first guess, and exact when the
  // row already has the target entropy.
  NewtonState<T> st;
  st.gamma = T(1);
  st.lo = T(0);
  st.hi = static_cast<T>(INFINITY);
  st.done = false;
  return st;
}

// Entropy and variance of y = softmax(gamma*u) from the three moment sums.
template <typename T>
KEXUE_HOST_DEVICE void entropy_and_variance(T s0, T s1, T s2, T gamma, T* entropy, T* variance) {
  const T mean = s1 / s0;
  *entropy = ::log(s0) - gamma * mean;
  const T var = s2 / s0 - mean * mean;
  *variance = var > T(0) ? var : T(0);
}

// One Newton step on gamma given H(gamma) and Var(gamma); tol is a relative step size below which
// the iteration counts as converged (the step is still taken: Newton's error after it is ~tol^2).
template <typename T>
KEXUE_HOST_DEVICE void newton_step(NewtonState<T>* st, T entropy, T variance, T target, T tol) {
  const T g = st->gamma;
  const T excess = entropy - target;          // > 0: too flat, sharpen (larger gamma)
  const T slope = g * variance;               // = -dH/dgamma >= 0
  const T next = g + excess / slope;
  if (slope > T(0) && ::fabs(next - g) <= tol * g) {
    st->gamma = next;
    st->done = true;
    return;
  }
  if (excess > T(0)) {
    st->lo = g;
  } else if (excess < T(0)) {
    st->hi = g;
  } else {
    st->done = true;  // exactly on target
    return;
  }
  const bool inside = slope > T(0) && next > st->lo && next < st->hi;  // false for NaN too
  if (inside) {
    st->gamma = next;
  } else if (!(st->hi < static_cast<T>(INFINITY))) {  // no upper bound yet
    st->gamma = T(2) * g;
  } else {
    st->gamma = T(0.5) * (st->lo + st->hi);
  }
}

// Backward of one row. With ybar-weighted means ubar = E_y[u], gbar = E_y[G], the centred
// sums var = E_y[(u-ubar)^2] and cov = E_y[(G-gbar)(u-ubar)], and the gradient grad_gamma that
// reaches gamma directly, implicit differentiation of H(softmax(gamma z)) = H* gives
//
//   dL/dz_i = gamma * y_i * ((G_i - gbar) - k * (u_i - ubar)),   k = (cov + grad_gamma) / var
//   dL/dH*  = -k / gamma
//
// Rows solved at an end (gamma = 0 or inf) or with var = 0 are locally constant: zero gradient.
template <typename T>
KEXUE_HOST_DEVICE bool backward_coefficient(T gamma, T var, T cov, T grad_gamma, T* k) {
  const bool live = gamma > T(0) && gamma < static_cast<T>(INFINITY) && var > T(0);
  *k = live ? (cov + grad_gamma) / var : T(0);
  return live;
}

}  // namespace entropy_norm
}  // namespace kexue
