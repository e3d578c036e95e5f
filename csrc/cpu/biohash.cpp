// BioHash / FlyVec on CPU: hashing of sparse inputs, the FlyVec learning step, Hamming search.
//
// Layout. The kernels take the synapses transposed, `wt` = (N, K) contiguous (the Python layer
// passes `synapses.t()`, a free view when the (K, N) synapses are stored input-major): the column
// of input i, the K numbers a token adds to the activations, is then one contiguous run that the
// gather streams through, instead of K cache lines N elements apart.
//
// Exactness. Activations are summed token by token in row order with a separate multiply and add
// (no fused multiply-add: the pragmas below), exactly like python/kexue/reference/biohash.py, so
// codes agree with the reference bit for bit. Winner-take-all uses the order keys of
// csrc/include/kexue/biohash.h (ties to the lowest unit index).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "kexue/biohash.h"
#include "kexue/biohash_checks.h"
#include "kexue/ops.h"
#include "simd.h"

namespace kexue {
namespace {

using biohash::check_csr;
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
// tied with the (k+1)-th: the caller then needs the tie rule.
template <typename Key>
bool exact_threshold(const Key* keys, int64_t n, int64_t k, Key* out) {
  constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  Key threshold = 0;
  for (int b = kBits - 1; b >= 0; --b) {
    const Key candidate = threshold | (Key(1) << b);
    const int64_t count = count_at_least(keys, n, candidate);
    if (count == k) {
      *out = candidate;
      return true;
    }
    threshold = count > k ? candidate : threshold;
  }
  return false;
}

// The same search for float keys, started from a guess: the threshold of the row this thread
// ranked last (rows of one batch rank alike, so it is usually close). One count at the guess,
// then a bracket [lo, hi) with count(lo) > k > count(hi) by steps growing 4x away from it, then
// bisection; true with a threshold that exactly k keys reach, false iff none exists (a tie at
// the k-th key). About half the passes of the bitwise search on the bench's rows.
bool exact_threshold_near(const uint32_t* keys, int64_t n, int64_t k, uint32_t guess, uint32_t* out) {
  constexpr uint64_t kBeyond = uint64_t(1) << 32;  // a threshold no key reaches: count 0 < k
  auto found = [&](uint64_t t) {
    *out = static_cast<uint32_t>(t);
    return true;
  };
  int64_t c = count_at_least(keys, n, guess);
  if (c == k) return found(guess);
  uint64_t lo, hi, step = uint64_t(1) << 16;
  if (c > k) {
    lo = guess;
    for (;;) {
      hi = std::min(lo + step, kBeyond);
      if (hi == kBeyond) break;
      c = count_at_least(keys, n, static_cast<uint32_t>(hi));
      if (c == k) return found(hi);
      if (c < k) break;
      lo = hi;
      step *= 4;
    }
  } else {
    hi = guess;
    for (;;) {
      lo = hi > step ? hi - step : 0;
      c = count_at_least(keys, n, static_cast<uint32_t>(lo));  // all n >= k keys reach 0
      if (c == k) return found(lo);
      if (c > k) break;
      hi = lo;
      step *= 4;
    }
  }
  while (hi - lo > 1) {  // count(lo) > k > count(hi)
    const uint64_t mid = lo + (hi - lo) / 2;
    c = count_at_least(keys, n, static_cast<uint32_t>(mid));
    if (c == k) return found(mid);
    (c > k ? lo : hi) = mid;
  }
  return false;
}

// Exact threshold for write_code: float keys start from this thread's last threshold.
bool find_exact_threshold(const uint32_t* keys, int64_t n, int64_t k, uint32_t* out) {
  thread_local uint32_t last = 0x80000000u;  // the key of +0 before the first row
  if (!exact_threshold_near(keys, n, k, last, out)) return false;
  last = *out;
  return true;
}

bool find_exact_threshold(const uint64_t* keys, int64_t n, int64_t k, uint64_t* out) {
  return exact_threshold(keys, n, k, out);
}

// flags[i] = keys[i] >= t, one byte each.
KEXUE_CPU_CLONES void flags_at_least(const uint32_t* keys, int64_t n, uint32_t t, uint8_t* flags) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) flags[i] = keys[i] >= t ? 1 : 0;
}

