// Hamming top-n on CPU: the n nearest packed codes of each query, nearest first, distance ties to
// the lowest database index (reference: hamming_topk in python/kexue/reference/biohash.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "kexue/biohash_checks.h"
#include "kexue/dynamic_for.h"
#include "kexue/ops.h"
#include "simd.h"

namespace kexue {
namespace {

// Hamming distance of two packed codes of nb bytes: 64-bit words, then the tail bytes.
KEXUE_CPU_CLONES int64_t hamming(const uint8_t* a, const uint8_t* b, int64_t nb) {
  int64_t d = 0;
  int64_t i = 0;
  for (; i + 8 <= nb; i += 8) {
    uint64_t x, y;
    std::memcpy(&x, a + i, 8);
    std::memcpy(&y, b + i, 8);
    d += __builtin_popcountll(x ^ y);
  }
  for (; i < nb; ++i) d += __builtin_popcount(static_cast<unsigned>(a[i] ^ b[i]));
  return d;
}

KEXUE_CPU_CLONES void hamming_row(const uint8_t* q, const uint8_t* db, int64_t D, int64_t nb, int32_t* dist) {
  for (int64_t d = 0; d < D; ++d) dist[d] = static_cast<int32_t>(hamming(q, db + d * nb, nb));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& database,
                                                    int64_t n) {
  biohash::check_codes(queries, database, n, at::kCPU);
  const int64_t Q = queries.size(0), D = database.size(0), nb = queries.size(1);
  auto dist_out = at::empty({Q, n}, queries.options().dtype(at::kLong));
  auto idx_out = at::empty({Q, n}, queries.options().dtype(at::kLong));
  const uint8_t* qp = queries.data_ptr<uint8_t>();
  const uint8_t* dbp = database.data_ptr<uint8_t>();
  int64_t* dop = dist_out.data_ptr<int64_t>();
  int64_t* iop = idx_out.data_ptr<int64_t>();
  const int64_t max_dist = nb * 8;
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(D * std::max<int64_t>(nb, 1), 1));
  // Queries are independent: blocks of them handed out from a shared counter (kexue/dynamic_for.h).
  struct Scratch {
    std::vector<int32_t> dist;
    std::vector<int64_t> slot;
  };
  auto make = [&](int64_t) { return Scratch{std::vector<int32_t>(D), std::vector<int64_t>(max_dist + 2)}; };
  cpu::dynamic_blocks(Q, grain, make, [&](Scratch& t, int64_t begin, int64_t end) {
    std::vector<int32_t>& dist = t.dist;
    std::vector<int64_t>& slot = t.slot;
    for (int64_t q = begin; q < end; ++q) {
      hamming_row(qp + q * nb, dbp, D, nb, dist.data());
      // Counting sort on the distance, stopping at the n-th: slot[v] = first output position of v.
      std::fill(slot.begin(), slot.end(), 0);
      for (int64_t d = 0; d < D; ++d) ++slot[dist[d] + 1];
      for (int64_t v = 0; v <= max_dist; ++v) slot[v + 1] += slot[v];
      int64_t* od = dop + q * n;
      int64_t* oi = iop + q * n;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t pos = slot[dist[d]];
        if (pos < n) {
          od[pos] = dist[d];
          oi[pos] = d;
        }
        ++slot[dist[d]];
      }
    }
  });
  return {dist_out, idx_out};
}

}  // namespace kexue
