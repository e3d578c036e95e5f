"""GlobalPointer in plain PyTorch: RoPE, span scores, multilabel cross-entropy, decoding.

The oracle of every global_pointer test (run it in float64) and the ``torch`` backend of
:mod:`kexue.ops.global_pointer`. The math: kexue.fm/archives/8373 (GlobalPointer), 8877 (Efficient
GlobalPointer), 7359 and 9064 (multilabel cross-entropy), 8888 (GPLinker).

Canonical layout (what the ops layer hands the kernels):

- ``q, k``: ``(B, H, L, d)``, the query and key of each position, ``H = 1`` (Efficient
  GlobalPointer: one pair shared by every type) or ``H = T`` (GlobalPointer: one pair per type);
- ``start_bias, end_bias``: ``(B, T, L)``, added to the score of span (i, j) at its start i and
  its end j;
- ``mask``: ``(B, L)`` bool, True at real tokens.

The score of span (i, j) for type t:

    s[b, t, i, j] = <R_i q[b, h(t), i], R_j k[b, h(t), j]> / sqrt(d) + start_bias[b, t, i] + end_bias[b, t, j]

with R_p the rotary position embedding of position p (positions from 0), and ``-inf`` where token
i or token j is padding or, with ``tril_mask``, where i > j (a span cannot end before it starts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kexue._rope import rope_angles  # the angle formula, shared with the Triton launchers

ROPE_LAYOUTS = ("interleaved", "half")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates in for inputs of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding.


def apply_rope(x: Tensor, layout: str = "interleaved", base: float = 10000.0, inverse: bool = False) -> Tensor:
    """Rotate ``x (..., L, d)`` by its positions along dim -2.

    ``interleaved`` (bert4keras / bert4torch GlobalPointer): pair c is channels (2c, 2c+1),
    ``x'[2c] = x[2c] cos - x[2c+1] sin``, ``x'[2c+1] = x[2c+1] cos + x[2c] sin``.
    ``half`` (GPT-NeoX / LLaMA ``rotate_half``): pair c is channels (c, c + d/2).
    ``inverse`` applies the transpose ``R_p^T = R_{-p}`` (the gradient through the rotation).
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    length, d = x.shape[-2], x.shape[-1]
    ang = rope_angles(length, d, base).to(x.device)  # the angles are built on the CPU in float64
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    if inverse:
        sin = -sin
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if layout == "interleaved":
        return torch.stack((ra, rb), dim=-1).flatten(-2)
    return torch.cat((ra, rb), dim=-1)


# ---------------------------------------------------------------------------------------------
# Scores.


def span_mask(mask: Tensor | None, batch: int, length: int, tril_mask: bool, device) -> Tensor:
    """``(B, 1, L, L)`` bool: True where span (i, j) is a candidate."""
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    ok = mask[:, None, :, None] & mask[:, None, None, :]
    if tril_mask:
        ok = ok & torch.ones(length, length, dtype=torch.bool, device=device).triu()
    return ok


