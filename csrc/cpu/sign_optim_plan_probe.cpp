// Test hook: the CUDA sign-optimizer step's launch plan and plan cache (kexue/sign_optim_plan.h),
// driven on CPU tensors, so that the host logic the CUDA step runs -- structure keys, which jobs
// get a pre-pass, spans and outs, which tensors move as 128-bit accesses (the items' vec column),
// when a plan is built and when the jobs are uploaded -- is tested on machines without a GPU. The
// "upload" here is a plain copy into a CPU tensor.
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "kexue/ops.h"
#include "kexue/sign_optim_host.h"
#include "kexue/sign_optim_plan.h"

namespace kexue {
namespace {

using namespace sign_optim;

PlanCache<at::Tensor>& probe_plans() {
  static PlanCache<at::Tensor> cache;
  return cache;
}

template <typename T, typename F>
at::Tensor rows_of(const std::vector<T>& v, int64_t width, F fields) {
  at::Tensor out = at::empty({static_cast<int64_t>(v.size()), width}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const T& x : v) {
    const std::vector<int64_t> f = fields(x);
    for (int64_t c = 0; c < width; ++c) *o++ = f[c];
  }
  return out;
}

}  // namespace

std::tuple<int64_t, int64_t, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sign_optim_plan_probe(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                      const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                      const at::Tensor& hyper, const at::Tensor& ints, bool capturable, bool clear) {
  PlanCache<at::Tensor>& cache = probe_plans();
  if (clear) cache.clear();
  // Capturable: a dynamic table of zeros stands in for the device one (decode_jobs wants one for
  // kDynamic rows; the values it applies on CPU only change the jobs' bytes).
  std::optional<at::Tensor> dyn;
  if (capturable) dyn = at::zeros({static_cast<int64_t>(params.size()), kNumDyn}, at::kDouble);
  const Call call = decode_jobs("sign_optim_plan_probe", params, grads, exp_avgs, masks, row_seen, hyper, ints, dyn,
                                at::kCPU, &ssq);
  check_plan_jobs("sign_optim_plan_probe", call.jobs);
  const Plan<at::Tensor> plan = cache.prepare(call.jobs, "cpu", capturable, [](const void* data, size_t bytes) {
    at::Tensor t = at::empty({static_cast<int64_t>(bytes)}, at::kByte);
    if (bytes > 0) std::memcpy(t.data_ptr(), data, bytes);
    return t;
  });
  const Layout& l = *plan.layout;
  TORCH_CHECK(plan.tables.numel() == static_cast<int64_t>(l.bytes.size()) &&
                  std::memcmp(plan.tables.data_ptr(), l.bytes.data(), l.bytes.size()) == 0,
              "sign_optim_plan_probe: the uploaded tables are not the layout's bytes");
  const auto item = [](const Item& x) { return std::vector<int64_t>{x.job, x.begin, x.end, x.vec}; };
  const auto launch = [](const Launch& x) { return std::vector<int64_t>{x.ps, x.ms, x.first, x.count}; };
  const auto span = [](const Span& x) { return std::vector<int64_t>{x.job, x.first, x.count}; };
  const PlanStats stats = cache.stats();
  return {stats.builds,
          stats.uploads,
          static_cast<int64_t>(cache.size()),
          rows_of(l.items, 4, item),
          rows_of(l.prepass, 4, launch),
          rows_of(l.steps, 4, launch),
          rows_of(l.spans, 3, span),
          rows_of(l.outs, 3, span)};
}

}  // namespace kexue
