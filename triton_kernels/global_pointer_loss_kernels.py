"""The fused GlobalPointer loss in Triton: forward (online log-sum-exp states per row) and the two
backward passes (rows: d_start_bias and dq; columns: d_end_bias and dk, no atomics). The launchers
are in :mod:`global_pointer`, the shared tile helpers in :mod:`global_pointer_tile_ops`.

A tile's dot product ``Q K^T`` is computed ONCE and then serves every type of the head: with
shared q/k (Efficient GlobalPointer, H = 1) all T types only add their start/end biases to the same
tile, and in the backward their ``dL/ds`` tiles add up into one ``G`` before the single products
``G K`` (rows pass) or ``G^T Q`` (columns pass). The FLOPs of a call are therefore those of one
``Q K^T`` per (batch, tile) plus one gradient product per (batch, tile), whatever T is.

Dots take the operands in their stored dtype (bf16/fp16 on tensor cores, fp32 in IEEE or TF32 as
``DOT_PREC`` says) and accumulate in fp32; each score pays one exponential.

Grid: (blocks along the owned axis, B * H). Types of head h: all T when H = 1, else h.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .global_pointer_rope import load_rotated, store_unrotated
from .global_pointer_tile_ops import (
    RUNTIME_INTS,
    add_owned,
    batch_head,
    bias,
    candidates,
    grad_tile,
    labels_tile,
    tile_dots,
    token_ok,
)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_loss_fwd_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    rope_ptr,
    row_ptr,
    cols_ptr,
    state_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    SCALE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Per row (b, t, i) the online log-sum-exp states (m_neg, s_neg, m_pos, s_pos) in
    ``state (B, T, L, 4)``, initialized by the launcher to (-inf, 0, -inf, 0)."""
    pid_m = tl.program_id(0)
    b, h, pid_bh = batch_head(H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = token_ok(mask_ptr, b, L, i)
    qr = load_rotated(q_ptr, pid_bh * L * BLOCK_H, i, row_ok, rope_ptr, SCALE, BLOCK_H, ROPE)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = token_ok(mask_ptr, b, L, j)
        kr = load_rotated(k_ptr, pid_bh * L * BLOCK_H, j, col_ok, rope_ptr, 1.0, BLOCK_H, ROPE)
        valid = candidates(i, j, row_ok, col_ok, TRIL)
        dots = tile_dots(qr, kr, valid, DOT_PREC)  # once for every type
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + bias(sb_ptr, bt, L, i, row_ok)[:, None] + bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
            # negatives contribute e^{s}, positives e^{-s}: one exp per score, shifted by the
            # running maximum of its own stream
            x = tl.where(valid, tl.where(y, -s, s), float("-inf"))
            st = state_ptr + (bt * L + i) * 4
            m_neg = tl.load(st, mask=row_in, other=float("-inf"))
            s_neg = tl.load(st + 1, mask=row_in, other=0.0)
            m_pos = tl.load(st + 2, mask=row_in, other=float("-inf"))
            s_pos = tl.load(st + 3, mask=row_in, other=0.0)
            mn = tl.maximum(m_neg, tl.max(tl.where(y, float("-inf"), x), axis=1))
            mp = tl.maximum(m_pos, tl.max(tl.where(y, x, float("-inf")), axis=1))
            mn_safe = tl.where(mn == float("-inf"), 0.0, mn)
            mp_safe = tl.where(mp == float("-inf"), 0.0, mp)
            e = tl.exp(x - tl.where(y, mp_safe[:, None], mn_safe[:, None]))
            s_neg = s_neg * tl.exp(m_neg - mn_safe) + tl.sum(tl.where(y, 0.0, e), axis=1)
            s_pos = s_pos * tl.exp(m_pos - mp_safe) + tl.sum(tl.where(y, e, 0.0), axis=1)
            tl.store(st, mn, mask=row_in)
            tl.store(st + 1, s_neg, mask=row_in)
            tl.store(st + 2, mp, mask=row_in)
            tl.store(st + 3, s_pos, mask=row_in)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_loss_bwd_rows_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    rope_ptr,
    row_ptr,
    cols_ptr,
    grad_ptr,
    lse_ptr,
    dq_ptr,
    dsb_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    SCALE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Rows pass: d_start_bias (row sums of dL/ds, into the zeroed ``dsb``) and dq = G K."""
    pid_m = tl.program_id(0)
    b, h, pid_bh = batch_head(H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = token_ok(mask_ptr, b, L, i)
    qr = load_rotated(q_ptr, pid_bh * L * BLOCK_H, i, row_ok, rope_ptr, SCALE, BLOCK_H, ROPE)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = token_ok(mask_ptr, b, L, j)
        kr = load_rotated(k_ptr, pid_bh * L * BLOCK_H, j, col_ok, rope_ptr, 1.0, BLOCK_H, ROPE)
        valid = candidates(i, j, row_ok, col_ok, TRIL)
        dots = tile_dots(qr, kr, valid, DOT_PREC)  # once for every type
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + bias(sb_ptr, bt, L, i, row_ok)[:, None] + bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
            p = grad_tile(s, valid, y, tl.load(grad_ptr + bt), tl.load(lse_ptr + bt * 2), tl.load(lse_ptr + bt * 2 + 1))
            G += p
            add_owned(dsb_ptr + bt * L, i, row_in, tl.sum(p, axis=1))
        dq += tl.dot(G.to(kr.dtype), kr, input_precision=DOT_PREC)
    store_unrotated(dq_ptr, pid_bh * L * BLOCK_H, i, row_in, rope_ptr, SCALE, dq, BLOCK_H, ROPE)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_loss_bwd_cols_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    rope_ptr,
    row_ptr,
    cols_ptr,
    grad_ptr,
    lse_ptr,
    dk_ptr,
    deb_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    SCALE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Columns pass: d_end_bias (column sums, into the zeroed ``deb``) and dk = G^T Q."""
    pid_n = tl.program_id(0)
    b, h, pid_bh = batch_head(H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in, col_ok = token_ok(mask_ptr, b, L, j)
    kr = load_rotated(k_ptr, pid_bh * L * BLOCK_H, j, col_ok, rope_ptr, 1.0, BLOCK_H, ROPE)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for i0 in range(0, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        row_in, row_ok = token_ok(mask_ptr, b, L, i)
        qr = load_rotated(q_ptr, pid_bh * L * BLOCK_H, i, row_ok, rope_ptr, SCALE, BLOCK_H, ROPE)
        valid = candidates(i, j, row_ok, col_ok, TRIL)
        dots = tile_dots(qr, kr, valid, DOT_PREC)  # once for every type
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + bias(sb_ptr, bt, L, i, row_ok)[:, None] + bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
            p = grad_tile(s, valid, y, tl.load(grad_ptr + bt), tl.load(lse_ptr + bt * 2), tl.load(lse_ptr + bt * 2 + 1))
            G += p
            add_owned(deb_ptr + bt * L, j, col_in, tl.sum(p, axis=0))
        dk += tl.dot(tl.trans(G.to(qr.dtype)), qr, input_precision=DOT_PREC)
    store_unrotated(dk_ptr, pid_bh * L * BLOCK_H, j, col_in, rope_ptr, 1.0, dk, BLOCK_H, ROPE)
