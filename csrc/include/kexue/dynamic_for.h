// Dynamic hand-out of CPU work, the one implementation every kernel in csrc/cpu uses (CPU only:
// it runs on torch's intra-op thread pool).
//
// Why not at::parallel_for alone: it gives each thread one fixed contiguous share of the range. On
// a machine whose cores are shared with other processes, a thread that is descheduled for a while
// then holds up the whole call by its entire share (measured: GlobalPointer loss forward+backward
// 7x slower with one of two cores busy). Here workers take items from one shared atomic counter,
// so a stalled worker delays only the item it holds and the others take the rest.
//
// Determinism: which worker runs which item depends on timing. Results stay bit-identical from run
// to run as long as each item writes its own outputs (rows, per-item partials added afterwards in
// item order) or combines them with an exact operation (max); per-worker partial sums of floats
// would not be, so callers that keep such sums say so.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kexue {
namespace cpu {

// Workers worth running for `items` items: torch's thread count, at most one per item, at least 1.
inline int64_t worker_count(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
}

// Calls body(scratch, worker, item) for every item in [0, n), each exactly once, on at most
// `workers` workers. Items are handed out in increasing order as workers become free, so callers
// put the costliest items first. Each worker that gets an item first calls make(worker) once for
// its own scratch (buffers, accumulators), built on its own thread; worker ids lie in
// [0, workers) and no two threads share one at a time. Nested in a parallel region, one worker
// runs every item.
template <typename Make, typename Body>
void dynamic_for(int64_t n, int64_t workers, const Make& make, const Body& body) {
  if (n <= 0) return;
  workers = std::clamp<int64_t>(workers, 1, n);
  std::atomic<int64_t> next{0};
  // Grain 1 over the worker ids: one id per thread of the pool (all of them on one thread when
  // the pool is smaller or busy in an enclosing region; the first id then drains the counter).
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= n) return;
      auto scratch = make(w);
      for (; item < n; item = next.fetch_add(1, std::memory_order_relaxed)) body(scratch, w, item);
    }
  });
}

// body(worker, item), for callers whose per-worker state lives outside (indexed by worker).
template <typename Body>
void dynamic_for(int64_t n, int64_t workers, const Body& body) {
  dynamic_for(
      n, workers, [](int64_t) { return 0; }, [&](int, int64_t w, int64_t item) { body(w, item); });
}

// The blocked form, for loops that were at::parallel_for(0, n, grain, ...): body(scratch, begin,
// end) over the consecutive blocks [begin, end) of `block` indices (the last one shorter) covering
// [0, n), handed out as dynamic_for's items on worker_count(blocks) workers. `block` is the least
// work worth one hand-out (what the grain was); a single block runs inline, with no region.
template <typename Make, typename Body>
void dynamic_blocks(int64_t n, int64_t block, const Make& make, const Body& body) {
  if (n <= 0) return;
  block = std::max<int64_t>(1, block);
  const int64_t blocks = (n + block - 1) / block;
  dynamic_for(blocks, worker_count(blocks), make, [&](auto& scratch, int64_t, int64_t b) {
    body(scratch, b * block, std::min(n, (b + 1) * block));
  });
}

// body(begin, end), without scratch.
template <typename Body>
void dynamic_blocks(int64_t n, int64_t block, const Body& body) {
  dynamic_blocks(
      n, block, [](int64_t) { return 0; }, [&](int, int64_t begin, int64_t end) { body(begin, end); });
}

}  // namespace cpu
}  // namespace kexue
