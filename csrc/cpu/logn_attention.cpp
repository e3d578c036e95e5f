// Log-n attention on CPU: flash-style tiled forward and backward.
//
// Dense (B, H, L, D) and packed variable-length (T, H, D) inputs share the kernels: a Layout says
// where each sequence starts and the strides between rows and heads.
//
// Forward (one task per sequence x query head x block of query rows, longest first, on torch's pool):
// the rows of q, each multiplied by its own scale (kexue/logn_attention.h), go against blocks of
// keys: S = Qs K^T, masked, folded into a running max / sum / accumulator (online softmax), the
// accumulator growing by P V. Saves lse = m + log(l) per row. Backward (one task per sequence x
// query head): recomputes P = exp(S - lse) block by block, with delta = rowsum(dO * O) - dlse:
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

#include "kexue/dynamic_for.h"
#include "kexue/logn_attention.h"
#include "kexue/logn_attention_checks.h"
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

using logn_attention::acc_type_of;
using logn_attention::check_backward;
using logn_attention::check_common;
using logn_attention::make_rule;
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

// A tile of rows of length d, row stride `ld`: float32 rows are used in place (BLAS takes the
// stride), fp16 / bf16 rows are converted into `buf` (stride d).
template <typename A>
struct Tile {
  const A* p;
  int64_t ld;
};

template <typename T, typename A>
Tile<A> load_tile(const T* src, int64_t rows, int64_t d, int64_t stride, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return {src, stride};
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) buf[r * d + c] = static_cast<A>(src[r * stride + c]);
    return {buf, d};
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
// Where the rows of a call live. A dense call (B, H, L, D) and a packed one (T, H, D) with
// cumulative sequence offsets differ only in where each sequence starts and in the strides
// between rows and between heads, so both run the same kernels over a Layout: no padding copy.

struct Seq {
  int64_t lq, lk;         // query and key rows of the sequence
  int64_t q0, k0;         // element offset of its row 0, head 0 in q / out / dout / dq, in k / v
  int64_t l0;             // offset of its row 0, head 0 in lse / grad_lse (rows at stride 1)
  int64_t a0;             // offset of its row 0, head 0 in the dK / dV accumulators
  const bool* pad;        // (lk) padding flags, or nullptr
  const int64_t* prefix;  // (lk + 1) unpadded keys among the first j, or nullptr (no padding)
};

struct Layout {
  int64_t Hq, Hkv, D, groups;
  int64_t q_row, q_head;  // element strides of q, out, dout, dq
  int64_t k_row, k_head;  // of k, v
  int64_t l_head;         // of lse, grad_lse
  int64_t a_row, a_head;  // of the accumulators: (B, Hq, Lk, D) dense, (Tk, Hq, D) packed
  std::vector<Seq> seqs;
  std::vector<int64_t> prefix;  // storage of the Seq::prefix arrays
};

// q (B, Hq, Lq, D), k (B, Hkv, Lk, D), pad (B, Lk) or nullptr; lse (B, Hq, Lq).
Layout dense_layout(const at::Tensor& q, const at::Tensor& k, const bool* pad) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  Layout L{Hq, Hkv, D, Hq / Hkv, D, Lq * D, D, Lk * D, Lq, D, Lk * D, {}, {}};
  if (pad != nullptr) {
    L.prefix.resize(B * (Lk + 1));
    for (int64_t b = 0; b < B; ++b) {
      int64_t* p = L.prefix.data() + b * (Lk + 1);
      p[0] = 0;
      for (int64_t j = 0; j < Lk; ++j) p[j + 1] = p[j] + !pad[b * Lk + j];
    }
  }
  for (int64_t b = 0; b < B; ++b)
    L.seqs.push_back(Seq{Lq, Lk, b * Hq * Lq * D, b * Hkv * Lk * D, b * Hq * Lq, b * Hq * Lk * D,
                         pad == nullptr ? nullptr : pad + b * Lk,
                         pad == nullptr ? nullptr : L.prefix.data() + b * (Lk + 1)});
  return L;
}

