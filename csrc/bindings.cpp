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
  m.def("sign_optim_step_cpu", &kexue::sign_optim_step_cpu, nogil, arg("params"), arg("grads"), arg("exp_avgs"),
        arg("masks"), arg("row_seen"), arg("hyper"), arg("ints"));
  m.def("sign_optim_step_dyn_cpu", &kexue::sign_optim_step_dyn_cpu, nogil, arg("params"), arg("grads"),
        arg("exp_avgs"), arg("masks"), arg("row_seen"), arg("ssq"), arg("hyper"), arg("ints"), arg("dyn"));
  m.def("sign_optim_plan_probe", &kexue::sign_optim_plan_probe, nogil, arg("params"), arg("grads"), arg("exp_avgs"),
        arg("masks"), arg("row_seen"), arg("ssq"), arg("hyper"), arg("ints"), arg("capturable"), arg("clear"));
  m.def("biohash_activations_cpu", &kexue::biohash_activations_cpu, nogil, arg("indices"), arg("offsets"),
        arg("weights"), arg("synapses_t"));
  m.def("biohash_sparse_cpu", &kexue::biohash_sparse_cpu, nogil, arg("indices"), arg("offsets"), arg("weights"),
        arg("synapses_t"), arg("k"), arg("packed"));
  m.def("biohash_topk_cpu", &kexue::biohash_topk_cpu, nogil, arg("activations"), arg("k"), arg("packed"));
  m.def("biohash_update_cpu", &kexue::biohash_update_cpu, nogil, arg("indices"), arg("offsets"), arg("weights"),
        arg("synapses_t"), arg("lr"), arg("delta"), arg("rank"), arg("prec"), arg("tiny"));
  m.def("hamming_topk_cpu", &kexue::hamming_topk_cpu, nogil, arg("queries"), arg("database"), arg("n"));
  m.def("global_pointer_loss_forward_cpu", &kexue::global_pointer_loss_forward_cpu, nogil, arg("q"), arg("k"),
        arg("start_bias"), arg("end_bias"), arg("mask"), arg("row_ptr"), arg("cols"), arg("dense"), arg("rope"),
        arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_loss_backward_cpu", &kexue::global_pointer_loss_backward_cpu, nogil, arg("grad"), arg("q"),
        arg("k"), arg("start_bias"), arg("end_bias"), arg("mask"), arg("row_ptr"), arg("cols"), arg("dense"), arg("lse"),
        arg("rope"), arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_scores_forward_cpu", &kexue::global_pointer_scores_forward_cpu, nogil, arg("q"), arg("k"),
        arg("start_bias"), arg("end_bias"), arg("mask"), arg("rope"), arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_scores_backward_cpu", &kexue::global_pointer_scores_backward_cpu, nogil, arg("grad"),
        arg("q"), arg("k"), arg("start_bias"), arg("end_bias"), arg("mask"), arg("rope"), arg("rope_base"),
        arg("tril_mask"));
  m.def("logn_attention_forward_cpu", &kexue::logn_attention_forward_cpu, nogil, arg("q"), arg("k"), arg("v"),
        arg("key_padding_mask"), arg("causal"), arg("scale"), arg("train_len"), arg("logn"), arg("clip"),
        arg("min_n"), arg("gradmax"));
  m.def("logn_attention_backward_cpu", &kexue::logn_attention_backward_cpu, nogil, arg("grad_out"),
        arg("grad_lse"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("key_padding_mask"),
        arg("causal"), arg("scale"), arg("train_len"), arg("logn"), arg("clip"), arg("min_n"), arg("gradmax"));
  m.def("logn_attention_varlen_forward_cpu", &kexue::logn_attention_varlen_forward_cpu, nogil, arg("q"), arg("k"),
        arg("v"), arg("cu_seqlens_q"), arg("cu_seqlens_k"), arg("causal"), arg("scale"), arg("train_len"),
        arg("logn"), arg("clip"), arg("min_n"), arg("gradmax"));
  m.def("logn_attention_varlen_backward_cpu", &kexue::logn_attention_varlen_backward_cpu, nogil, arg("grad_out"),
        arg("grad_lse"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("cu_seqlens_q"),
        arg("cu_seqlens_k"), arg("causal"), arg("scale"), arg("train_len"), arg("logn"), arg("clip"), arg("min_n"),
        arg("gradmax"));
#ifdef KEXUE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.def("entropy_normalize_forward_cuda", &kexue::entropy_normalize_forward_cuda, nogil, arg("x"), arg("target"),
        arg("logits"), arg("max_iter"), arg("tol"));
  m.def("entropy_normalize_backward_cuda", &kexue::entropy_normalize_backward_cuda, nogil, arg("grad_y"),
        arg("grad_gamma"), arg("x"), arg("gamma"), arg("stats"), arg("logits"));
  m.def("sign_optim_step_dyn_cuda", &kexue::sign_optim_step_dyn_cuda, nogil, arg("params"), arg("grads"),
        arg("exp_avgs"), arg("masks"), arg("row_seen"), arg("ssq"), arg("hyper"), arg("ints"), arg("dyn"));
  m.def("sign_optim_step_cuda", &kexue::sign_optim_step_cuda, nogil, arg("params"), arg("grads"), arg("exp_avgs"),
        arg("masks"), arg("row_seen"), arg("hyper"), arg("ints"));
  m.def("biohash_activations_cuda", &kexue::biohash_activations_cuda, nogil, arg("indices"), arg("offsets"),
        arg("weights"), arg("synapses_t"));
  m.def("biohash_sparse_cuda", &kexue::biohash_sparse_cuda, nogil, arg("indices"), arg("offsets"), arg("weights"),
        arg("synapses_t"), arg("k"), arg("packed"));
  m.def("biohash_topk_cuda", &kexue::biohash_topk_cuda, nogil, arg("activations"), arg("k"), arg("packed"));
  m.def("hamming_topk_cuda", &kexue::hamming_topk_cuda, nogil, arg("queries"), arg("database"), arg("n"));
  m.def("biohash_update_cuda", &kexue::biohash_update_cuda, nogil, arg("indices"), arg("offsets"), arg("weights"),
        arg("synapses_t"), arg("lr"), arg("delta"), arg("rank"), arg("prec"), arg("tiny"));
  m.def("global_pointer_loss_forward_cuda", &kexue::global_pointer_loss_forward_cuda, nogil, arg("q"), arg("k"),
        arg("start_bias"), arg("end_bias"), arg("mask"), arg("row_ptr"), arg("cols"), arg("dense"), arg("rope"),
        arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_loss_backward_cuda", &kexue::global_pointer_loss_backward_cuda, nogil, arg("grad"), arg("q"),
        arg("k"), arg("start_bias"), arg("end_bias"), arg("mask"), arg("row_ptr"), arg("cols"), arg("dense"), arg("lse"),
        arg("rope"), arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_scores_forward_cuda", &kexue::global_pointer_scores_forward_cuda, nogil, arg("q"), arg("k"),
        arg("start_bias"), arg("end_bias"), arg("mask"), arg("rope"), arg("rope_base"), arg("tril_mask"));
  m.def("global_pointer_scores_backward_cuda", &kexue::global_pointer_scores_backward_cuda, nogil, arg("grad"),
        arg("q"), arg("k"), arg("start_bias"), arg("end_bias"), arg("mask"), arg("rope"), arg("rope_base"),
        arg("tril_mask"));
  m.def("logn_attention_forward_cuda", &kexue::logn_attention_forward_cuda, nogil, arg("q"), arg("k"), arg("v"),
        arg("key_padding_mask"), arg("causal"), arg("scale"), arg("train_len"), arg("logn"), arg("clip"),
        arg("min_n"), arg("gradmax"));
  m.def("logn_attention_backward_cuda", &kexue::logn_attention_backward_cuda, nogil, arg("grad_out"),
        arg("grad_lse"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("key_padding_mask"),
        arg("causal"), arg("scale"), arg("train_len"), arg("logn"), arg("clip"), arg("min_n"), arg("gradmax"));
#else
  m.attr("WITH_CUDA") = false;
#endif
}
