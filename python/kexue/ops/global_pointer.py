"""GlobalPointer: span scores, the fused multilabel loss, decoding, multilabel cross-entropy.

Public functions (shapes in the users' layout, the layout of the open-source layers):

- :func:`global_pointer_scores` -> ``(B, T, L, L)`` masked span scores;
- :func:`global_pointer_loss` -> the multilabel categorical cross-entropy over every span of each
  (batch, type), computed by the kernels block by block without the ``(B, T, L, L)`` scores;
- :func:`global_pointer_decode` -> the spans scoring above a threshold, in row chunks;
- :func:`multilabel_crossentropy` -> the standalone loss over the last dim, dense or sparse labels.

Custom ops ``kexue::global_pointer_loss`` / ``_backward`` and ``kexue::global_pointer_scores`` /
``_backward`` work in the canonical layout of :mod:`kexue.reference.global_pointer` and dispatch
to the backend :mod:`kexue._backend` picks. The math is shared/spec/global_pointer.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._checks import check_floating_tensor
from kexue.reference import global_pointer as reference

OP_LOSS = "global_pointer_loss"
OP_SCORES = "global_pointer_scores"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = _FLOATS + (torch.float64,)
_ROPE = {None: 0, "interleaved": 1, "half": 2}
_ROPE_NAMES = {v: k for k, v in _ROPE.items()}
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Labels: dense (B, T, L, L) bool or sparse (N, 4) int64 -> CSR over rows (b, t, i).


def _label_args(labels: Tensor, batch: int, types: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_ptr, cols, dense)`` for the backends: dense labels pass through as they are (the
    kernels read them row by row), sparse ones become CSR."""
    if labels.dim() == 4:
        empty = labels.new_zeros((0,), dtype=torch.int64)
        return empty, empty, labels
    row_ptr, cols = labels_to_csr(labels, batch, types, length)
    return row_ptr, cols, labels.new_zeros((0,), dtype=torch.bool)


def labels_to_csr(labels: Tensor, batch: int, types: int, length: int) -> tuple[Tensor, Tensor]:
    """``(row_ptr (B*T*L + 1,), cols (N,))`` of the distinct positive spans, sorted.

    ``labels`` is dense ``(B, T, L, L)`` bool or sparse ``(N, 4)`` int64 ``(b, t, i, j)`` rows
    (duplicates count once, as in the dense form).
    """
    index = labels.nonzero() if labels.dim() == 4 else labels
    rows_total = batch * types * length
    if index.numel() == 0:
        return torch.zeros(rows_total + 1, dtype=torch.int64, device=labels.device), index.new_zeros((0,))
    b, t, i, j = index.to(torch.int64).unbind(-1)
    key = torch.unique(((b * types + t) * length + i) * length + j)  # sorted
    rows, cols = key // length, key % length
    row_ptr = torch.zeros(rows_total + 1, dtype=torch.int64, device=labels.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=rows_total), 0)
    return row_ptr, cols.contiguous()


# --------------------------------------------------------------------------------------------
# Backends. Each takes the canonical layout, contiguous.


def _dense(q, sb, row_ptr, cols, dense):
    if dense.dim() == 4:
        return dense
    return reference.dense_labels(row_ptr, cols, q.shape[0], sb.shape[1], q.shape[2])


def _ref_loss_forward(q, k, sb, eb, mask, row_ptr, cols, dense, rope, base, tril):
    labels = _dense(q, sb, row_ptr, cols, dense)
    return reference.global_pointer_loss_forward(q, k, sb, eb, mask, labels, _ROPE_NAMES[rope], base, tril)


def _ref_loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, dense, _lse, rope, base, tril):
    labels = _dense(q, sb, row_ptr, cols, dense)
    return reference.global_pointer_loss_backward(grad, q, k, sb, eb, mask, labels, _ROPE_NAMES[rope], base, tril)


def _ref_scores_forward(q, k, sb, eb, mask, rope, base, tril):
    return reference.global_pointer_scores_forward(q, k, sb, eb, mask, _ROPE_NAMES[rope], base, tril)