// q (Tq, Hq, D), k (Tk, Hkv, D), sequence s at rows cu_q[s] .. cu_q[s+1] and cu_k[s] .. cu_k[s+1];
// lse (Hq, Tq).
Layout packed_layout(const at::Tensor& q, const at::Tensor& k, const std::vector<int64_t>& cu_q,
                     const std::vector<int64_t>& cu_k) {
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  Layout L{Hq, Hkv, D, Hq / Hkv, Hq * D, D, Hkv * D, D, Tq, Hq * D, D, {}, {}};
  for (size_t s = 0; s + 1 < cu_q.size(); ++s)
    L.seqs.push_back(Seq{cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s], cu_q[s] * Hq * D, cu_k[s] * Hkv * D, cu_q[s],
                         cu_k[s] * Hq * D, nullptr, nullptr});
  return L;
}

// The keys a query block [i0, i1) of a sequence needs: [0, end).
int64_t key_end(const Seq& s, int64_t i1, bool causal) {
  if (!causal) return s.lk;
  return std::clamp<int64_t>(i1 + s.lk - s.lq, 0, s.lk);
}

// The per-query scale of row i of a sequence.
template <typename A>
A scale_of(const Seq& s, int64_t i, bool causal, const ScaleRule& rule) {
  return logn_attention::row_scale<A>(logn_attention::visible_keys(i, s.lq, s.lk, causal, s.prefix), rule);
}

// ---------------------------------------------------------------------------------------------
// Scheduling. Tasks of very different cost (causal query blocks, sequences of mixed lengths) go
// longest first to whichever thread of torch's pool is free (kexue/dynamic_for.h): at::parallel_for
// alone would give each thread a fixed contiguous range, and one thread could get all the long ones.

struct Task {
  int64_t seq, head, block, cost;
};

// body(task, scratch, slot): slot in [0, cpu::worker_count(n)) is distinct for concurrently
// running workers, for per-worker partial sums.
template <typename Scratch, typename Body>
void run_tasks(std::vector<Task>& tasks, const Body& body) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(tasks.size());
  cpu::dynamic_for(
      n, cpu::worker_count(n), [](int64_t) { return Scratch(); },
      [&](Scratch& scratch, int64_t slot, int64_t t) { body(tasks[t], scratch, slot); });
}

// ---------------------------------------------------------------------------------------------
// Forward: one task per (sequence, query head, block of query rows).

template <typename A>
struct ForwardScratch {
  std::vector<A> qs, acc, s, kbuf, vbuf, m, l;
};

