"""GlobalPointer backends: the torch reference, C++ CPU, CUDA C++ and Triton implementations of the
loss and scores ops in the canonical layout, registered with :mod:`kexue._backend` together with
what each serves (dtypes, head sizes), so that the dispatcher alone picks one per call."""

from __future__ import annotations

import torch

from kexue import _backend
from kexue.ops._global_pointer_inputs import ALL_FLOATS, ROPE_NAMES, labels_to_csr
from kexue.reference import global_pointer as reference

OP_LOSS = "global_pointer_loss"
OP_SCORES = "global_pointer_scores"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# The CUDA C++ backward keeps its dq / dk rows in registers (csrc/cuda/global_pointer.cu): head
# sizes up to this.
CUDA_MAX_HEAD_SIZE = 128


def label_args(labels, batch: int, types: int, length: int):
    """``(row_ptr, cols, dense)`` for the backends: dense labels pass through as they are (the C++
    kernels read them row by row), sparse ones become CSR (range-checked)."""
    if labels.dim() == 4:
        empty = labels.new_zeros((0,), dtype=torch.int64)
        return empty, empty, labels
    row_ptr, cols = labels_to_csr(labels, batch, types, length)
    return row_ptr, cols, labels.new_zeros((0,), dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# torch: the float64-capable reference.


def _dense(q, sb, row_ptr, cols, dense):
    if dense.dim() == 4:
        return dense
    return reference.dense_labels(row_ptr, cols, q.shape[0], sb.shape[1], q.shape[2])


def _ref_loss_forward(q, k, sb, eb, mask, row_ptr, cols, dense, rope, base, tril):
    labels = _dense(q, sb, row_ptr, cols, dense)
    return reference.global_pointer_loss_forward(q, k, sb, eb, mask, labels, ROPE_NAMES[rope], base, tril)


def _ref_loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, dense, _lse, rope, base, tril):
    labels = _dense(q, sb, row_ptr, cols, dense)
    return reference.global_pointer_loss_backward(grad, q, k, sb, eb, mask, labels, ROPE_NAMES[rope], base, tril)


def _ref_scores_forward(q, k, sb, eb, mask, rope, base, tril):
    return reference.global_pointer_scores_forward(q, k, sb, eb, mask, ROPE_NAMES[rope], base, tril)


def _ref_scores_backward(grad, q, k, sb, eb, mask, rope, base, tril):
    return reference.global_pointer_scores_backward(grad, q, k, sb, eb, mask, ROPE_NAMES[rope], base, tril)


# --------------------------------------------------------------------------------------------
# triton: the kernels take CSR positives only (never a dense (B, T, L, L) tensor).


def _kernels():
    from kexue.triton_kernels import global_pointer

    return global_pointer


def _csr(q, sb, row_ptr, cols, dense):
    if dense.dim() == 4:
        return labels_to_csr(dense, q.shape[0], sb.shape[1], q.shape[2])
    return row_ptr, cols


def _triton_loss_forward(q, k, sb, eb, mask, row_ptr, cols, dense, rope, base, tril):
    row_ptr, cols = _csr(q, sb, row_ptr, cols, dense)
    return _kernels().loss_forward(q, k, sb, eb, mask, row_ptr, cols, rope, base, tril)


def _triton_loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, dense, lse, rope, base, tril):
    row_ptr, cols = _csr(q, sb, row_ptr, cols, dense)
    return _kernels().loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, lse, rope, base, tril)


def _triton_scores_forward(*args):
    return _kernels().scores_forward(*args)


def _triton_scores_backward(*args):
    return _kernels().scores_backward(*args)


def _triton_loss_supports(q: torch.Tensor) -> str | None:
    return _kernels().supports(q.shape[-1], q.dtype, "loss")


def _triton_scores_supports(q: torch.Tensor) -> str | None:
    return _kernels().supports(q.shape[-1], q.dtype, "scores")


def _cuda_supports(q: torch.Tensor) -> str | None:
    if q.shape[-1] > CUDA_MAX_HEAD_SIZE:
        return f"the CUDA C++ backward holds heads up to {CUDA_MAX_HEAD_SIZE} channels in registers"
    return None


def _register_backends() -> None:
    _backend.register(OP_LOSS, "torch", (_ref_loss_forward, _ref_loss_backward), ALL_FLOATS)
    _backend.register(OP_SCORES, "torch", (_ref_scores_forward, _ref_scores_backward), ALL_FLOATS)
    native = _backend.native()
    if native is not None and hasattr(native, "global_pointer_loss_forward_cpu"):
        _backend.register(
            OP_LOSS,
            "cpu",
            (native.global_pointer_loss_forward_cpu, native.global_pointer_loss_backward_cpu),
            ALL_FLOATS,
        )
        _backend.register(
            OP_SCORES,
            "cpu",
            (native.global_pointer_scores_forward_cpu, native.global_pointer_scores_backward_cpu),
            ALL_FLOATS,
        )
    with_cuda = native is not None and getattr(native, "WITH_CUDA", False)
    if with_cuda and hasattr(native, "global_pointer_loss_forward_cuda"):
        _backend.register(
            OP_LOSS,
            "cuda",
            (native.global_pointer_loss_forward_cuda, native.global_pointer_loss_backward_cuda),
            ALL_FLOATS,
            supports=_cuda_supports,
        )
        _backend.register(
            OP_SCORES,
            "cuda",
            (native.global_pointer_scores_forward_cuda, native.global_pointer_scores_backward_cuda),
            ALL_FLOATS,
            supports=_cuda_supports,
        )
    _backend.register(
        OP_LOSS, "triton", (_triton_loss_forward, _triton_loss_backward), _FLOATS, supports=_triton_loss_supports
    )
    _backend.register(
        OP_SCORES,
        "triton",
        (_triton_scores_forward, _triton_scores_backward),
        _FLOATS,
        supports=_triton_scores_supports,
    )


_register_backends()
