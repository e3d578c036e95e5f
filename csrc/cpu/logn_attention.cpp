// Log-n attention on CPU: flash-style tiled forward and backward.
//
// Forward (one task per batch x query head x block of query rows, through at::parallel_for):
// the rows of q, each multiplied by its own scale (kexue/logn_attention.h), go against blocks of
// keys: S = Qs K^T, masked, folded into a running max / sum / accumulator (online softmax), the
// accumulator growing by P V. Saves lse = m + log(l) per row. Backward (one task per batch x query
// head): recomputes P = exp(S - lse) block by block, with delta = rowsum(dO * O) - dlse:
// dV += P^T dO, dS = P (dO V^T - delta), dQ += dS K, dK += dS^T Qs. Extra memory is a few tiles
// per thread and, in the backward, one (Lk, D) float accumulator pair per query head when the
// inputs are not float32 or heads are grouped: O(L D), never O(L^2).
//
// The tile products go to the BLAS that libtorch_cpu exports (sgemm_ / dgemm_, MKL on x86 wheels),
// found at load time through weak symbols; where a torch build has none, plain loops that the
// compiler vectorizes take over. fp16 / bf16 tiles are converted to float32 as they are loaded.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kexue/logn_attention.h"
#include "kexue/ops.h"
#include "rows.h"
#include "simd.h"