def _ref_scores_backward(grad, q, k, sb, eb, mask, rope, base, tril):
    return reference.global_pointer_scores_backward(grad, q, k, sb, eb, mask, _ROPE_NAMES[rope], base, tril)


def _triton_module():
    from kexue.triton_kernels import global_pointer

    return global_pointer


# The CUDA C++ kernels (csrc/cuda/global_pointer.cu) keep the backward's dq / dk rows in
# registers: head sizes up to this run there, wider ones on the reference.
CUDA_MAX_HEAD_SIZE = 128


def _cuda_native():
    native = _backend.native()
    return native if native is not None and getattr(native, "WITH_CUDA", False) else None


def _beyond_triton(name: str, q: Tensor):
    """The implementation of ``name`` for a head wider than the Triton tiles: the CUDA C++ kernel
    when it is built and serves the head, else the reference."""
    native = _cuda_native()
    if native is not None and q.is_cuda and q.shape[-1] <= CUDA_MAX_HEAD_SIZE:
        return getattr(native, f"{name}_cuda")
    return _REF[name]


def _cuda(name: str):
    """The ``cuda`` backend's ``name``: the CUDA C++ entry point, or the reference for wide heads."""

    def call(*args):
        q = args[1] if name.endswith("backward") else args[0]  # backwards take grad first
        native = _cuda_native()
        fn = getattr(native, f"{name}_cuda") if q.shape[-1] <= CUDA_MAX_HEAD_SIZE else _REF[name]
        return fn(*args)

    return call


def _triton_loss_forward(q, *args):
    kernels = _triton_module()
    if q.shape[-1] > kernels.MAX_HEAD_SIZE:  # beyond the compiled tiles
        return _beyond_triton("global_pointer_loss_forward", q)(q, *args)
    return kernels.loss_forward(q, *args)


def _triton_loss_backward(grad, q, *args):
    kernels = _triton_module()
    if q.shape[-1] > kernels.MAX_HEAD_SIZE:
        return _beyond_triton("global_pointer_loss_backward", q)(grad, q, *args)
    return kernels.loss_backward(grad, q, *args)


def _triton_scores_forward(q, *args):
    kernels = _triton_module()
    if q.shape[-1] > kernels.MAX_HEAD_SIZE:
        return _beyond_triton("global_pointer_scores_forward", q)(q, *args)
    return kernels.scores_forward(q, *args)


def _triton_scores_backward(grad, q, *args):
    kernels = _triton_module()
    if q.shape[-1] > kernels.MAX_HEAD_SIZE:
        return _beyond_triton("global_pointer_scores_backward", q)(grad, q, *args)
    return kernels.scores_backward(grad, q, *args)


_REF = {
    "global_pointer_loss_forward": _ref_loss_forward,
    "global_pointer_loss_backward": _ref_loss_backward,
    "global_pointer_scores_forward": _ref_scores_forward,
    "global_pointer_scores_backward": _ref_scores_backward,
}


def _register_backends() -> None:
    _backend.register(OP_LOSS, "torch", (_ref_loss_forward, _ref_loss_backward), _ALL_FLOATS)
    _backend.register(OP_SCORES, "torch", (_ref_scores_forward, _ref_scores_backward), _ALL_FLOATS)
    native = _backend.native()
    if native is not None and hasattr(native, "global_pointer_loss_forward_cpu"):
        _backend.register(OP_LOSS, "cpu",
                          (native.global_pointer_loss_forward_cpu, native.global_pointer_loss_backward_cpu),
                          _ALL_FLOATS)
        _backend.register(OP_SCORES, "cpu",
                          (native.global_pointer_scores_forward_cpu, native.global_pointer_scores_backward_cpu),
                          _ALL_FLOATS)
    if _cuda_native() is not None and hasattr(_cuda_native(), "global_pointer_loss_forward_cuda"):
        _backend.register(OP_LOSS, "cuda",
                          (_cuda("global_pointer_loss_forward"), _cuda("global_pointer_loss_backward")), _ALL_FLOATS)
        _backend.register(OP_SCORES, "cuda",
                          (_cuda("global_pointer_scores_forward"), _cuda("global_pointer_scores_backward")),
                          _ALL_FLOATS)
    _backend.register(OP_LOSS, "triton", (_triton_loss_forward, _triton_loss_backward), _FLOATS)
    _backend.register(OP_SCORES, "triton", (_triton_scores_forward, _triton_scores_backward), _FLOATS)