// Eight 0/1 bytes -> one byte, flag i at bit i (one multiply moves byte i's bit to bit 56 + i).
inline uint8_t pack8(const uint8_t* flags) {
  uint64_t x;
  std::memcpy(&x, flags, sizeof(x));
  return static_cast<uint8_t>((x * 0x0102040810204080ull) >> 56);
}

// code bits: unit mu wins when keys[mu] >= t (packed: bit mu % 8 of byte mu / 8).
// float keys: vectorized comparisons, then whole bytes packed at once.
void write_at_least(const uint32_t* keys, int64_t K, uint32_t t, bool packed, uint8_t* out) {
  if (!packed) {
    flags_at_least(keys, K, t, out);
    return;
  }
  constexpr int64_t kChunk = 512;  // units per pass through a stack buffer of flags
  uint8_t flags[kChunk];
  for (int64_t mu0 = 0; mu0 < K; mu0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, K - mu0);
    flags_at_least(keys + mu0, n, t, flags);
    const int64_t whole = n / 8;
    for (int64_t j = 0; j < whole; ++j) out[mu0 / 8 + j] = pack8(flags + 8 * j);
    if (n % 8 != 0) {
      unsigned byte = 0;
      for (int64_t b = 0; b < n % 8; ++b) byte |= static_cast<unsigned>(flags[8 * whole + b]) << b;
      out[mu0 / 8 + whole] = static_cast<uint8_t>(byte);
    }
  }
}

template <typename Key>
void write_at_least(const Key* keys, int64_t K, Key t, bool packed, uint8_t* out) {
  if (!packed) {
    for (int64_t mu = 0; mu < K; ++mu) out[mu] = keys[mu] >= t;
    return;
  }
  const int64_t nb = biohash::code_bytes(K);
  for (int64_t j = 0; j < nb; ++j) {
    unsigned byte = 0;
    const int64_t len = std::min<int64_t>(8, K - 8 * j);
    for (int64_t b = 0; b < len; ++b) byte |= static_cast<unsigned>(keys[8 * j + b] >= t) << b;
    out[j] = static_cast<uint8_t>(byte);
  }
}

// Writes the code of one row: packed (code_bytes(K) bytes) or dense (K bytes of 0/1).
template <typename Key>
void write_code(const Key* keys, int64_t K, int64_t k, bool packed, uint8_t* out) {
  if (k == K) {
    write_at_least(keys, K, Key(0), packed, out);  // every key is >= 0
    return;
  }
  Key t;
  if (find_exact_threshold(keys, K, k, &t)) {  // no tie at the threshold: branch-free
    write_at_least(keys, K, t, packed, out);
    return;
  }
  const auto [threshold, greater] = kth_key(keys, K, k);
  const int64_t nb = biohash::code_bytes(K);
  if (packed) std::memset(out, 0, nb);
  int64_t ties_left = k - greater;  // units equal to the threshold that still win, lowest index first
  for (int64_t mu = 0; mu < K; ++mu) {
    bool win = keys[mu] > threshold;
    if (!win && keys[mu] == threshold && ties_left > 0) {
      win = true;
      --ties_left;
    }
    if (packed) {
      if (win) out[mu >> 3] |= biohash::bit_of(mu);
    } else {
      out[mu] = win ? 1 : 0;
    }
  }
}

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

// ---------------------------------------------------------------------------------------------
// Parallel rows.

// Rows per task: a task should hold a few hundred thousand multiply-adds.
int64_t row_grain(int64_t K, int64_t nnz, int64_t rows) {
  const int64_t per_row = std::max<int64_t>(1, K * std::max<int64_t>(1, nnz / std::max<int64_t>(rows, 1)));
  return std::max<int64_t>(1, 262144 / per_row);
}

