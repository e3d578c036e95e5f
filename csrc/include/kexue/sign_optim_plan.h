// Sign optimizers on CUDA: the launch plan of the fused step and the cache that keeps it between
// steps (host side; csrc/cuda/sign_optim.cu launches it, csrc/cpu/sign_optim_plan_probe.cpp lets
// the tests drive this very code on a machine without a GPU).
//
// A plan says what each launch of a step runs: work items of at most kChunk elements (whole rows
// for tensors updated row by row), the pre-pass items of the tensors that need one, each tensor's
// slots of pre-pass partial sums (spans, for the finishing kernel) and, for the tensors that hand
// on a whole-tensor sum of squares (kSsqOut), their slots of step partial sums (outs). It depends
// only on the call's structure -- sizes, storage types, the flags that decide which passes run,
// NaN-guard groups, row lengths, which tensors are vectorizable -- so it is built and uploaded
// once per structure, as triton_kernels/sign_optim_plan.py does for the Triton step. What changes
// from step to step (addresses, coefficients, the kUpdate switch, random keys) lives in the jobs
// array, which goes to the device in one copy when its bytes differ from the last upload, and not
// at all otherwise.
//
// One thing of the addresses is structural: whether a tensor's arrays are aligned for 128-bit
// accesses (vectorizable). The plan records it in each work item (Item::vec), and it is part of
// the structure key, so a tensor whose gradient moves to an unaligned address gets another plan.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kexue/sign_optim_host.h"

