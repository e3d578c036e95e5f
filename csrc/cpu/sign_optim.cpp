// Lion / Tiger on CPU: one fused multi-tensor step over every parameter handed in.
//
// The tensors are cut into work items of ~64k elements (whole rows for tensors updated row by
// row) and torch's threads take the items of all tensors at once from a shared counter
// (kexue/dynamic_for.h), so a step over many small tensors keeps every thread busy, a step over a
// few large ones splits them, and a thread whose core another process holds delays one item.
// Each element is read and written once: read param, grad, momentum; write param, momentum.
//
// Two reductions must finish before the update they feed: Tiger's whole-tensor RMS(theta) and the NaN guard's
// "any NaN or inf in the grad". The RMS is carried from the previous step when the optimizer can vouch for it
// (kRmsCarried): the step that writes theta_t sums its squares while each tile is still in L1 (kSsqOut), so
// the next step needs no extra read of the params, and Tiger moves the bytes Lion moves. Otherwise, and for
// the NaN guard, a pre-pass over the same items reads the params / grads first, batch by batch of tensors
// that fit in the last-level cache, each batch's pre-pass alongside the previous batch's main pass
// (cache_batches, overlapped). Per-row quantities (row RMS, whether a row of an embedding table has any
// gradient) are computed in the main pass, on a row that is about to be updated and so sits in cache. Partial
// sums are kept per item and added in item order: results do not depend on the number of threads.
//
// The element arithmetic is in csrc/include/kexue/sign_optim.h (shared with CUDA). Here: loops
// over float tiles that the compiler vectorizes, compiled per instruction set (simd.h), with
// software prefetch; 16-bit tensors are converted tile by tile into float buffers that stay in L1,
// except bfloat16 momentum next to float params, which the update loop converts itself.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

#include "kexue/dynamic_for.h"
#include "kexue/ops.h"
#include "kexue/sign_optim.h"
#include "kexue/sign_optim_host.h"
#include "simd.h"

namespace kexue {
namespace {

using namespace sign_optim;

constexpr int64_t kChunk = 65536;  // elements per work item (as ATen's multi_tensor_apply)
constexpr int64_t kTile = 1024;    // elements per float tile (4 KB per buffer)

// Software prefetch. A step streams up to three arrays from memory at once, and on the 2-core
// benchmark machine one core's hardware prefetchers keep too few of their lines in flight to
// reach the machine's bandwidth. Every loop that reads memory therefore asks, once per block of
// 16 elements, for the line kAheadBytes further on in each of its streams. On the 100M-parameter
// Lion step this took a one-loop prototype from 51 to 44 ms (1.5 to 2.5 KB ahead all within 1%;
// 4 KB ahead kept half the gain; a burst of prefetches at the start of each 1024-element tile
// none of it). For 16-bit tensors the loops that read memory are the conversions into float tiles;
// 2 KB ahead of a 16-bit tile is the next tile, so those prefetch one tile ahead. Prefetching an
// address past the end of an array is harmless: it never faults.
constexpr int64_t kBlock = 16;  // elements between prefetches: one 64-byte line of float
constexpr int64_t kAheadBytes = 2048;

inline __attribute__((always_inline)) void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kAheadBytes, 1, 3);
}

// ---------------------------------------------------------------------------------------------
// Vectorized loops over float tiles. Everything they call is inline, so each clone is complete.

// kMomBF16: the momentum is bfloat16 bits in memory, converted in the loop itself. Float params
// with bfloat16 momentum (the option that halves the state) then take no trip through a float
// tile: converting into a tile and back is two more loops over it per 1024 elements, and with them
// the step moved its 16 bytes per parameter no faster than the float-momentum step moved 20.
template <bool kGate, bool kNewMomentum, bool kUpdate, bool kGateStep, bool kMomBF16>
inline __attribute__((always_inline)) void update_loop(float* __restrict th, void* __restrict mv,
                                                       const float* __restrict g, const float* __restrict gate,
                                                       int64_t n, const Coefs& k, float gscale) {
  float* __restrict mf = static_cast<float*>(mv);
  uint16_t* __restrict mb = static_cast<uint16_t*>(mv);
  for (int64_t b = 0; b < n; b += kBlock) {
    // th, m and g are memory for float tensors, L1-resident tiles otherwise (then this is cheap).
    prefetch_ahead(g + b);
    prefetch_ahead(kMomBF16 ? static_cast<const void*>(mb + b) : static_cast<const void*>(mf + b));
    if (kUpdate) prefetch_ahead(th + b);
    const int64_t e = std::min(n, b + kBlock);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      // A masked element never sees its gradient: inf * 0 would be NaN.
      const float gi = kGate ? (gate[i] != 0.f ? g[i] * gate[i] : 0.f) : g[i] * gscale;
      const float mi = kMomBF16 ? bf16_bits_to_float(mb[i]) : mf[i];
      const float mn = new_momentum(mi, gi, k);
      if (kUpdate) {
        const float tn = stepped(th[i], direction(mi, mn, gi, k, kNewMomentum), k);
        th[i] = (kGate && kGateStep) ? (gate[i] != 0.f ? tn : th[i]) : tn;
      }
      if (kMomBF16) {
        mb[i] = float_to_bf16_bits(mn);
      } else {
        mf[i] = mn;
      }
    }
  }
}

