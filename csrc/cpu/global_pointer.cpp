// GlobalPointer on CPU: span scores and the fused multilabel loss, forward and backward.
//
// Layout (validated by python/kexue/ops/global_pointer.py): q, k (B, H, L, d) with H = 1 (one
// pair shared by every type: Efficient GlobalPointer) or H = T (one pair per type); start_bias,
// end_bias (B, T, L); mask (B, L) bool. Positives of the loss come as CSR over the rows
// (b, t, i): row_ptr (B*T*L + 1,) and cols (N,) holding the span ends j, sorted within a row;
// or densely, labels (B, T, L, L) bool, read one row at a time (a memchr finds the rare rows that
// hold a positive). A positive on a masked span (padding, or i > j with tril) makes the loss of its
// (b, t) +inf, as in the dense formula (e^{-(-inf)}); the ops layer turns that into an error.
//
// The work is cut into blocks of kRows query rows of one batch element. For a block, the
// scores of its rows against every key (only keys j >= first row with the tril mask) come from
// one small GEMM (at::mm on the rotated q and k), then each type's row is finished in a
// row-sized buffer: biases and masks added, positives taken out, and the online log-sum-exp
// states updated (forward) or the gradient row dL/ds formed and reduced (backward). Nothing of
// size L x L is ever allocated; the largest buffers are kRows x L per worker.
//
// Parallelism (drive): one parallel region per call; the (batch element, block) items are handed
// out from a shared counter (kexue/dynamic_for.h), so a core taken by another process delays one
// block; the row rotations and the final merge are handed out the same way.
// Each worker keeps its own accumulators for the quantities indexed by key (dk, d_end_bias, the
// loss states) over every batch element, summed at the end. With shared q/k (H = 1) a block's
// scores come from ONE product for all T types: the types only add their biases to the same rows,
// and in the backward their dL/ds add up into one G before the products G k and G^T q.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kexue/dynamic_for.h"
#include "kexue/global_pointer.h"
#include "kexue/ops.h"
#include "rows.h"
#include "simd.h"

namespace kexue {
namespace {

using namespace global_pointer;

constexpr int64_t kRows = 32;  // query rows per block: kRows x L scores stay in L2

// ---------------------------------------------------------------------------------------------
// Row passes. float versions are vectorized (fast_exp, multiversioned); double versions are
// plain loops with std::exp (the float64 path is for exact comparisons, not speed).

KEXUE_CPU_CLONES void build_row(const float* s, float c, const float* e, float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = s[j] + c + e[j];
}
void build_row(const double* s, double c, const double* e, double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = s[j] + c + e[j];
}

// sum_j e^{x_j - m}; -inf entries add 0.
KEXUE_CPU_CLONES float row_sumexp(const float* x, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += cpu::fast_exp(x[j] - m);
  return s;
}
double row_sumexp(const double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - m);
  return s;
}

// p_j = g e^{x_j - shift}, added to G and D; returns sum_j p_j.
KEXUE_CPU_CLONES float row_grad(const float* x, int64_t n, float g, float shift, float* G, float* D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float p = g * cpu::fast_exp(x[j] - shift);
    G[j] += p;
    D[j] += p;
    s += p;
  }
  return s;
}
double row_grad(const double* x, int64_t n, double g, double shift, double* G, double* D) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double p = g * std::exp(x[j] - shift);
    G[j] += p;
    D[j] += p;
    s += p;
  }
  return s;
}

