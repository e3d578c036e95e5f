"""Entropy normalization forward for rows longer than one tile (Triton): three passes over x.

One program streams one row in chunks of BLOCK_N:

1. scan: the row maximum m, ties at it, the support and the NaN flag (which classify the row, as
   in entropy_norm_rows.classify), and at the same time the sums s0, s1, s2 of exp(gamma u) at the
   SAMPLES values GRID = 0, 1/8, 1/4, ..., 8 of gamma, kept relative to the running maximum (when
   it grows by d, each sum is rescaled by exp(-gamma d) and re-centred, all terms of one sign).
   The samples whose entropy H straddles the target bracket the root.
2. sweep: SAMPLES new values of gamma, evenly spaced over a window around the root estimated from
   the interpolant over the bracket (entropy_norm_solve.py), the same sums at each; the bracket
   shrinks to two neighbouring samples. One sweep is enough when that bracket is narrow enough for
   the interpolant to be final (entropy_norm_solve.untrusted). Otherwise another sweep runs (one
   more pass; rows whose root lies above 8, where each sweep first extends the bracket 8-fold, or
   rows whose first window missed the root), at most max_iter sweeps in all.
3. write: y = exp(gamma u - L) with gamma and L = log s0 from the interpolant.

The result is the root of H(gamma) = target to float32 precision, which is what the reference's
Newton iteration converges to; ``tol`` does not apply (the trust test replaces it), and max_iter
counts sweeps, not Newton steps. Rows of other kinds (uniform, argmax, invalid) need no sweep.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .entropy_norm_rows import (
    ARGMAX,
    INVALID,
    NEWTON,
    any_set,
    classify,
    count,
    load_logits,
    numerators,
    row_outputs,
    scan_tile,
    shift,
    tile_at,
)
from .entropy_norm_solve import SAMPLES, mean_var, model_root, pick, sample_sums, untrusted


@triton.jit
def _bracket_end(gammas, s0, mean, var, k, j, take, g, s0_g, mean_g, var_g):
    """Sample j's (gamma, s0, mean, var) where ``take``, else the current end kept."""
    return (
        tl.where(take, pick(gammas, k, j), g),
        tl.where(take, pick(s0, k, j), s0_g),
        tl.where(take, pick(mean, k, j), mean_g),
        tl.where(take, pick(var, k, j), var_g),
    )


@triton.jit
def _window(a, b, s0_a, mean_a, var_a, s0_b, mean_b, var_b, target):
    """(first, last) sample of the next sweep: a window around the interpolant's root as wide as
    its distance to the Newton steps taken from either end (an estimate of its error); a to 8a
    while no upper end is known."""
    est, _ = model_root(a, b, s0_a, mean_a, var_a, s0_b, mean_b, var_b, target)
    from_a = a + (tl.log(s0_a) - a * mean_a - target) / (a * var_a)
    from_b = b + (tl.log(s0_b) - b * mean_b - target) / (b * var_b)
    err_a = tl.where((from_a >= a) & (from_a <= b), tl.abs(from_a - est), 0.0)  # false for NaN
    err_b = tl.where((from_b >= a) & (from_b <= b), tl.abs(from_b - est), 0.0)
    w = tl.maximum(tl.maximum(err_a, err_b), 1e-4 * est)
    first = tl.maximum(est - w, a)
    last = tl.minimum(est + w, b)
    bounded = b < float("inf")
    return tl.where(bounded, first, a), tl.where(bounded, last, 8.0 * a)


