// Dynamic work distribution for the CPU kernels: workers take items from one shared atomic
// counter instead of a static split, so a core that another process holds delays the item it is
// on, not a fixed share of the call.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kexue {
namespace cpu {

// Calls body(worker, item) for every item in [0, n), each item exactly once, on at most
// `workers` workers (worker ids in [0, workers), each used by one thread at a time). Items are
// handed out in increasing order as workers become free.
template <typename Body>
void dynamic_for(int64_t n, int64_t workers, const Body& body) {
  if (n <= 0) return;
  workers = std::max<int64_t>(1, std::min(workers, n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t item = next.fetch_add(1); item < n; item = next.fetch_add(1)) body(w, item);
    }
  });
}

}  // namespace cpu
}  // namespace kexue