namespace kexue {
namespace sign_optim {

constexpr int64_t kChunk = 65536;  // elements per work item (as ATen's multi_tensor_apply)

// Elements per group: the kernels sweep every tensor in groups of kGroup consecutive elements, one
// group per thread at a time (sign_optim_access.cuh). A group is 16 bytes of a 16-bit array, two
// times 16 bytes of a float32 one and 8 bytes of a mask, so one width serves every dtype pair.
constexpr int64_t kGroup = 8;

// The flags a plan depends on. kUpdate is not one: Tiger clears it on accumulation micro-steps and
// the kernels read it at run time, so one plan serves both kinds of micro-step.
constexpr int64_t kStructuralFlags = kRmsTensor | kRmsRow | kLazyRows | kSsqOut | kRmsCarried | kDynamic;

struct Item {  // elements [begin, end) of job `job`; vec: its full groups move as 128-bit accesses
  int64_t job, begin, end, vec;
};

struct Span {  // the partial-sum slots [first, first + count) of job `job`
  int64_t job, first, count;
};

struct Launch {  // items [first, first + count) of one list, for storage types (ps, ms)
  int32_t ps, ms;
  int64_t first, count;
};

// Whether the pre-pass reads a job: its grads for the NaN guard, or its params for a whole-tensor
// sum of squares that is not carried (the RMS; or the sum to hand on where theta stays, which the
// kernel decides from kUpdate at run time).
inline bool wants_prepass(const Job& j) {
  const bool carried = has(j, kRmsCarried);
  return j.nan_group >= 0 || (has(j, kRmsTensor) && !carried) || (has(j, kSsqOut) && !carried && !per_row_sums(j));
}

// Whether the finishing kernel visits a job: a pre-pass to add up, or a sum to take from the
// carried one (lr * RMS, and the value handed on where theta stays).
inline bool wants_finish(const Job& j) {
  return wants_prepass(j) || has(j, kRmsTensor) || (has(j, kSsqOut) && !per_row_sums(j));
}

// The host-side plan: every item list end to end (pre-pass items, then step items), the launches
// over them, spans and outs; `bytes` is what goes to the device, with the offsets of each part.
struct Layout {
  std::vector<Item> items;
  std::vector<Launch> prepass, steps;  // step items are numbered from prepass_slots
  std::vector<Span> spans, outs;       // spans: pre-pass slots; outs: step slots
  int64_t prepass_slots = 0, step_slots = 0;
  size_t spans_at = 0, outs_at = 0;  // byte offsets in the upload (items start at 0)
  std::vector<uint8_t> bytes;
};

inline bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether a job's full groups may move as 128-bit accesses: param, grad and momentum 16-byte
// aligned and a ChildTuning-D mask 8-byte aligned (a group of each starts on such a boundary, as
// items and rows start on group boundaries: kChunk and, for a job updated row by row, its row
// length are multiples of kGroup), and at least one full group. The last group of a tensor whose
// numel is not a multiple of kGroup, and every group of a job that is not vectorizable, go element
// by element in the same order, so the choice changes no result bit.
inline bool vectorizable(const Job& j) {
  return j.numel >= kGroup && aligned_to(j.param, 16) && aligned_to(j.grad, 16) && aligned_to(j.mom, 16) &&
         (j.mask == nullptr || aligned_to(j.mask, 8)) && (!by_rows(j) || j.row_len % kGroup == 0);
}

inline void cut_items(const Job& j, int64_t job, bool rows, std::vector<Item>& out) {
  const int64_t step = rows && by_rows(j) ? std::max<int64_t>(1, kChunk / j.row_len) * j.row_len : kChunk;
  const int64_t vec = vectorizable(j) ? 1 : 0;
  for (int64_t b = 0; b < j.numel; b += step) out.push_back({job, b, std::min(j.numel, b + step), vec});
}

template <typename T>
void append_bytes(std::vector<uint8_t>& out, const std::vector<T>& v) {
  const size_t at = out.size();
  out.resize(at + v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data() + at, v.data(), v.size() * sizeof(T));
}

inline Layout make_layout(const std::vector<Job>& jobs) {
  const int64_t T = static_cast<int64_t>(jobs.size());
  std::map<std::pair<int32_t, int32_t>, std::vector<int64_t>> buckets;  // (param, momentum storage)
  std::map<int32_t, std::vector<int64_t>> by_param;
  for (int64_t i = 0; i < T; ++i) {
    if (jobs[i].numel == 0) continue;
    buckets[{jobs[i].ps, jobs[i].ms}].push_back(i);
    by_param[jobs[i].ps].push_back(i);
  }
  Layout l;
  std::vector<int64_t> pre_first(T, 0), pre_count(T, 0);
  for (const auto& [ps, which] : by_param) {
    const int64_t first = static_cast<int64_t>(l.items.size());
    for (int64_t i : which) {
      if (!wants_prepass(jobs[i])) continue;
      pre_first[i] = static_cast<int64_t>(l.items.size());
      cut_items(jobs[i], i, false, l.items);
      pre_count[i] = static_cast<int64_t>(l.items.size()) - pre_first[i];
    }
    const int64_t count = static_cast<int64_t>(l.items.size()) - first;
    if (count > 0) l.prepass.push_back({ps, 0, first, count});
  }
  l.prepass_slots = static_cast<int64_t>(l.items.size());
  for (int64_t i = 0; i < T; ++i) {  // in job order: the finishing kernel's order does not matter
    if (jobs[i].numel > 0 && wants_finish(jobs[i])) l.spans.push_back({i, pre_first[i], pre_count[i]});
  }
  for (const auto& [key, which] : buckets) {
    const int64_t first = static_cast<int64_t>(l.items.size()) - l.prepass_slots;
    for (int64_t i : which) {
      const int64_t at = static_cast<int64_t>(l.items.size()) - l.prepass_slots;
      cut_items(jobs[i], i, true, l.items);
      const int64_t count = static_cast<int64_t>(l.items.size()) - l.prepass_slots - at;
      if (has(jobs[i], kSsqOut) && !per_row_sums(jobs[i])) l.outs.push_back({i, at, count});
    }
    l.steps.push_back({key.first, key.second, first, static_cast<int64_t>(l.items.size()) - l.prepass_slots - first});
  }
  l.step_slots = static_cast<int64_t>(l.items.size()) - l.prepass_slots;
  append_bytes(l.bytes, l.items);
  l.spans_at = l.bytes.size();
  append_bytes(l.bytes, l.spans);
  l.outs_at = l.bytes.size();
  append_bytes(l.bytes, l.outs);
  return l;
}

// What the CUDA step refuses besides what decode_jobs checks: carried sums of squares in
// capturable mode (the optimizers never ask for them there; the Triton step refuses them too).
inline void check_plan_jobs(const char* op, const std::vector<Job>& jobs) {
  for (size_t i = 0; i < jobs.size(); ++i) {
    TORCH_CHECK(!(has(jobs[i], kDynamic) && has(jobs[i], kRmsCarried | kSsqOut)), op, ": tensor ", i,
                ": carried sums of squares are not served in capturable mode (kDynamic rows)");
  }
}

// What a plan depends on, per job: numel, storage types, structural flags, NaN group, row length,
// whether it is vectorizable. Not the addresses themselves, nor any coefficient.
inline std::string structure_key(const std::vector<Job>& jobs) {
  std::string key;
  key.reserve(jobs.size() * 56);
  for (const Job& j : jobs) {
    const int64_t fields[] = {j.numel, j.ps, j.ms, j.flags & kStructuralFlags, j.nan_group, j.row_len,
                              vectorizable(j) ? 1 : 0};
    key.append(reinterpret_cast<const char*>(fields), sizeof(fields));
  }
  return key;
}

// A plan as the step uses it: the layout (host), its upload and the last jobs uploaded for it.
template <typename Stored>
struct Plan {
  std::shared_ptr<const Layout> layout;
  Stored tables;  // Layout::bytes on the device
  Stored jobs;    // the jobs array on the device
};

struct PlanStats {
  int64_t builds = 0, uploads = 0;  // layouts built; uploads of a jobs array
};

// Plans by (device, structure), least recently used dropped beyond kMaxPlans. A model's step has
// one structure (two while Tiger's carried sums start: the first step reads theta, later ones
// carry). `Stored` is the handle of device memory (at::Tensor); `upload(data, bytes)` makes one.
template <typename Stored>
class PlanCache {
 public:
  static constexpr size_t kMaxPlans = 16;

