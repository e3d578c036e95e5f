// Row reductions shared by the softmax-style CPU kernels (log-n attention, GlobalPointer).
// Multiversioned like the loops of simd.h; internal to each file that includes this header.
#pragma once

#include <cstdint>
#include <limits>

#include "simd.h"

namespace kexue {
namespace cpu {
namespace {

// Maximum of a row (-inf for an empty one). NaN entries are passed over here; callers let them
// propagate through the exp that follows.
KEXUE_CPU_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// The float64 path is for exact comparisons, not speed.
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

}  // namespace
}  // namespace cpu
}  // namespace kexue