template <typename T, typename A>
void forward_impl(const Layout& L, const T* qp, const T* kp, const T* vp, bool causal, const ScaleRule& rule, T* op,
                  A* lp) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(L.seqs.size()); ++s) {
    const Seq& sq = L.seqs[s];
    for (int64_t h = 0; h < L.Hq; ++h)
      for (int64_t i0 = 0, qb = 0; i0 < sq.lq; i0 += kBlockQ, ++qb) {
        const int64_t nq = std::min(kBlockQ, sq.lq - i0);
        tasks.push_back(Task{s, h, qb, nq * (key_end(sq, i0 + nq, causal) + 1)});
      }
  }
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t D = L.D;

  run_tasks<ForwardScratch<A>>(tasks, [&](const Task& task, ForwardScratch<A>& w, int64_t) {
    if (w.qs.empty()) {
      w.qs.resize(kBlockQ * D), w.acc.resize(kBlockQ * D), w.s.resize(kBlockQ * kBlockK);
      w.m.resize(kBlockQ), w.l.resize(kBlockQ);
      if constexpr (!std::is_same_v<T, A>) w.kbuf.resize(kBlockK * D), w.vbuf.resize(kBlockK * D);
    }
    const Seq& sq = L.seqs[task.seq];
    const int64_t h = task.head, hk = h / L.groups, off = sq.lk - sq.lq;
    const int64_t i0 = task.block * kBlockQ, nq = std::min(kBlockQ, sq.lq - i0);
    const T* qrow = qp + sq.q0 + h * L.q_head + i0 * L.q_row;
    const T* kbase = kp + sq.k0 + hk * L.k_head;
    const T* vbase = vp + sq.k0 + hk * L.k_head;
    A *qs = w.qs.data(), *acc = w.acc.data(), *s = w.s.data(), *m = w.m.data(), *l = w.l.data();
    for (int64_t r = 0; r < nq; ++r) {
      const A sc = scale_of<A>(sq, i0 + r, causal, rule);
      for (int64_t c = 0; c < D; ++c) qs[r * D + c] = sc * static_cast<A>(qrow[r * L.q_row + c]);
      m[r] = ninf;
      l[r] = 0;
    }
    std::fill(acc, acc + nq * D, A(0));
    const int64_t kend = key_end(sq, i0 + nq, causal);
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const Tile<A> kt = load_tile<T, A>(kbase + j0 * L.k_row, nk, D, L.k_row, w.kbuf.data());
      const Tile<A> vt = load_tile<T, A>(vbase + j0 * L.k_row, nk, D, L.k_row, w.vbuf.data());
      gemm_nt<A>(nq, nk, D, qs, D, kt.p, kt.ld, A(0), s, kBlockK);
      const bool crosses = causal && (j0 + nk - 1 > i0 + off);
      if (crosses || sq.pad != nullptr) mask_tile(s, kBlockK, nq, nk, i0, j0, off, crosses, sq.pad);
      for (int64_t r = 0; r < nq; ++r) {
        A* sr = s + r * kBlockK;
        const A m_new = std::max(m[r], cpu::row_max(sr, nk));
        const A shift = m_new == ninf ? A(0) : m_new;  // a row with nothing visible yet stays 0
        const A row_total = exp_shift_sum(sr, nk, shift);
        const A alpha = m[r] == ninf ? A(0) : static_cast<A>(std::exp(m[r] - shift));
        l[r] = l[r] * alpha + row_total;
        m[r] = m_new;
        if (alpha != A(1)) {
          A* ar = acc + r * D;
          for (int64_t c = 0; c < D; ++c) ar[c] *= alpha;
        }
      }
      gemm_nn<A>(nq, D, nk, s, kBlockK, vt.p, vt.ld, A(1), acc, D);
    }
    T* orow = op + sq.q0 + h * L.q_head + i0 * L.q_row;
    A* lrow = lp + sq.l0 + h * L.l_head + i0;
    for (int64_t r = 0; r < nq; ++r) {
      // l == 0: nothing visible; zeros and lse 0 (the reference's definition). A NaN l
      // (NaN input) fails the test and propagates through the division.
      const bool empty = l[r] == A(0);
      const A inv = empty ? A(0) : A(1) / l[r];
      for (int64_t c = 0; c < D; ++c) orow[r * L.q_row + c] = static_cast<T>(acc[r * D + c] * inv);
      lrow[r] = empty ? A(0) : m[r] + static_cast<A>(std::log(l[r]));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Normally one task per (sequence, query head), which owns that head's dK / dV
// accumulator rows of the sequence (no two tasks write the same memory). When there are fewer
// (sequence, head) pairs than threads (one long sequence with one head), each pair is split by
// query blocks instead, each worker summing dK / dV into its own (Lk, D) partial buffers, added
// up at the end: O(threads Lk D) extra memory, still never O(L^2).

template <typename A>
struct BackwardScratch {
  std::vector<A> qs, dot, dqt, p, dp, kbuf, vbuf, scale, delta, lrow;
};

template <typename T, typename A>
void backward_impl(const Layout& L, const T* dop, const A* dlse, const T* qp, const T* kp, const T* vp, const T* op,
                   const A* lp, bool causal, const ScaleRule& rule, T* dqp, A* dk_acc, A* dv_acc) {
  const int64_t D = L.D;
  // One query block [i0, i0 + kBlockQ) of head h of a sequence: writes its dQ rows, adds to dK / dV
  // (rows at stride a_row).
  auto block = [&](const Seq& sq, int64_t h, int64_t i0, A* dk, A* dv, int64_t a_row, BackwardScratch<A>& w) {
    if (w.qs.empty()) {
      w.qs.resize(kBlockQ * D), w.dot.resize(kBlockQ * D), w.dqt.resize(kBlockQ * D);
      w.p.resize(kBlockQ * kBlockK), w.dp.resize(kBlockQ * kBlockK);
      w.scale.resize(kBlockQ), w.delta.resize(kBlockQ), w.lrow.resize(kBlockQ);
      if constexpr (!std::is_same_v<T, A>) w.kbuf.resize(kBlockK * D), w.vbuf.resize(kBlockK * D);
    }
    const int64_t hk = h / L.groups, off = sq.lk - sq.lq;
    const T* kbase = kp + sq.k0 + hk * L.k_head;
    const T* vbase = vp + sq.k0 + hk * L.k_head;
    A *qs = w.qs.data(), *dot = w.dot.data(), *dqt = w.dqt.data(), *p = w.p.data(), *dp = w.dp.data();
    const int64_t nq = std::min(kBlockQ, sq.lq - i0);
    const int64_t row0 = sq.q0 + h * L.q_head + i0 * L.q_row;  // element offset of row i0
    const int64_t lrow0 = sq.l0 + h * L.l_head + i0;
    for (int64_t r = 0; r < nq; ++r) {
      const A sc = scale_of<A>(sq, i0 + r, causal, rule);
      w.scale[r] = sc;
      A dd = 0;
      for (int64_t c = 0; c < D; ++c) {
        const int64_t at = row0 + r * L.q_row + c;
        qs[r * D + c] = sc * static_cast<A>(qp[at]);
        const A g = static_cast<A>(dop[at]);
        dot[r * D + c] = g;
        dd += g * static_cast<A>(op[at]);
      }
      w.delta[r] = dd - (dlse == nullptr ? A(0) : dlse[lrow0 + r]);
      w.lrow[r] = lp[lrow0 + r];
    }
    std::fill(dqt, dqt + nq * D, A(0));
    const int64_t kend = key_end(sq, i0 + nq, causal);
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const Tile<A> kt = load_tile<T, A>(kbase + j0 * L.k_row, nk, D, L.k_row, w.kbuf.data());
      const Tile<A> vt = load_tile<T, A>(vbase + j0 * L.k_row, nk, D, L.k_row, w.vbuf.data());
      gemm_nt<A>(nq, nk, D, qs, D, kt.p, kt.ld, A(0), p, kBlockK);
      const bool crosses = causal && (j0 + nk - 1 > i0 + off);
      if (crosses || sq.pad != nullptr) mask_tile(p, kBlockK, nq, nk, i0, j0, off, crosses, sq.pad);
      for (int64_t r = 0; r < nq; ++r) exp_shift_sum(p + r * kBlockK, nk, w.lrow[r]);
      // dV_j += P^T dO ; dP = dO V^T
      gemm_tn<A>(nk, D, nq, p, kBlockK, dot, D, A(1), dv + j0 * a_row, a_row);
      gemm_nt<A>(nq, nk, D, dot, D, vt.p, vt.ld, A(0), dp, kBlockK);
      for (int64_t r = 0; r < nq; ++r)  // dS, in place of P
        softmax_grad_row(p + r * kBlockK, dp + r * kBlockK, nk, w.delta[r]);
      // dQ += dS K ; dK_j += dS^T Qs
      gemm_nn<A>(nq, D, nk, p, kBlockK, kt.p, kt.ld, A(1), dqt, D);
      gemm_tn<A>(nk, D, nq, p, kBlockK, qs, D, A(1), dk + j0 * a_row, a_row);
    }
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < D; ++c) dqp[row0 + r * L.q_row + c] = static_cast<T>(w.scale[r] * dqt[r * D + c]);
  };
  auto block_cost = [&](const Seq& sq, int64_t i0) {
    const int64_t nq = std::min(kBlockQ, sq.lq - i0);
    return nq * (key_end(sq, i0 + nq, causal) + 1);
  };
  auto zero_rows = [&](A* t, int64_t rows, int64_t ld) {
    for (int64_t j = 0; j < rows; ++j) std::fill(t + j * ld, t + j * ld + D, A(0));
  };

  const int64_t pairs = static_cast<int64_t>(L.seqs.size()) * L.Hq;
  if (pairs >= at::get_num_threads() || at::in_parallel_region()) {
    std::vector<Task> tasks;
    for (int64_t s = 0; s < static_cast<int64_t>(L.seqs.size()); ++s) {
      int64_t cost = L.seqs[s].lk;
      for (int64_t i0 = 0; i0 < L.seqs[s].lq; i0 += kBlockQ) cost += block_cost(L.seqs[s], i0);
      for (int64_t h = 0; h < L.Hq; ++h) tasks.push_back(Task{s, h, 0, cost});
    }
    run_tasks<BackwardScratch<A>>(tasks, [&](const Task& task, BackwardScratch<A>& w, int64_t) {
      const Seq& sq = L.seqs[task.seq];
      A* dk = dk_acc + sq.a0 + task.head * L.a_head;
      A* dv = dv_acc + sq.a0 + task.head * L.a_head;
      zero_rows(dk, sq.lk, L.a_row);
      zero_rows(dv, sq.lk, L.a_row);
      for (int64_t i0 = 0; i0 < sq.lq; i0 += kBlockQ) block(sq, task.head, i0, dk, dv, L.a_row, w);
    });
    return;
  }
  for (int64_t s = 0; s < static_cast<int64_t>(L.seqs.size()); ++s) {
    const Seq& sq = L.seqs[s];
    std::vector<Task> tasks;
    for (int64_t i0 = 0, qb = 0; i0 < sq.lq; i0 += kBlockQ, ++qb) tasks.push_back(Task{s, 0, qb, block_cost(sq, i0)});
    const int64_t slots = cpu::worker_count(static_cast<int64_t>(tasks.size()));
    std::vector<A> part(slots * 2 * sq.lk * D, A(0));  // per worker: dK (lk, D), then dV (lk, D)
    for (int64_t h = 0; h < L.Hq; ++h) {
      if (h > 0) std::fill(part.begin(), part.end(), A(0));
      run_tasks<BackwardScratch<A>>(tasks, [&](const Task& task, BackwardScratch<A>& w, int64_t slot) {
        A* mine = part.data() + slot * 2 * sq.lk * D;
        block(sq, h, task.block * kBlockQ, mine, mine + sq.lk * D, D, w);
      });
      A* dk = dk_acc + sq.a0 + h * L.a_head;
      A* dv = dv_acc + sq.a0 + h * L.a_head;
      for (int64_t j = 0; j < sq.lk; ++j)
        for (int64_t c = 0; c < D; ++c) {
          A gk = 0, gv = 0;
          for (int64_t t = 0; t < slots; ++t) {
            gk += part[(t * 2) * sq.lk * D + j * D + c];
            gv += part[(t * 2 + 1) * sq.lk * D + j * D + c];
          }
          dk[j * L.a_row + c] = gk;
          dv[j * L.a_row + c] = gv;
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// Offsets of a (nseq + 1,) int32 / int64 CPU tensor, checked: 0 first, non-decreasing, `total` last.
std::vector<int64_t> offsets_of(const at::Tensor& cu, int64_t total, const char* name) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1 && cu.device().is_cpu() &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "logn_attention: ", name, " must be a 1-d int32 or int64 CPU tensor with at least one entry");
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + c.numel());
  TORCH_CHECK(out.front() == 0 && out.back() == total, "logn_attention: ", name, " must start at 0 and end at ", total);
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK(out[i] >= out[i - 1], "logn_attention: ", name, " must be non-decreasing");
  return out;
}

// Calls fn(T{}, A{}) with the storage type T of q and the type A it computes in.
template <typename Fn>
void dispatch(const at::Tensor& q, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "logn_attention_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, A{});
  });
}