_register_backends()


# --------------------------------------------------------------------------------------------
# Custom ops: the loss.


@torch.library.custom_op("kexue::global_pointer_loss", mutates_args=())
def global_pointer_loss_rows(
    q: Tensor, k: Tensor, start_bias: Tensor, end_bias: Tensor, mask: Tensor, labels: Tensor,
    rope: int, rope_base: float, tril_mask: bool,
) -> tuple[Tensor, Tensor]:
    """Canonical layout -> ``(loss (B, T), lse (B, T, 2))`` in the compute dtype.

    ``labels``: dense ``(B, T, L, L)`` bool or sparse ``(N, 4)`` int64, already validated.
    """
    batch, _, length, _ = q.shape
    row_ptr, cols, dense = _label_args(labels, batch, start_bias.shape[1], length)
    _, (forward, _) = _backend.select(OP_LOSS, q)
    return forward(q, k, start_bias, end_bias, mask, row_ptr, cols, dense, rope, rope_base, tril_mask)


@global_pointer_loss_rows.register_fake
def _(q, k, start_bias, end_bias, mask, labels, rope, rope_base, tril_mask):
    ct = reference.compute_dtype(q.dtype)
    batch, types = start_bias.shape[0], start_bias.shape[1]
    return q.new_empty((batch, types), dtype=ct), q.new_empty((batch, types, 2), dtype=ct)


@torch.library.custom_op("kexue::global_pointer_loss_backward", mutates_args=())
def global_pointer_loss_rows_backward(
    grad: Tensor, q: Tensor, k: Tensor, start_bias: Tensor, end_bias: Tensor, mask: Tensor, labels: Tensor,
    lse: Tensor, rope: int, rope_base: float, tril_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * loss)``."""
    batch, _, length, _ = q.shape
    row_ptr, cols, dense = _label_args(labels, batch, start_bias.shape[1], length)
    _, (_, backward) = _backend.select(OP_LOSS, q)
    return backward(grad, q, k, start_bias, end_bias, mask, row_ptr, cols, dense, lse, rope, rope_base, tril_mask)


@global_pointer_loss_rows_backward.register_fake
def _(grad, q, k, start_bias, end_bias, mask, labels, lse, rope, rope_base, tril_mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(start_bias), torch.empty_like(end_bias)


def _loss_setup_context(ctx, inputs, output):
    q, k, sb, eb, mask, labels, rope, rope_base, tril_mask = inputs
    ctx.save_for_backward(q, k, sb, eb, mask, labels, output[1])
    ctx.args = (rope, rope_base, tril_mask)


def _loss_backward(ctx, grad_loss, _grad_lse):
    q, k, sb, eb, mask, labels, lse = ctx.saved_tensors
    grad_loss = torch.zeros_like(lse[..., 0]) if grad_loss is None else grad_loss.contiguous()
    dq, dk, dsb, deb = global_pointer_loss_rows_backward(grad_loss, q, k, sb, eb, mask, labels, lse, *ctx.args)
    return dq, dk, dsb, deb, None, None, None, None, None


global_pointer_loss_rows.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------------------------
# Custom ops: the scores.


@torch.library.custom_op("kexue::global_pointer_scores", mutates_args=())
def global_pointer_scores_canonical(
    q: Tensor, k: Tensor, start_bias: Tensor, end_bias: Tensor, mask: Tensor, rope: int, rope_base: float,
    tril_mask: bool,
) -> Tensor:
    """Canonical layout -> ``(B, T, L, L)`` scores in q's dtype, ``-inf`` where masked."""
    _, (forward, _) = _backend.select(OP_SCORES, q)
    return forward(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask)


@global_pointer_scores_canonical.register_fake
def _(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask):
    batch, types, length = start_bias.shape
    return q.new_empty((batch, types, length, length))


