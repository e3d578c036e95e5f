"""Entropy normalization in plain PyTorch (the oracle, and the ``torch`` backend).

Shapes: ``x`` is ``(R, n)`` (rows already flattened by :mod:`kexue.ops.entropy_norm`), ``target``
is ``(R,)``. Arithmetic runs in ``promote_types(x.dtype, float32)``: float64 inputs give the oracle.

The algorithm is exactly the kernels' (csrc/include/kexue/entropy_norm.h): shift each row by its
maximum, classify it (Newton / uniform / argmax / invalid), run the safeguarded Newton iteration
on gamma with all rows in lock step, and write ``softmax(gamma * z)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEWTON, UNIFORM, ARGMAX, INVALID = 0, 1, 2, 3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates in for inputs of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def default_tol(dtype: torch.dtype) -> float:
    """Relative Newton step below which a row counts as converged, for a compute dtype."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _shifted_logits(x: Tensor, logits: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(u, finite, m, has_nan)`` for each row of logits z (``log x`` for probabilities).

    u = z - rowmax with masked (-inf) entries set to 0, the mask of finite entries, the row
    maximum, and whether the row holds a NaN (a NaN input, or +inf which makes z - m NaN).
    """
    z = x.to(compute_dtype(x.dtype))
    if not logits:
        z = torch.log(z)
    finite = z > -math.inf
    m = torch.where(finite, z, -math.inf).amax(dim=-1, keepdim=True)
    u = torch.where(finite, z - m, 0.0)
    has_nan = torch.isnan(z).any(-1) | torch.isnan(u).any(-1)
    return u, finite, m.squeeze(-1), has_nan


def _classify(z_has_nan: Tensor, support: Tensor, ties: Tensor, target: Tensor) -> Tensor:
    # Thresholds compared in float64 on every backend (see classify_row in the shared header).
    t = target.double()
    kind = torch.full_like(support, NEWTON)
    kind = torch.where(t <= torch.log(ties.double()), ARGMAX, kind)
    kind = torch.where(t >= torch.log(support.double()), UNIFORM, kind)
    kind = torch.where(z_has_nan | (support == 0) | torch.isnan(t), INVALID, kind)
    return kind


def _moments(u: Tensor, finite: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    e = torch.where(finite, torch.exp(gamma[:, None] * u), 0.0)
    return e.sum(-1), (e * u).sum(-1), (e * u * u).sum(-1)


def solve_gamma(u: Tensor, finite: Tensor, target: Tensor, max_iter: int, tol: float) -> Tensor:
    """Safeguarded Newton on gamma for every row of ``u`` (all rows assumed of kind NEWTON)."""
    rows = u.shape[0]
    gamma = torch.ones(rows, dtype=u.dtype, device=u.device)
    lo = torch.zeros_like(gamma)
    hi = torch.full_like(gamma, math.inf)
    active = torch.ones(rows, dtype=torch.bool, device=u.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        s0, s1, s2 = _moments(u, finite, gamma)
        mean = s1 / s0
        entropy = torch.log(s0) - gamma * mean
        variance = (s2 / s0 - mean * mean).clamp_min(0.0)
        excess = entropy - target
        slope = gamma * variance
        newton = gamma + excess / slope
        small = (slope > 0) & ((newton - gamma).abs() <= tol * gamma)
        on_target = excess == 0
        lo_new = torch.where(excess > 0, gamma, lo)
        hi_new = torch.where(excess < 0, gamma, hi)
        inside = (slope > 0) & (newton > lo_new) & (newton < hi_new)
        fallback = torch.where(torch.isinf(hi_new), 2 * gamma, 0.5 * (lo_new + hi_new))
        stepped = torch.where(inside, newton, fallback)
        stepped = torch.where(small, newton, torch.where(on_target, gamma, stepped))
        gamma = torch.where(active, stepped, gamma)
        lo = torch.where(active, lo_new, lo)
        hi = torch.where(active, hi_new, hi)
        active = active & ~small & ~on_target
    return gamma


def entropy_normalize_forward(
    x: Tensor, target: Tensor, logits: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, gamma, stats)``.

    y: ``(R, n)`` in ``x.dtype``, each row ``softmax(gamma * z)`` with entropy ``target``.
    gamma: ``(R,)`` in the compute dtype; 0 for rows made uniform, inf for rows made one-hot
    (uniform over tied maxima), NaN for invalid rows.
    stats: ``(R, 2)`` in the compute dtype: the row maximum m and log of the normaliser
    ``sum exp(gamma * (z - m))``, kept so that the backward can rebuild y in full precision.
    """
    u, finite, m, has_nan = _shifted_logits(x, logits)
    ct = u.dtype
    target = target.to(ct)
    support = finite.sum(-1)
    ties = (finite & (u == 0)).sum(-1)
    kind = _classify(has_nan, support, ties, target)

    gamma = torch.ones_like(target)
    newton_rows = kind == NEWTON
    if bool(newton_rows.any()):
        gamma[newton_rows] = solve_gamma(u[newton_rows], finite[newton_rows], target[newton_rows], max_iter, tol)
    gamma = torch.where(kind == UNIFORM, 0.0, gamma)
    gamma = torch.where(kind == ARGMAX, math.inf, gamma)
    gamma = torch.where(kind == INVALID, math.nan, gamma)

    # Newton rows: y = exp(gamma u) / s0. The two ends are written directly (no 0 * inf).
    g = torch.where(kind == NEWTON, gamma, 0.0)
    e = torch.where(finite, torch.exp(g[:, None] * u), 0.0)
    e = torch.where((kind == ARGMAX)[:, None], (finite & (u == 0)).to(ct), e)
    s0 = e.sum(-1)
    y = e / s0[:, None]
    invalid = kind == INVALID
    y = torch.where(invalid[:, None], math.nan, y)
    stats = torch.where(invalid[:, None], math.nan, torch.stack([m, torch.log(s0)], dim=-1))
    return y.to(x.dtype), gamma, stats