  // The plan of this call, built only if its structure is new, with `jobs` uploaded only if they
  // differ from the last upload for it. `capturable`: the jobs' bytes are part of the key, so the
  // tables a captured CUDA graph reads are never replaced by those of another call of the same
  // structure. Returned by value (handles), so a concurrent eviction is harmless.
  template <typename Upload>
  Plan<Stored> prepare(const std::vector<Job>& jobs, const std::string& device, bool capturable, Upload upload) {
    std::string staged(reinterpret_cast<const char*>(jobs.data()), jobs.size() * sizeof(Job));
    std::string key = device + structure_key(jobs);
    if (capturable) key += staged;
    const std::lock_guard<std::mutex> lock(mutex_);
    auto it = std::find_if(plans_.begin(), plans_.end(), [&](const Entry& e) { return e.key == key; });
    if (it == plans_.end()) {
      Entry e;
      e.key = std::move(key);
      auto layout = std::make_shared<Layout>(make_layout(jobs));
      e.plan.tables = upload(layout->bytes.data(), layout->bytes.size());
      e.plan.layout = std::move(layout);
      ++stats_.builds;
      plans_.push_front(std::move(e));
      if (plans_.size() > kMaxPlans) plans_.pop_back();
    } else if (it != plans_.begin()) {
      plans_.splice(plans_.begin(), plans_, it);
    }
    Entry& e = plans_.front();
    if (e.staged != staged) {
      e.plan.jobs = upload(staged.data(), staged.size());
      e.staged = std::move(staged);
      ++stats_.uploads;
    }
    return e.plan;
  }

  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    plans_.clear();
    stats_ = PlanStats{};
  }

  PlanStats stats() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  size_t size() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return plans_.size();
  }

 private:
  struct Entry {
    std::string key;
    Plan<Stored> plan;
    std::string staged;  // the bytes of plan.jobs
  };
  mutable std::mutex mutex_;
  std::list<Entry> plans_;  // most recently used first
  PlanStats stats_;
};

}  // namespace sign_optim
}  // namespace kexue