// p_j = grad_j where the key is valid (e_j > -inf), else 0; added to G and D; returns the sum.
template <typename X, typename A>
A row_take_grad(const X* grad, const A* e, int64_t n, A* G, A* D) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) {
    const A p = e[j] > -std::numeric_limits<A>::infinity() ? static_cast<A>(grad[j]) : A(0);
    G[j] += p;
    D[j] += p;
    s += p;
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// The problem, prepared once per call: rotated q (scaled by 1/sqrt d) and k in the compute dtype,
// the biases with the key mask folded into the end bias (-inf at padded keys).

template <typename A>
struct Problem {
  int64_t B, H, T, L, d;
  bool tril;
  at::Tensor qr, kr;  // (B, H, L, d) A
  at::Tensor sb;      // (B, T, L) A
  at::Tensor ebm;     // (B, T, L) A, -inf at padded keys
  const bool* mask;   // (B, L)
  const int64_t* row_ptr = nullptr;  // CSR positives, or
  const bool* dense = nullptr;        // dense (B, T, L, L) labels
  const int64_t* cols = nullptr;

  int64_t blocks() const { return (L + kRows - 1) / kRows; }
  int64_t type_begin(int64_t h) const { return H == 1 ? 0 : h; }
  int64_t type_end(int64_t h) const { return H == 1 ? T : h + 1; }
};

// The positive span ends j of row i of (b, t) = bt that are candidates (j >= js, key not padded,
// row not padded), into `out`; returns how many positives fall on masked spans instead.
template <typename A>
int64_t row_positives(const Problem<A>& pb, int64_t bt, int64_t i, bool row_ok, int64_t js, const A* ebm,
                      std::vector<int64_t>* out) {
  out->clear();
  const int64_t L = pb.L, row = bt * L + i;
  int64_t bad = 0;
  auto take = [&](int64_t j) {
    if (row_ok && j >= js && ebm[j] > -std::numeric_limits<A>::infinity()) {
      out->push_back(j);
    } else {
      ++bad;
    }
  };
  if (pb.dense != nullptr) {
    const bool* lab = pb.dense + row * L;
    const void* first = std::memchr(lab, 1, static_cast<size_t>(L));
    if (first == nullptr) return 0;
    for (int64_t j = static_cast<const bool*>(first) - lab; j < L; ++j) {
      if (lab[j]) take(j);
    }
  } else {
    for (int64_t p = pb.row_ptr[row]; p < pb.row_ptr[row + 1]; ++p) take(pb.cols[p]);
  }
  return bad;
}

// cos and sin of every (position, pair): (L, d/2) each, computed in double.
template <typename A>
void rope_tables(int64_t L, int64_t d, double base, std::vector<A>* cos_t, std::vector<A>* sin_t) {
  const int64_t half = d / 2;
  cos_t->resize(L * half);
  sin_t->resize(L * half);
  for (int64_t p = 0; p < L; ++p) {
    for (int64_t c = 0; c < half; ++c) {
      const double a = rope_angle(p, c, d, base);
      (*cos_t)[p * half + c] = static_cast<A>(std::cos(a));
      (*sin_t)[p * half + c] = static_cast<A>(std::sin(a));
    }
  }
}

// Rows per hand-out of the rotations: ~4k elements, far below a thread's share.
inline int64_t rotate_block(int64_t d) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)); }

// dst = scale * R_p src for each of `rows` rows of size d (row r is at position r % L of batch
// element r / (H L)). Rows of padded tokens (mask false) become 0 whatever they hold: a NaN or inf
// there would otherwise reach the real spans through 0 * NaN in the products G k and G^T q.
template <typename X, typename A>
void rotate(const X* src, A* dst, int64_t rows, int64_t H, int64_t L, int64_t d, const bool* mask, int layout,
            const std::vector<A>& cos_t, const std::vector<A>& sin_t, A scale) {
  cpu::dynamic_blocks(rows, rotate_block(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* s = src + r * d;
      A* o = dst + r * d;
      if (!mask[(r / (H * L)) * L + r % L]) {
        std::fill(o, o + d, A(0));
        continue;
      }
      if (layout == kRopeNone) {
        for (int64_t c = 0; c < d; ++c) o[c] = scale * static_cast<A>(s[c]);
        continue;
      }
      const int64_t p = r % L, half = d / 2;
      for (int64_t c = 0; c < half; ++c) {
        long long a, b;
        rope_pair(layout, c, d, &a, &b);
        const A ca = cos_t[p * half + c], sa = sin_t[p * half + c];
        A ra, rb;
        rope_rotate(static_cast<A>(s[a]), static_cast<A>(s[b]), ca, sa, &ra, &rb);
        o[a] = scale * ra;
        o[b] = scale * rb;
      }
    }
  });
}