extern "C" {
// Fortran BLAS, column-major. Weak: null when the loaded torch exports none.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace kexue {
namespace {

using logn_attention::ScaleRule;

// Query rows and key rows per tile (128 x 512 measured best of 64/128/256 x 256/512 at L = 2048,
// D = 64: the score tile, 256 KiB, stays in L2).
#ifndef KEXUE_LOGN_BLOCK_Q
#define KEXUE_LOGN_BLOCK_Q 128
#endif
#ifndef KEXUE_LOGN_BLOCK_K
#define KEXUE_LOGN_BLOCK_K 512
#endif
constexpr int64_t kBlockQ = KEXUE_LOGN_BLOCK_Q;
constexpr int64_t kBlockK = KEXUE_LOGN_BLOCK_K;

// ---------------------------------------------------------------------------------------------
// Row-major tile products. C (m x n) = A B^T (nt), A B (nn) or A^T B (tn), plus beta * C.
// A row-major C is a column-major C^T, so each maps to one BLAS call with the operands swapped.

template <typename A>
void blas(char ta, char tb, int m, int n, int k, const A* a, int lda, const A* b, int ldb, A beta, A* c, int ldc);

template <>
void blas<float>(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  const float one = 1.f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
void blas<double>(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                  double beta, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <typename A>
bool have_blas();
template <>
bool have_blas<float>() { return sgemm_ != nullptr; }
template <>
bool have_blas<double>() { return dgemm_ != nullptr; }

// C = A (m x k) B^T (B: n x k) + beta C.
template <typename A>
void gemm_nt(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A beta, A* c,
             int64_t ldc) {
  if (have_blas<A>()) return blas<A>('T', 'N', n, m, k, b, ldb, a, lda, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < k; ++t) s += a[i * lda + t] * b[j * ldb + t];
      c[i * ldc + j] = (beta == A(0) ? A(0) : beta * c[i * ldc + j]) + s;
    }
}

// C = A (m x k) B (k x n) + beta C.
template <typename A>
void gemm_nn(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A beta, A* c,
             int64_t ldc) {
  if (have_blas<A>()) return blas<A>('N', 'N', n, m, k, b, ldb, a, lda, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i) {
    A* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == A(0) ? A(0) : beta * ci[j];
    for (int64_t t = 0; t < k; ++t) {
      const A at = a[i * lda + t];
      const A* bt = b + t * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += at * bt[j];
    }
  }
}

// C = A^T (A: k x m) B (k x n) + beta C.
template <typename A>
void gemm_tn(int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A beta, A* c,
             int64_t ldc) {
  if (have_blas<A>()) return blas<A>('N', 'T', n, m, k, b, ldb, a, lda, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i) {
    A* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == A(0) ? A(0) : beta * ci[j];
  }
  for (int64_t t = 0; t < k; ++t)
    for (int64_t i = 0; i < m; ++i) {
      const A at = a[t * lda + i];
      const A* bt = b + t * ldb;
      A* ci = c + i * ldc;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += at * bt[j];
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes over a row of a tile.

// s = exp(s - shift) in place; returns the sum of the row.
KEXUE_CPU_CLONES float exp_shift_sum(float* s, int64_t n, float shift) {
  float t = 0.f;
#pragma omp simd reduction(+ : t)
  for (int64_t j = 0; j < n; ++j) {
    const float e = cpu::softmax_exp(s[j] - shift);
    s[j] = e;
    t += e;
  }
  return t;
}
double exp_shift_sum(double* s, int64_t n, double shift) {
  double t = 0;
  for (int64_t j = 0; j < n; ++j) t += (s[j] = std::exp(s[j] - shift));
  return t;
}

// dS = P (dP - delta) in place of P, for one row.
KEXUE_CPU_CLONES void softmax_grad_row(float* p, const float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta);
}
void softmax_grad_row(double* p, const double* dp, int64_t n, double delta) {
  for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (dp[j] - delta);
}

// Loads rows x rows of length d (row stride d) into a float buffer; float32 needs no copy.
template <typename T, typename A>
const A* load_tile(const T* src, int64_t rows, int64_t d, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < rows * d; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// Sets -inf on the keys [j0, j0 + nk) that query row i0 + r may not see: past its causal limit
// (absolute position i + off) or padded.
template <typename A>
void mask_tile(A* s, int64_t ldS, int64_t nq, int64_t nk, int64_t i0, int64_t j0, int64_t off, bool causal,
               const bool* pad) {
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    A* sr = s + r * ldS;
    if (causal) {
      const int64_t first_hidden = std::max<int64_t>(i0 + r + off + 1 - j0, 0);
      for (int64_t c = first_hidden; c < nk; ++c) sr[c] = ninf;
    }
    if (pad != nullptr)
      for (int64_t c = 0; c < nk; ++c)
        if (pad[j0 + c]) sr[c] = ninf;
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes and the per-query scale.

struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, groups, off;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, 0};
  d.groups = d.Hq / d.Hkv;
  d.off = d.Lk - d.Lq;
  return d;
}

ScaleRule make_rule(int64_t head_dim, double scale, double train_len, bool logn, bool clip, double min_n,
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

// prefix (B, Lk + 1): unpadded keys among the first j of each batch row.
std::vector<int64_t> key_prefix(const Dims& d, const bool* pad) {
  std::vector<int64_t> prefix(d.B * (d.Lk + 1));
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t* p = prefix.data() + b * (d.Lk + 1);
    p[0] = 0;
    for (int64_t j = 0; j < d.Lk; ++j) p[j + 1] = p[j] + (pad == nullptr || !pad[b * d.Lk + j]);
  }
  return prefix;
}

// The key blocks a query block [i0, i1) needs: [0, end).
int64_t key_end(const Dims& d, int64_t i1, bool causal) {
  if (!causal) return d.Lk;
  return std::clamp<int64_t>(i1 - 1 + d.off + 1, 0, d.Lk);
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, typename A>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* pad, bool causal,
                  const ScaleRule& rule, at::Tensor& out, at::Tensor& lse) {
  const Dims d = dims_of(q, k);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  A* lp = lse.data_ptr<A>();
  const std::vector<int64_t> prefix = key_prefix(d, pad);
  const int64_t qblocks = (d.Lq + kBlockQ - 1) / kBlockQ;
  const A ninf = -std::numeric_limits<A>::infinity();

  at::parallel_for(0, d.B * d.Hq * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(kBlockQ * d.D), acc(kBlockQ * d.D), s(kBlockQ * kBlockK), kbuf, vbuf;
    std::vector<A> m(kBlockQ), l(kBlockQ);
    if constexpr (!std::is_same_v<T, A>) kbuf.resize(kBlockK * d.D), vbuf.resize(kBlockK * d.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % qblocks, bh = task / qblocks, b = bh / d.Hq, h = bh % d.Hq;
      const int64_t hk = h / d.groups;
      const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, d.Lq - i0);
      const bool* pad_b = pad == nullptr ? nullptr : pad + b * d.Lk;
      const int64_t* prefix_b = prefix.data() + b * (d.Lk + 1);
      const T* qrow = qp + (bh * d.Lq + i0) * d.D;
      const T* kbase = kp + (b * d.Hkv + hk) * d.Lk * d.D;
      const T* vbase = vp + (b * d.Hkv + hk) * d.Lk * d.D;
      for (int64_t r = 0; r < nq; ++r) {
        const A sc = logn_attention::row_scale<A>(logn_attention::visible_keys(i0 + r, d.Lq, d.Lk, causal, prefix_b),
                                                  rule);
        for (int64_t c = 0; c < d.D; ++c) qs[r * d.D + c] = sc * static_cast<A>(qrow[r * d.D + c]);
        m[r] = ninf;
        l[r] = 0;
      }
      std::fill(acc.begin(), acc.begin() + nq * d.D, A(0));
      const int64_t kend = key_end(d, i0 + nq, causal);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        const A* kt = load_tile<T, A>(kbase + j0 * d.D, nk, d.D, kbuf.data());
        const A* vt = load_tile<T, A>(vbase + j0 * d.D, nk, d.D, vbuf.data());
        gemm_nt<A>(nq, nk, d.D, qs.data(), d.D, kt, d.D, A(0), s.data(), kBlockK);
        const bool crosses = causal && (j0 + nk - 1 > i0 + d.off);
        if (crosses || pad_b != nullptr) mask_tile(s.data(), kBlockK, nq, nk, i0, j0, d.off, crosses, pad_b);
        for (int64_t r = 0; r < nq; ++r) {
          A* sr = s.data() + r * kBlockK;
          const A m_new = std::max(m[r], cpu::row_max(sr, nk));
          const A shift = m_new == ninf ? A(0) : m_new;  // a row with nothing visible yet stays 0
          const A row_total = exp_shift_sum(sr, nk, shift);
          const A alpha = m[r] == ninf ? A(0) : static_cast<A>(std::exp(m[r] - shift));
          l[r] = l[r] * alpha + row_total;
          m[r] = m_new;
          if (alpha != A(1)) {
            A* ar = acc.data() + r * d.D;
            for (int64_t c = 0; c < d.D; ++c) ar[c] *= alpha;
          }
        }
        gemm_nn<A>(nq, d.D, nk, s.data(), kBlockK, vt, d.D, A(1), acc.data(), d.D);
      }
      T* orow = op + (bh * d.Lq + i0) * d.D;
      A* lrow = lp + bh * d.Lq + i0;
      for (int64_t r = 0; r < nq; ++r) {
        // l == 0: nothing visible; zeros and lse 0 (the reference's definition). A NaN l
        // (NaN input) fails the test and propagates through the division.
        const bool empty = l[r] == A(0);
        const A inv = empty ? A(0) : A(1) / l[r];
        for (int64_t c = 0; c < d.D; ++c) orow[r * d.D + c] = static_cast<T>(acc[r * d.D + c] * inv);
        lrow[r] = empty ? A(0) : m[r] + static_cast<A>(std::log(l[r]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename T, typename A>
void backward_impl(const at::Tensor& dout, const A* dlse, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const bool* pad, bool causal,
                   const ScaleRule& rule, at::Tensor& dq, A* dk_acc, A* dv_acc) {
  const Dims d = dims_of(q, k);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const A* lp = lse.data_ptr<A>();
  T* dqp = dq.data_ptr<T>();
  const std::vector<int64_t> prefix = key_prefix(d, pad);

  // dk_acc / dv_acc: (B, Hq, Lk, D), one slab per query head, summed over groups by the caller.
  at::parallel_for(0, d.B * d.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(kBlockQ * d.D), dot(kBlockQ * d.D), dqt(kBlockQ * d.D), p(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), kbuf, vbuf, scale(kBlockQ), delta(kBlockQ), lrow(kBlockQ);
    if constexpr (!std::is_same_v<T, A>) kbuf.resize(kBlockK * d.D), vbuf.resize(kBlockK * d.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.groups;
      const bool* pad_b = pad == nullptr ? nullptr : pad + b * d.Lk;
      const int64_t* prefix_b = prefix.data() + b * (d.Lk + 1);
      const T* kbase = kp + (b * d.Hkv + hk) * d.Lk * d.D;
      const T* vbase = vp + (b * d.Hkv + hk) * d.Lk * d.D;
      A* dk = dk_acc + bh * d.Lk * d.D;
      A* dv = dv_acc + bh * d.Lk * d.D;
      std::fill(dk, dk + d.Lk * d.D, A(0));
      std::fill(dv, dv + d.Lk * d.D, A(0));
      for (int64_t i0 = 0; i0 < d.Lq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, d.Lq - i0);
        const int64_t row0 = bh * d.Lq + i0;
        for (int64_t r = 0; r < nq; ++r) {
          const A sc = logn_attention::row_scale<A>(
              logn_attention::visible_keys(i0 + r, d.Lq, d.Lk, causal, prefix_b), rule);
          scale[r] = sc;
          A dd = 0;
          for (int64_t c = 0; c < d.D; ++c) {
            const int64_t at = (row0 + r) * d.D + c;
            qs[r * d.D + c] = sc * static_cast<A>(qp[at]);
            const A g = static_cast<A>(dop[at]);
            dot[r * d.D + c] = g;
            dd += g * static_cast<A>(op[at]);
          }
          delta[r] = dd - (dlse == nullptr ? A(0) : dlse[row0 + r]);
          lrow[r] = lp[row0 + r];
        }
        std::fill(dqt.begin(), dqt.begin() + nq * d.D, A(0));
        const int64_t kend = key_end(d, i0 + nq, causal);
        for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
          const int64_t nk = std::min(kBlockK, kend - j0);
          const A* kt = load_tile<T, A>(kbase + j0 * d.D, nk, d.D, kbuf.data());
          const A* vt = load_tile<T, A>(vbase + j0 * d.D, nk, d.D, vbuf.data());
          gemm_nt<A>(nq, nk, d.D, qs.data(), d.D, kt, d.D, A(0), p.data(), kBlockK);
          const bool crosses = causal && (j0 + nk - 1 > i0 + d.off);
          if (crosses || pad_b != nullptr) mask_tile(p.data(), kBlockK, nq, nk, i0, j0, d.off, crosses, pad_b);
          for (int64_t r = 0; r < nq; ++r) exp_shift_sum(p.data() + r * kBlockK, nk, lrow[r]);
          // dV_j += P^T dO ; dP = dO V^T
          gemm_tn<A>(nk, d.D, nq, p.data(), kBlockK, dot.data(), d.D, A(1), dv + j0 * d.D, d.D);
          gemm_nt<A>(nq, nk, d.D, dot.data(), d.D, vt, d.D, A(0), dp.data(), kBlockK);
          for (int64_t r = 0; r < nq; ++r)  // dS, in place of P
            softmax_grad_row(p.data() + r * kBlockK, dp.data() + r * kBlockK, nk, delta[r]);
          // dQ += dS K ; dK_j += dS^T Qs
          gemm_nn<A>(nq, d.D, nk, p.data(), kBlockK, kt, d.D, A(1), dqt.data(), d.D);
          gemm_tn<A>(nk, d.D, nq, p.data(), kBlockK, qs.data(), d.D, A(1), dk + j0 * d.D, d.D);
        }
        for (int64_t r = 0; r < nq; ++r)
          for (int64_t c = 0; c < d.D; ++c)
            dqp[(row0 + r) * d.D + c] = static_cast<T>(scale[r] * dqt[r * d.D + c]);
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& pad) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "logn_attention: q, k, v must be 4-d");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "logn_attention: inputs must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "logn_attention: shapes of q, k, v do not match");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "logn_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "logn_attention: q, k, v must share a dtype");
  if (pad.has_value()) {
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 &&
                    pad->size(0) == q.size(0) && pad->size(1) == k.size(2),
                "logn_attention: key_padding_mask must be a contiguous bool (B, Lk) tensor");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> logn_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::optional<at::Tensor>& key_padding_mask,
                                                              bool causal, double scale, double train_len, bool logn,
                                                              bool clip, double min_n, bool gradmax) {
  check_inputs(q, k, v, key_padding_mask);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type));
  const ScaleRule rule = make_rule(q.size(3), scale, train_len, logn, clip, min_n, gradmax);
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "logn_attention_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, A>(q, k, v, pad, causal, rule, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double train_len, bool logn,
    bool clip, double min_n, bool gradmax) {
  check_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "logn_attention_backward: grad_out must be contiguous and shaped and typed like q");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "logn_attention_backward: bad out");
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "logn_attention_backward: bad lse");
  if (grad_lse.has_value())
    TORCH_CHECK(grad_lse->scalar_type() == acc_type && grad_lse->is_contiguous() && grad_lse->numel() == lse.numel(),
                "logn_attention_backward: bad grad_lse");
  const ScaleRule rule = make_rule(q.size(3), scale, train_len, logn, clip, min_n, gradmax);
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Lk = k.size(2), D = q.size(3);
  at::Tensor dq = at::empty_like(q);
  // One accumulator slab per query head. With float32 inputs and no grouping these are the
  // outputs themselves; otherwise they are reduced over groups and cast below.
  const bool direct = q.scalar_type() == acc_type && Hq == Hkv;
  at::Tensor dk_acc = direct ? at::empty_like(k) : at::empty({B, Hq, Lk, D}, q.options().dtype(acc_type));
  at::Tensor dv_acc = direct ? at::empty_like(v) : at::empty({B, Hq, Lk, D}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "logn_attention_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* dlse = grad_lse.has_value() ? grad_lse->data_ptr<A>() : nullptr;
    backward_impl<scalar_t, A>(grad_out, dlse, q, k, v, out, lse, pad, causal, rule, dq, dk_acc.data_ptr<A>(),
                               dv_acc.data_ptr<A>());
  });
  if (direct) return {dq, dk_acc, dv_acc};
  const int64_t groups = Hq / Hkv;
  at::Tensor dk = dk_acc.view({B, Hkv, groups, Lk, D}).sum(2).to(k.scalar_type());
  at::Tensor dv = dv_acc.view({B, Hkv, groups, Lk, D}).sum(2).to(v.scalar_type());
  return {dq, dk, dv};
}

}  // namespace kexue