template <typename A>
using Key = typename KeyOf<A>::type;

// Asks for the synapse columns of the next row while this one is summed and ranked: a window's
// columns lie anywhere in a matrix larger than the caches, and without this their first cache
// lines are waited for one after the other.
template <typename T>
void prefetch_columns(const int64_t* ids, int64_t len, const T* wt, int64_t K) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < len; ++j) {
    const T* col = wt + ids[j] * K;
    for (int64_t i = 0; i < K; i += kLine) __builtin_prefetch(col + i);
  }
}

// Runs fn(row, acc) for every CSR row in parallel with acc holding the row's activations.
//
// Rows are handed out in blocks of row_grain rows from a shared counter, not split into one
// contiguous share per thread as at::parallel_for does: on a machine whose cores are shared with
// other work, a thread that is descheduled for a while then delays the call by one block instead
// of by its whole share. (On 2 cores busy with other work, 2 threads were still no faster than 1
// here with OpenMP's default spinning wait; OMP_WAIT_POLICY=passive recovered it. On idle cores
// 2 threads take half the time of 1.)
template <typename T, typename A, typename Fn>
void for_each_row(const at::Tensor& indices, const at::Tensor& offsets, const A* w, const at::Tensor& wt, Fn fn) {
  const int64_t rows = offsets.size(0) - 1;
  const int64_t K = wt.size(1);
  const int64_t* ids = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* wtp = wt.data_ptr<T>();
  const int64_t grain = row_grain(K, indices.size(0), rows);
  const int64_t blocks = (rows + grain - 1) / grain;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), blocks);
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<A> acc(K);
    std::vector<Key<A>> keys(K);
    for (int64_t b = next_block.fetch_add(1); b < blocks; b = next_block.fetch_add(1)) {
      const int64_t begin = b * grain, end = std::min(rows, begin + grain);
      prefetch_columns(ids + off[begin], off[begin + 1] - off[begin], wtp, K);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t start = off[r];
        if (r + 1 < end) prefetch_columns(ids + off[r + 1], off[r + 2] - off[r + 1], wtp, K);
        row_activations(ids + start, w == nullptr ? nullptr : w + start, off[r + 1] - start, wtp, K, acc.data());
        fn(r, acc.data(), keys.data());
      }
    }
  });
}

#define KEXUE_DISPATCH_SYNAPSES(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

at::Tensor biohash_activations_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                                   const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t) {
  check_csr(indices, offsets, weights, synapses_t, at::kCPU);
  const int64_t rows = offsets.size(0) - 1, K = synapses_t.size(1);
  const auto acc_dtype = synapses_t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({rows, K}, synapses_t.options().dtype(acc_dtype));
  KEXUE_DISPATCH_SYNAPSES(synapses_t.scalar_type(), "biohash_activations_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* w = weights.has_value() ? weights->data_ptr<A>() : nullptr;
    A* o = out.data_ptr<A>();
    for_each_row<scalar_t, A>(indices, offsets, w, synapses_t, [&](int64_t r, const A* acc, Key<A>*) {
      std::copy(acc, acc + K, o + r * K);
    });
  });
  return out;
}

at::Tensor biohash_sparse_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t, int64_t k,
                              bool packed) {
  check_csr(indices, offsets, weights, synapses_t, at::kCPU);
  const int64_t rows = offsets.size(0) - 1, K = synapses_t.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "k must lie in [1, K]");
  const int64_t width = packed ? biohash::code_bytes(K) : K;
  auto out = at::empty({rows, width}, synapses_t.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  KEXUE_DISPATCH_SYNAPSES(synapses_t.scalar_type(), "biohash_sparse_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* w = weights.has_value() ? weights->data_ptr<A>() : nullptr;
    for_each_row<scalar_t, A>(indices, offsets, w, synapses_t, [&](int64_t r, const A* acc, Key<A>* keys) {
      keys_of(acc, K, keys);
      write_code(keys, K, k, packed, o + r * width);
    });
  });
  return out;
}

