"""The dense GlobalPointer scores op in Triton: the forward writes the masked ``(B, T, L, L)``
scores, the backward reduces dScores in a rows pass (d_start_bias, dq) and a columns pass
(d_end_bias, dk). The launchers are in :mod:`global_pointer`, the shared tile helpers in
:mod:`global_pointer_tile_ops`.

As in the loss kernels, a tile's ``Q K^T`` (forward) or gradient product (backward) is computed
once for all the types of its head: the types' dScores tiles add up into one ``G`` first.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .global_pointer_rope import load_rotated, store_unrotated
from .global_pointer_tile_ops import RUNTIME_INTS, add_owned, batch_head, bias, candidates, tile_dots, token_ok


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_scores_fwd_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    rope_ptr,
    out_ptr,
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
    """Grid (tiles, B * H): one tile's dot, written for every type of the head with its biases."""
    pid = tl.program_id(0)
    n_col_blk = tl.cdiv(L, BLOCK_N)
    pid_m = pid // n_col_blk
    pid_n = pid % n_col_blk
    b, h, pid_bh = batch_head(H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    row_in, row_ok = token_ok(mask_ptr, b, L, i)
    col_in, col_ok = token_ok(mask_ptr, b, L, j)
    qr = load_rotated(q_ptr, pid_bh * L * BLOCK_H, i, row_ok, rope_ptr, SCALE, BLOCK_H, ROPE)
    kr = load_rotated(k_ptr, pid_bh * L * BLOCK_H, j, col_ok, rope_ptr, 1.0, BLOCK_H, ROPE)
    valid = candidates(i, j, row_ok, col_ok, TRIL)
    dots = tile_dots(qr, kr, valid, DOT_PREC)  # once for every type
    n_types = T // H
    t0 = h * (H // T)
    # int64 offsets: B * T * L * L overflows int32 from L = 2^15 / sqrt(B T) on
    tile_off = i.to(tl.int64)[:, None] * L + j[None, :]
    in_tile = row_in[:, None] & col_in[None, :]
    for tt in range(0, n_types):
        bt = b * T + t0 + tt
        s = dots + bias(sb_ptr, bt, L, i, row_ok)[:, None] + bias(eb_ptr, bt, L, j, col_ok)[None, :]
        s = tl.where(valid, s, float("-inf"))
        tl.store(out_ptr + bt * L * L + tile_off, s.to(out_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _grad_scores_tile(grad_ptr, bt, L, i, j, valid):
    """dScores of (b, t) = bt on a tile in fp32, 0 at non-candidates (their scores are the
    constant -inf, so whatever dScores holds there, NaN included, is not a gradient)."""
    rows = grad_ptr + bt * L * L + i.to(tl.int64) * L
    return tl.load(rows[:, None] + j[None, :], mask=valid, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_scores_bwd_rows_kernel(
    k_ptr,
    mask_ptr,
    rope_ptr,
    grad_ptr,
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
    """Rows pass: d_start_bias = row sums of dScores, dq = (sum over the head's types) dScores K."""
    pid_m = tl.program_id(0)
    b, h, pid_bh = batch_head(H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = token_ok(mask_ptr, b, L, i)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = token_ok(mask_ptr, b, L, j)
        kr = load_rotated(k_ptr, pid_bh * L * BLOCK_H, j, col_ok, rope_ptr, 1.0, BLOCK_H, ROPE)
        valid = candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            p = _grad_scores_tile(grad_ptr, bt, L, i, j, valid)
            G += p
            add_owned(dsb_ptr + bt * L, i, row_in, tl.sum(p, axis=1))
        dq += tl.dot(G.to(kr.dtype), kr, input_precision=DOT_PREC)
    store_unrotated(dq_ptr, pid_bh * L * BLOCK_H, i, row_in, rope_ptr, SCALE, dq, BLOCK_H, ROPE)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _gp_scores_bwd_cols_kernel(
    q_ptr,
    mask_ptr,
    rope_ptr,
    grad_ptr,
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
    """Columns pass: d_end_bias = column sums of dScores, dk = G^T Q (each program owns its keys)."""
    pid_n = tl.program_id(0)
    b, h, pid_bh = batch_head(H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in, col_ok = token_ok(mask_ptr, b, L, j)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for i0 in range(0, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        row_in, row_ok = token_ok(mask_ptr, b, L, i)
        qr = load_rotated(q_ptr, pid_bh * L * BLOCK_H, i, row_ok, rope_ptr, SCALE, BLOCK_H, ROPE)
        valid = candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            p = _grad_scores_tile(grad_ptr, bt, L, i, j, valid)
            G += p
            add_owned(deb_ptr + bt * L, j, col_in, tl.sum(p, axis=0))
        dk += tl.dot(tl.trans(G.to(qr.dtype)), qr, input_precision=DOT_PREC)
    store_unrotated(dk_ptr, pid_bh * L * BLOCK_H, j, col_in, rope_ptr, 1.0, dk, BLOCK_H, ROPE)
