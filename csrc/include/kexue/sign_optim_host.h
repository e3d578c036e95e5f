// Sign optimizers (Lion, Tiger): the host side shared by the CPU and CUDA kernels -- checking the
// tensors and tables of one call and decoding them into an array of jobs (one per tensor).
//
// The contract is kexue::sign_optim_step's (python/kexue/ops/sign_optim.py): params, grads and
// momenta contiguous with one numel per index, grads in the param's dtype, momenta float32 or
// bfloat16, optional bool ChildTuning-D masks, uint8 row_seen flags (an empty tensor means none),
// the (T, kNumFloats) float64 / (T, kNumInts) int64 host tables and, in capturable mode, the
// (T, kNumDyn) float64 dynamic table on the tensors' device (sign_optim.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "kexue/sign_optim.h"

namespace kexue {
namespace sign_optim {

// Storage types of params, grads and momenta.
enum Storage : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One tensor of a call: its table row and its memory. Plain data: the CUDA path copies an array of
// these to the device as bytes.
struct Job : TableRow {
  void* param;
  const void* grad;
  void* mom;
  const uint8_t* mask;  // ChildTuning-D, or null
  uint8_t* seen;        // rows seen with a gradient in Tiger's accumulation window, or null
  double* ssq;          // carried sum(s) of squares of theta (kRmsCarried / kSsqOut), or null
  int64_t numel;
  int32_t ps, ms;       // param (= grad) and momentum storage
};

// The decoded call. `dyn` points to the dynamic table (device memory on CUDA) or is null.
struct Call {
  std::vector<Job> jobs;
  const double* dyn = nullptr;
};

inline Storage storage_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
  return kF32;
}

// Checks everything a kernel relies on and decodes the tables. Every tensor must be on `device`
// (the tables: on the CPU). On the CPU the dynamic rows are applied here, since the dynamic table
// is host memory there; on CUDA the host never reads it (that would synchronise) and the kernels
// apply it (apply_dynamic).
inline Call decode_jobs(const char* op, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                        const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints,
                        const std::optional<at::Tensor>& dyn, const at::Device& device,
                        const std::vector<at::Tensor>* ssq = nullptr) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() && masks.size() == params.size() &&
                  row_seen.size() == params.size(),
              op, ": params, grads, exp_avgs, masks and row_seen must have the same length");
  TORCH_CHECK(ssq == nullptr || ssq->size() == params.size(), op, ": ssq must have one entry per tensor");
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.is_contiguous() &&
                  hyper.dim() == 2 && hyper.size(0) == T && hyper.size(1) == kNumFloats,
              op, ": hyper must be a contiguous CPU float64 tensor of shape (", T, ", ", kNumFloats, ")");
  TORCH_CHECK(ints.device().is_cpu() && ints.scalar_type() == at::kLong && ints.is_contiguous() && ints.dim() == 2 &&
                  ints.size(0) == T && ints.size(1) == kNumInts,
              op, ": ints must be a contiguous CPU int64 tensor of shape (", T, ", ", kNumInts, ")");
  Call call;
  const bool has_dyn = dyn.has_value() && dyn->defined();
  if (has_dyn) {
    TORCH_CHECK(dyn->device() == device && dyn->scalar_type() == at::kDouble && dyn->is_contiguous() &&
                    dyn->dim() == 2 && dyn->size(0) == T && dyn->size(1) == kNumDyn,
                op, ": dyn must be a contiguous float64 tensor of shape (", T, ", ", kNumDyn, ") on ", device);
    call.dyn = dyn->data_ptr<double>();
  }
  const double* h = hyper.data_ptr<double>();
  const int64_t* in = ints.data_ptr<int64_t>();
  call.jobs.resize(T);
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    TORCH_CHECK(p.device() == device && g.device() == device && m.device() == device, op, ": tensor ", i,
                " is not on ", device);
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous(), op, ": tensor ", i,
                " (param, grad or momentum) is not contiguous");
    TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel(), op, ": tensor ", i,
                ": grad and momentum must have as many elements as the param");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": tensor ", i, ": grad dtype must equal the param dtype");
    TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16, op, ": tensor ", i,
                ": momentum must be float32 or bfloat16");
    Job& j = call.jobs[i];  // value-initialized by resize: zero padding
    const TableRow row = decode_row(h + i * kNumFloats, in + i * kNumInts);
    std::memcpy(static_cast<TableRow*>(&j), &row, sizeof(TableRow));  // the padding too
    TORCH_CHECK(!has(j, kDynamic) || has_dyn, op, ": tensor ", i, " is flagged dynamic but no dyn table was given");
    if (has(j, kDynamic) && device.is_cpu()) apply_dynamic(j, call.dyn + i * kNumDyn);
    j.param = p.data_ptr();
    j.grad = g.data_ptr();
    j.mom = m.data_ptr();
    j.ps = storage_of(p, op);
    j.ms = storage_of(m, op);
    j.numel = p.numel();
    TORCH_CHECK(j.nan_group < T, op, ": tensor ", i, ": NaN group out of range");
    TORCH_CHECK(!by_rows(j) || j.numel % j.row_len == 0, op, ": tensor ", i, ": numel is not a multiple of row_len");
    j.mask = nullptr;
    if (masks[i].has_value() && masks[i]->defined()) {
      const at::Tensor& mk = *masks[i];
      TORCH_CHECK(mk.device() == device && mk.is_contiguous() && mk.numel() == j.numel &&
                      (mk.scalar_type() == at::kBool || mk.scalar_type() == at::kByte),
                  op, ": mask ", i, " must be a contiguous bool tensor shaped like its param on ", device);
      j.mask = static_cast<const uint8_t*>(mk.data_ptr());
    }
    j.seen = nullptr;
    if (row_seen[i].numel() > 0 && by_rows(j)) {  // an empty tensor stands for "none"
      const at::Tensor& sn = row_seen[i];
      TORCH_CHECK(sn.device() == device && sn.is_contiguous() && sn.scalar_type() == at::kByte &&
                      sn.numel() == j.numel / j.row_len,
                  op, ": row_seen ", i, " must be a contiguous uint8 tensor with one entry per row on ", device);
      j.seen = static_cast<uint8_t*>(sn.data_ptr());
    }
    j.ssq = nullptr;
    if (has(j, kRmsCarried | kSsqOut)) {
      // Carried sums serve a whole tensor updated element-wise, or the rows of a row-wise RMS.
      const bool per_row = by_rows(j) && has(j, kRmsRow);
      TORCH_CHECK(per_row || !by_rows(j), op, ": tensor ", i,
                  ": carried sums of squares need a whole-tensor job or a row-wise RMS");
      TORCH_CHECK(ssq != nullptr, op, ": tensor ", i, " asks for carried sums of squares but no ssq was given");
      const at::Tensor& sq = (*ssq)[i];
      const int64_t want = per_row ? j.numel / j.row_len : 1;
      TORCH_CHECK(sq.device() == device && sq.is_contiguous() && sq.scalar_type() == at::kDouble &&
                      sq.numel() == want,
                  op, ": ssq ", i, " must be a contiguous float64 tensor of ", want, " element(s) on ", device);
      j.ssq = sq.data_ptr<double>();
    }
  }
  return call;
}

}  // namespace sign_optim
}  // namespace kexue
