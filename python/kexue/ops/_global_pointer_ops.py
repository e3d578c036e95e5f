"""GlobalPointer custom ops (``kexue::global_pointer_loss`` / ``_backward``,
``kexue::global_pointer_scores`` / ``_backward``): canonical layout in, the backend the dispatcher
picks called once, autograd and fake (meta) implementations registered."""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._global_pointer_backends import OP_LOSS, OP_SCORES, label_args
from kexue.ops._global_pointer_inputs import ROPE_NAMES
from kexue.reference.global_pointer import compute_dtype

# The op bodies check the canonical layout again: raw ``torch.ops.kexue.global_pointer_*`` calls
# and compiled graphs reach them without the public functions, and the Triton launchers take
# the shapes as given (a short mask or bias would be read past its end). Metadata only.


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_canonical(q, k, start_bias, end_bias, mask, rope) -> None:
    tensors = {"q": q, "k": k, "start_bias": start_bias, "end_bias": end_bias, "mask": mask}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _expect(t.is_contiguous() and t.device == q.device, f"{name} must be contiguous and on q's device")
    _expect(
        q.dim() == 4 and k.shape == q.shape and k.dtype == q.dtype and q.is_floating_point(),
        f"q and k must be floating (B, H, L, d) tensors of one shape and dtype, got {tuple(q.shape)}, {tuple(k.shape)}",
    )
    b, h, length = q.shape[:3]
    _expect(
        start_bias.dim() == 3
        and start_bias.shape[0] == b
        and start_bias.shape[2] == length
        and end_bias.shape == start_bias.shape
        and start_bias.dtype == end_bias.dtype == q.dtype,
        f"start_bias and end_bias must be (B, T, L) = ({b}, T, {length}) tensors of q's dtype, "
        f"got {tuple(start_bias.shape)} and {tuple(end_bias.shape)}",
    )
    _expect(h in (1, start_bias.shape[1]), f"q must have 1 or T = {start_bias.shape[1]} heads, got {h}")
    _expect(
        mask.dtype == torch.bool and tuple(mask.shape) == (b, length),
        f"mask must be a (B, L) = {(b, length)} bool tensor, got {mask.dtype} {tuple(mask.shape)}",
    )
    _expect(rope in ROPE_NAMES, f"rope must be one of the codes {sorted(ROPE_NAMES)}, got {rope}")


def _check_grad(name: str, t, shape, dtype, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _expect(
        tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.is_contiguous() and t.device == q.device,
        f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}",
    )


def _check_dense_labels(labels: Tensor, start_bias: Tensor) -> None:
    if labels.dim() == 4:
        b, types, length = start_bias.shape
        _check_grad("dense labels", labels, (b, types, length, length), torch.bool, start_bias)


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
    _check_canonical(q, k, start_bias, end_bias, mask, rope)
    _check_dense_labels(labels, start_bias)
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
    _check_canonical(q, k, start_bias, end_bias, mask, rope)
    _check_dense_labels(labels, start_bias)
    ct = compute_dtype(q.dtype)
    _check_grad("grad", grad, start_bias.shape[:2], ct, q)
    _check_grad("lse", lse, (*start_bias.shape[:2], 2), ct, q)
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
    _check_canonical(q, k, start_bias, end_bias, mask, rope)
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
    _check_canonical(q, k, start_bias, end_bias, mask, rope)
    b, types, length = start_bias.shape
    _check_grad("grad", grad, (b, types, length, length), q.dtype, q)
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