@torch.library.custom_op("kexue::global_pointer_scores_backward", mutates_args=())
def global_pointer_scores_canonical_backward(
    grad: Tensor, q: Tensor, k: Tensor, start_bias: Tensor, end_bias: Tensor, mask: Tensor, rope: int,
    rope_base: float, tril_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, (_, backward) = _backend.select(OP_SCORES, q)
    return backward(grad, q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask)


@global_pointer_scores_canonical_backward.register_fake
def _(grad, q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(start_bias), torch.empty_like(end_bias)


def _scores_setup_context(ctx, inputs, output):
    q, k, sb, eb, mask, rope, rope_base, tril_mask = inputs
    ctx.save_for_backward(q, k, sb, eb, mask)
    ctx.args = (rope, rope_base, tril_mask)


def _scores_backward(ctx, grad):
    q, k, sb, eb, mask = ctx.saved_tensors
    dq, dk, dsb, deb = global_pointer_scores_canonical_backward(grad.contiguous(), q, k, sb, eb, mask, *ctx.args)
    return dq, dk, dsb, deb, None, None, None, None


global_pointer_scores_canonical.register_autograd(_scores_backward, setup_context=_scores_setup_context)


# --------------------------------------------------------------------------------------------
# Checks and layout: the users' layout -> the canonical one.


def _rope_code(rope) -> int:
    if rope is True:
        return _ROPE["interleaved"]
    if rope is False or rope is None:
        return 0
    if isinstance(rope, str) and rope in ("interleaved", "half"):
        return _ROPE[rope]
    raise ValueError(f"rope must be True, False, 'interleaved' or 'half', got {rope!r}")


def _canonical(q, k, start_bias, end_bias, mask, rope, rope_base):
    """Validate and return ``(q, k, start_bias, end_bias, mask, rope_code, rope_base)`` in the
    canonical layout: q, k ``(B, H, L, d)``; biases ``(B, T, L)``; mask ``(B, L)`` bool."""
    check_floating_tensor("q", q, _ALL_FLOATS)
    check_floating_tensor("k", k, _ALL_FLOATS)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, L, d) (shared by every type) or (B, L, T, d) (one per type), "
                         f"got shape {tuple(q.shape)}")
    if k.shape != q.shape or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must match q in shape, dtype and device: q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)} {k.dtype}")
    batch, length, d = q.shape[0], q.shape[1], q.shape[-1]
    heads = 1 if q.dim() == 3 else q.shape[2]
    code = _rope_code(rope)
    if code and d % 2:
        raise ValueError(f"rope needs an even head size, got q's last dim {d}")
    if not isinstance(rope_base, numbers.Real) or isinstance(rope_base, bool) or not rope_base > 0:
        raise ValueError(f"rope_base must be a positive number, got {rope_base!r}")

    biases = []
    types = None
    for name, bias in (("start_bias", start_bias), ("end_bias", end_bias)):
        if bias is None:
            biases.append(None)
            continue
        check_floating_tensor(name, bias, _ALL_FLOATS)
        if bias.dim() != 3 or bias.shape[0] != batch or bias.shape[1] != length:
            raise ValueError(f"{name} must be (B, L, T) = ({batch}, {length}, T), got {tuple(bias.shape)}")
        if types is not None and bias.shape[2] != types:
            raise ValueError(f"start_bias and end_bias must have the same number of types, got {types} "
                             f"and {bias.shape[2]}")
        types = bias.shape[2]
        biases.append(bias.to(q.dtype).transpose(1, 2).contiguous())
    if types is None:
        types = heads
    if heads != 1 and heads != types:
        raise ValueError(f"q has {heads} heads but the biases have {types} types; expected 1 head or one per type")
    biases = [b if b is not None else q.new_zeros((batch, types, length)) for b in biases]

    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != (batch, length):
            raise ValueError(f"mask must be (B, L) = ({batch}, {length}), got {tuple(mask.shape)}")
        mask = (mask != 0).contiguous()
    q4 = q.unsqueeze(1) if q.dim() == 3 else q.transpose(1, 2)
    k4 = k.unsqueeze(1) if k.dim() == 3 else k.transpose(1, 2)
    return q4.contiguous(), k4.contiguous(), biases[0], biases[1], mask, code, float(rope_base)


