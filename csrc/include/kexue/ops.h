// Declarations of every native entry point bound in csrc/bindings.cpp.
//
// Conventions (shared by every op family): inputs arrive contiguous and validated by the Python
// ops layer; outputs are allocated here; reductions accumulate in float32 (float64 for float64).
#pragma once

// ATen only, not torch/extension.h: the .cu files include this header, and the Python headers
// behind torch/extension.h double nvcc's compile time.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace kexue {

// Entropy normalization over rows. x: (R, n); target: (R,) in the compute dtype.
// Returns y (R, n) in x's dtype, gamma (R,) and stats (R, 2) = (row max, log normaliser).
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cpu(const at::Tensor& x,
                                                                             const at::Tensor& target, bool logits,
                                                                             int64_t max_iter, double tol);
// Returns grad_x (R, n) in x's dtype and grad_target (R,) in the compute dtype.
std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cpu(const at::Tensor& grad_y,
                                                                  const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                  const at::Tensor& gamma, const at::Tensor& stats,
                                                                  bool logits);

// Lion / Tiger: one fused step over a list of tensors, in place on params, exp_avgs and row_seen.
// hyper (T, kNumFloats) float64 and ints (T, kNumInts) int64 are the per-tensor table described
// in csrc/include/kexue/sign_optim.h; masks (ChildTuning-D, bool) may be None;
// row_seen (uint8 per row) may be empty tensors, meaning none.
void sign_optim_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                         const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper,
                         const at::Tensor& ints);
// The same with the dynamic table: dyn (T, kNumDyn) float64 on the tensors' device, or None,
// holds the per-step values of the rows flagged kDynamic (capturable mode); ssq: one float64
// tensor per param (one value, or one per row; numel 0: none), the sums of squares of theta
// carried between steps for rows flagged kRmsCarried / kSsqOut (one-pass Tiger). The function
// above is this one with dyn = None and no carried sums.
void sign_optim_step_dyn_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& exp_avgs,
                             const std::vector<std::optional<at::Tensor>>& masks,
                             const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                             const at::Tensor& hyper, const at::Tensor& ints, const std::optional<at::Tensor>& dyn);
// Test hook for the CUDA step's launch-plan cache (csrc/include/kexue/sign_optim_plan.h), run on
// CPU tensors with the sign_optim_step_dyn_cpu arguments: the plan the CUDA step would use for
// this call, from a cache of its own (the CUDA step's is not touched). Returns (builds, uploads,
// cached plans, items (N, 3), pre-pass launches (L, 4), step launches (S, 4), spans (., 3), outs
// (., 3)) as int64 tensors; launches are (ps, ms, first, count). clear: empty the cache first.
std::tuple<int64_t, int64_t, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sign_optim_plan_probe(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                      const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                      const at::Tensor& hyper, const at::Tensor& ints, bool capturable, bool clear);

// BioHash / FlyVec (csrc/cpu/{biohash,biohash_update,hamming}.cpp). Sparse rows are CSR:
// indices (nnz,) int64, offsets (B+1,) int64, optional weights (nnz,) in the compute dtype.
// synapses_t is the (N, K) contiguous transpose of the (K, N) synapses. Codes are uint8: packed
// (B, ceil(K/8)) or dense 0/1 (B, K).
at::Tensor biohash_activations_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                                   const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t);
at::Tensor biohash_sparse_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t, int64_t k,
                              bool packed);
// Winner-take-all of precomputed (B, K) float32/float64 activations (the dense-input path).
at::Tensor biohash_topk_cpu(const at::Tensor& activations, int64_t k, bool packed);
// One FlyVec minibatch step, in place on synapses_t (float32/float64). Returns (winners (B,) int64,
// scaled activation of each winner (B,)).
std::tuple<at::Tensor, at::Tensor> biohash_update_cpu(const at::Tensor& indices, const at::Tensor& offsets,
                                                      const std::optional<at::Tensor>& weights,
                                                      at::Tensor synapses_t, double lr, double delta, int64_t rank,
                                                      double prec, double tiny);
// The n nearest packed codes of each query: (distances (Q, n) int64, indices (Q, n) int64).
std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& queries, const at::Tensor& database,
                                                    int64_t n);

// GlobalPointer (csrc/cpu/global_pointer.cpp). q, k (B, H, L, d) with H in {1, T}; start_bias,
// end_bias (B, T, L) in q's dtype; mask (B, L) bool; rope 0 none / 1 interleaved / 2 half.
// Loss positives as CSR over rows (b, t, i): row_ptr (B*T*L + 1,) int64, cols (N,) int64; or, when
// `dense` is 4-D, dense (B, T, L, L) bool labels (row_ptr and cols are then ignored).
// Loss forward returns loss (B, T) and lse (B, T, 2) = (log(1 + sum_neg e^s), log(1 + sum_pos e^-s))
// in the compute dtype; the backwards return (dq, dk, d_start_bias, d_end_bias) in q's dtype.
std::tuple<at::Tensor, at::Tensor> global_pointer_loss_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& start_bias,
                                                                   const at::Tensor& end_bias, const at::Tensor& mask,
                                                                   const at::Tensor& row_ptr, const at::Tensor& cols,
                                                                   const at::Tensor& dense, int64_t rope,
                                                                   double rope_base, bool tril_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& cols,
    const at::Tensor& dense, const at::Tensor& lse, int64_t rope, double rope_base, bool tril_mask);