enum Variant : int { kVGate = 1, kVNewMomentum = 2, kVUpdate = 4, kVGateStep = 8, kVMomBF16 = 16 };

template <int V>
inline __attribute__((always_inline)) void run_variant(float* th, void* m, const float* g, const float* gate,
                                                       int64_t n, const Coefs& k, float gscale) {
  update_loop<(V & kVGate) != 0, (V & kVNewMomentum) != 0, (V & kVUpdate) != 0, (V & kVGateStep) != 0,
              (V & kVMomBF16) != 0>(th, m, g, gate, n, k, gscale);
}

// The update of one tile, in place on th (params) and m (momentum: float, or bfloat16 bits with
// kVMomBF16).
KEXUE_CPU_CLONES void update_tile(float* th, void* m, const float* g, const float* gate, int64_t n,
                                  const Coefs& k, float gscale, int variant) {
  switch (variant) {
#define KEXUE_CASE(V) \
  case V:             \
    run_variant<V>(th, m, g, gate, n, k, gscale); break;
#define KEXUE_CASES(B)                                                                                       \
  KEXUE_CASE(B + 0) KEXUE_CASE(B + 1) KEXUE_CASE(B + 2) KEXUE_CASE(B + 3) KEXUE_CASE(B + 4) KEXUE_CASE(B + 5) \
  KEXUE_CASE(B + 6) KEXUE_CASE(B + 7) KEXUE_CASE(B + 8) KEXUE_CASE(B + 9) KEXUE_CASE(B + 10)                \
  KEXUE_CASE(B + 11) KEXUE_CASE(B + 12) KEXUE_CASE(B + 13) KEXUE_CASE(B + 14) KEXUE_CASE(B + 15)
    KEXUE_CASES(0)
    KEXUE_CASES(kVMomBF16)
#undef KEXUE_CASES
#undef KEXUE_CASE
  }
}

// ChildTuning-F: gate = gscale where the hash keeps the element, else 0.
KEXUE_CPU_CLONES void bernoulli_gate(float* gate, int64_t n, uint64_t start, uint32_t k0, uint32_t k1,
                                     uint32_t threshold, float gscale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    gate[i] = keep_element(element_bits(k0, k1, start + static_cast<uint64_t>(i)), threshold) ? gscale : 0.f;
  }
}

// ChildTuning-D: gate = gscale where the fixed mask is set, else 0.
KEXUE_CPU_CLONES void mask_gate(float* gate, const uint8_t* mask, int64_t n, float gscale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gate[i] = mask[i] != 0 ? gscale : 0.f;
}

KEXUE_CPU_CLONES void shrink_tile(float* th, int64_t n, float shrink, float centre) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) th[i] = nan_shrink(th[i], shrink, centre);
}

KEXUE_CPU_CLONES void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n; b += kBlock) {
    prefetch_ahead(src + b);
    const int64_t e = std::min(n, b + kBlock);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) dst[i] = bf16_bits_to_float(src[i]);
  }
}

KEXUE_CPU_CLONES void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
}

KEXUE_CPU_CLONES void float_to_bf16_stochastic(const float* src, uint16_t* dst, int64_t n, uint64_t start,
                                               uint32_t k0, uint32_t k1) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = float_to_bf16_bits_stochastic(src[i], element_bits(k0, k1, start + static_cast<uint64_t>(i)));
  }
}

