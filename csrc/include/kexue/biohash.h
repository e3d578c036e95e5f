// BioHash math shared by the CPU (.cpp) and, later, CUDA (.cu) kernels: the order in which units
// win, and the bit layout of packed codes. See python/kexue/reference/biohash.py for the contract.
//
// Winner-take-all without sorting: each activation is mapped to an unsigned key whose integer
// order is the ranking order (larger activation = larger key; every NaN above +inf; -0.0 equal to
// +0.0). The k-th largest key is then found bit by bit, from the most significant down, by
// counting keys >= a candidate: 32 (float) or 64 (double) branch-free counting passes over the row,
// which vectorize on a CPU and map to warp ballots on a GPU. Ties at the threshold go to the lowest
// unit index. This is exact, deterministic, and needs no index buffer.
#pragma once

#include <cstdint>
#include <cstring>

#include "kexue/macros.h"

namespace kexue {
namespace biohash {

template <typename A>
struct KeyOf;

template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int kBits = 32;
};

template <>
struct KeyOf<double> {
  using type = uint64_t;
  static constexpr int kBits = 64;
};

// Order-preserving key of an activation. Positive numbers get the sign bit set, negative ones are
// bit-inverted (so more negative = smaller); -0.0 is mapped to +0.0's key; any NaN to the maximum.
KEXUE_HOST_DEVICE uint32_t order_key(float a) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  bits = bits == 0x80000000u ? 0u : bits;
  const uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return a != a ? 0xFFFFFFFFu : key;
}

KEXUE_HOST_DEVICE uint64_t order_key(double a) {
  uint64_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  const uint64_t sign = 0x8000000000000000ull;
  bits = bits == sign ? 0ull : bits;
  const uint64_t key = (bits & sign) ? ~bits : (bits | sign);
  return a != a ? ~0ull : key;
}

// True when unit i (activation a_i) ranks before unit j: larger key, or equal key and lower index.
template <typename Key>
KEXUE_HOST_DEVICE bool ranks_before(Key key_i, int64_t i, Key key_j, int64_t j) {
  return key_i > key_j || (key_i == key_j && i < j);
}

// One step of the bitwise search for the k-th largest key: `threshold` holds the bits decided so
// far; the candidate adds `bit`, and is kept when at least k keys are >= it.
template <typename Key>
KEXUE_HOST_DEVICE Key refine_threshold(Key threshold, Key bit, int64_t count_at_least_candidate, int64_t k) {
  return count_at_least_candidate >= k ? (threshold | bit) : threshold;
}

// Packed codes: unit mu is bit (mu % 8) of byte (mu / 8).
KEXUE_HOST_DEVICE int64_t code_bytes(int64_t num_hidden) { return (num_hidden + 7) / 8; }
KEXUE_HOST_DEVICE uint8_t bit_of(int64_t mu) { return static_cast<uint8_t>(1u << (mu & 7)); }

}  // namespace biohash
}  // namespace kexue