// dst = scale * R_p^T g: the gradient through the rotation (its transpose is its inverse).
template <typename A, typename X>
void unrotate(const A* g, X* dst, int64_t rows, int64_t L, int64_t d, int layout, const std::vector<A>& cos_t,
              const std::vector<A>& sin_t, A scale) {
  cpu::dynamic_blocks(rows, rotate_block(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const A* s = g + r * d;
      X* o = dst + r * d;
      if (layout == kRopeNone) {
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<X>(scale * s[c]);
        continue;
      }
      const int64_t p = r % L, half = d / 2;
      for (int64_t c = 0; c < half; ++c) {
        long long a, b;
        rope_pair(layout, c, d, &a, &b);
        const A ca = cos_t[p * half + c], sa = sin_t[p * half + c];
        A ra, rb;
        rope_unrotate(s[a], s[b], ca, sa, &ra, &rb);
        o[a] = static_cast<X>(scale * ra);
        o[b] = static_cast<X>(scale * rb);
      }
    }
  });
}

template <typename X, typename A>
Problem<A> prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sb, const at::Tensor& eb,
                   const at::Tensor& mask, int64_t rope, double base, bool tril, std::vector<A>* cos_t,
                   std::vector<A>* sin_t) {
  Problem<A> pb;
  pb.B = q.size(0), pb.H = q.size(1), pb.L = q.size(2), pb.d = q.size(3), pb.T = sb.size(1);
  pb.tril = tril;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pb.qr = at::empty(q.sizes(), q.options().dtype(acc));
  pb.kr = at::empty(k.sizes(), k.options().dtype(acc));
  if (rope != kRopeNone) rope_tables<A>(pb.L, pb.d, base, cos_t, sin_t);
  const int64_t rows = pb.B * pb.H * pb.L;
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(pb.d, 1))));
  const bool* m = mask.data_ptr<bool>();
  rotate<X, A>(q.data_ptr<X>(), pb.qr.template data_ptr<A>(), rows, pb.H, pb.L, pb.d, m, static_cast<int>(rope),
               *cos_t, *sin_t, scale);
  rotate<X, A>(k.data_ptr<X>(), pb.kr.template data_ptr<A>(), rows, pb.H, pb.L, pb.d, m, static_cast<int>(rope),
               *cos_t, *sin_t, A(1));
  // Biases at padded tokens are never read as numbers: 0 at padded rows (skipped anyway), -inf at
  // padded keys (the key mask folded into the end bias).
  const at::Tensor padded = mask.logical_not().unsqueeze(1);
  pb.sb = sb.to(acc).masked_fill(padded, 0).contiguous();
  pb.ebm = eb.to(acc).masked_fill(padded, -std::numeric_limits<double>::infinity()).contiguous();
  pb.mask = mask.data_ptr<bool>();
  return pb;
}

// Scores of the rows [i0, i0 + r) of head h against keys [jlo, L): (r, L - jlo), in buf.
template <typename A>
at::Tensor block_scores(const Problem<A>& pb, int64_t b, int64_t h, int64_t i0, int64_t r, int64_t jlo,
                        at::Tensor& buf) {
  const int64_t ncols = pb.L - jlo;
  at::Tensor out = buf.narrow(0, 0, r * ncols).view({r, ncols});
  at::mm_out(out, pb.qr[b][h].narrow(0, i0, r), pb.kr[b][h].narrow(0, jlo, ncols).t());
  return out;
}

