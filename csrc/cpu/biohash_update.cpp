// The FlyVec / BioHash learning step on CPU (reference: biohash_update_ in
// python/kexue/reference/biohash.py), in place on the (N, K) transposed synapses: winners per row,
// then the Hebbian term minus Oja's decay, normalized by the step's largest change.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "biohash_rows.h"
#include "kexue/biohash_checks.h"
#include "kexue/dynamic_for.h"
#include "kexue/ops.h"

namespace kexue {
namespace {

// Hebbian entries (unit mu gets +value at input i), bucketed by input i in a stable order so that
// each element's contributions are summed in the reference's order.
template <typename A>
struct Hebbian {
  std::vector<int64_t> start;  // (N + 1) bucket offsets
  std::vector<int64_t> unit;
  std::vector<A> value;
};

template <typename A>
Hebbian<A> bucket_hebbian(const int64_t* ids, const int64_t* off, const A* w, int64_t rows, int64_t N,
                          const int64_t* winners, const int64_t* second, A delta) {
  Hebbian<A> h;
  h.start.assign(N + 1, 0);
  const int64_t nnz = off[rows];
  const int passes = second == nullptr ? 1 : 2;
  for (int pass = 0; pass < passes; ++pass) {
    for (int64_t j = 0; j < nnz; ++j) ++h.start[ids[j] + 1];
  }
  for (int64_t i = 0; i < N; ++i) h.start[i + 1] += h.start[i];
  h.unit.resize(h.start[N]);
  h.value.resize(h.start[N]);
  std::vector<int64_t> fill(h.start.begin(), h.start.end() - 1);
  // All winner contributions first, then the anti-Hebbian ones: the reference's order.
  for (int pass = 0; pass < passes; ++pass) {
    const int64_t* units = pass == 0 ? winners : second;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = off[r]; j < off[r + 1]; ++j) {
        const A wj = w == nullptr ? A(1) : w[j];
        const int64_t slot = fill[ids[j]]++;
        h.unit[slot] = units[r];
        h.value[slot] = pass == 0 ? wj : -delta * wj;
      }
    }
  }
  return h;
}

// ds for row i of wt (all K units): ds = nx * W + hebb, nx = -xx on active units and 0 elsewhere.
// `sum` and `touched` are K-long scratch, all zero on entry and on exit.
template <typename A>
void ds_row(const A* wrow, const A* nx, const uint8_t* active, const Hebbian<A>& h, int64_t i, int64_t K, A* ds,
            A* sum, uint8_t* touched) {
  for (int64_t mu = 0; mu < K; ++mu) ds[mu] = nx[mu] * wrow[mu];
  const int64_t b = h.start[i], e = h.start[i + 1];
  for (int64_t s = b; s < e; ++s) {
    const int64_t mu = h.unit[s];
    sum[mu] += h.value[s];
    touched[mu] = 1;
  }
  for (int64_t s = b; s < e; ++s) {
    const int64_t mu = h.unit[s];
    if (touched[mu]) {
      if (active[mu]) ds[mu] = ds[mu] + sum[mu];
      sum[mu] = A(0);
      touched[mu] = 0;
    }
  }
}