@triton.jit
def entropy_norm_fwd_stream_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    gamma_ptr,
    stats_ptr,
    n_cols,
    max_iter,
    LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) + tl.zeros([1], tl.int64)  # one row, as a (1,) tile
    row_ok = rows >= 0
    row_base = rows * n_cols  # int64: R * n may exceed 2**31
    cols = tl.arange(0, BLOCK_N)
    target = tl.load(target_ptr + rows).to(tl.float32)
    k = tl.arange(0, SAMPLES)
    row_zero = tl.zeros([1], tl.int32)  # keeps per-row values (1,), never 0-d, in every branch
    grid = tl.where(k == 0, 0.0, tl.exp2((k - 4).to(tl.float32)))  # 0, 1/8, ..., 8

    # -- pass 1: scan and the sums at GRID, relative to the running maximum.
    m = tl.full([1], float("-inf"), tl.float32)
    ties = tl.zeros([1], tl.int32)
    support = tl.zeros([1], tl.int32)
    bad = tl.zeros([1], tl.int32)
    s0 = tl.zeros([SAMPLES], tl.float32)
    s1 = tl.zeros([SAMPLES], tl.float32)
    s2 = tl.zeros([SAMPLES], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        offs, mask = tile_at(row_base, row_ok, start + cols, n_cols)
        z = load_logits(x_ptr, offs, mask, LOGITS)
        m_old = m
        m, ties, support, bad = scan_tile(z, m, ties, support, bad)
        # u_old = u_new + d: e scales by exp(-gamma d); s1, s2 re-centre (every term <= 0, >= 0).
        d = tl.where(m_old > float("-inf"), m - m_old, 0.0)
        scale = tl.exp(-grid * d)
        s2 = scale * (s2 - 2.0 * d * s1 + d * d * s0)
        s1 = scale * (s1 - d * s0)
        s0 = scale * s0
        u, finite = shift(z, m)
        a0, a1, a2 = sample_sums(u, finite, grid)
        s0 += a0
        s1 += a1
        s2 += a2
    kind = classify(target, support, ties, bad)

    # The bracket [a, b] of the root: the last sample above the target and the first below it.
    mean, var = mean_var(s0, s1, s2)
    above = count(tl.log(s0) - grid * mean > target, 0) + row_zero  # >= 1 for Newton rows: H(0) = log support
    a, s0_a, mean_a, var_a = _bracket_end(grid, s0, mean, var, k, above - 1, above >= 1, 0.0, 1.0, 0.0, 0.0)
    inf = float("inf")
    b, s0_b, mean_b, var_b = _bracket_end(grid, s0, mean, var, k, above, above < SAMPLES, inf, 1.0, 0.0, 0.0)

    # -- pass 2: sweeps until the interpolant over the bracket is final (usually one).
    sweeps = 0
    need = (kind == NEWTON) & untrusted(a, b, var_a, var_b)
    while (sweeps < max_iter) & (any_set(need, 0) > 0):
        first, last = _window(a, b, s0_a, mean_a, var_a, s0_b, mean_b, var_b, target)
        gammas = first + (last - first) * (k.to(tl.float32) / (SAMPLES - 1))
        s0 = tl.zeros([SAMPLES], tl.float32)
        s1 = tl.zeros([SAMPLES], tl.float32)
        s2 = tl.zeros([SAMPLES], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs, mask = tile_at(row_base, row_ok, start + cols, n_cols)
            u, finite = shift(load_logits(x_ptr, offs, mask, LOGITS), m)
            a0, a1, a2 = sample_sums(u, finite, gammas)
            s0 += a0
            s1 += a1
            s2 += a2
        mean, var = mean_var(s0, s1, s2)
        above = count(tl.log(s0) - gammas * mean > target, 0) + row_zero
        a, s0_a, mean_a, var_a = _bracket_end(gammas, s0, mean, var, k, above - 1, above >= 1, a, s0_a, mean_a, var_a)
        b, s0_b, mean_b, var_b = _bracket_end(gammas, s0, mean, var, k, above, above < SAMPLES, b, s0_b, mean_b, var_b)
        need = untrusted(a, b, var_a, var_b)
        sweeps += 1

    # gamma and L = log s0 from the interpolant; a row never bracketed from above (max_iter spent)
    # keeps its largest sample, whose sums are exact. Uniform and argmax rows normalise by counts.
    gamma, log_s0 = model_root(a, b, s0_a, mean_a, var_a, s0_b, mean_b, var_b, target)
    unbounded = b == float("inf")
    gamma = tl.where(unbounded, a, gamma)
    log_s0 = tl.where(unbounded, tl.log(s0_a), log_s0)
    by_count = tl.where(kind == ARGMAX, ties, support).to(tl.float32)
    log_s0 = tl.where(kind == NEWTON, log_s0, tl.log(by_count))

    # -- pass 3: write y.
    g = tl.where(kind == NEWTON, gamma, 0.0)
    argmax = kind == ARGMAX
    inv_s0 = tl.where(kind == INVALID, float("nan"), tl.exp(-log_s0))
    for start in range(0, n_cols, BLOCK_N):
        offs, mask = tile_at(row_base, row_ok, start + cols, n_cols)
        u, finite = shift(load_logits(x_ptr, offs, mask, LOGITS), m)
        y = numerators(u, finite, g, argmax) * inv_s0[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    row_outputs(kind, gamma, m, log_s0, gamma_ptr, stats_ptr, rows, row_ok)