def zero_padded(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x (B, H, L, ...)`` with the rows of padded tokens set to 0. Padded positions may hold
    anything (NaN, inf): their scores are -inf, and zeroing them keeps 0 * NaN out of the
    products that reach the real spans (the scores and the gradients G k, G^T q)."""
    if mask is None:
        return x
    keep = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (x.dim() - 3)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def global_pointer_scores(
    q: Tensor,
    k: Tensor,
    start_bias: Tensor,
    end_bias: Tensor,
    mask: Tensor | None = None,
    rope: str | None = "interleaved",
    tril_mask: bool = True,
    rope_base: float = 10000.0,
) -> Tensor:
    """``(B, T, L, L)`` span scores in ``compute_dtype(q.dtype)``, ``-inf`` where masked.

    Shapes as in the module docstring; ``T = start_bias.shape[1]``, and ``H`` is 1 or ``T``.
    """
    ct = compute_dtype(q.dtype)
    q, k = zero_padded(q.to(ct), mask), zero_padded(k.to(ct), mask)
    if rope is not None:
        q, k = apply_rope(q, rope, rope_base), apply_rope(k, rope, rope_base)
    batch, _, length, d = q.shape
    types = start_bias.shape[1]
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    if logits.shape[1] != types:
        logits = logits.expand(batch, types, length, length)
    sb, eb = zero_padded(start_bias.to(ct), mask), zero_padded(end_bias.to(ct), mask)
    s = logits + sb[..., :, None] + eb[..., None, :]
    ok = span_mask(mask, batch, length, tril_mask, q.device)
    return s.masked_fill(~ok, -math.inf)


# ---------------------------------------------------------------------------------------------
# Multilabel categorical cross-entropy (kexue.fm/archives/7359).


def multilabel_crossentropy(scores: Tensor, labels: Tensor) -> Tensor:
    """Dense form over the last dim: ``log(1 + sum_neg e^s) + log(1 + sum_pos e^-s)``.

    ``scores (..., n)`` with ``-inf`` at excluded entries; ``labels (..., n)`` bool. Returns
    ``(...)``. A positive at a ``-inf`` score gives ``+inf`` (the caller validates labels).
    """
    y = labels.bool()
    zero = scores.new_zeros(scores.shape[:-1] + (1,))
    neg = torch.where(y, -math.inf, scores)
    pos = torch.where(y, -scores, -math.inf)
    return torch.logsumexp(torch.cat((neg, zero), -1), -1) + torch.logsumexp(torch.cat((pos, zero), -1), -1)


def sparse_multilabel_crossentropy(
    scores: Tensor, positives: Tensor, mask_zero: bool = False, epsilon: float = 1e-7
) -> Tensor:
    """Sparse form of bert4keras / bert4torch, step for step (kexue.fm/archives/8888).

    ``scores (..., n)``; ``positives (..., P)`` int64 class indices (with ``mask_zero``, index 0 is
    padding). ``neg = a + log(clip(1 - e^(b - a), epsilon, 1))`` with ``a = log(1 + sum_all e^s)``
    and ``b = log sum_pos e^s``; ``pos = log(1 + sum_pos e^-s)``. Equal to the dense form when
    positives are distinct, up to the epsilon clamp.
    """
    zero = scores.new_zeros(scores.shape[:-1] + (1,))
    s = torch.cat((scores, zero), -1)
    if mask_zero:
        s = torch.cat((torch.full_like(zero, math.inf), s[..., 1:]), -1)
    pos_2 = torch.gather(s, -1, positives)
    pos_1 = torch.cat((pos_2, zero), -1)
    if mask_zero:
        s = torch.cat((torch.full_like(zero, -math.inf), s[..., 1:]), -1)
        pos_2 = torch.gather(s, -1, positives)
    pos_loss = torch.logsumexp(-pos_1, -1)
    all_loss = torch.logsumexp(s, -1)
    aux = torch.clamp(1 - torch.exp(torch.logsumexp(pos_2, -1) - all_loss), epsilon, 1)
    return pos_loss + all_loss + torch.log(aux)


# ---------------------------------------------------------------------------------------------
# The GlobalPointer loss and its pieces as the kernels compute them.


def dense_labels(row_ptr: Tensor, cols: Tensor, batch: int, types: int, length: int) -> Tensor:
    """``(B, T, L, L)`` bool from CSR positives: ``row_ptr (B*T*L + 1,)``, ``cols (N,)``."""
    dense = torch.zeros(batch * types * length, length, dtype=torch.bool, device=cols.device)
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(batch * types * length, device=cols.device), counts)
    dense[rows, cols] = True
    return dense.view(batch, types, length, length)


def loss_parts(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(lse_neg, lse_pos)``, each ``(B, T)``: ``log(1 + sum_neg e^s)``, ``log(1 + sum_pos e^-s)``."""
    y = labels.flatten(-2)
    s = scores.flatten(-2)
    zero = s.new_zeros(s.shape[:-1] + (1,))
    neg = torch.logsumexp(torch.cat((torch.where(y, -math.inf, s), zero), -1), -1)
    pos = torch.logsumexp(torch.cat((torch.where(y, -s, -math.inf), zero), -1), -1)
    return neg, pos


def global_pointer_loss_forward(q, k, start_bias, end_bias, mask, labels, rope, rope_base, tril_mask):
    """The kernels' forward: ``(loss (B, T), lse (B, T, 2))`` with ``lse = (lse_neg, lse_pos)``.

    ``labels``: dense ``(B, T, L, L)`` bool. A positive on a masked span gives ``+inf``.
    """
    s = global_pointer_scores(q, k, start_bias, end_bias, mask, rope, tril_mask, rope_base)
    neg, pos = loss_parts(s, labels)
    return neg + pos, torch.stack((neg, pos), -1)


def score_grad_to_inputs(ds, q, k, rope, rope_base, mask=None):
    """``(dq, dk, d_start_bias, d_end_bias)`` from ``ds = dL/ds (B, T, L, L)`` (zero where masked).

    The kernels' backward step for step: bias gradients are the row and column sums, the types
    that share a head add up into ``G``, then ``dq = G k / sqrt(d)``, ``dk = G^T q / sqrt(d)`` in
    the rotated frame, rotated back by ``R^T``.
    """
    ct = ds.dtype
    qr, kr = zero_padded(q.to(ct), mask), zero_padded(k.to(ct), mask)
    if rope is not None:
        qr, kr = apply_rope(qr, rope, rope_base), apply_rope(kr, rope, rope_base)
    d = q.shape[-1]
    g = ds.sum(1, keepdim=True) if q.shape[1] == 1 else ds
    dqr = torch.einsum("bhij,bhjd->bhid", g, kr) / math.sqrt(d)
    dkr = torch.einsum("bhij,bhid->bhjd", g, qr) / math.sqrt(d)
    if rope is not None:
        dqr, dkr = apply_rope(dqr, rope, rope_base, inverse=True), apply_rope(dkr, rope, rope_base, inverse=True)
    return dqr, dkr, ds.sum(-1), ds.sum(-2)


def global_pointer_loss_backward(grad, q, k, start_bias, end_bias, mask, labels, rope, rope_base, tril_mask):
    """Gradients ``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * loss)``.

    ``dL/ds = g e^{s - lse_neg}`` at negatives, ``-g e^{-s - lse_pos}`` at positives, 0 where
    masked (a positive on a masked span is left out, as in the kernels).
    """
    s = global_pointer_scores(q, k, start_bias, end_bias, mask, rope, tril_mask, rope_base)
    neg, pos = loss_parts(s, labels)
    g = grad.to(s.dtype)[..., None, None]
    valid = torch.isfinite(s)
    ds = torch.where(labels, -g * torch.exp(-s - pos[..., None, None]), g * torch.exp(s - neg[..., None, None]))
    ds = torch.where(valid, ds, 0.0)
    grads = score_grad_to_inputs(ds, q, k, rope, rope_base, mask)
    return tuple(x.to(t.dtype) for x, t in zip(grads, (q, k, start_bias, end_bias), strict=False))


def global_pointer_scores_forward(q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask):
    """The kernels' scores forward: ``(B, T, L, L)`` in q's dtype."""
    return global_pointer_scores(q, k, start_bias, end_bias, mask, rope, tril_mask, rope_base).to(q.dtype)


def global_pointer_scores_backward(grad, q, k, start_bias, end_bias, mask, rope, rope_base, tril_mask):
    """Gradients ``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * scores)`` over unmasked spans."""
    batch, _, length, _ = q.shape
    ok = span_mask(mask, batch, length, tril_mask, q.device)
    ds = torch.where(ok, grad.to(compute_dtype(q.dtype)), 0.0)
    grads = score_grad_to_inputs(ds, q, k, rope, rope_base, mask)
    return tuple(x.to(t.dtype) for x, t in zip(grads, (q, k, start_bias, end_bias), strict=False))


# ---------------------------------------------------------------------------------------------
# Decoding.


def decode(scores: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Every span scoring above ``threshold``: ``(index (N, 4) int64 = (b, t, i, j), score (N,))``,
    in lexicographic order of the index."""
    index = torch.nonzero(scores > threshold)
    return index, scores[tuple(index.unbind(-1))]
