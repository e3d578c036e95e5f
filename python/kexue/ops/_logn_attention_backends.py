"""Log-n attention's backends: what each one is and what it serves.

Each dense backend takes contiguous q, k, v, an optional contiguous bool mask, the scale rule as
plain scalars and the precision switch: ``(q, k, v, mask, causal, scale, train_len, logn, clip,
min_n, gradmax, allow_tf32)``; the packed (varlen) ones take ``(q, k, v, cu_q, cu_k, max_seqlen,
rule..., allow_tf32)``. :mod:`kexue._backend` picks one per call; the custom ops in
:mod:`kexue.ops._logn_attention_ops` call it.

``allow_tf32`` is a permission, not a demand: only the Triton kernels use it (float32 dots on
tensor cores with TF32 operands). The C++ CPU and CUDA kernels and the reference have no TF32 path
and compute float32 inputs in full float32 (or float64), which is at least as precise as asked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._logn_attention_inputs import FLOATS as _FLOATS
from kexue.reference import logn_attention as reference

OP = "logn_attention"
OP_VARLEN = "logn_attention_varlen"


def _ref_scale(scale: float, gradmax: bool):
    return reference.GRADMAX if gradmax else scale


def _torch_forward(q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False):
    return reference.logn_attention_forward(
        q, k, v, mask, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_backward(
    grad_out, grad_lse, q, k, v, out, lse, mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False
):
    return reference.logn_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, mask, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_varlen_forward(
    q, k, v, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False
):
    return reference.logn_attention_varlen_forward(
        q, k, v, cu_q, cu_k, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_varlen_backward(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    cu_q,
    cu_k,
    max_seqlen,
    causal,
    scale,
    train_len,
    logn,
    clip,
    min_n,
    gradmax,
    allow_tf32=False,
):
    return reference.logn_attention_varlen_backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        causal,
        _ref_scale(scale, gradmax),
        train_len,
        logn,
        clip,
        min_n,
    )


def _triton_module():
    from kexue.triton_kernels import logn_attention

    return logn_attention


def _triton(name: str):
    """The ``triton`` backend's ``name``, imported on first use (importing triton is slow)."""

    def call(*args):
        return getattr(_triton_module(), name)(*args)

    return call


def _full_precision(fn):
    """A backend without a TF32 path: ``allow_tf32`` (the last argument) is dropped, and float32
    runs in full float32, more precise than the caller allowed."""

    def call(*args):
        return fn(*args[:-1])

    return call


def _triton_serves(q: Tensor, allow_tf32: bool = False) -> str | None:
    """What the Triton kernels cannot take on a GPU; the dispatcher then picks the CUDA C++ kernel
    or the reference. Under the interpreter (CPU tensors) they take everything."""
    if not q.is_cuda:
        return None
    kernels = _triton_module()
    widest = kernels.max_head_dim(kernels.dot_mode(q.dtype, allow_tf32))
    if q.shape[-1] > widest:
        return f"heads wider than {widest} for {q.dtype} on a GPU (no Triton tiles fitted for them)"
    if q.dtype == torch.float32 and not allow_tf32:
        return "float32 on a GPU without allow_tf32 (its FMA-dot tiles keep a stack frame; pass allow_tf32=True)"
    return None


def _register_backends() -> None:
    _backend.register(OP, "torch", (_torch_forward, _torch_backward), _FLOATS + (torch.float64,))
    native = _backend.native()
    if native is not None and hasattr(native, "logn_attention_forward_cpu"):
        _backend.register(
            OP,
            "cpu",
            (_full_precision(native.logn_attention_forward_cpu), _full_precision(native.logn_attention_backward_cpu)),
            _FLOATS + (torch.float64,),
        )
    _backend.register(OP, "triton", (_triton("forward"), _triton("backward")), _FLOATS, supports=_triton_serves)
    if native is not None and hasattr(native, "logn_attention_forward_cuda"):  # built with CUDA; dense inputs only
        _backend.register(
            OP,
            "cuda",
            (_full_precision(native.logn_attention_forward_cuda), _full_precision(native.logn_attention_backward_cuda)),
            _FLOATS + (torch.float64,),
        )
    # Packed sequences: (q, k, v, cu_q, cu_k, max_seqlen, rule...); only Triton reads max_seqlen.
    _backend.register(OP_VARLEN, "torch", (_torch_varlen_forward, _torch_varlen_backward), _FLOATS + (torch.float64,))
    if native is not None and hasattr(native, "logn_attention_varlen_forward_cpu"):

        def cpu_forward(q, k, v, cu_q, cu_k, max_seqlen, *rule_and_tf32):
            return native.logn_attention_varlen_forward_cpu(q, k, v, cu_q, cu_k, *rule_and_tf32[:-1])

        def cpu_backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_seqlen, *rule_and_tf32):
            return native.logn_attention_varlen_backward_cpu(
                grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *rule_and_tf32[:-1]
            )

        _backend.register(OP_VARLEN, "cpu", (cpu_forward, cpu_backward), _FLOATS + (torch.float64,))
    _backend.register(
        OP_VARLEN, "triton", (_triton("varlen_forward"), _triton("varlen_backward")), _FLOATS, supports=_triton_serves
    )


_register_backends()