// float16 through the compiler's _Float16 where it has one (GCC >= 12 on x86-64): the x86-64-v3
// clone then converts 8 values per F16C instruction instead of c10::Half's bit manipulation.
#if defined(__FLT16_MAX__)
KEXUE_CPU_CLONES void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n; b += kBlock) {
    prefetch_ahead(src + b);
    const int64_t e = std::min(n, b + kBlock);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      _Float16 h;
      std::memcpy(&h, src + i, sizeof(h));
      dst[i] = static_cast<float>(h);
    }
  }
}
KEXUE_CPU_CLONES void float_to_half(const float* src, c10::Half* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const _Float16 h = static_cast<_Float16>(src[i]);  // round to nearest even, as c10::Half
    std::memcpy(dst + i, &h, sizeof(h));
  }
}
#else
void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (i % kBlock == 0) prefetch_ahead(src + i);
    dst[i] = static_cast<float>(src[i]);
  }
}
void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}
#endif

// Sum of squares of one tile (n <= kTile) in float lanes, which the callers add up in double: a
// float sum of 1024 squares is good to ~1e-7 relative, below the float32 rounding of the lr it
// scales, and float lanes keep this pass at memory speed (double lanes halve the vector width).
// The reductions keep one partial per lane of a block (kBlock wide), so that the prefetch per
// block does not force a horizontal reduction per block; the lanes are combined once at the end.
KEXUE_CPU_CLONES double sum_squares(const float* x, int64_t n) {
  float lanes[kBlock] = {};
  int64_t b = 0;
  for (; b + kBlock <= n; b += kBlock) {
    prefetch_ahead(x + b);
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) lanes[i] += x[b + i] * x[b + i];
  }
  for (int64_t i = b; i < n; ++i) lanes[i - b] += x[i] * x[i];
  double s = 0.0;
  for (int64_t i = 0; i < kBlock; ++i) s += lanes[i];
  return s;
}

// Whether pred(x[i]) holds for some i < n, prefetching as the loops above.
template <typename Pred>
inline __attribute__((always_inline)) bool any_of_tile(const float* x, int64_t n, Pred pred) {
  int32_t lanes[kBlock] = {};
  int64_t b = 0;
  for (; b + kBlock <= n; b += kBlock) {
    prefetch_ahead(x + b);
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) lanes[i] |= pred(x[b + i]);
  }
  for (int64_t i = b; i < n; ++i) lanes[i - b] |= pred(x[i]);
  int32_t found = 0;
  for (int64_t i = 0; i < kBlock; ++i) found |= lanes[i];
  return found != 0;
}

KEXUE_CPU_CLONES bool any_nonzero(const float* x, int64_t n) {
  return any_of_tile(x, n, [](float v) { return static_cast<int32_t>(v != 0.f); });  // NaN counts as nonzero
}

KEXUE_CPU_CLONES bool any_non_finite(const float* x, int64_t n) {
  return any_of_tile(x, n, [](float v) { return static_cast<int32_t>(non_finite(v)); });
}

// any_non_finite over a whole work item, read as kStreams interleaved sub-ranges: a loop that reads
// one stream streams at about 24 GB/s on the 2-core benchmark machine, one that reads 4 to 8 at once
// at 34-36 GB/s (Lion's update loop, with its 3 read and 2 write streams, moves 53 GB/s). The NaN
// guard's pre-pass is such a read-only loop over the grads, so this is its cost.
constexpr int64_t kStreams = 4;

KEXUE_CPU_CLONES bool any_non_finite_streams(const float* x, int64_t n) {
  const int64_t q = n / (kStreams * kBlock) * kBlock;  // elements per stream, whole blocks
  int32_t lanes[kBlock] = {};
  for (int64_t b = 0; b < q; b += kBlock) {
    for (int64_t k = 0; k < kStreams; ++k) {
      const float* y = x + k * q + b;
      prefetch_ahead(y);
#pragma omp simd
      for (int64_t i = 0; i < kBlock; ++i) lanes[i] |= static_cast<int32_t>(non_finite(y[i]));
    }
  }
  int32_t found = 0;
  for (int64_t i = 0; i < kBlock; ++i) found |= lanes[i];
  for (int64_t i = kStreams * q; i < n; ++i) found |= static_cast<int32_t>(non_finite(x[i]));
  return found != 0;
}

// ---------------------------------------------------------------------------------------------
// Storage types (sign_optim_host.h): float, bfloat16 (bits) and half, loaded into and stored from
// float tiles.