def _check_labels(labels, batch: int, types: int, length: int, mask: Tensor, tril_mask: bool) -> Tensor:
    """Dense ``(B, T, L, L)`` or sparse ``(N, 4)`` labels, validated (eagerly) against the spans."""
    if isinstance(labels, Sequence) and not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels, dtype=torch.int64, device=mask.device).reshape(-1, 4)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor (dense (B, T, L, L) bool or sparse (N, 4) int), "
                        f"got {type(labels).__name__}")
    if labels.dim() == 4:
        if labels.shape != (batch, types, length, length):
            raise ValueError(f"dense labels must be (B, T, L, L) = {(batch, types, length, length)}, "
                             f"got {tuple(labels.shape)}")
        if labels.dtype != torch.bool:
            if labels.is_floating_point() or labels.is_complex():
                raise TypeError(f"dense labels must be bool (or integer 0/1), got {labels.dtype}")
            labels = labels != 0
        # Passed on dense: the kernels read the rows and report a positive on a masked span as
        # an infinite loss, which global_pointer_loss turns into an error.
        return labels.contiguous()
    elif labels.dim() == 2 and labels.shape[1] == 4:
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"sparse labels must be integer (b, t, start, end) rows, got {labels.dtype}")
        index = labels.to(torch.int64)
        if torch.compiler.is_compiling():
            return index.contiguous()
    else:
        raise ValueError(f"labels must be dense (B, T, L, L) = {(batch, types, length, length)} or sparse (N, 4) "
                         f"(batch, type, start, end) rows, got shape {tuple(labels.shape)}")
    if labels.device != mask.device:
        raise ValueError(f"labels are on {labels.device} but q is on {mask.device}")
    if index.numel():
        b, t, i, j = index.unbind(-1)
        for name, v, hi in (("batch", b, batch), ("type", t, types), ("start", i, length), ("end", j, length)):
            bad = (v < 0) | (v >= hi)
            if bool(bad.any()):
                row = index[bad.nonzero()[0, 0]].tolist()
                raise ValueError(f"label {row}: {name} index out of range [0, {hi})")
        if tril_mask:
            bad = i > j
            if bool(bad.any()):
                row = index[bad.nonzero()[0, 0]].tolist()
                raise ValueError(f"label {row}: start > end, but tril_mask excludes such spans")
        bad = ~(mask[b, i] & mask[b, j])
        if bool(bad.any()):
            row = index[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"label {row}: the span touches a padded position (mask is False there)")
    return index.contiguous()


