// Entropy normalization on CPU: blocks of rows handed out to torch's threads from a shared counter
// (kexue/dynamic_for.h; each row is computed alone, so the result does not depend on which thread
// takes it), each row processed in a per-thread float buffer (it stays in L1/L2 while Newton
// iterates over it).
//
// The per-row decisions (classification, Newton step, backward coefficient) come from
// csrc/include/kexue/entropy_norm.h, shared with the CUDA kernels. This file holds the passes
// over a row: each is a short loop the compiler vectorizes (fast_exp / fast_log from simd.h,
// `omp simd` reductions, selects instead of branches), compiled per instruction set.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kexue/dynamic_for.h"
#include "kexue/entropy_norm.h"
#include "kexue/ops.h"
#include "simd.h"

namespace kexue {
namespace {

using namespace entropy_norm;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Passes over one row. Overloaded for float (vectorized, multiversioned) and double (scalar
// std::exp / std::log: the float64 path exists for exact comparisons, not for speed).

struct RowScan {
  double max;
  int64_t support;  // finite entries
  bool has_nan;
};

// Turns probabilities into logits in place.
KEXUE_CPU_CLONES void log_inplace(float* z, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = cpu::fast_log(z[i]);
}
void log_inplace(double* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = std::log(z[i]);
}

// Row maximum over all entries (a -inf entry never wins unless all are -inf), number of finite
// entries, and whether a NaN is present.
template <typename A>
RowScan scan_row(const A* z, int64_t n) {
  A m = -kInf;
  int64_t support = 0;
  int64_t nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : support, nans)
  for (int64_t i = 0; i < n; ++i) {
    m = z[i] > m ? z[i] : m;
    support += z[i] > -kInf;
    nans += z[i] != z[i];
  }
  return {static_cast<double>(m), support, nans > 0};
}

// u = z - m in place; counts the entries equal to the maximum. +inf entries become NaN, which
// the caller reports as an invalid row (softmax gives NaN there too).
template <typename A>
int64_t shift_row(A* z, int64_t n, A m, bool* has_nan) {
  int64_t ties = 0;
  int64_t nans = 0;
#pragma omp simd reduction(+ : ties, nans)
  for (int64_t i = 0; i < n; ++i) {
    const A u = z[i] - m;
    z[i] = u;
    ties += u == A(0);
    nans += u != u;
  }
  *has_nan = *has_nan || nans > 0;
  return ties;
}

// s0 = sum e, s1 = sum e*u, s2 = sum e*u^2 with e = exp(g*u); -inf entries contribute nothing.
KEXUE_CPU_CLONES void moments(const float* u, int64_t n, float g, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = u[i] > -kInf;
    const float uu = fin ? u[i] : 0.f;
    const float e = fin ? cpu::fast_exp(g * uu) : 0.f;
    s0 += e;
    s1 += e * uu;
    s2 += e * uu * uu;
  }
  out[0] = s0, out[1] = s1, out[2] = s2;
}
void moments(const double* u, int64_t n, double g, double* out) {
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(u[i] > -kInf)) continue;
    const double e = std::exp(g * u[i]);
    s0 += e, s1 += e * u[i], s2 += e * u[i] * u[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2;
}

// e = exp(g*u - shift) (0 at -inf entries) written to `e`; returns the sum.
KEXUE_CPU_CLONES float exp_row(const float* u, int64_t n, float g, float shift, float* e) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = u[i] > -kInf;
    const float v = fin ? cpu::fast_exp(g * (fin ? u[i] : 0.f) - shift) : 0.f;
    e[i] = v;
    s += v;
  }
  return s;
}
double exp_row(const double* u, int64_t n, double g, double shift, double* e) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    e[i] = u[i] > -kInf ? std::exp(g * u[i] - shift) : 0.0;
    s += e[i];
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Rows.

// Scratch for one thread: z/u of the current row and one more row-sized buffer.
template <typename A>
struct Scratch {
  explicit Scratch(int64_t n) : u(n), e(n) {}
  std::vector<A> u, e;
};

template <typename T, typename A>
void load_logits(const T* x, int64_t n, bool logits, A* z) {
  for (int64_t i = 0; i < n; ++i) z[i] = static_cast<A>(x[i]);
  if (!logits) log_inplace(z, n);
}

template <typename T, typename A>
void store_scaled(const A* e, int64_t n, A scale, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(e[i] * scale);
}

// Forward of one row: writes y, gamma and stats (row max, log normaliser).
template <typename T, typename A>
void forward_row(const T* x, int64_t n, A target, bool logits, int64_t max_iter, A tol, Scratch<A>& s, T* y,
                 A* gamma_out, A* stats_out) {
  A* u = s.u.data();
  A* e = s.e.data();
  load_logits(x, n, logits, u);
  RowScan scan = scan_row(u, n);
  const A m = static_cast<A>(scan.max);
  int64_t ties = 0;
  if (scan.support > 0) ties = shift_row(u, n, m, &scan.has_nan);
  const int kind = classify_row<A>(target, scan.support, ties, scan.has_nan);

  A gamma;
  A total;
  switch (kind) {
    case kNewton: {
      NewtonState<A> st = newton_init<A>();
      A sums[3];
      for (int64_t it = 0; it < max_iter && !st.done; ++it) {
        moments(u, n, st.gamma, sums);
        A entropy, variance;
        entropy_and_variance(sums[0], sums[1], sums[2], st.gamma, &entropy, &variance);
        newton_step(&st, entropy, variance, target, tol);
      }
      gamma = st.gamma;
      total = exp_row(u, n, gamma, A(0), e);
      break;
    }
    case kUniform:
      gamma = A(0);
      for (int64_t i = 0; i < n; ++i) e[i] = u[i] > -kInf ? A(1) : A(0);
      total = static_cast<A>(scan.support);
      break;
    case kArgmax:
      gamma = static_cast<A>(kInf);
      for (int64_t i = 0; i < n; ++i) e[i] = u[i] == A(0) ? A(1) : A(0);
      total = static_cast<A>(ties);
      break;
    default: {  // kInvalid
      const A nan = std::numeric_limits<A>::quiet_NaN();
      for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(nan);
      *gamma_out = nan;
      stats_out[0] = nan;
      stats_out[1] = nan;
      return;
    }
  }
  store_scaled(e, n, A(1) / total, y);
  *gamma_out = gamma;
  stats_out[0] = m;
  stats_out[1] = std::log(total);
}