// A float view of n elements at ptr + offset: the memory itself for float tensors, else `buf`
// filled by conversion.
const float* load(const void* ptr, int32_t s, int64_t offset, int64_t n, float* buf) {
  switch (s) {
    case kF32: return static_cast<const float*>(ptr) + offset;
    case kBF16: bf16_to_float(static_cast<const uint16_t*>(ptr) + offset, buf, n); return buf;
    case kF16: half_to_float(static_cast<const c10::Half*>(ptr) + offset, buf, n); return buf;
  }
  return buf;
}

// Writable float view: as load, but for float tensors the caller updates memory in place.
float* load_mut(void* ptr, int32_t s, int64_t offset, int64_t n, float* buf) {
  if (s == kF32) return static_cast<float*>(ptr) + offset;
  load(ptr, s, offset, n, buf);
  return buf;
}

// Writes a tile back (nothing to do for float, which was updated in place).
void store(const float* src, void* ptr, int32_t s, int64_t offset, int64_t n, bool stochastic, uint32_t k0,
           uint32_t k1) {
  switch (s) {
    case kF32: return;
    case kBF16: {
      uint16_t* dst = static_cast<uint16_t*>(ptr) + offset;
      if (stochastic) {
        float_to_bf16_stochastic(src, dst, n, static_cast<uint64_t>(offset), k0, k1);
      } else {
        float_to_bf16(src, dst, n);
      }
      return;
    }
    case kF16: float_to_half(src, static_cast<c10::Half*>(ptr) + offset, n); return;
  }
}

// ---------------------------------------------------------------------------------------------
// Work items over the jobs of a call (sign_optim_host.h decodes the table into jobs).

struct Item {
  int64_t job, begin, end;  // element range of one tensor
};

// Float coefficients for a learning rate that already includes any RMS factor.
Coefs coefs_for(const Job& j, double lr) {
  Coefs k;
  k.lr = static_cast<float>(lr);
  k.decay = static_cast<float>(1.0 - lr * j.wd);
  k.c_m = j.c_m, k.c_g = j.c_g, k.m_m = j.m_m, k.m_g = j.m_g;
  return k;
}

// Per-thread float tiles.
struct Tiles {
  float th[kTile], m[kTile], g[kTile], gate[kTile], out[kTile];
};

// Sum of squares of elements [s, s + n) of theta as stored: the same tile function the pre-pass
// runs on the same tiles, so a carried sum is bit for bit the one the pre-pass would compute.
// `th` is the float tile just written (memory itself for float params, in L1 either way); 16-bit
// params are read back from their (L1-resident) storage, so the sum is of the rounded values.
double stored_sum_squares(const Job& j, const float* th, int64_t s, int64_t n, Tiles& t) {
  return sum_squares(j.ps == kF32 ? th : load(j.param, j.ps, s, n, t.out), n);
}

// Sum of squares of elements [s, s + len) read tile by tile from memory (a row, or a range).
double read_sum_squares(const Job& j, int64_t s, int64_t len, Tiles& t) {
  double sum = 0.0;
  for (int64_t o = 0; o < len; o += kTile) {
    const int64_t n = std::min(kTile, len - o);
    sum += sum_squares(load(j.param, j.ps, s + o, n, t.out), n);
  }
  return sum;
}

// The update of elements [begin, end) of one tensor with fixed coefficients. With `ssq`, the sum
// of squares of the stored theta is added to it tile by tile.
void update_range(const Job& j, int64_t begin, int64_t end, const Coefs& k, bool update, Tiles& t,
                  double* ssq = nullptr) {
  int variant = 0;
  const bool gated = has(j, kMaskF) || (has(j, kMaskD) && j.mask != nullptr);
  if (gated) variant |= kVGate;
  if (has(j, kUseNewMomentum)) variant |= kVNewMomentum;
  if (update) variant |= kVUpdate;
  if (gated && has(j, kMaskUpdate)) variant |= kVGateStep;
  const bool stochastic = has(j, kStochasticRound) && j.ps == kBF16;
  // bfloat16 momentum next to float params is converted inside the update loop (update_loop).
  const bool mom_in_loop = j.ps == kF32 && j.ms == kBF16;
  if (mom_in_loop) variant |= kVMomBF16;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const float* g = load(j.grad, j.ps, s, n, t.g);
    void* m = mom_in_loop ? static_cast<void*>(static_cast<uint16_t*>(j.mom) + s)
                          : static_cast<void*>(load_mut(j.mom, j.ms, s, n, t.m));
    float* th = update ? load_mut(j.param, j.ps, s, n, t.th) : t.th;
    if (has(j, kMaskF)) {
      bernoulli_gate(t.gate, n, static_cast<uint64_t>(s), j.mask_k0, j.mask_k1, j.mask_threshold, j.gscale);
    } else if (gated) {
      mask_gate(t.gate, j.mask + s, n, j.gscale);
    }
    update_tile(th, m, g, t.gate, n, k, j.gscale, variant);
    if (!mom_in_loop) store(t.m, j.mom, j.ms, s, n, false, 0, 0);
    if (update) store(th, j.param, j.ps, s, n, stochastic, j.round_k0, j.round_k1);
    if (update && ssq != nullptr) *ssq += stored_sum_squares(j, th, s, n, t);
  }
}

