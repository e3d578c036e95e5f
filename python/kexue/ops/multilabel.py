"""Multilabel categorical cross-entropy over the last dim (dense, soft or sparse labels), and the
loss reductions the GlobalPointer loss shares with it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kexue.ops._checks import check_floating_tensor
from kexue.reference.global_pointer import compute_dtype

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_loss(loss: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """``loss`` reduced as ``reduction`` says (the mean of nothing is 0), in ``dtype``."""
    if reduction == "mean":
        out = loss.mean() if loss.numel() else loss.sum() * 0
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    return out.to(dtype)


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
    check_reduction(reduction)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the classes)")
    ct = compute_dtype(scores.dtype)
    s = scores.to(ct)
    if labels.dtype == torch.bool or labels.is_floating_point():
        if labels.shape != scores.shape:
            raise ValueError(
                f"dense labels must have the shape of scores {tuple(scores.shape)}, got {tuple(labels.shape)}"
            )
        if mask_zero:
            raise ValueError("mask_zero applies to sparse (index) labels only")
        t = labels.to(ct)
        # written so that NaN fails it too: a NaN soft label is not a probability
        if not torch.compiler.is_compiling() and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("soft labels must lie in [0, 1] (NaN is not allowed)")
    else:
        if labels.shape[:-1] != scores.shape[:-1] or labels.dim() != scores.dim():
            raise ValueError(
                f"sparse labels must be (..., P) with ... = {tuple(scores.shape[:-1])}, got {tuple(labels.shape)}"
            )
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
    # Under torch.compile the check above is skipped: a NaN label still gives a NaN loss, never a
    # silent 0 (both where() masks above are False at NaN).
    loss = torch.where(torch.isnan(t).any(-1), math.nan, loss)
    return reduce_loss(loss, reduction, scores.dtype)