template <typename A>
A abs_max(const A* x, int64_t n) {
  A m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const A v = std::abs(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

template <typename A>
std::tuple<at::Tensor, at::Tensor> update_impl(const at::Tensor& indices, const at::Tensor& offsets, const A* w,
                                               at::Tensor& wt, double lr, double delta, int64_t rank, double prec,
                                               double tiny) {
  const int64_t rows = offsets.size(0) - 1, N = wt.size(0), K = wt.size(1);
  const int64_t* ids = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  A* wtp = wt.data_ptr<A>();
  auto winners_t = at::empty({rows}, offsets.options());
  auto s_win_t = at::empty({rows}, wt.options());
  int64_t* winners = winners_t.data_ptr<int64_t>();
  A* s_win = s_win_t.data_ptr<A>();
  const bool anti = delta != 0.0;
  std::vector<int64_t> second(anti ? rows : 0);
  std::vector<A> s_second(anti ? rows : 0);

  // 1. Winners by the raw activation, and the scaled activation of each chosen unit.
  struct RowScratch {
    std::vector<A> raw, scaled;
    std::vector<Key<A>> keys;
  };
  auto make_rows = [&](int64_t) {
    return RowScratch{std::vector<A>(K), std::vector<A>(w == nullptr ? 0 : K), std::vector<Key<A>>(K)};
  };
  cpu::dynamic_blocks(rows, row_grain(K, indices.size(0), rows), make_rows, [&](RowScratch& t, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t start = off[r], len = off[r + 1] - start;
      row_activations(ids + start, static_cast<const A*>(nullptr), len, static_cast<const A*>(wtp), K, t.raw.data());
      const A* s = t.raw.data();
      if (w != nullptr) {
        row_activations(ids + start, w + start, len, static_cast<const A*>(wtp), K, t.scaled.data());
        s = t.scaled.data();
      }
      keys_of(t.raw.data(), K, t.keys.data());
      winners[r] = unit_of_rank(t.keys.data(), K, 1);
      s_win[r] = s[winners[r]];
      if (anti) {
        second[r] = unit_of_rank(t.keys.data(), K, rank);
        s_second[r] = s[second[r]];
      }
    }
  });

  // 2. xx per unit, in sample order (deterministic), then the active units.
  std::vector<A> nx(K, A(0));
  std::vector<uint8_t> active(K, 0);
  {
    std::vector<A> xx(K, A(0));
    for (int64_t r = 0; r < rows; ++r) xx[winners[r]] += s_win[r];
    const A d = static_cast<A>(delta);
    if (anti) {
      for (int64_t r = 0; r < rows; ++r) xx[second[r]] += -d * s_second[r];
    }
    for (int64_t mu = 0; mu < K; ++mu) {
      active[mu] = xx[mu] != A(0);
      nx[mu] = active[mu] ? -xx[mu] : A(0);
    }
  }
  const Hebbian<A> hebb =
      bucket_hebbian<A>(ids, off, w, rows, N, winners, anti ? second.data() : nullptr, static_cast<A>(delta));

  // 3. max |ds| over the whole matrix, without storing ds. Chunks of `grain` rows are handed out
  // dynamically; each writes its own maximum, and max is exact, so the result is deterministic.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  const int64_t chunks = (N + grain - 1) / grain;
  std::vector<A> chunk_max(std::max<int64_t>(chunks, 1), A(0));
  struct DsScratch {
    std::vector<A> ds, sum;
    std::vector<uint8_t> touched;
  };
  auto make_ds = [&](int64_t) {
    return DsScratch{std::vector<A>(K), std::vector<A>(K, A(0)), std::vector<uint8_t>(K, 0)};
  };
  cpu::dynamic_blocks(N, grain, make_ds, [&](DsScratch& t, int64_t begin, int64_t end) {
    A m = 0;
    for (int64_t i = begin; i < end; ++i) {
      ds_row(wtp + i * K, nx.data(), active.data(), hebb, i, K, t.ds.data(), t.sum.data(), t.touched.data());
      const A rm = abs_max(t.ds.data(), K);
      m = rm > m ? rm : m;
    }
    chunk_max[begin / grain] = m;
  });
  A nc = 0;
  for (A m : chunk_max) nc = m > nc ? m : nc;

  // 4. W += lr / max(nc, prec) * ds, leaving changes of at most `tiny`.
  const A p = static_cast<A>(prec);
  const A scale = static_cast<A>(lr) / (nc > p ? nc : p);
  const A small = static_cast<A>(tiny);
  cpu::dynamic_blocks(N, grain, make_ds, [&](DsScratch& t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A* wrow = wtp + i * K;
      ds_row(wrow, nx.data(), active.data(), hebb, i, K, t.ds.data(), t.sum.data(), t.touched.data());
      const A* ds = t.ds.data();
#pragma omp simd
      for (int64_t mu = 0; mu < K; ++mu) {
        const A change = scale * ds[mu];
        wrow[mu] = std::abs(change) > small ? wrow[mu] + change : wrow[mu];
      }
    }
  });
  return {winners_t, s_win_t};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> biohash_update_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                                                      const std::optional<at::Tensor>& weights,
                                                      at::Tensor synapses_t, double lr, double delta, int64_t rank,
                                                      double prec, double tiny) {
  biohash::check_csr(indices, offsets, weights, synapses_t, at::kCPU);
  TORCH_CHECK(synapses_t.scalar_type() == at::kFloat || synapses_t.scalar_type() == at::kDouble,
              "biohash_update_cpu takes float32 or float64 synapses");
  TORCH_CHECK(rank >= 1 && rank <= synapses_t.size(1), "rank must lie in [1, K]");
  TORCH_CHECK(synapses_t.size(1) >= 1, "K must be at least 1");
  if (synapses_t.scalar_type() == at::kDouble) {
    return update_impl<double>(indices, offsets, weights ? weights->data_ptr<double>() : nullptr, synapses_t, lr,
                               delta, rank, prec, tiny);
  }
  return update_impl<float>(indices, offsets, weights ? weights->data_ptr<float>() : nullptr, synapses_t, lr, delta,
                            rank, prec, tiny);
}

}  // namespace kexue