// Runs process(acc, b, block) over every block of every batch element in ONE parallel region,
// blocks handed out from a shared counter (cpu::dynamic_for): a worker that stalls (its core
// taken by another process) delays the block it holds, and there is no barrier per batch element
// for it to hold up. Each worker's accumulators cover every batch element; once all blocks are
// done, flush(b, accs, n) merges the workers' shares of each b (in parallel over b). Which blocks a
// worker's share holds depends on timing, so the key-indexed float sums (dk, d_end_bias, the loss
// states) may differ in the last bits from run to run; a static split would fix that order but
// bring back the stall this hand-out removes.
template <typename Acc, typename Make, typename Process, typename Flush>
void drive(int64_t B, int64_t nblk, Make make, Process process, Flush flush) {
  if (B == 0 || nblk == 0) return;
  const int64_t items = B * nblk;
  const int64_t nw = cpu::worker_count(items);
  std::vector<Acc> accs;
  for (int64_t w = 0; w < nw; ++w) accs.push_back(make());
  // Counter order: batch-major, and with the tril mask a batch element's early blocks (the
  // longest rows) first.
  cpu::dynamic_for(items, nw, [&](int64_t w, int64_t item) { process(accs[w], item / nblk, item % nblk); });
  // Each b is merged by one worker, over the workers' shares in worker order.
  cpu::dynamic_for(B, cpu::worker_count(B), [&](int64_t, int64_t b) { flush(b, accs.data(), nw); });
}

// ---------------------------------------------------------------------------------------------
// Loss forward.

template <typename A>
struct LossFwdAcc {
  at::Tensor S;        // kRows * L scores
  std::vector<A> x;    // one row
  std::vector<LseState<A>> neg, pos;  // per (batch, type)
  std::vector<int64_t> bad;           // per (batch, type): positives on masked spans
  std::vector<int64_t> cols;          // positives of the current row
  void reset() {
    std::fill(neg.begin(), neg.end(), lse_empty<A>());
    std::fill(pos.begin(), pos.end(), lse_empty<A>());
    std::fill(bad.begin(), bad.end(), 0);
  }
};