// Rows [row_begin, row_end) of a tensor updated row by row (row RMS and/or lazy rows). With
// kSsqOut (row RMS), each row's sum of squares is left in j.ssq[r] for the next step.
void update_rows(const Job& j, int64_t row_begin, int64_t row_end, double lr, bool update, Tiles& t) {
  const int64_t len = j.row_len;
  const bool carried = has(j, kRmsCarried), out = has(j, kSsqOut);
  // The row's sum of squares before the update: for its lr, or to hand on when theta stays.
  const bool read_ssq = has(j, kRmsRow) && !carried && (update || out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t s = r * len;
    bool present = false;  // any nonzero gradient in this row
    double ssq = 0.0;
    for (int64_t o = 0; o < len; o += kTile) {
      const int64_t n = std::min(kTile, len - o);
      present = present || any_nonzero(load(j.grad, j.ps, s + o, n, t.g), n);
      if (read_ssq) ssq += sum_squares(load(j.param, j.ps, s + o, n, t.th), n);
    }
    if (carried) ssq = j.ssq[r];
    bool live = true;
    if (has(j, kLazyRows)) {
      live = present || (j.seen != nullptr && j.seen[r] != 0);
      if (j.seen != nullptr) j.seen[r] = update ? 0 : static_cast<uint8_t>(live);
    }
    // An absent row whose momentum is frozen does not change at all.
    const bool frozen = has(j, kLazyRows) && !present && has(j, kFreezeAbsent);
    const bool moves = update && live && !frozen;
    if (!frozen) {
      const double row_lr = has(j, kRmsRow) ? lr * std::sqrt(ssq / static_cast<double>(len)) : lr;
      update_range(j, s, s + len, coefs_for(j, row_lr), moves, t);
    }
    if (out) j.ssq[r] = moves ? read_sum_squares(j, s, len, t) : ssq;  // the row is in L1/L2 now
  }
}

// Tiger's NaN guard over elements [begin, end): theta pulled towards its centre. With `ssq`, the
// sum of squares of the stored theta is added to it (whole-tensor sums; row sums: by the caller).
void shrink_range(const Job& j, int64_t begin, int64_t end, Tiles& t, double* ssq) {
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    float* th = load_mut(j.param, j.ps, s, n, t.th);
    shrink_tile(th, n, j.shrink, j.centre);
    store(th, j.param, j.ps, s, n, has(j, kStochasticRound) && j.ps == kBF16, j.round_k0, j.round_k1);
    if (ssq != nullptr) *ssq += stored_sum_squares(j, th, s, n, t);
  }
}

// Per-row sums of squares of rows [row_begin, row_end), read from theta (row-wise kSsqOut where
// this call did not go through update_rows).
void row_sums(const Job& j, int64_t row_begin, int64_t row_end, Tiles& t) {
  for (int64_t r = row_begin; r < row_end; ++r) j.ssq[r] = read_sum_squares(j, r * j.row_len, j.row_len, t);
}

// Work items of jobs [first, last): ~kChunk elements each, whole rows for tensors updated row by row.
std::vector<Item> make_items(const std::vector<Job>& jobs, int64_t first, int64_t last, bool (*wanted)(const Job&)) {
  std::vector<Item> items;
  for (int64_t i = first; i < last; ++i) {
    const Job& j = jobs[i];
    if (j.numel == 0 || !wanted(j)) continue;
    const int64_t step = by_rows(j) ? std::max<int64_t>(1, kChunk / j.row_len) * j.row_len : kChunk;
    for (int64_t b = 0; b < j.numel; b += step) items.push_back({i, b, std::min(j.numel, b + step)});
  }
  return items;
}

int64_t element_bytes(int32_t s) { return s == kF32 ? 4 : 2; }