// Backward of one row (see backward_coefficient in the shared header for the formula).
template <typename T, typename A>
void backward_row(const T* gy, A grad_gamma, const T* x, int64_t n, A gamma, const A* stats, bool logits,
                  Scratch<A>& s, T* gx, A* grad_target) {
  const bool live_gamma = gamma > A(0) && gamma < static_cast<A>(kInf);
  if (!live_gamma) {
    for (int64_t i = 0; i < n; ++i) gx[i] = static_cast<T>(0);
    *grad_target = A(0);
    return;
  }
  A* u = s.u.data();
  A* y = s.e.data();
  load_logits(x, n, logits, u);
  const A m = stats[0];
  for (int64_t i = 0; i < n; ++i) u[i] -= m;
  exp_row(u, n, gamma, stats[1], y);  // y, rebuilt in full precision from the saved normaliser

  // Centred y-weighted sums in two passes: E[u], E[G], then Var(u), Cov(G, u).
  A ubar = 0, gbar = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = u[i] > -kInf;
    ubar += y[i] * (fin ? u[i] : A(0));
    gbar += y[i] * (fin ? static_cast<A>(gy[i]) : A(0));
  }
  A var = 0, cov = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = u[i] > -kInf;
    const A du = (fin ? u[i] : A(0)) - ubar;
    const A dg = (fin ? static_cast<A>(gy[i]) : A(0)) - gbar;
    var += y[i] * du * du;
    cov += y[i] * dg * du;
  }
  A k;
  if (!backward_coefficient(gamma, var, cov, grad_gamma, &k)) {
    for (int64_t i = 0; i < n; ++i) gx[i] = static_cast<T>(0);
    *grad_target = A(0);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = u[i] > -kInf;
    const A du = (fin ? u[i] : A(0)) - ubar;
    const A dg = (fin ? static_cast<A>(gy[i]) : A(0)) - gbar;
    A g = fin ? gamma * y[i] * (dg - k * du) : A(0);
    if (!logits) {
      const A p = static_cast<A>(x[i]);
      g = p > A(0) ? g / p : A(0);  // d/dp = d/dz / p; zero-probability entries get zero
    }
    gx[i] = static_cast<T>(g);
  }
  *grad_target = -k / gamma;
}

// Rows per hand-out: ~16k elements, so that taking a block from the shared counter costs nothing
// next to computing it.
int64_t grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, " must be a contiguous (R, n) tensor");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cpu(const at::Tensor& x,
                                                                             const at::Tensor& target, bool logits,
                                                                             int64_t max_iter, double tol) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == acc_dtype &&
                  target.is_contiguous(),
              "target must be a contiguous (R,) tensor of the compute dtype");
  auto y = at::empty_like(x);
  auto gamma = at::empty({rows}, x.options().dtype(acc_dtype));
  auto stats = at::empty({rows, 2}, x.options().dtype(acc_dtype));
  if (rows == 0) return {y, gamma, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_normalize_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const A* tp = target.data_ptr<A>();
    A* gp = gamma.data_ptr<A>();
    A* sp = stats.data_ptr<A>();
    auto make = [&](int64_t) { return Scratch<A>(n); };
    cpu::dynamic_blocks(rows, grain(n), make, [&](Scratch<A>& scratch, int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        forward_row(xp + r * n, n, tp[r], logits, max_iter, static_cast<A>(tol), scratch, yp + r * n, gp + r,
                    sp + 2 * r);
      }
    });
  });
  return {y, gamma, stats};
}

std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cpu(const at::Tensor& grad_y,
                                                                  const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                  const at::Tensor& gamma, const at::Tensor& stats,
                                                                  bool logits) {
  check_rows(x, "x");
  check_rows(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must match x in shape and dtype");
  const int64_t rows = x.size(0), n = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_gamma, &gamma, &stats}) {
    TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous() && t->size(0) == rows,
                "grad_gamma, gamma and stats must be contiguous, of the compute dtype, with R rows");
  }
  auto grad_x = at::empty_like(x);
  auto grad_target = at::empty({rows}, x.options().dtype(acc_dtype));
  if (rows == 0) return {grad_x, grad_target};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_normalize_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const A* ggp = grad_gamma.data_ptr<A>();
    const A* gp = gamma.data_ptr<A>();
    const A* sp = stats.data_ptr<A>();
    A* gtp = grad_target.data_ptr<A>();
    auto make = [&](int64_t) { return Scratch<A>(n); };
    cpu::dynamic_blocks(rows, grain(n), make, [&](Scratch<A>& scratch, int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        backward_row(gyp + r * n, ggp[r], xp + r * n, n, gp[r], sp + 2 * r, logits, scratch, gxp + r * n, gtp + r);
      }
    });
  });
  return {grad_x, grad_target};
}

}  // namespace kexue
