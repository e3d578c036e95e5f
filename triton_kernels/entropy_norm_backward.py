"""Entropy normalization backward (Triton): gradients to x and the target.

With y rebuilt from the forward's stats (m, log s0), ubar = E_y[u], gbar = E_y[G],
var = E_y[(u - ubar)^2], cov = E_y[(G - gbar)(u - ubar)] and k = (cov + grad_gamma) / var
(backward_coefficient in entropy_norm.h):

    grad_z = gamma * y * ((G - gbar) - k (u - ubar)),   grad_target = -k / gamma,

zero for rows solved at a limit (gamma 0 or inf), invalid rows (NaN) and rows with var = 0.
Rows that fit one tile are read once and kept in registers; longer rows take three passes
(means, centred sums, write), each loading x and G once: for probabilities the write pass takes
p from the same load it takes log p from.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .entropy_norm_rows import logits_of, shift, tile_at


@triton.jit
def _bwd_tile(grad_y_ptr, x_ptr, offs, mask, m, gs, log_s0, live_gamma, LOGITS: tl.constexpr):
    """(u, y, G, x) of a tile: shifted logits, y rebuilt in float32, the incoming gradient, and x
    as loaded (the write pass divides by p).

    u, y and G are 0 on masked entries and on whole rows without a finite positive gamma, so those
    rows come out of the sums with var = 0 and need no flag of their own later on (fewer live
    predicates: ptxas otherwise spills them on some configurations).
    """
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    u, finite = shift(logits_of(x, mask, LOGITS), m)
    keep = finite & live_gamma[:, None]
    u = tl.where(keep, u, 0.0)  # rows with m = +inf would otherwise carry -inf
    y = tl.where(keep, tl.exp(gs[:, None] * u - log_s0[:, None]), 0.0)
    grad = tl.where(keep, tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    return u, y, grad, x


@triton.jit
def _bwd_grad_x(x, u, y, grad, ubar, gbar, k, gs, live, LOGITS: tl.constexpr):
    """grad_x of a tile; for probabilities grad_x = grad_z / p where p > 0 (z = log p), else 0."""
    grad_z = gs[:, None] * y * ((grad - gbar[:, None]) - k[:, None] * (u - ubar[:, None]))
    grad_z = tl.where(live[:, None], grad_z, 0.0)
    if not LOGITS:
        p = x.to(tl.float32)
        grad_z = tl.where(p > 0.0, grad_z / tl.where(p > 0.0, p, 1.0), 0.0)
    return grad_z


@triton.jit
def entropy_norm_bwd_kernel(
    grad_y_ptr,
    grad_gamma_ptr,
    x_ptr,
    gamma_ptr,
    stats_ptr,
    grad_x_ptr,
    grad_target_ptr,
    n_rows,
    n_cols,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    row_base = rows * n_cols
    cols = tl.arange(0, BLOCK_N)

    gamma = tl.load(gamma_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad_gamma = tl.load(grad_gamma_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    m = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0).to(tl.float32)
    log_s0 = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    live_gamma = (gamma > 0.0) & (gamma < float("inf"))  # false for NaN
    gs = tl.where(live_gamma, gamma, 0.0)

    if SINGLE_TILE:
        offs, mask = tile_at(row_base, row_ok, cols, n_cols)
        u, y, grad, x = _bwd_tile(grad_y_ptr, x_ptr, offs, mask, m, gs, log_s0, live_gamma, LOGITS)
        ubar = tl.sum(y * u, axis=1)
        gbar = tl.sum(y * grad, axis=1)
        du = u - ubar[:, None]
        var = tl.sum(y * du * du, axis=1)
        cov = tl.sum(y * (grad - gbar[:, None]) * du, axis=1)
    else:
        # Means first, then centred sums in a second pass (not E[u^2] - E[u]^2, which cancels),
        # as the single tile does in registers.
        ubar = tl.zeros([BLOCK_M], tl.float32)
        gbar = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c, _ = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            ubar += tl.sum(y_c * u_c, axis=1)
            gbar += tl.sum(y_c * grad_c, axis=1)
        var = tl.zeros([BLOCK_M], tl.float32)
        cov = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c, _ = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            du = u_c - ubar[:, None]
            var += tl.sum(y_c * du * du, axis=1)
            cov += tl.sum(y_c * (grad_c - gbar[:, None]) * du, axis=1)

    live = var > 0.0  # implies live_gamma: other rows were zeroed by _bwd_tile, so var = 0
    k = tl.where(live, (cov + grad_gamma) / tl.where(live, var, 1.0), 0.0)
    tl.store(grad_target_ptr + rows, tl.where(live, -k / tl.where(live, gs, 1.0), 0.0), mask=row_ok)

    if SINGLE_TILE:
        gx = _bwd_grad_x(x, u, y, grad, ubar, gbar, k, gs, live, LOGITS)
        tl.store(grad_x_ptr + offs, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c, x_c = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            gx = _bwd_grad_x(x_c, u_c, y_c, grad_c, ubar, gbar, k, gs, live, LOGITS)
            tl.store(grad_x_ptr + offs_c, gx.to(grad_x_ptr.dtype.element_ty), mask=mask_c)
