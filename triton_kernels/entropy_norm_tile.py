"""Entropy normalization forward for rows that fit one tile (Triton).

One program handles BLOCK_M rows of up to BLOCK_N entries. x is read once; the shifted logits stay
in registers and every Newton iteration is arithmetic on registers only, all rows of the program
in lock step, exactly as the reference iterates (entropy_norm_rows.py holds the steps). Longer rows
are the job of entropy_norm_stream.py.
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
    load_logits,
    moments,
    newton_step,
    numerators,
    row_outputs,
    scan_tile,
    shift,
    tile_at,
)


@triton.jit
def entropy_norm_fwd_tile_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    gamma_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    max_iter,
    tol,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: R * n may exceed 2**31
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    offs, mask = tile_at(rows * n_cols, row_ok, tl.arange(0, BLOCK_N), n_cols)
    tol = tl.cast(tol, tl.float32)  # pinned: a Python float may arrive as fp64 under torch.compile
    target = tl.load(target_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # -- scan: row maximum, ties at the maximum, finite entries, NaN/+inf. Rows past the end see
    # only -inf, classify as INVALID and so never hold the Newton loop open.
    z = load_logits(x_ptr, offs, mask, LOGITS)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_M], tl.int32)
    m, ties, support, bad = scan_tile(z, m, zero, zero, zero)
    u, finite = shift(z, m)  # stays in registers for the rest of the kernel
    kind = classify(target, support, ties, bad)

    # -- safeguarded Newton on gamma, all rows of the block in lock step, until each has
    # converged (or hit the target exactly) or max_iter iterations are spent.
    gamma = tl.full([BLOCK_M], 1.0, tl.float32)  # gamma = 1: the input distribution itself
    lo = tl.zeros([BLOCK_M], tl.float32)
    hi = tl.full([BLOCK_M], float("inf"), tl.float32)
    active = kind == NEWTON
    it = tl.zeros([], tl.int32)
    while (it < max_iter) & (any_set(active, 0) > 0):
        s0, s1, s2 = moments(u, finite, gamma)
        gamma, lo, hi, active = newton_step(gamma, lo, hi, active, s0, s1, s2, target, tol)
        it += 1

    # -- output: y = e / s0 with e = exp(g * u) at the final gamma (g = 0 for uniform and invalid
    # rows, the indicator of the maxima for argmax rows); y and stats are NaN for invalid rows.
    g = tl.where(kind == NEWTON, gamma, 0.0)
    e = numerators(u, finite, g, kind == ARGMAX)
    s0 = tl.sum(e, axis=1)
    y = tl.where((kind == INVALID)[:, None], float("nan"), e / s0[:, None])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    row_outputs(kind, gamma, m, tl.log(s0), gamma_ptr, stats_ptr, rows, row_ok)
