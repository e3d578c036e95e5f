"""The Triton kernels of GlobalPointer (the launchers are in :mod:`global_pointer`): tile loops only.

Every program owns a block of rows (or columns) of one (batch, head) and walks the other axis in
tiles. A tile's dot product ``Q K^T`` is computed ONCE and then serves every type of the head: with
shared q/k (Efficient GlobalPointer, H = 1) all T types only add their start/end biases to the same
tile, and in the backward their ``dL/ds`` tiles add up into one ``G`` before the single products
``G K`` (rows pass) or ``G^T Q`` (columns pass). The FLOPs of a call are therefore those of one
``Q K^T`` per (batch, tile) plus one gradient product per (batch, tile), whatever T is.

State that belongs to one (batch, type) and one row or column (the online log-sum-exp of the
loss, the bias gradients) lives in small ``(B, T, L, ...)`` fp32 buffers that the program owns
(read-modify-write, no atomics): the type loop sits inside the tile loop, so it cannot stay in
registers for a runtime T.

Positives come as CSR over the rows (b, t, i): ``row_ptr (B*T*L + 1,)``, ``cols (N,)``; a tile's
label mask is built by comparing the columns of its rows' positives with the tile's columns.

Dots take the operands in their stored dtype (bf16/fp16 on tensor cores, fp32 in IEEE or TF32 as
``DOT_PREC`` says) and accumulate in fp32; each score pays one exponential.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, base, pos, pos_ok, c, D):
    """Rows ``pos`` of one head (rotated and scaled by the launcher), 0 where ``pos_ok`` is False:
    a padded token's row is never read, so NaN or inf there cannot reach a real span through
    0 * NaN in a product."""
    return tl.load(ptr + base + pos[:, None] * D + c[None, :], mask=pos_ok[:, None] & (c < D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, base, pos, pos_in, c, D, value):
    tl.store(
        ptr + base + pos[:, None] * D + c[None, :],
        value.to(ptr.dtype.element_ty),
        mask=pos_in[:, None] & (c < D)[None, :],
    )


@triton.jit
def _token_ok(mask_ptr, b, L, pos):
    """(in range, real token) for positions ``pos`` of batch element b."""
    pos_in = pos < L
    return pos_in, pos_in & (tl.load(mask_ptr + b * L + pos, mask=pos_in, other=0) != 0)


@triton.jit
def _candidates(i, j, row_ok, col_ok, TRIL):
    """Whether each span (i, j) of the tile is a candidate (both tokens real; i <= j with tril)."""
    first = tl.where(TRIL != 0, i, 0)  # the first candidate column of each row
    return row_ok[:, None] & col_ok[None, :] & (j[None, :] >= first[:, None])


@triton.jit
def _labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in):
    """The tile's positives of (b, t) = bt from the CSR rows: True at (i, j) if j is a positive
    end of row i. Loops over the most positives any row of the block has (usually 0 or 1)."""
    r = bt * L + i
    lo = tl.load(row_ptr + r, mask=row_in, other=0)
    hi = tl.load(row_ptr + r + 1, mask=row_in, other=0)
    y = (i[:, None] < 0) & (j[None, :] < 0)
    for p in range(0, tl.max(hi - lo, axis=0)):
        col = tl.load(cols_ptr + lo + p, mask=lo + p < hi, other=-1)
        y = y | (col[:, None] == j[None, :])
    return y


@triton.jit
def _bias(ptr, bt, L, pos, pos_ok):
    return tl.load(ptr + bt * L + pos, mask=pos_ok, other=0.0).to(tl.float32)


@triton.jit
def _add_owned(ptr, pos, pos_in, value):
    """``ptr[pos] += value`` on entries this program alone owns (no atomics needed)."""
    tl.store(ptr + pos, tl.load(ptr + pos, mask=pos_in, other=0.0) + value, mask=pos_in)


@triton.jit
def _grad_tile(s, valid, y, g, ln, lp):
    """dL/ds on a tile with one exp per score: g e^{s - lse_neg} at negatives, -g e^{-s - lse_pos}
    at positives, 0 at non-candidates."""
    e = g * tl.exp(tl.where(y, -s - lp, s - ln))
    return tl.where(valid, tl.where(y, -e, e), 0.0)


# ---------------------------------------------------------------------------------------------
# The loss. Grid: (blocks along the owned axis, B * H). Types of head h: all T when H = 1, else h.


@triton.jit
def _gp_loss_fwd_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    row_ptr,
    cols_ptr,
    state_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per row (b, t, i) the online log-sum-exp states (m_neg, s_neg, m_pos, s_pos) in
    ``state (B, T, L, 4)``, initialized by the launcher to (-inf, 0, -inf, 0)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = _token_ok(mask_ptr, b, L, i)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_ok, c, D)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = _token_ok(mask_ptr, b, L, j)
        kr = _load_rows(k_ptr, pid_bh * L * D, j, col_ok, c, D)
        dots = tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)  # once for every type
        valid = _candidates(i, j, row_ok, col_ok, TRIL)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + _bias(sb_ptr, bt, L, i, row_ok)[:, None] + _bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = _labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
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


@triton.jit
def _gp_loss_bwd_rows_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Rows pass: d_start_bias (row sums of dL/ds, into the zeroed ``dsb``) and dq = G K."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = _token_ok(mask_ptr, b, L, i)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_ok, c, D)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = _token_ok(mask_ptr, b, L, j)
        kr = _load_rows(k_ptr, pid_bh * L * D, j, col_ok, c, D)
        dots = tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)
        valid = _candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + _bias(sb_ptr, bt, L, i, row_ok)[:, None] + _bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = _labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
            p = _grad_tile(
                s, valid, y, tl.load(grad_ptr + bt), tl.load(lse_ptr + bt * 2), tl.load(lse_ptr + bt * 2 + 1)
            )
            G += p
            _add_owned(dsb_ptr + bt * L, i, row_in, tl.sum(p, axis=1))
        dq += tl.dot(G.to(kr.dtype), kr, input_precision=DOT_PREC)
    _store_rows(dq_ptr, pid_bh * L * D, i, row_in, c, D, dq)


@triton.jit
def _gp_loss_bwd_cols_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Columns pass: d_end_bias (column sums, into the zeroed ``deb``) and dk = G^T Q."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in, col_ok = _token_ok(mask_ptr, b, L, j)
    kr = _load_rows(k_ptr, pid_bh * L * D, j, col_ok, c, D)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for i0 in range(0, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        row_in, row_ok = _token_ok(mask_ptr, b, L, i)
        qr = _load_rows(q_ptr, pid_bh * L * D, i, row_ok, c, D)
        dots = tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)
        valid = _candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            s = dots + _bias(sb_ptr, bt, L, i, row_ok)[:, None] + _bias(eb_ptr, bt, L, j, col_ok)[None, :]
            y = _labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in)
            p = _grad_tile(
                s, valid, y, tl.load(grad_ptr + bt), tl.load(lse_ptr + bt * 2), tl.load(lse_ptr + bt * 2 + 1)
            )
            G += p
            _add_owned(deb_ptr + bt * L, j, col_in, tl.sum(p, axis=0))
        dk += tl.dot(tl.trans(G.to(qr.dtype)), qr, input_precision=DOT_PREC)
    _store_rows(dk_ptr, pid_bh * L * D, j, col_in, c, D, dk)


# ---------------------------------------------------------------------------------------------
# The dense scores op: forward writes the masked (B, T, L, L) scores, backward reduces dScores.


@triton.jit
def _gp_scores_fwd_kernel(
    q_ptr,
    k_ptr,
    sb_ptr,
    eb_ptr,
    mask_ptr,
    out_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (tiles, B * H): one tile's dot, written for every type of the head with its biases."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_col_blk = tl.cdiv(L, BLOCK_N)
    pid_m = pid // n_col_blk
    pid_n = pid % n_col_blk
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    row_in, row_ok = _token_ok(mask_ptr, b, L, i)
    col_in, col_ok = _token_ok(mask_ptr, b, L, j)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_ok, c, D)
    kr = _load_rows(k_ptr, pid_bh * L * D, j, col_ok, c, D)
    dots = tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC)
    valid = _candidates(i, j, row_ok, col_ok, TRIL)
    n_types = T // H
    t0 = h * (H // T)
    # int64 offsets: B * T * L * L overflows int32 from L = 2^15 / sqrt(B T) on
    tile_off = i.to(tl.int64)[:, None] * L + j[None, :]
    in_tile = row_in[:, None] & col_in[None, :]
    for tt in range(0, n_types):
        bt = b * T + t0 + tt
        s = dots + _bias(sb_ptr, bt, L, i, row_ok)[:, None] + _bias(eb_ptr, bt, L, j, col_ok)[None, :]
        s = tl.where(valid, s, float("-inf"))
        tl.store(out_ptr + bt * L * L + tile_off, s.to(out_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _grad_scores_tile(grad_ptr, bt, L, i, j, valid):
    """dScores of (b, t) = bt on a tile in fp32, 0 at non-candidates (their scores are the
    constant -inf, so whatever dScores holds there, NaN included, is not a gradient)."""
    rows = grad_ptr + bt * L * L + i.to(tl.int64) * L
    return tl.load(rows[:, None] + j[None, :], mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _gp_scores_bwd_rows_kernel(
    k_ptr,
    mask_ptr,
    grad_ptr,
    dq_ptr,
    dsb_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Rows pass: d_start_bias = row sums of dScores, dq = (sum over the head's types) dScores K."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in, row_ok = _token_ok(mask_ptr, b, L, i)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for j0 in range(j_lo, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_in, col_ok = _token_ok(mask_ptr, b, L, j)
        kr = _load_rows(k_ptr, pid_bh * L * D, j, col_ok, c, D)
        valid = _candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            p = _grad_scores_tile(grad_ptr, bt, L, i, j, valid)
            G += p
            _add_owned(dsb_ptr + bt * L, i, row_in, tl.sum(p, axis=1))
        dq += tl.dot(G.to(kr.dtype), kr, input_precision=DOT_PREC)
    _store_rows(dq_ptr, pid_bh * L * D, i, row_in, c, D, dq)


@triton.jit
def _gp_scores_bwd_cols_kernel(
    q_ptr,
    mask_ptr,
    grad_ptr,
    dk_ptr,
    deb_ptr,
    H,
    T,
    L,
    D,
    TRIL,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Columns pass: d_end_bias = column sums of dScores, dk = G^T Q (each program owns its keys)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in, col_ok = _token_ok(mask_ptr, b, L, j)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for i0 in range(0, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        row_in, row_ok = _token_ok(mask_ptr, b, L, i)
        qr = _load_rows(q_ptr, pid_bh * L * D, i, row_ok, c, D)
        valid = _candidates(i, j, row_ok, col_ok, TRIL)
        G = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for tt in range(0, n_types):
            bt = b * T + t0 + tt
            p = _grad_scores_tile(grad_ptr, bt, L, i, j, valid)
            G += p
            _add_owned(deb_ptr + bt * L, j, col_in, tl.sum(p, axis=0))
        dk += tl.dot(tl.trans(G.to(qr.dtype)), qr, input_precision=DOT_PREC)
    _store_rows(dk_ptr, pid_bh * L * D, j, col_in, c, D, dk)
