"""GlobalPointer custom ops (``kexue::global_pointer_loss`` / ``_backward``,
``kexue::global_pointer_scores`` / ``_backward``): canonical layout in, the backend the dispatcher
picks called once, autograd and fake (meta) implementations registered."""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._global_pointer_backends import OP_LOSS, OP_SCORES, label_args
from kexue.reference.global_pointer import compute_dtype


@torch.library.custom_op("kexue::global_pointer_loss", mutates_args=())
def global_pointer_loss_rows(
    q: Tensor,
    k: Tensor,
    start_bias: Tensor,
    end_bias: Tensor,
    mask: Tensor,
    labels: Tensor,
    rope: int,
    rope_base: float,
    tril_mask: bool,
) -> tuple[Tensor, Tensor]:
    """Canonical layout -> ``(loss (B, T), lse (B, T, 2))`` in the compute dtype.

    ``labels``: dense ``(B, T, L, L)`` bool or sparse ``(N, 4)`` int64, already validated.
    """
    batch, _, length, _ = q.shape
    row_ptr, cols, dense = label_args(labels, batch, start_bias.shape[1], length)
    _, (forward, _) = _backend.select(OP_LOSS, q)
    return forward(q, k, start_bias, end_bias, mask, row_ptr, cols, dense, rope, rope_base, tril_mask)


@global_pointer_loss_rows.register_fake
def _(q, k, start_bias, end_bias, mask, labels, rope, rope_base, tril_mask):
    ct = compute_dtype(q.dtype)
    batch, types = start_bias.shape[0], start_bias.shape[1]
    return q.new_empty((batch, types), dtype=ct), q.new_empty((batch, types, 2), dtype=ct)


@torch.library.custom_op("kexue::global_pointer_loss_backward", mutates_args=())
def global_pointer_loss_rows_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    start_bias: Tensor,
    end_bias: Tensor,
    mask: Tensor,
    labels: Tensor,
    lse: Tensor,
    rope: int,
    rope_base: float,
    tril_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * loss)``."""
    batch, _, length, _ = q.shape
    row_ptr, cols, dense = label_args(labels, batch, start_bias.shape[1], length)
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
    q: Tensor,
    k: Tensor,
    start_bias: Tensor,
    end_bias: Tensor,
    mask: Tensor,
    rope: int,
    rope_base: float,
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
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    start_bias: Tensor,
    end_bias: Tensor,
    mask: Tensor,
    rope: int,
    rope_base: float,
    tril_mask: bool,
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