def _reduce(loss: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "mean":
        out = loss.mean() if loss.numel() else loss.sum() * 0
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    return out.to(dtype)


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------------------------
# Public functions.


def global_pointer_scores(
    q: Tensor,
    k: Tensor,
    start_bias: Tensor | None = None,
    end_bias: Tensor | None = None,
    mask: Tensor | None = None,
    rope: bool | str = True,
    tril_mask: bool = True,
    *,
    rope_base: float = 10000.0,
) -> Tensor:
    r"""Span scores ``(B, T, L, L)`` of GlobalPointer / Efficient GlobalPointer.

    ``s[b, t, i, j] = <R_i q_i, R_j k_j> / sqrt(d) + start_bias[b, i, t] + end_bias[b, j, t]``, with
    ``-inf`` where token i or j is padding and, with ``tril_mask``, where ``i > j``.
    (bert4torch subtracts 1e12 instead of writing -inf below the diagonal; every loss and decoder
    treats both alike.)

    Args:
        q, k: ``(B, L, d)``, one pair shared by every type (Efficient GlobalPointer), or
            ``(B, L, T, d)``, one pair per type (GlobalPointer). float16/bfloat16/float32/float64.
        start_bias, end_bias: ``(B, L, T)`` or None (zero). ``T`` is taken from them, else from q.
        mask: ``(B, L)``, nonzero at real tokens; None: no padding.
        rope: rotary position embedding on q and k: True or ``"interleaved"`` (pairs (2c, 2c+1):
            bert4keras / bert4torch), ``"half"`` (pairs (c, c + d/2): rotate_half), False: none.
            Positions 0..L-1, angles ``p * rope_base**(-2c/d)``.
        tril_mask: mask the spans with ``i > j``.

    Returns:
        ``(B, T, L, L)`` in q's dtype. Differentiable in q, k and the biases.
    """
    q4, k4, sb, eb, m, code, base = _canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
    return global_pointer_scores_canonical(q4, k4, sb, eb, m, code, base, bool(tril_mask))


def global_pointer_loss(
    q: Tensor,
    k: Tensor,
    start_bias: Tensor | None,
    end_bias: Tensor | None,
    labels: Tensor | Sequence,
    mask: Tensor | None = None,
    rope: bool | str = True,
    tril_mask: bool = True,
    *,
    reduction: str = "mean",
    rope_base: float = 10000.0,
) -> Tensor:
    r"""The multilabel categorical cross-entropy of GlobalPointer, fused with the span scores.

    For each (batch, type): ``log(1 + sum_neg e^s) + log(1 + sum_pos e^-s)`` over the candidate
    spans (those :func:`global_pointer_scores` does not mask), computed block by block with online
    log-sum-exp: the ``(B, T, L, L)`` scores never exist, memory is O(B L (d + T)) beyond the labels.

    Args:
        q, k, start_bias, end_bias, mask, rope, tril_mask, rope_base: as :func:`global_pointer_scores`.
        labels: the gold spans, dense ``(B, T, L, L)`` bool, or sparse ``(N, 4)`` integer rows
            ``(batch, type, start, end)`` (duplicates count once). Both give the same result. A gold
            span that is masked (padding, or start > end with ``tril_mask``) or out of range raises
            ValueError (checked eagerly; under torch.compile the check is skipped).
        reduction: ``"mean"`` over the B*T (batch, type) pairs (bojone's examples), ``"sum"``, or
            ``"none"``: the ``(B, T)`` losses (GPLinker sums over types and averages over batch).

    Returns:
        The loss in q's dtype (accumulated in float32, float64 for float64 inputs).
    """
    _check_reduction(reduction)
    q4, k4, sb, eb, m, code, base = _canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
    batch, types, length = sb.shape
    index = _check_labels(labels, batch, types, length, m, bool(tril_mask))
    loss, _ = global_pointer_loss_rows(q4, k4, sb, eb, m, index, code, base, bool(tril_mask))
    if index.dim() == 4 and not torch.compiler.is_compiling():
        bad = loss == math.inf
        if bool(bad.any()):
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(f"labels[{b}, {t}] marks a span that is masked (a padded position, or start > end "
                             "with tril_mask): such a span can never be predicted")
    return _reduce(loss, reduction, q.dtype)


@torch.no_grad()
def global_pointer_decode(
    q: Tensor,
    k: Tensor,
    start_bias: Tensor | None = None,
    end_bias: Tensor | None = None,
    mask: Tensor | None = None,
    rope: bool | str = True,
    tril_mask: bool = True,
    *,
    threshold: float = 0.0,
    rope_base: float = 10000.0,
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """Every span scoring above ``threshold``, without the ``(B, T, L, L)`` scores.

    Scores are formed ``chunk`` start positions at a time (memory ``B * T * chunk * L``).

    Returns:
        ``(index (N, 4) int64 = (batch, type, start, end), score (N,) float32/float64)``, sorted
        by index: the same as :func:`decode` on :func:`global_pointer_scores`.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    q4, k4, sb, eb, m, code, base = _canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
    ct = reference.compute_dtype(q.dtype)
    batch, types, length = sb.shape
    d = q4.shape[-1]
    q4, k4, sb, eb = q4.to(ct), k4.to(ct), sb.to(ct), eb.to(ct)
    if code:
        q4 = reference.apply_rope(q4, _ROPE_NAMES[code], base)
        k4 = reference.apply_rope(k4, _ROPE_NAMES[code], base)
    q4 = q4 / math.sqrt(d)
    eb = eb.masked_fill(~m[:, None, :], -math.inf)
    indices, values = [], []
    cols = torch.arange(length, device=q.device)
    for i0 in range(0, length, chunk):
        i1 = min(length, i0 + chunk)
        s = torch.einsum("bhid,bhjd->bhij", q4[:, :, i0:i1], k4)
        s = s + sb[:, :, i0:i1, None] + eb[:, :, None, :]
        ok = m[:, None, i0:i1, None].expand_as(s)
        if tril_mask:
            ok = ok & (cols[None, None, None, :] >= torch.arange(i0, i1, device=q.device)[None, None, :, None])
        hit = (s > threshold) & ok
        idx = hit.nonzero()
        values.append(s[hit])
        idx[:, 2] += i0
        indices.append(idx)
    if not indices:
        return torch.zeros(0, 4, dtype=torch.int64, device=q.device), torch.zeros(0, dtype=ct, device=q.device)
    index, score = torch.cat(indices), torch.cat(values)
    order = torch.argsort(((index[:, 0] * types + index[:, 1]) * length + index[:, 2]) * length + index[:, 3])
    return index[order], score[order]


def decode(scores: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Spans of dense ``scores (B, T, L, L)`` above ``threshold``: ``(index (N, 4), score (N,))``."""
    check_floating_tensor("scores", scores, _ALL_FLOATS)
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be (B, T, L, L), got {tuple(scores.shape)}")
    return reference.decode(scores, threshold)


def multilabel_crossentropy(
    scores: Tensor, labels: Tensor, *, mask_zero: bool = False, reduction: str = "mean"
) -> Tensor:
    r"""Multilabel categorical cross-entropy over the last dim (kexue.fm/archives/7359, 9064).

    ``log(1 + sum_i (1 - t_i) e^{s_i}) + log(1 + sum_i t_i e^{-s_i})``: with hard labels, the
    negatives' and positives' log-sum-exp each with an extra logit 0; threshold 0 at inference.

    Args:
        scores: ``(..., n)`` logits; ``-inf`` excludes an entry (it counts neither as negative
            nor as positive).
        labels: dense ``(..., n)`` bool (hard) or floating in [0, 1] (soft labels, 9064), or
            sparse ``(..., P)`` integer class indices of the positives (duplicates count once).
            The sparse form is computed exactly (no 1 - e^(b - a) cancellation, no epsilon clamp).
        mask_zero: sparse labels only: index 0 is padding and class 0 is reserved (left out of
            both sums), as bert4keras / bert4torch ``mask_zero=True``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``(...)`` losses).
    """
    check_floating_tensor("scores", scores, _ALL_FLOATS)
    _check_reduction(reduction)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the classes)")
    ct = reference.compute_dtype(scores.dtype)
    s = scores.to(ct)
    if labels.dtype == torch.bool or labels.is_floating_point():
        if labels.shape != scores.shape:
            raise ValueError(f"dense labels must have the shape of scores {tuple(scores.shape)}, "
                             f"got {tuple(labels.shape)}")
        if mask_zero:
            raise ValueError("mask_zero applies to sparse (index) labels only")
        t = labels.to(ct)
        if not torch.compiler.is_compiling() and t.numel() and bool(((t < 0) | (t > 1)).any()):
            raise ValueError("soft labels must lie in [0, 1]")
    else:
        if labels.shape[:-1] != scores.shape[:-1] or labels.dim() != scores.dim():
            raise ValueError(f"sparse labels must be (..., P) with ... = {tuple(scores.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
        n = scores.shape[-1]
        index = labels.to(torch.int64)
        if not torch.compiler.is_compiling() and index.numel() and bool(((index < 0) | (index >= n)).any()):
            raise ValueError(f"sparse labels must be class indices in [0, {n})")
        t = torch.zeros_like(s).scatter_(-1, index, 1.0)
        if mask_zero:  # class 0 is padding: neither positive nor negative
            t = t.narrow(-1, 1, n - 1)
            s = s.narrow(-1, 1, n - 1)
    valid = s > -math.inf
    neg = torch.where(valid & (t < 1), s + torch.log1p(-t), -math.inf)
    pos = torch.where(valid & (t > 0), -s + torch.log(t), -math.inf)
    zero = s.new_zeros(s.shape[:-1] + (1,))
    loss = torch.logsumexp(torch.cat((neg, zero), -1), -1) + torch.logsumexp(torch.cat((pos, zero), -1), -1)
    return _reduce(loss, reduction, scores.dtype)