at::Tensor biohash_topk_cpu(const at::Tensor& activations, int64_t k, bool packed) {
  TORCH_CHECK(activations.device().is_cpu() && activations.dim() == 2 && activations.is_contiguous() &&
                  (activations.scalar_type() == at::kFloat || activations.scalar_type() == at::kDouble),
              "activations must be a contiguous float32 or float64 (B, K) CPU tensor");
  const int64_t rows = activations.size(0), K = activations.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "k must lie in [1, K]");
  const int64_t width = packed ? biohash::code_bytes(K) : K;
  auto out = at::empty({rows, width}, activations.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(activations.scalar_type(), "biohash_topk_cpu", [&] {
    const scalar_t* a = activations.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      std::vector<Key<scalar_t>> keys(K);
      for (int64_t r = begin; r < end; ++r) {
        keys_of(a + r * K, K, keys.data());
        write_code(keys.data(), K, k, packed, o + r * width);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The learning step (reference: biohash_update_ in python/kexue/reference/biohash.py).

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
  at::parallel_for(0, rows, row_grain(K, indices.size(0), rows), [&](int64_t begin, int64_t end) {
    std::vector<A> raw(K), scaled(w == nullptr ? 0 : K);
    std::vector<Key<A>> keys(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t start = off[r], len = off[r + 1] - start;
      row_activations(ids + start, static_cast<const A*>(nullptr), len, static_cast<const A*>(wtp), K, raw.data());
      const A* s = raw.data();
      if (w != nullptr) {
        row_activations(ids + start, w + start, len, static_cast<const A*>(wtp), K, scaled.data());
        s = scaled.data();
      }
      keys_of(raw.data(), K, keys.data());
      winners[r] = unit_of_rank(keys.data(), K, 1);
      s_win[r] = s[winners[r]];
      if (anti) {
        second[r] = unit_of_rank(keys.data(), K, rank);
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

  // 3. max |ds| over the whole matrix, without storing ds.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  const int64_t chunks = (N + grain - 1) / grain;
  std::vector<A> chunk_max(std::max<int64_t>(chunks, 1), A(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> ds(K), sum(K, A(0));
    std::vector<uint8_t> touched(K, 0);
    for (int64_t c = cb; c < ce; ++c) {
      A m = 0;
      for (int64_t i = c * grain; i < std::min(N, (c + 1) * grain); ++i) {
        ds_row(wtp + i * K, nx.data(), active.data(), hebb, i, K, ds.data(), sum.data(), touched.data());
        const A rm = abs_max(ds.data(), K);
        m = rm > m ? rm : m;
      }
      chunk_max[c] = m;
    }
  });
  A nc = 0;
  for (A m : chunk_max) nc = m > nc ? m : nc;

  // 4. W += lr / max(nc, prec) * ds, leaving changes of at most `tiny`.
  const A p = static_cast<A>(prec);
  const A scale = static_cast<A>(lr) / (nc > p ? nc : p);
  const A small = static_cast<A>(tiny);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> ds(K), sum(K, A(0));
    std::vector<uint8_t> touched(K, 0);
    for (int64_t c = cb; c < ce; ++c) {
      for (int64_t i = c * grain; i < std::min(N, (c + 1) * grain); ++i) {
        A* wrow = wtp + i * K;
        ds_row(wrow, nx.data(), active.data(), hebb, i, K, ds.data(), sum.data(), touched.data());
#pragma omp simd
        for (int64_t mu = 0; mu < K; ++mu) {
          const A change = scale * ds[mu];
          wrow[mu] = std::abs(change) > small ? wrow[mu] + change : wrow[mu];
        }
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
  check_csr(indices, offsets, weights, synapses_t, at::kCPU);
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

// ---------------------------------------------------------------------------------------------
// Hamming top-n.

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
  at::parallel_for(0, Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> dist(D);
    std::vector<int64_t> slot(max_dist + 2);
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