at::Tensor global_pointer_scores_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
                                             const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope,
                                             double rope_base, bool tril_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope, double rope_base, bool tril_mask);
// Log-n attention (csrc/cpu/logn_attention.cpp). q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D),
// key_padding_mask (B, Lk) bool (true = padding), all contiguous. The scale rule is described in
// csrc/include/kexue/logn_attention.h. Forward returns out (like q) and lse (B, Hq, Lq) float32
// (float64 for float64); backward returns (grad_q, grad_k, grad_v); grad_lse may be None.
std::tuple<at::Tensor, at::Tensor> logn_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::optional<at::Tensor>& key_padding_mask,
                                                              bool causal, double scale, double train_len, bool logn,
                                                              bool clip, double min_n, bool gradmax);
std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double train_len, bool logn,
    bool clip, double min_n, bool gradmax);
// Log-n attention over packed variable-length sequences: q (Tq, Hq, D), k and v (Tk, Hkv, D), all
// contiguous; cu_seqlens_q / cu_seqlens_k (nseq + 1,) int32 or int64 CPU offsets, 0 first, Tq / Tk
// last, non-decreasing. Forward returns out (like q) and lse (Hq, Tq).
std::tuple<at::Tensor, at::Tensor> logn_attention_varlen_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v,
                                                                     const at::Tensor& cu_seqlens_q,
                                                                     const at::Tensor& cu_seqlens_k, bool causal,
                                                                     double scale, double train_len, bool logn,
                                                                     bool clip, double min_n, bool gradmax);
std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, bool causal, double scale, double train_len, bool logn, bool clip, double min_n,
    bool gradmax);

#ifdef KEXUE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_normalize_forward_cuda(const at::Tensor& x,
                                                                              const at::Tensor& target, bool logits,
                                                                              int64_t max_iter, double tol);
std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_cuda(const at::Tensor& grad_y,
                                                                   const at::Tensor& grad_gamma, const at::Tensor& x,
                                                                   const at::Tensor& gamma, const at::Tensor& stats,
                                                                   bool logits);
// Lion / Tiger on CUDA tensors with the dynamic table and the carried sums of squares: the
// contract of sign_optim_step_dyn_cpu (carried sums are refused in kDynamic rows).
void sign_optim_step_dyn_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& exp_avgs,
                              const std::vector<std::optional<at::Tensor>>& masks,
                              const std::vector<at::Tensor>& row_seen, const std::vector<at::Tensor>& ssq,
                              const at::Tensor& hyper, const at::Tensor& ints, const std::optional<at::Tensor>& dyn);
// Lion / Tiger on CUDA tensors (csrc/cuda/sign_optim.cu): the contract of sign_optim_step_cpu.
void sign_optim_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<std::optional<at::Tensor>>& masks,
                          const std::vector<at::Tensor>& row_seen, const at::Tensor& hyper, const at::Tensor& ints);
// BioHash on CUDA tensors (csrc/cuda/{biohash,biohash_update,hamming}.cu): the contracts of the _cpu functions above.
at::Tensor biohash_activations_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t);
at::Tensor biohash_sparse_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& weights, const at::Tensor& synapses_t, int64_t k,
                               bool packed);
at::Tensor biohash_topk_cuda(const at::Tensor& activations, int64_t k, bool packed);
std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& queries, const at::Tensor& database,
                                                     int64_t n);
std::tuple<at::Tensor, at::Tensor> biohash_update_cuda(const at::Tensor& indices, const at::Tensor& offsets,
                                                       const std::optional<at::Tensor>& weights,
                                                       at::Tensor synapses_t, double lr, double delta, int64_t rank,
                                                       double prec, double tiny);
// GlobalPointer on CUDA tensors (csrc/cuda/global_pointer.cu): the contracts of the *_cpu functions.
std::tuple<at::Tensor, at::Tensor> global_pointer_loss_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& start_bias,
                                                                    const at::Tensor& end_bias, const at::Tensor& mask,
                                                                    const at::Tensor& row_ptr, const at::Tensor& cols,
                                                                    const at::Tensor& dense, int64_t rope,
                                                                    double rope_base, bool tril_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, const at::Tensor& row_ptr, const at::Tensor& cols,
    const at::Tensor& dense, const at::Tensor& lse, int64_t rope, double rope_base, bool tril_mask);
at::Tensor global_pointer_scores_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
                                              const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope,
                                              double rope_base, bool tril_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& start_bias,
    const at::Tensor& end_bias, const at::Tensor& mask, int64_t rope, double rope_base, bool tril_mask);
// Log-n attention on CUDA tensors (csrc/cuda/logn_attention.cu): the contracts of the dense _cpu functions.
std::tuple<at::Tensor, at::Tensor> logn_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const std::optional<at::Tensor>& key_padding_mask,
                                                               bool causal, double scale, double train_len, bool logn,
                                                               bool clip, double min_n, bool gradmax);
std::tuple<at::Tensor, at::Tensor, at::Tensor> logn_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double train_len, bool logn,
    bool clip, double min_n, bool gradmax);
#endif

}  // namespace kexue