template <typename A>
void loss_fwd_block(const Problem<A>& pb, LossFwdAcc<A>& acc, int64_t b, int64_t blk) {
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t L = pb.L, i0 = blk * kRows, r = std::min(kRows, L - i0), jlo = pb.tril ? i0 : 0;
  const int64_t ncols = L - jlo;
  A* x = acc.x.data();
  for (int64_t h = 0; h < pb.H; ++h) {
    const at::Tensor S = block_scores(pb, b, h, i0, r, jlo, acc.S);
    const A* Sp = S.data_ptr<A>();
    for (int64_t t = pb.type_begin(h); t < pb.type_end(h); ++t) {
      const A* sb = pb.sb.template data_ptr<A>() + (b * pb.T + t) * L;
      const A* ebm = pb.ebm.template data_ptr<A>() + (b * pb.T + t) * L;
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = i0 + ii;
        const bool row_ok = pb.mask[b * L + i];
        const int64_t js = pb.tril ? i : 0, n = L - js;
        acc.bad[b * pb.T + t] += row_positives(pb, b * pb.T + t, i, row_ok, js, ebm, &acc.cols);
        if (!row_ok) continue;
        build_row(Sp + ii * ncols + (js - jlo), sb[i], ebm + js, x, n);
        for (const int64_t jj : acc.cols) {
          const int64_t j = jj - js;
          lse_merge(&acc.pos[b * pb.T + t], -x[j], A(1));
          x[j] = ninf;
        }
        const A m = cpu::row_max(x, n);
        if (!(m > ninf)) continue;
        lse_merge(&acc.neg[b * pb.T + t], m, row_sumexp(x, n, m));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, shared by the loss and the scores: per block, the gradient dL/ds of each type's rows
// is formed by `grad_rows(h, t, ii, i, js, n, G_row, D_row) -> row sum` and reduced into
// d_start_bias (row sums), d_end_bias (column sums), and through G = sum_t dL/ds into dq and dk.

template <typename A>
struct BwdAcc {
  at::Tensor S, G;      // kRows * L each
  std::vector<A> x;     // one row
  at::Tensor dk;        // (B, H, L, d): gradient wrt the rotated k, this worker's share
  at::Tensor deb;       // (B, T, L)
  std::vector<int64_t> cols;  // positives of the current row
  void reset() {
    dk.zero_();
    deb.zero_();
  }
};

template <typename A>
BwdAcc<A> make_bwd_acc(const Problem<A>& pb) {
  auto opt = pb.qr.options();
  BwdAcc<A> acc;
  acc.S = at::empty({kRows * pb.L}, opt);
  acc.G = at::empty({kRows * pb.L}, opt);
  acc.x.resize(pb.L);
  acc.dk = at::zeros({pb.B, pb.H, pb.L, pb.d}, opt);
  acc.deb = at::zeros({pb.B, pb.T, pb.L}, opt);
  return acc;
}

// dqr (B, H, L, d) and dsb (B, T, L) are written per row (each row belongs to one block).
template <typename A, typename RowGrad>
void bwd_block(const Problem<A>& pb, BwdAcc<A>& acc, int64_t b, int64_t blk, at::Tensor& dqr, A* dsb,
               RowGrad grad_row) {
  const int64_t L = pb.L, i0 = blk * kRows, r = std::min(kRows, L - i0), jlo = pb.tril ? i0 : 0;
  const int64_t ncols = L - jlo;
  A* deb = acc.deb.template data_ptr<A>() + b * pb.T * L;
  for (int64_t h = 0; h < pb.H; ++h) {
    const at::Tensor S = block_scores(pb, b, h, i0, r, jlo, acc.S);
    at::Tensor G = acc.G.narrow(0, 0, r * ncols).view({r, ncols});
    G.zero_();
    const A* Sp = S.data_ptr<A>();
    A* Gp = G.data_ptr<A>();
    for (int64_t t = pb.type_begin(h); t < pb.type_end(h); ++t) {
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = i0 + ii;
        if (!pb.mask[b * L + i]) continue;
        const int64_t js = pb.tril ? i : 0, n = L - js;
        dsb[(b * pb.T + t) * L + i] =
            grad_row(acc, t, i, js, n, Sp + ii * ncols + (js - jlo), Gp + ii * ncols + (js - jlo), deb + t * L + js);
      }
    }
    // dq (rotated, scaled) rows of this block, and this block's share of dk.
    at::Tensor qblk = pb.qr[b][h].narrow(0, i0, r);
    at::Tensor dq_rows = dqr[b][h].narrow(0, i0, r);
    at::mm_out(dq_rows, G, pb.kr[b][h].narrow(0, jlo, ncols));
    acc.dk[b][h].narrow(0, jlo, ncols).addmm_(G.t(), qblk);
  }
}

// dkr[b] and deb_out[b]: the sums of the workers' shares.
template <typename A>
void bwd_flush(const Problem<A>& pb, int64_t b, BwdAcc<A>* accs, int64_t n, at::Tensor& dkr, at::Tensor& deb_out) {
  at::Tensor dk = dkr[b], deb = deb_out[b];
  dk.copy_(accs[0].dk[b]);
  deb.copy_(accs[0].deb[b]);
  for (int64_t w = 1; w < n; ++w) {
    dk.add_(accs[w].dk[b]);
    deb.add_(accs[w].deb[b]);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sb, const at::Tensor& eb,
                  const at::Tensor& mask) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  k.scalar_type() == q.scalar_type(),
              "q and k must be contiguous (B, H, L, d) tensors of one dtype");
  TORCH_CHECK(sb.dim() == 3 && sb.size(0) == q.size(0) && sb.size(2) == q.size(2) && eb.sizes() == sb.sizes() &&
                  sb.scalar_type() == q.scalar_type() && eb.scalar_type() == q.scalar_type(),
              "start_bias and end_bias must be (B, T, L) tensors of q's dtype");
  TORCH_CHECK(q.size(1) == 1 || q.size(1) == sb.size(1), "q must have 1 or T heads");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                  mask.size(1) == q.size(2) && mask.is_contiguous(),
              "mask must be a contiguous (B, L) bool tensor");
}

