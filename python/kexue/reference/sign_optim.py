"""Lion and Tiger in plain PyTorch, in their own terms: the oracle the fused step is tested against.

:func:`lion_step` and :func:`tiger_step` follow the papers and the reference code (beta1/beta2,
beta and the accumulation counter, alpha * RMS, tensor kinds, the NaN guard, lazy embedding rows,
ChildTuning masks) one tensor at a time, in the dtype of the tensors given: pass float64 copies
for the oracle. They update their arguments in place. They know nothing of the kernels' table:
the ``torch`` backend that interprets that table is kexue/ops/_sign_optim_torch.py, so each
checks the other.

Non-finite gradients (the rule every backend follows): the update is the formulas in IEEE
arithmetic with sign(+-0) = 0, sign(+-inf) = +-1 and sign(NaN) = NaN, so a NaN reaching the
direction makes that element of theta NaN instead of silently freezing it; an element that
ChildTuning masks out never sees its gradient. Tiger's guard fires on any NaN *or* +-inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Re-exported for the tests that draw the kernels' random bits or read the table.
from kexue._sign_random import (  # noqa: F401
    child_tuning_f_gate,
    element_bits,
    splitmix64,
    stream_keys,
    stream_keys_from_step,
    stream_prefix,
    to_bf16_stochastic,
)
from kexue._sign_table import *  # noqa: F401,F403
from kexue._sign_table import TIGER_KINDS


def _sign(c: Tensor) -> Tensor:
    """sign(0) = 0, sign(+-inf) = +-1, sign(NaN) = NaN (torch.sign(NaN) is 0)."""
    return torch.where(torch.isnan(c), c, torch.sign(c))


def _any_non_finite(g: Tensor) -> bool:
    return not bool(torch.isfinite(g).all())


def _row_present(grad: Tensor) -> Tensor:
    """For an embedding table: which rows (vectors along the last dim) have any nonzero gradient."""
    return (grad != 0).reshape(-1, grad.shape[-1]).any(-1)


def _rowwise(mask_rows: Tensor, like: Tensor) -> Tensor:
    """A per-row bool broadcast to the element shape of ``like``."""
    return mask_rows[:, None].expand(-1, like.shape[-1]).reshape(like.shape)


def _per_tensor(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per tensor ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def _masked_grad(grad: Tensor, maximize: bool, grad_mask: Tensor | None, mask_scale: float):
    """The gradient the momentum sees: negated for maximize, ChildTuning-masked and rescaled."""
    g = -grad if maximize else grad
    if grad_mask is None:
        return g
    return torch.where(grad_mask.reshape(g.shape), g * mask_scale, torch.zeros_like(g))


def _movable(param: Tensor, grad_mask: Tensor | None, mask_update: bool, row_live: Tensor | None) -> Tensor | None:
    """Which elements may move this step (None: all of them)."""
    ok = None
    if grad_mask is not None and mask_update:
        ok = grad_mask.reshape(param.shape)
    if row_live is not None:
        rows = _rowwise(row_live, param)
        ok = rows if ok is None else ok & rows
    return ok


def lion_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_masks: Sequence[Tensor | None] | None = None,
    mask_scale: float | Sequence[float] = 1.0,
    mask_update: bool = True,
    lazy_rows: bool | Sequence[bool] = False,
    freeze_absent: bool = False,
) -> None:
    r"""One Lion step (Chen et al. 2023) over a list of tensors, in place.

    c = beta1 m + (1 - beta1) g;  theta <- theta - lr (sign(c) + wd theta);  m <- beta2 m + (1 - beta2) g.

    ``grad_masks`` (bool, per tensor or None): ChildTuning keep masks; kept gradients are multiplied
    by ``mask_scale`` (1/p for ChildTuning-F), dropped ones are zero, and with ``mask_update``
    dropped elements are not stepped. ``lazy_rows`` (per tensor): embedding tables whose rows with
    an all-zero gradient are not stepped (their momentum still decays unless ``freeze_absent``).
    """
    n = len(params)
    masks = _per_tensor(grad_masks, n, "grad_masks")
    scales = _per_tensor(mask_scale, n, "mask_scale")
    lazy = _per_tensor(lazy_rows, n, "lazy_rows")
    for p, grad, m, mask, scale, is_lazy in zip(params, grads, exp_avgs, masks, scales, lazy, strict=True):
        g = _masked_grad(grad, maximize, mask, scale)
        present = _row_present(grad) if is_lazy else None
        c = beta1 * m + (1 - beta1) * g
        new_p = p - lr * (_sign(c) + weight_decay * p)
        ok = _movable(p, mask, mask_update, present)
        p.copy_(new_p if ok is None else torch.where(ok, new_p, p))
        new_m = beta2 * m + (1 - beta2) * g
        if is_lazy and freeze_absent:
            new_m = torch.where(_rowwise(present, m), new_m, m)
        m.copy_(new_m)


def tiger_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta: float = 0.965,
    step: int | Sequence[int] = 0,
    grad_accum_steps: int = 1,
    kinds: str | Sequence[str] = "matrix",
    weight_decay: float = 0.01,
    elementwise_lr: float = 0.5,
    rms_scale: bool | float = True,
    nan_guard: str | None = "tensor",
    shrink_ratio: float = 0.99,
    maximize: bool = False,
    grad_masks: Sequence[Tensor | None] | None = None,
    mask_scale: float | Sequence[float] = 1.0,
    mask_update: bool = True,
    lazy_rows: bool | Sequence[bool] = False,
    freeze_absent: bool = False,
    row_seen: Sequence[Tensor | None] | None = None,
) -> None:
    r"""One Tiger micro-step (Su 2023, bojone/tiger ``tiger.py``) over a list of tensors, in place.

    With t = ``step`` (0-based, counting micro-steps) and k = ``grad_accum_steps``:

        b1 = beta if t % k == 0 else 1;   m <- b1 m + (1 - beta)/k g
        if (t + 1) % k == 0:  theta <- theta - eta (sign(m) + wd theta)

    eta = ``lr`` * RMS(theta) over the tensor ("matrix"), over each row along the last dim
    ("embedding"), or ``elementwise_lr * lr`` with wd = 0 for "bias" and "gamma" (norm gains).
    ``rms_scale`` = a float replaces RMS(theta) by that constant (Su: 1/sqrt(hidden)).

    NaN guard: a tensor whose gradient holds a NaN or +-inf ("tensor"), or every tensor when any
    gradient does ("global"), keeps its momentum and shrinks theta <- (theta - c) s + c (c = 1 for "gamma",
    else 0), on every micro-step. ``lazy_rows``/``row_seen``: an embedding row moves on the update
    micro-step iff it had a nonzero gradient in some micro-step of the window (``row_seen`` holds
    that flag between micro-steps and is updated in place).
    """
    n = len(params)
    steps = _per_tensor(step, n, "step")
    kinds_ = _per_tensor(kinds, n, "kinds")
    masks = _per_tensor(grad_masks, n, "grad_masks")
    scales = _per_tensor(mask_scale, n, "mask_scale")
    lazy = _per_tensor(lazy_rows, n, "lazy_rows")
    seen = _per_tensor(row_seen, n, "row_seen")
    k = grad_accum_steps
    has_nan = [_any_non_finite(g) for g in grads]
    if nan_guard == "global":
        has_nan = [any(has_nan)] * n
    elif nan_guard is None:
        has_nan = [False] * n

    for i, (p, grad, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        kind, t = kinds_[i], steps[i]
        if kind not in TIGER_KINDS:
            raise ValueError(f"kind must be one of {TIGER_KINDS}, got {kind!r}")
        if has_nan[i]:
            centre = 1.0 if kind == "gamma" else 0.0
            p.copy_((p - centre) * shrink_ratio + centre)
            continue
        g = _masked_grad(grad, maximize, masks[i], scales[i])
        b1 = beta if t % k == 0 else 1.0
        new_m = b1 * m + (1 - beta) / k * g
        live = None
        if lazy[i]:
            present = _row_present(grad)
            if freeze_absent:
                new_m = torch.where(_rowwise(present, m), new_m, m)
            live = present if seen[i] is None else present | seen[i].bool()
        m.copy_(new_m)
        if (t + 1) % k != 0:
            if seen[i] is not None and live is not None:
                seen[i].copy_(live)
            continue
        if seen[i] is not None:
            seen[i].zero_()
        if kind in ("bias", "gamma"):
            eta, wd = elementwise_lr * lr, 0.0
        elif not isinstance(rms_scale, bool):
            eta, wd = lr * rms_scale, weight_decay
        elif rms_scale and kind == "embedding":
            eta, wd = lr * (p.pow(2).sum(-1, keepdim=True) / p.shape[-1]).sqrt(), weight_decay
        elif rms_scale:
            eta, wd = lr * (p.pow(2).sum() / p.numel()).sqrt(), weight_decay
        else:
            eta, wd = lr, weight_decay
        new_p = p - eta * (_sign(m) + wd * p)
        ok = _movable(p, masks[i], mask_update, live)
        p.copy_(new_p if ok is None else torch.where(ok, new_p, p))
