// The per-row pieces the BioHash CPU kernels share (csrc/cpu/biohash.cpp hashes rows,
// csrc/cpu/biohash_update.cpp takes the learning step): the gather-sum of a CSR row's synapse
// columns into activations, the order keys of winner-take-all, and the unit of a given rank.
//
// Exactness. Activations are summed token by token in row order with a separate multiply and add
// (no fused multiply-add: every file that includes this one turns contraction off before it), exactly
// like python/kexue/reference/biohash.py, so codes agree with the reference bit for bit.
//
// The functions sit in an anonymous namespace on purpose: the multiversioned ones
// (KEXUE_CPU_CLONES) then get one resolver per translation unit, and nothing leaks into the
// extension's exported symbols.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kexue/biohash.h"
#include "simd.h"

namespace kexue {
namespace {

using biohash::KeyOf;
using biohash::order_key;

// ---------------------------------------------------------------------------------------------
// Gather-sum: acc += w * column. Overloads for float storage (vectorized, multiversioned) and a
// generic one (double, and 16-bit storage converted to float on the fly).

KEXUE_CPU_CLONES void add_column(float* acc, const float* col, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += col[i];
}

KEXUE_CPU_CLONES void add_scaled_column(float* acc, const float* col, float w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float p = w * col[i];  // rounded on its own, as torch's w * col is
    acc[i] += p;
  }
}

template <typename T, typename A>
void add_column(A* acc, const T* col, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(col[i]);
}

template <typename T, typename A>
void add_scaled_column(A* acc, const T* col, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const A p = w * static_cast<A>(col[i]);
    acc[i] += p;
  }
}

// Activations of one CSR row into acc (K values).
template <typename T, typename A>
void row_activations(const int64_t* ids, const A* w, int64_t len, const T* wt, int64_t K, A* acc) {
  std::fill(acc, acc + K, A(0));
  for (int64_t j = 0; j < len; ++j) {
    const T* col = wt + ids[j] * K;
    if (w == nullptr) {
      add_column(acc, col, K);
    } else {
      add_scaled_column(acc, col, w[j], K);
    }
  }
}

// float32 synapses, the common case, a block of kUnitBlock units at a time: the block's partial
// sums stay in four 16-float registers (one AVX-512 register each; two AVX2 or four SSE registers
// in the narrower clones) while every column of the row is added, instead of being loaded and
// stored again for each column. Every unit's sum is still taken token by token in row order, from
// +0, so the activations are the same bit for bit. Written with GCC vector types: the plain loop
// was vectorized only after a scalar pass that took most of the time.
constexpr int64_t kUnitBlock = 64;
typedef float F16 __attribute__((vector_size(64)));

inline F16 load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline void store16(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }

KEXUE_CPU_CLONES void sum_block(const int64_t* ids, int64_t len, const float* wt, int64_t K, int64_t unit0,
                                float* out) {
  F16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  for (int64_t j = 0; j < len; ++j) {
    const float* col = wt + ids[j] * K + unit0;
    s0 += load16(col);
    s1 += load16(col + 16);
    s2 += load16(col + 32);
    s3 += load16(col + 48);
  }
  store16(out, s0);
  store16(out + 16, s1);
  store16(out + 32, s2);
  store16(out + 48, s3);
}

KEXUE_CPU_CLONES void sum_scaled_block(const int64_t* ids, const float* w, int64_t len, const float* wt, int64_t K,
                                       int64_t unit0, float* out) {
  F16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  for (int64_t j = 0; j < len; ++j) {
    const float* col = wt + ids[j] * K + unit0;
    const float wj = w[j];
    // each product rounded on its own, as torch's w * col is (fp-contract is off in this file)
    s0 += wj * load16(col);
    s1 += wj * load16(col + 16);
    s2 += wj * load16(col + 32);
    s3 += wj * load16(col + 48);
  }
  store16(out, s0);
  store16(out + 16, s1);
  store16(out + 32, s2);
  store16(out + 48, s3);
}

void row_activations(const int64_t* ids, const float* w, int64_t len, const float* wt, int64_t K, float* acc) {
  const int64_t blocked = K - K % kUnitBlock;
  for (int64_t unit0 = 0; unit0 < blocked; unit0 += kUnitBlock) {
    if (w == nullptr) {
      sum_block(ids, len, wt, K, unit0, acc + unit0);
    } else {
      sum_scaled_block(ids, w, len, wt, K, unit0, acc + unit0);
    }
  }
  if (blocked == K) return;
  float* tail = acc + blocked;
  std::fill(tail, acc + K, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    const float* col = wt + ids[j] * K + blocked;
    if (w == nullptr) {
      add_column(tail, col, K - blocked);
    } else {
      add_scaled_column(tail, col, w[j], K - blocked);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Winner-take-all.

KEXUE_CPU_CLONES void keys_of(const float* a, int64_t n, uint32_t* keys) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(a[i]);
}
void keys_of(const double* a, int64_t n, uint64_t* keys) {
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(a[i]);
}

// 32-bit lanes and a 32-bit count (a row has far fewer than 2^31 units): 16 keys per AVX-512 op.
KEXUE_CPU_CLONES int64_t count_at_least(const uint32_t* keys, int64_t n, uint32_t c) {
  int32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) count += keys[i] >= c ? 1 : 0;
  return count;
}
int64_t count_at_least(const uint64_t* keys, int64_t n, uint64_t c) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += keys[i] >= c;
  return count;
}

// The k-th largest key (1 <= k <= n) and how many keys are strictly larger.
template <typename Key>
std::pair<Key, int64_t> kth_key(const Key* keys, int64_t n, int64_t k) {
  constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  Key threshold = 0;
  for (int b = kBits - 1; b >= 0; --b) {
    const Key bit = Key(1) << b;
    threshold = biohash::refine_threshold(threshold, bit, count_at_least(keys, n, threshold | bit), k);
  }
  const Key top = ~Key(0);
  const int64_t greater = threshold == top ? 0 : count_at_least(keys, n, threshold + 1);
  return {threshold, greater};
}

// A threshold that exactly k keys reach, found by the same bitwise search stopped as soon as a
// candidate is reached by exactly k keys (after ~log2(K) + a few of the passes for spread-out
// activations). Returns false when no such threshold exists, i.e. when the k-th largest key is

// Index of the unit ranked `rank`-th (1 = the winner).
template <typename Key>
int64_t unit_of_rank(const Key* keys, int64_t K, int64_t rank) {
  if (rank == 1) {
    Key best = 0;
    for (int64_t mu = 0; mu < K; ++mu) best = keys[mu] > best ? keys[mu] : best;
    for (int64_t mu = 0; mu < K; ++mu) {
      if (keys[mu] == best) return mu;
    }
    return 0;
  }
  const auto [threshold, greater] = kth_key(keys, K, rank);
  int64_t tie = rank - greater;  // the tie-th unit (in index order) equal to the threshold
  for (int64_t mu = 0; mu < K; ++mu) {
    if (keys[mu] == threshold && --tie == 0) return mu;
  }
  return 0;
}

// Rows per task: a task should hold a few hundred thousand multiply-adds.
int64_t row_grain(int64_t K, int64_t nnz, int64_t rows) {
  const int64_t per_row = std::max<int64_t>(1, K * std::max<int64_t>(1, nnz / std::max<int64_t>(rows, 1)));
  return std::max<int64_t>(1, 262144 / per_row);
}

template <typename A>
using Key = typename KeyOf<A>::type;


}  // namespace
}  // namespace kexue