def entropy_normalize_backward(
    grad_y: Tensor, grad_gamma: Tensor, x: Tensor, gamma: Tensor, stats: Tensor, logits: bool
) -> tuple[Tensor, Tensor]:
    """Gradients ``(grad_x, grad_target)`` by implicit differentiation of H(y) = H*.

    See csrc/include/kexue/entropy_norm.h (``backward_coefficient``) for the formula.
    """
    u, finite, _, _ = _shifted_logits(x, logits)
    ct = u.dtype
    g = gamma.to(ct)
    live_gamma = (g > 0) & torch.isfinite(g)
    gs = torch.where(live_gamma, g, 0.0)
    y = torch.where(finite & live_gamma[:, None], torch.exp(gs[:, None] * u - stats[:, 1:2].to(ct)), 0.0)
    grad = torch.where(finite, grad_y.to(ct), 0.0)
    ubar = (y * u).sum(-1, keepdim=True)
    gbar = (y * grad).sum(-1, keepdim=True)
    du = u - ubar
    dg = grad - gbar
    var = (y * du * du).sum(-1)
    cov = (y * dg * du).sum(-1)
    live = live_gamma & (var > 0)
    k = torch.where(live, (cov + grad_gamma.to(ct)) / torch.where(live, var, 1.0), 0.0)
    grad_z = gs[:, None] * y * (dg - k[:, None] * du)
    grad_z = torch.where(live[:, None], grad_z, 0.0)
    grad_target = torch.where(live, -k / torch.where(live, gs, 1.0), 0.0)
    if not logits:
        p = x.to(ct)
        grad_z = torch.where(p > 0, grad_z / torch.where(p > 0, p, 1.0), 0.0)
    return grad_z.to(x.dtype), grad_target
