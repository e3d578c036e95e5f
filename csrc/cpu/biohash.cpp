// BioHash on CPU: codes and activations of sparse CSR rows (gather-sum + winner-take-all), and
// codes of precomputed activations. The learning step is csrc/cpu/biohash_update.cpp, Hamming
// search csrc/cpu/hamming.cpp; the per-row pieces they share are in csrc/cpu/biohash_rows.h.
//
// Layout. The kernels take the synapses transposed, `wt` = (N, K) contiguous (the Python layer
// passes `synapses.t()`, a free view when the (K, N) synapses are stored input-major): the column
// of input i, the K numbers a token adds to the activations, is then one contiguous run that the
// gather streams through, instead of K cache lines N elements apart.
//
// Winner-take-all uses the order keys of csrc/include/kexue/biohash.h (ties to the lowest unit index).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "biohash_rows.h"
#include "kexue/biohash.h"
#include "kexue/biohash_checks.h"
#include "kexue/dynamic_for.h"
#include "kexue/ops.h"
#include "simd.h"

namespace kexue {
namespace {

using biohash::check_csr;

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
// Rows are handed out in blocks of row_grain rows from a shared counter (kexue/dynamic_for.h),
// not split into one contiguous share per thread: on a machine whose cores are shared with other
// work, a thread that is descheduled for a while then delays the call by one block instead of by
// its whole share. (On 2 cores busy with other work, 2 threads were still no faster than 1 here
// with OpenMP's default spinning wait; OMP_WAIT_POLICY=passive recovered it. On idle cores 2
// threads take half the time of 1.)
template <typename T, typename A, typename Fn>
void for_each_row(const at::Tensor& indices, const at::Tensor& offsets, const A* w, const at::Tensor& wt, Fn fn) {
  const int64_t rows = offsets.size(0) - 1;
  const int64_t K = wt.size(1);
  const int64_t* ids = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* wtp = wt.data_ptr<T>();
  struct Scratch {
    std::vector<A> acc;
    std::vector<Key<A>> keys;
  };
  auto make = [&](int64_t) { return Scratch{std::vector<A>(K), std::vector<Key<A>>(K)}; };
  cpu::dynamic_blocks(rows, row_grain(K, indices.size(0), rows), make, [&](Scratch& s, int64_t begin, int64_t end) {
    prefetch_columns(ids + off[begin], off[begin + 1] - off[begin], wtp, K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t start = off[r];
      if (r + 1 < end) prefetch_columns(ids + off[r + 1], off[r + 2] - off[r + 1], wtp, K);
      row_activations(ids + start, w == nullptr ? nullptr : w + start, off[r + 1] - start, wtp, K, s.acc.data());
      fn(r, s.acc.data(), s.keys.data());
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
    cpu::dynamic_blocks(
        rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
        [&](int64_t) { return std::vector<Key<scalar_t>>(K); },
        [&](std::vector<Key<scalar_t>>& keys, int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            keys_of(a + r * K, K, keys.data());
            write_code(keys.data(), K, k, packed, o + r * width);
          }
        });
  });
  return out;
}

}  // namespace kexue