std::tuple<at::Tensor, at::Tensor> forward_on(const Layout& L, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, at::IntArrayRef lse_shape, bool causal,
                                              const ScaleRule& rule) {
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(acc_type_of(q)));
  dispatch(q, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    forward_impl<T, A>(L, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), causal, rule, out.data_ptr<T>(),
                       lse.data_ptr<A>());
  });
  return {out, lse};
}

// acc_shape: the accumulators' shape with Hq heads, (B, Hq, Lk, D) or (Tk, Hq, D); head_dim is
// the index of the heads in it. With float32 inputs and no grouping they are dk and dv
// themselves; otherwise they are reduced over the groups and cast.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_on(const Layout& L, const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_lse,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& out,
                                                           const at::Tensor& lse, std::vector<int64_t> acc_shape,
                                                           int64_t head_dim, bool causal, const ScaleRule& rule) {
  const auto acc_type = acc_type_of(q);
  at::Tensor dq = at::empty_like(q);
  const bool direct = q.scalar_type() == acc_type && L.groups == 1;
  at::Tensor dk_acc = direct ? at::empty_like(k) : at::empty(acc_shape, q.options().dtype(acc_type));
  at::Tensor dv_acc = direct ? at::empty_like(v) : at::empty(acc_shape, q.options().dtype(acc_type));
  dispatch(q, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const A* dlse = grad_lse.has_value() ? grad_lse->data_ptr<A>() : nullptr;
    backward_impl<T, A>(L, grad_out.data_ptr<T>(), dlse, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                        out.data_ptr<T>(), lse.data_ptr<A>(), causal, rule, dq.data_ptr<T>(), dk_acc.data_ptr<A>(),
                        dv_acc.data_ptr<A>());
  });
  if (direct) return {dq, dk_acc, dv_acc};
  // (.., Hq, ..) -> (.., Hkv, groups, ..) summed over the groups
  std::vector<int64_t> grouped = acc_shape;
  grouped[head_dim] = L.Hkv;
  grouped.insert(grouped.begin() + head_dim + 1, L.groups);
  at::Tensor dk = dk_acc.view(grouped).sum(head_dim + 1).to(k.scalar_type());
  at::Tensor dv = dv_acc.view(grouped).sum(head_dim + 1).to(v.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> logn_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::optional<at::Tensor>& key_padding_mask,
                                                              bool causal, double scale, double train_len, bool logn,
                                                              bool clip, double min_n, bool gradmax) {
  logn_attention::check_inputs(q, k, v, key_padding_mask, at::kCPU);
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  const Layout L = dense_layout(q, k, pad);
  const ScaleRule rule = make_rule(q.size(3), scale, train_len, logn, clip, min_n, gradmax);
  return forward_on(L, q, k, v, {q.size(0), q.size(1), q.size(2)}, causal, rule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double train_len, bool logn,
    bool clip, double min_n, bool gradmax) {
  logn_attention::check_inputs(q, k, v, key_padding_mask, at::kCPU);
  check_backward(grad_out, grad_lse, q, out, lse, q.size(0) * q.size(1) * q.size(2));
  const bool* pad = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  const Layout L = dense_layout(q, k, pad);
  const ScaleRule rule = make_rule(q.size(3), scale, train_len, logn, clip, min_n, gradmax);
  return backward_on(L, grad_out, grad_lse, q, k, v, out, lse, {q.size(0), q.size(1), k.size(2), q.size(3)}, 1, causal,
                     rule);
}

std::tuple<at::Tensor, at::Tensor> logn_attention_varlen_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v,
                                                                     const at::Tensor& cu_seqlens_q,
                                                                     const at::Tensor& cu_seqlens_k, bool causal,
                                                                     double scale, double train_len, bool logn,
                                                                     bool clip, double min_n, bool gradmax) {
  check_common(q, k, v, 3, at::kCPU);
  const auto cu_q = offsets_of(cu_seqlens_q, q.size(0), "cu_seqlens_q");
  const auto cu_k = offsets_of(cu_seqlens_k, k.size(0), "cu_seqlens_k");
  TORCH_CHECK(cu_q.size() == cu_k.size(), "logn_attention: cu_seqlens_q and cu_seqlens_k must have one length");
  const Layout L = packed_layout(q, k, cu_q, cu_k);
  const ScaleRule rule = make_rule(q.size(2), scale, train_len, logn, clip, min_n, gradmax);
  return forward_on(L, q, k, v, {q.size(1), q.size(0)}, causal, rule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, bool causal, double scale, double train_len, bool logn, bool clip, double min_n,
    bool gradmax) {
  check_common(q, k, v, 3, at::kCPU);
  check_backward(grad_out, grad_lse, q, out, lse, q.size(0) * q.size(1));
  const auto cu_q = offsets_of(cu_seqlens_q, q.size(0), "cu_seqlens_q");
  const auto cu_k = offsets_of(cu_seqlens_k, k.size(0), "cu_seqlens_k");
  TORCH_CHECK(cu_q.size() == cu_k.size(), "logn_attention: cu_seqlens_q and cu_seqlens_k must have one length");
  const Layout L = packed_layout(q, k, cu_q, cu_k);
  const ScaleRule rule = make_rule(q.size(2), scale, train_len, logn, clip, min_n, gradmax);
  return backward_on(L, grad_out, grad_lse, q, k, v, out, lse, {k.size(0), q.size(1), q.size(2)}, 1, causal, rule);
}

}  // namespace kexue
