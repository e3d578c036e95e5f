// The one module definition of kexue._C. Kernels live in csrc/cpu and csrc/cuda; their
// declarations are in csrc/include/kexue/ops.h.
#include <torch/extension.h>

#include "kexue/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kexue native kernels (C++ CPU, and CUDA when built with it)";
  namespace py = pybind11;
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("entropy_normalize_forward_cpu", &kexue::entropy_normalize_forward_cpu, nogil, arg("x"), arg("target"),
        arg("logits"), arg("max_iter"), arg("tol"));
  m.def("entropy_normalize_backward_cpu", &kexue::entropy_normalize_backward_cpu, nogil, arg("grad_y"),
        arg("grad_gamma"), arg("x"), arg("gamma"), arg("stats"), arg("logits"));
#ifdef KEXUE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.def("entropy_normalize_forward_cuda", &kexue::entropy_normalize_forward_cuda, nogil, arg("x"), arg("target"),
        arg("logits"), arg("max_iter"), arg("tol"));
  m.def("entropy_normalize_backward_cuda", &kexue::entropy_normalize_backward_cuda, nogil, arg("grad_y"),
        arg("grad_gamma"), arg("x"), arg("gamma"), arg("stats"), arg("logits"));
#else
  m.attr("WITH_CUDA") = false;
#endif
}