bool needs_rms(const Job& j) { return has(j, kRmsTensor) && has(j, kUpdate); }

// Whether the job's sums of squares are per row (else one per tensor).
bool row_ssq(const Job& j) { return by_rows(j) && has(j, kRmsRow); }

// Whether the pre-pass reads the params of a job: for a whole-tensor RMS that is not carried, or to
// hand on the sum of a theta this call will not write (a skipped job, an accumulation micro-step).
bool pre_reads_params(const Job& j) {
  if (row_ssq(j) || has(j, kRmsCarried)) return false;
  if (j.skip) return has(j, kSsqOut);
  return needs_rms(j) || (has(j, kSsqOut) && !has(j, kUpdate));
}

bool pre_reads_grads(const Job& j) { return !j.skip && j.nan_group >= 0; }

// Bytes the pre-pass reads for a job.
int64_t pre_pass_bytes(const Job& j) {
  return j.numel * element_bytes(j.ps) * ((pre_reads_params(j) ? 1 : 0) + (pre_reads_grads(j) ? 1 : 0));
}

// Where the pre-pass is needed, the step runs in batches of consecutive tensors, each batch reading about
// kBatchBytes in its pre-pass, which runs alongside the previous batch's main pass (overlapped()): the main
// pass then finds a batch's grads still in the last-level cache instead of reading them from memory a second
// time. A NaN-guard group is never split (its flag must be known before any of its tensors moves), nor is a
// tensor (its RMS needs all of it), so a batch can be larger. Tensors need not be small for this: in the
// 100M-parameter benchmark 2/3 of the parameters are in tensors of over 4M. There, with the pre-pass reading
// params and grads and no overlap, Tiger's default step went from 74.9 to 71.7 ms with 32 MB batches (8 to
// 128 MB: 71.7 to 73.5 ms). Now that it reads only the grads and overlaps the main pass, on a shared machine
// (load ~9 on 2 cores) 128 MB and larger batches came out best (Tiger/Lion 1.42-1.52x, against 1.72x at 32 MB
// and 2.1x at 8 MB), and within the noise of one batch of everything (1.42x): the overlap is not shown to
// gain there. On a quiet machine, with the pre-pass's multi-stream read, a first batch of 4 MB and each next
// one up to 4x the previous one (so that less of the grads is read with no main pass beside it) measured the
// same as 128 MB batches (Tiger/Lion 1.30x either way).
constexpr int64_t kBatchBytes = int64_t{128} << 20;

// The batch size, or KEXUE_SIGN_OPTIM_BATCH_BYTES when set to a positive integer: for tests, which
// need batch boundaries between tensors of a few MB, and for measuring other sizes. Read per step
// (one getenv against a step over megabytes), so a test can set it in a running process.
int64_t batch_bytes() {
  const char* text = std::getenv("KEXUE_SIGN_OPTIM_BATCH_BYTES");
  if (text == nullptr) return kBatchBytes;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return (end != text && *end == '\0' && value > 0) ? static_cast<int64_t>(value) : kBatchBytes;
}

// [first, last) job ranges of the batches; one batch of all jobs when no job needs the pre-pass.
std::vector<std::pair<int64_t, int64_t>> cache_batches(const std::vector<Job>& jobs) {
  const int64_t T = static_cast<int64_t>(jobs.size());
  std::vector<int64_t> group_last(T, -1);  // last job of each NaN group
  for (int64_t i = 0; i < T; ++i) {
    if (jobs[i].nan_group >= 0) group_last[jobs[i].nan_group] = i;
  }
  std::vector<std::pair<int64_t, int64_t>> out;
  const int64_t limit = batch_bytes();
  int64_t first = 0, bytes = 0, open_until = -1;  // open_until: last job of a group begun in this batch
  for (int64_t i = 0; i < T; ++i) {
    bytes += pre_pass_bytes(jobs[i]);
    if (jobs[i].nan_group >= 0) open_until = std::max(open_until, group_last[jobs[i].nan_group]);
    if (bytes >= limit && open_until <= i) {
      out.push_back({first, i + 1});
      first = i + 1, bytes = 0;
    }
  }
  if (first < T) out.push_back({first, T});
  return out;
}

// Whether this call writes a job's theta.
bool writes_theta(const Job& j, bool shrink) { return !j.skip && (shrink || has(j, kUpdate)); }