// Labels are dense when `dense` is a (B, T, L, L) bool tensor, else CSR (row_ptr, cols).
template <typename A>
void set_labels(Problem<A>* pb, const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& dense) {
  if (dense.dim() == 4) {
    TORCH_CHECK(dense.scalar_type() == at::kBool && dense.is_contiguous() && dense.size(0) == pb->B &&
                    dense.size(1) == pb->T && dense.size(2) == pb->L && dense.size(3) == pb->L,
                "dense labels must be a contiguous (B, T, L, L) bool tensor");
    pb->dense = dense.data_ptr<bool>();
    return;
  }
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 &&
                  row_ptr.size(0) == pb->B * pb->T * pb->L + 1 && row_ptr.is_contiguous(),
              "row_ptr must be a contiguous (B*T*L + 1,) int64 tensor");
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.dim() == 1 && cols.is_contiguous(),
              "cols must be a contiguous (N,) int64 tensor");
  pb->row_ptr = row_ptr.data_ptr<int64_t>();
  pb->cols = cols.data_ptr<int64_t>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<at::Tensor, at::Tensor> global_pointer_loss_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& start_bias,
                                                                   const at::Tensor& end_bias, const at::Tensor& mask,
                                                                   const at::Tensor& row_ptr, const at::Tensor& cols,
                                                                   const at::Tensor& dense, int64_t rope,
                                                                   double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const int64_t B = q.size(0), T = start_bias.size(1), L = q.size(2);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::zeros({B, T}, q.options().dtype(acc_dtype));
  auto lse = at::zeros({B, T, 2}, q.options().dtype(acc_dtype));
  if (B == 0 || T == 0 || L == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_loss_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<A> cos_t, sin_t;
    Problem<A> pb = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask, &cos_t, &sin_t);
    set_labels(&pb, row_ptr, cols, dense);
    A* lossp = loss.data_ptr<A>();
    A* lsep = lse.data_ptr<A>();
    auto make = [&] {
      LossFwdAcc<A> acc;
      acc.S = at::empty({kRows * L}, pb.qr.options());
      acc.x.resize(L);
      acc.neg.resize(B * T);
      acc.pos.resize(B * T);
      acc.bad.resize(B * T);
      acc.reset();
      return acc;
    };
    auto process = [&](LossFwdAcc<A>& acc, int64_t b, int64_t blk) { loss_fwd_block(pb, acc, b, blk); };
    auto flush = [&](int64_t b, LossFwdAcc<A>* accs, int64_t n) {
      for (int64_t t = 0; t < T; ++t) {
        LseState<A> neg = lse_empty<A>(), pos = lse_empty<A>();
        int64_t bad = 0;
        for (int64_t w = 0; w < n; ++w) {
          const int64_t bt = b * T + t;
          lse_merge(&neg, accs[w].neg[bt].m, accs[w].neg[bt].s);
          lse_merge(&pos, accs[w].pos[bt].m, accs[w].pos[bt].s);
          bad += accs[w].bad[bt];
        }
        const A ln = finish_lse(neg);
        const A lp = bad > 0 ? std::numeric_limits<A>::infinity() : finish_lse(pos);
        lsep[(b * T + t) * 2] = ln;
        lsep[(b * T + t) * 2 + 1] = lp;
        lossp[b * T + t] = ln + lp;
      }
    };
    drive<LossFwdAcc<A>>(B, pb.blocks(), make, process, flush);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& cols,
    const at::Tensor& dense, const at::Tensor& lse, int64_t rope, double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const int64_t B = q.size(0), H = q.size(1), T = start_bias.size(1), L = q.size(2), d = q.size(3);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.scalar_type() == acc_dtype && grad.dim() == 2 && grad.size(0) == B && grad.size(1) == T &&
                  grad.is_contiguous(),
              "grad must be a contiguous (B, T) tensor of the compute dtype");
  TORCH_CHECK(lse.scalar_type() == acc_dtype && lse.dim() == 3 && lse.size(0) == B && lse.size(1) == T &&
                  lse.size(2) == 2 && lse.is_contiguous(),
              "lse must be a contiguous (B, T, 2) tensor of the compute dtype");
  auto dq = at::empty_like(q), dk = at::empty_like(k);
  auto dsb_out = at::empty_like(start_bias), deb_out = at::empty_like(end_bias);
  if (q.numel() == 0 || start_bias.numel() == 0) {
    dq.zero_(), dk.zero_(), dsb_out.zero_(), deb_out.zero_();
    return {dq, dk, dsb_out, deb_out};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_loss_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A ninf = -std::numeric_limits<A>::infinity();
    std::vector<A> cos_t, sin_t;
    Problem<A> pb = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask, &cos_t, &sin_t);
    set_labels(&pb, row_ptr, cols, dense);
    auto dqr = at::zeros_like(pb.qr), dkr = at::empty_like(pb.kr);
    auto dsb = at::zeros({B, T, L}, pb.qr.options()), deb = at::empty({B, T, L}, pb.qr.options());
    A* dsbp = dsb.data_ptr<A>();
    const A* gp = grad.data_ptr<A>();
    const A* lsep = lse.data_ptr<A>();
    const A* sbp = pb.sb.template data_ptr<A>();
    const A* ebp = pb.ebm.template data_ptr<A>();
    auto process = [&](BwdAcc<A>& acc, int64_t b, int64_t blk) {
      A* x = acc.x.data();
      auto grad_row = [&](BwdAcc<A>& acc, int64_t t, int64_t i, int64_t js, int64_t n, const A* s, A* G,
                          A* D) -> A {
        const int64_t bt = b * T + t;
        const A g = gp[bt], ln = lsep[2 * bt], lp = lsep[2 * bt + 1];
        build_row(s, sbp[bt * L + i], ebp + bt * L + js, x, n);
        // Positives leave the negative sum (their exact -inf keeps the vector pass exact), then
        // get their own gradient. Positives on masked spans (an error reported by the forward)
        // are left out.
        row_positives(pb, bt, i, true, js, ebp + bt * L, &acc.cols);
        A extra = 0;
        for (const int64_t jj : acc.cols) {
          const int64_t j = jj - js;
          const A v = positive_grad(x[j], g, lp);
          x[j] = ninf;
          G[j] += v;
          D[j] += v;
          extra += v;
        }
        return row_grad(x, n, g, ln, G, D) + extra;
      };
      bwd_block(pb, acc, b, blk, dqr, dsbp, grad_row);
    };
    auto flush = [&](int64_t b, BwdAcc<A>* accs, int64_t n) { bwd_flush(pb, b, accs, n, dkr, deb); };
    drive<BwdAcc<A>>(B, pb.blocks(), [&] { return make_bwd_acc(pb); }, process, flush);
    const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(d)));
    unrotate<A, scalar_t>(dqr.data_ptr<A>(), dq.data_ptr<scalar_t>(), B * H * L, L, d, static_cast<int>(rope), cos_t,
                          sin_t, scale);
    unrotate<A, scalar_t>(dkr.data_ptr<A>(), dk.data_ptr<scalar_t>(), B * H * L, L, d, static_cast<int>(rope), cos_t,
                          sin_t, A(1));
    dsb_out.copy_(dsb);
    deb_out.copy_(deb);
  });
  return {dq, dk, dsb_out, deb_out};
}

