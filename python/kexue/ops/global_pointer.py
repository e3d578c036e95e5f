"""GlobalPointer: the public span scores, fused multilabel loss and decoding.

- :func:`global_pointer_scores` -> ``(B, T, L, L)`` masked span scores;
- :func:`global_pointer_loss` -> the multilabel categorical cross-entropy over every span of each
  (batch, type), computed by the kernels block by block without the ``(B, T, L, L)`` scores;
- :func:`global_pointer_decode` -> the spans scoring above a threshold, in row chunks;
- :func:`multilabel_crossentropy` (from :mod:`kexue.ops.multilabel`) -> the standalone loss.

Shapes are the users' layout (that of the open-source layers). The pieces live beside this file:
input checks and layout in ``_global_pointer_inputs``, the backends in
``_global_pointer_backends``, the custom ops in ``_global_pointer_ops``. The math is in
python/kexue/reference/global_pointer.py (the float64 oracle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kexue.ops._checks import check_floating_tensor
from kexue.ops._global_pointer_backends import CUDA_MAX_HEAD_SIZE, OP_LOSS, OP_SCORES, label_args
from kexue.ops._global_pointer_inputs import (
    ALL_FLOATS,
    ROPE_NAMES,
    canonical,
    check_labels,
    labels_to_csr,
)
from kexue.ops._global_pointer_ops import (
    global_pointer_loss_rows,
    global_pointer_loss_rows_backward,
    global_pointer_scores_canonical,
    global_pointer_scores_canonical_backward,
)
from kexue.ops.multilabel import check_reduction, multilabel_crossentropy, reduce_loss
from kexue.reference import global_pointer as reference

__all__ = [
    "CUDA_MAX_HEAD_SIZE",
    "OP_LOSS",
    "OP_SCORES",
    "decode",
    "global_pointer_decode",
    "global_pointer_loss",
    "global_pointer_loss_rows",
    "global_pointer_loss_rows_backward",
    "global_pointer_scores",
    "global_pointer_scores_canonical",
    "global_pointer_scores_canonical_backward",
    "label_args",
    "labels_to_csr",
    "multilabel_crossentropy",
]


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
    q4, k4, sb, eb, m, code, base = canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
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
    check_reduction(reduction)
    q4, k4, sb, eb, m, code, base = canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
    batch, types, length = sb.shape
    index = check_labels(labels, batch, types, length, m, bool(tril_mask))
    loss, _ = global_pointer_loss_rows(q4, k4, sb, eb, m, index, code, base, bool(tril_mask))
    if index.dim() == 4 and not torch.compiler.is_compiling():
        bad = loss == math.inf
        if bool(bad.any()):
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(
                f"labels[{b}, {t}] marks a span that is masked (a padded position, or start > end "
                "with tril_mask): such a span can never be predicted"
            )
    return reduce_loss(loss, reduction, q.dtype)


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
    q4, k4, sb, eb, m, code, base = canonical(q, k, start_bias, end_bias, mask, rope, rope_base)
    ct = reference.compute_dtype(q.dtype)
    batch, types, length = sb.shape
    d = q4.shape[-1]
    q4, k4, sb, eb = q4.to(ct), k4.to(ct), sb.to(ct), eb.to(ct)
    if code:
        q4 = reference.apply_rope(q4, ROPE_NAMES[code], base)
        k4 = reference.apply_rope(k4, ROPE_NAMES[code], base)
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
    check_floating_tensor("scores", scores, ALL_FLOATS)
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be (B, T, L, L), got {tuple(scores.shape)}")
    return reference.decode(scores, threshold)