// The pre-pass of one batch: per item, the sum of squares of the params (a whole-tensor RMS that is
// not carried) and whether the grads hold a NaN or inf (the NaN guard).
struct PrePass {
  std::vector<Item> items;
  std::vector<double> ssq;
  std::vector<uint8_t> nan;

  PrePass(const std::vector<Job>& jobs, int64_t first, int64_t last)
      : items(make_items(jobs, first, last, [](const Job& j) { return pre_reads_params(j) || pre_reads_grads(j); })),
        ssq(items.size(), 0.0),
        nan(items.size(), 0) {}

  void run_item(const std::vector<Job>& jobs, size_t it, float* buf) {
    const Item& item = items[it];
    const Job& j = jobs[item.job];
    const bool rms = pre_reads_params(j), guard = pre_reads_grads(j);
    double sum = 0.0;
    bool found = false;
    if (guard && !rms && j.ps == kF32) {  // the common case: the grads only, read in place
      nan[it] = any_non_finite_streams(static_cast<const float*>(j.grad) + item.begin, item.end - item.begin);
      return;
    }
    for (int64_t s = item.begin; s < item.end; s += kTile) {
      const int64_t n = std::min(kTile, item.end - s);
      if (rms) sum += sum_squares(load(j.param, j.ps, s, n, buf), n);
      if (guard) found = found || any_non_finite(load(j.grad, j.ps, s, n, buf), n);
    }
    ssq[it] = sum;
    nan[it] = found;
  }

  // Partial sums added in item order, so results do not depend on the number of threads.
  void finish(const std::vector<Job>& jobs, std::vector<double>& job_ssq, std::vector<uint8_t>& group_nan) const {
    for (size_t it = 0; it < items.size(); ++it) {
      const Job& j = jobs[items[it].job];
      job_ssq[items[it].job] += ssq[it];
      if (pre_reads_grads(j) && nan[it]) group_nan[j.nan_group] = 1;
    }
  }
};

// The main pass of one batch, with each job's learning rate and whether the NaN guard shrinks it.
// Whole-tensor kSsqOut jobs that write theta leave per-item sums of squares of the stored theta.
struct MainPass {
  std::vector<Item> items;
  std::vector<double> part;

  MainPass(const std::vector<Job>& jobs, int64_t first, int64_t last)
      // A skipped job (GradScaler found an inf, capturable mode) only hands on its row sums.
      : items(make_items(jobs, first, last,
                         [](const Job& j) {
                           return !j.skip || (row_ssq(j) && has(j, kSsqOut) && !has(j, kRmsCarried));
                         })),
        part(items.size(), 0.0) {}

  void run_item(const std::vector<Job>& jobs, size_t it, const std::vector<double>& lr,
                const std::vector<uint8_t>& shrink, Tiles& tiles) {
    const Item& item = items[it];
    const Job& j = jobs[item.job];
    double* sum = has(j, kSsqOut) && !row_ssq(j) ? &part[it] : nullptr;
    if (j.skip) {
      row_sums(j, item.begin / j.row_len, item.end / j.row_len, tiles);
    } else if (shrink[item.job]) {
      shrink_range(j, item.begin, item.end, tiles, sum);
      if (has(j, kSsqOut) && row_ssq(j)) row_sums(j, item.begin / j.row_len, item.end / j.row_len, tiles);
    } else if (by_rows(j)) {
      update_rows(j, item.begin / j.row_len, item.end / j.row_len, lr[item.job], has(j, kUpdate), tiles);
    } else {
      update_range(j, item.begin, item.end, coefs_for(j, lr[item.job]), has(j, kUpdate), tiles, sum);
    }
  }

  // The sums of the theta written, per job in item order (as PrePass::finish adds its own).
  void finish(const std::vector<Job>& jobs, int64_t first, int64_t last, const std::vector<uint8_t>& shrink,
              std::vector<double>& job_ssq) const {
    auto written_out = [&](int64_t i) {
      return has(jobs[i], kSsqOut) && !row_ssq(jobs[i]) && writes_theta(jobs[i], shrink[i]);
    };
    for (int64_t i = first; i < last; ++i) {
      if (written_out(i)) job_ssq[i] = 0.0;
    }
    for (size_t it = 0; it < items.size(); ++it) {
      if (written_out(items[it].job)) job_ssq[items[it].job] += part[it];
    }
  }
};