at::Tensor global_pointer_scores_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
                                             const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope,
                                             double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const int64_t B = q.size(0), T = start_bias.size(1), L = q.size(2);
  auto out = at::empty({B, T, L, L}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_scores_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t ninf = static_cast<scalar_t>(-std::numeric_limits<A>::infinity());
    std::vector<A> cos_t, sin_t;
    Problem<A> pb = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask, &cos_t, &sin_t);
    scalar_t* outp = out.data_ptr<scalar_t>();
    const A* sbp = pb.sb.template data_ptr<A>();
    const A* ebp = pb.ebm.template data_ptr<A>();
    struct Acc {
      at::Tensor S;
      std::vector<A> x;
      void reset() {}
    };
    auto make = [&] {
      Acc acc;
      acc.S = at::empty({kRows * L}, pb.qr.options());
      acc.x.resize(L);
      return acc;
    };
    auto process = [&](Acc& acc, int64_t b, int64_t blk) {
      const int64_t i0 = blk * kRows, r = std::min(kRows, L - i0), jlo = pb.tril ? i0 : 0, ncols = L - jlo;
      A* x = acc.x.data();
      for (int64_t h = 0; h < pb.H; ++h) {
        const at::Tensor S = block_scores(pb, b, h, i0, r, jlo, acc.S);
        const A* Sp = S.data_ptr<A>();
        for (int64_t t = pb.type_begin(h); t < pb.type_end(h); ++t) {
          const int64_t bt = b * T + t;
          for (int64_t ii = 0; ii < r; ++ii) {
            const int64_t i = i0 + ii;
            scalar_t* o = outp + (bt * L + i) * L;
            if (!pb.mask[b * L + i]) {
              std::fill(o, o + L, ninf);
              continue;
            }
            const int64_t js = pb.tril ? i : 0, n = L - js;
            std::fill(o, o + js, ninf);
            build_row(Sp + ii * ncols + (js - jlo), sbp[bt * L + i], ebp + bt * L + js, x, n);
            for (int64_t j = 0; j < n; ++j) o[js + j] = static_cast<scalar_t>(x[j]);
          }
        }
      }
    };
    drive<Acc>(B, pb.blocks(), make, process, [](int64_t, Acc*, int64_t) {});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope, double rope_base, bool tril_mask) {
  check_inputs(q, k, start_bias, end_bias, mask);
  const int64_t B = q.size(0), H = q.size(1), T = start_bias.size(1), L = q.size(2), d = q.size(3);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == L && grad.size(3) == L &&
                  grad.scalar_type() == q.scalar_type() && grad.is_contiguous(),
              "grad must be a contiguous (B, T, L, L) tensor of q's dtype");
  auto dq = at::empty_like(q), dk = at::empty_like(k);
  auto dsb_out = at::empty_like(start_bias), deb_out = at::empty_like(end_bias);
  if (q.numel() == 0 || start_bias.numel() == 0) {
    dq.zero_(), dk.zero_(), dsb_out.zero_(), deb_out.zero_();
    return {dq, dk, dsb_out, deb_out};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "global_pointer_scores_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<A> cos_t, sin_t;
    Problem<A> pb = prepare<scalar_t, A>(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask, &cos_t, &sin_t);
    auto dqr = at::zeros_like(pb.qr), dkr = at::empty_like(pb.kr);
    auto dsb = at::zeros({B, T, L}, pb.qr.options()), deb = at::empty({B, T, L}, pb.qr.options());
    A* dsbp = dsb.data_ptr<A>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const A* ebp = pb.ebm.template data_ptr<A>();
    auto process = [&](BwdAcc<A>& acc, int64_t b, int64_t blk) {
      auto grad_row = [&](BwdAcc<A>&, int64_t t, int64_t i, int64_t js, int64_t n, const A*, A* G, A* D) -> A {
        const int64_t bt = b * T + t;
        return row_take_grad(gp + (bt * L + i) * L + js, ebp + bt * L + js, n, G, D);
      };
      bwd_block(pb, acc, b, blk, dqr, dsbp, grad_row);
    };
    auto flush = [&](int64_t b, BwdAcc<A>* accs, int64_t n) { bwd_flush(pb, b, accs, n, dkr, deb); };
    drive<BwdAcc<A>>(B, pb.blocks(), [&] { return make_bwd_acc(pb); }, process, flush);
    const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(d)));
    unrotate<A, scalar_t>(dqr.data_ptr<A>(), dq.data_ptr<scalar_t>(), B * H * L, L, d, static_cast<int>(rope), cos_t,
                          sin_t, scale);
    unrotate<A, scalar_t>(dkr.data_ptr<A>(), dk.data_ptr<scalar_t>(), B * H * L, L, d, static_cast<int>(rope), cos_t,
                          sin_t, A(1));
    dsb_out.copy_(dsb);
    deb_out.copy_(deb);
  });
  return {dq, dk, dsb_out, deb_out};
}

}  // namespace kexue