// One parallel region over the main pass of a batch and the pre-pass of the next, interleaved so
// that both threads do some of each: the read-only stream of the next batch's grads (the NaN
// guard) then runs while the update streams, instead of in a phase of its own, and leaves those
// grads in the last-level cache for the next main pass (kBatchBytes says what was measured). The
// two touch disjoint jobs (batches never share a tensor or a NaN group), and every partial lands in
// its own slot, so the result is that of the two passes run one after the other.
void overlapped(const std::vector<Job>& jobs, MainPass* main, PrePass* pre, const std::vector<double>& lr,
                const std::vector<uint8_t>& shrink) {
  const int64_t nm = main == nullptr ? 0 : static_cast<int64_t>(main->items.size());
  const int64_t np = pre == nullptr ? 0 : static_cast<int64_t>(pre->items.size());
  // Merge order: item k of a list of n sits at (k + 0.5) / n.
  std::vector<std::pair<int32_t, int64_t>> order;  // (0 main / 1 pre, item)
  order.reserve(nm + np);
  for (int64_t a = 0, b = 0; a < nm || b < np;) {
    if (b >= np || (a < nm && (2 * a + 1) * np <= (2 * b + 1) * nm)) {
      order.push_back({0, a++});
    } else {
      order.push_back({1, b++});
    }
  }
  const int64_t n = static_cast<int64_t>(order.size());
  cpu::dynamic_for(
      n, cpu::worker_count(n), [](int64_t) { return Tiles{}; },
      [&](Tiles& tiles, int64_t, int64_t k) {
        if (order[k].first == 0) {
          main->run_item(jobs, order[k].second, lr, shrink, tiles);
        } else {
          pre->run_item(jobs, order[k].second, tiles.out);
        }
      });
}

// The whole step over decoded jobs: the pre-pass of the first cache batch, then per batch its main
// pass overlapped with the next batch's pre-pass.
void run_step(const std::vector<Job>& jobs) {
  const int64_t T = static_cast<int64_t>(jobs.size());
  std::vector<double> ssq(T, 0.0), lr(T);
  std::vector<uint8_t> group_nan(T, 0), shrink(T);
  const std::vector<std::pair<int64_t, int64_t>> batches = cache_batches(jobs);
  if (batches.empty()) return;
  std::optional<PrePass> pre(std::in_place, jobs, batches[0].first, batches[0].second);
  overlapped(jobs, nullptr, &*pre, lr, shrink);
  for (size_t b = 0; b < batches.size(); ++b) {
    const auto [first, last] = batches[b];
    pre->finish(jobs, ssq, group_nan);
    for (int64_t i = first; i < last; ++i) {
      const Job& j = jobs[i];
      if (has(j, kRmsCarried) && !row_ssq(j)) ssq[i] = j.ssq[0];  // theta_{t-1}'s sum, left by the last call
      lr[i] = needs_rms(j) && j.numel > 0 ? j.lr * std::sqrt(ssq[i] / static_cast<double>(j.numel)) : j.lr;
      shrink[i] = !j.skip && ((j.nan_group >= 0 && group_nan[j.nan_group]) || has(j, kShrinkNow));
    }
    MainPass main(jobs, first, last);
    if (b + 1 < batches.size()) {
      pre.emplace(jobs, batches[b + 1].first, batches[b + 1].second);
    } else {
      pre.reset();
    }
    overlapped(jobs, &main, pre ? &*pre : nullptr, lr, shrink);
    main.finish(jobs, first, last, shrink, ssq);
    // Hand the sums on: of the theta written now, or of the unchanged one (carried or pre-read).
    for (int64_t i = first; i < last; ++i) {
      if (has(jobs[i], kSsqOut) && !row_ssq(jobs[i])) jobs[i].ssq[0] = ssq[i];
    }
  }
}

}  // namespace

void sign_optim_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                         const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints) {
  const std::vector<Job> jobs =
      decode_jobs("sign_optim_step_cpu", params, grads, exp_avgs, masks, row_seen, hyper, ints, std::nullopt, at::kCPU)
          .jobs;
  run_step(jobs);
}

void sign_optim_step_dyn_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& exp_avgs,
                             const std::vector<std::optional<at::Tensor>>& masks,
                             const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                             const at::Tensor& hyper, const at::Tensor& ints, const std::optional<at::Tensor>& dyn) {
  const std::vector<Job> jobs = decode_jobs("sign_optim_step_dyn_cpu", params, grads, exp_avgs, masks, row_seen, hyper,
                                            ints, dyn, at::kCPU, &ssq)
                                    .jobs;
  run_step(jobs);
}

}  // namespace kexue
