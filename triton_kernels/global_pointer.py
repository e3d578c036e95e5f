"""GlobalPointer in Triton: the fused multilabel loss and the dense scores op, forward and backward.

The arithmetic follows csrc/include/kexue/global_pointer.h and the float64 oracle
python/kexue/reference/global_pointer.py. Canonical layout: q, k ``(B, H, L, d)`` with ``H = 1``
(one pair shared by the T types) or ``H = T``; biases ``(B, T, L)``; mask ``(B, L)``; labels dense
``(B, T, L, L)`` (sparse labels are expanded to a byte mask by the launcher: one byte per span).

The loss: three kernels, each program owning a block of one (batch, head) and looping over the
types of the head and over the other axis in tiles, recomputing the ``(BLOCK_M, BLOCK_N)`` score tiles:

* forward, rows: per row an online log-sum-exp of the negatives and of the negated positives;
  the block's rows are reduced to one partial state per (b, t, block), combined by the launcher
  with the implicit extra logit 0. Positives on masked spans are counted (the loss is then +inf).
* backward, rows: ``P = dL/ds`` per tile, row sums -> ``d_start_bias``, ``P k`` -> dq.
* backward, columns: column sums -> ``d_end_bias``, ``P^T q`` -> dk (no atomics: each program
  owns its keys).

The dense scores op (for users who want the ``(B, T, L, L)`` tensor): a forward with one program per
(batch, head, row block, column block) that computes the tile's dot once and writes it for every
type of the head with the biases, 1/sqrt(d) and the masks (``-inf``) fused; a backward in the same
two passes as the loss's (rows: ``d_start_bias``, dq; columns: ``d_end_bias``, dk), reading dScores
instead of recomputing dL/ds.

The launcher rotates q and k once (RoPE, float32, O(L d): the interleaved or rotate_half
layout, positions from 0) and folds 1/sqrt(d) into q; the kernels read those rows and write the
gradients in the rotated frame, which the launcher rotates back (R^T). Dots run in float32 with
``input_precision="ieee"`` (no TF32: the loss sums exponentials of the scores, and TF32's 1e-3
relative error on a score of 20 moves e^s by 2%).

Tiles are 32 x 32 over 4 warps, one pipeline stage, with the head padded to 64 channels in one
block (:func:`tile_for`); larger tiles, 8 warps, 2-3 stages, other head blocks, or two half-head
dots (rotating in-kernel) compiled with a stack frame (spills) on sm_80 / sm_90. Head sizes above 64 run on the
reference (the ops layer routes them). The scores op uses 16 x 32 tiles (:func:`scores_tile_for`).
``AOT_CONFIGS`` lists every configuration.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Exact fp32 dots (no TF32): the loss is a sum of exponentials of the scores, and TF32's 1e-3
# relative error on a score of 20 moves e^s by 2%.
DOT_PRECISION = tl.constexpr("ieee")

# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


@triton.jit
def _load_rows(ptr, base, pos, pos_ok, c, D):
    """Rows ``pos`` of one head (already rotated and scaled by the launcher), fp32."""
    return tl.load(ptr + base + pos[:, None] * D + c[None, :], mask=pos_ok[:, None] & (c < D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, base, pos, pos_ok, c, D, value):
    tl.store(ptr + base + pos[:, None] * D + c[None, :], value, mask=pos_ok[:, None] & (c < D)[None, :])


@triton.jit
def _scores(qr, kr, sbv, ebv, i, j, row_ok, col_ok, TRIL):
    """Score tile (rows i, cols j) and whether each span is a candidate."""
    s = tl.dot(qr, tl.trans(kr), input_precision=DOT_PRECISION)
    s = s + sbv[:, None] + ebv[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    valid = valid & ((j[None, :] >= i[:, None]) | (TRIL == 0))
    return s, valid


@triton.jit
def _lse_update(m, s, x):
    """Online per-row log-sum-exp: (m, s) holds e^m * s; x a tile with -inf where absent."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def _lse_rows_to_one(m, s):
    """The rows' states merged into one (M, S)."""
    top = tl.max(m, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    return top, tl.sum(s * tl.exp(m - top_safe), axis=0)


@triton.jit
def _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in):
    block = lab_ptr + bt * L * L  # int64 scalar base of (b, t); int32 offsets inside (L < 46341)
    return tl.load(block + i[:, None] * L + j[None, :], mask=row_in[:, None] & col_in[None, :], other=0) != 0


# ---------------------------------------------------------------------------------------------
# Kernels. Grid: (blocks along the owned axis, B * H).


@triton.jit
def _gp_loss_fwd_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, part_ptr,
                        H, T, L, D, TRIL,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_blk = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in = i < L
    row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_in, c, D)
    # the types of this head: all T when q/k are shared (H = 1), else type h alone
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for tt in range(0, n_types):
        t = t0 + tt
        bt = b * T + t
        sbv = tl.load(sb_ptr + bt * L + i, mask=row_in, other=0.0).to(tl.float32)
        m_neg = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_neg = tl.zeros([BLOCK_M], tl.float32)
        m_pos = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)
        bad = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(0, j_lo, BLOCK_N):  # below the diagonal: only look for misplaced labels
            j = j0 + tl.arange(0, BLOCK_N)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, j < L)
            bad += tl.sum(y.to(tl.float32), axis=1)
        for j0 in range(j_lo, L, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            col_in = j < L
            col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
            kr = _load_rows(k_ptr, pid_bh * L * D, j, col_in, c, D)
            ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
            s, valid = _scores(qr, kr, sbv, ebv, i, j, row_ok, col_ok, TRIL)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in)
            m_neg, s_neg = _lse_update(m_neg, s_neg, tl.where(valid & ~y, s, float("-inf")))
            m_pos, s_pos = _lse_update(m_pos, s_pos, tl.where(valid & y, -s, float("-inf")))
            bad += tl.sum((y & ~valid).to(tl.float32), axis=1)
        mn, sn = _lse_rows_to_one(m_neg, s_neg)
        mp, sp = _lse_rows_to_one(m_pos, s_pos)
        out = part_ptr + (bt * n_blk + pid_m) * 5
        tl.store(out, mn)
        tl.store(out + 1, sn)
        tl.store(out + 2, mp)
        tl.store(out + 3, sp)
        tl.store(out + 4, tl.sum(bad, axis=0))


@triton.jit
def _grad_tile(s, valid, y, g, ln, lp):
    """dL/ds on a tile: g e^{s - lse_neg} at negatives, -g e^{-s - lse_pos} at positives."""
    p = tl.where(valid & ~y, g * tl.exp(s - ln), 0.0)
    return tl.where(valid & y, -g * tl.exp(-s - lp), p)


@triton.jit
def _gp_loss_bwd_rows_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, grad_ptr, lse_ptr,
                             dq_ptr, dsb_ptr, H, T, L, D, TRIL,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in = i < L
    row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_in, c, D)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    # the types of this head: all T when q/k are shared (H = 1), else type h alone
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for tt in range(0, n_types):
        t = t0 + tt
        bt = b * T + t
        g = tl.load(grad_ptr + bt)
        ln = tl.load(lse_ptr + bt * 2)
        lp = tl.load(lse_ptr + bt * 2 + 1)
        sbv = tl.load(sb_ptr + bt * L + i, mask=row_in, other=0.0).to(tl.float32)
        dsb = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(j_lo, L, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            col_in = j < L
            col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
            kr = _load_rows(k_ptr, pid_bh * L * D, j, col_in, c, D)
            ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
            s, valid = _scores(qr, kr, sbv, ebv, i, j, row_ok, col_ok, TRIL)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in)
            p = _grad_tile(s, valid, y, g, ln, lp)
            dsb += tl.sum(p, axis=1)
            dq += tl.dot(p, kr, input_precision=DOT_PRECISION)
        tl.store(dsb_ptr + bt * L + i, dsb, mask=row_in)
    _store_rows(dq_ptr, pid_bh * L * D, i, row_in, c, D, dq)


@triton.jit
def _gp_loss_bwd_cols_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, grad_ptr, lse_ptr,
                             dk_ptr, deb_ptr, H, T, L, D, TRIL,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in = j < L
    col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
    kr = _load_rows(k_ptr, pid_bh * L * D, j, col_in, c, D)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    # the types of this head: all T when q/k are shared (H = 1), else type h alone
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for tt in range(0, n_types):
        t = t0 + tt
        bt = b * T + t
        g = tl.load(grad_ptr + bt)
        ln = tl.load(lse_ptr + bt * 2)
        lp = tl.load(lse_ptr + bt * 2 + 1)
        ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
        deb = tl.zeros([BLOCK_N], tl.float32)
        for i0 in range(0, i_hi, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            row_in = i < L
            row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
            qr = _load_rows(q_ptr, pid_bh * L * D, i, row_in, c, D)
            sbv = tl.load(sb_ptr + bt * L + i, mask=row_in, other=0.0).to(tl.float32)
            s, valid = _scores(qr, kr, sbv, ebv, i, j, row_ok, col_ok, TRIL)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in)
            p = _grad_tile(s, valid, y, g, ln, lp)
            deb += tl.sum(p, axis=0)
            dk += tl.dot(tl.trans(p), qr, input_precision=DOT_PRECISION)
        tl.store(deb_ptr + bt * L + j, deb, mask=col_in)
    _store_rows(dk_ptr, pid_bh * L * D, j, col_in, c, D, dk)


# ---------------------------------------------------------------------------------------------
# The dense scores op: forward writes the masked (B, T, L, L) scores, backward reduces dScores.
# Grid: (tiles, B * H). Each program owns one tile of one (batch, head) and loops over the types
# of the head (all T for a shared pair, one otherwise), so a shared head's dot is computed once.


@triton.jit
def _gp_scores_fwd_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, out_ptr,
                          H, T, L, D, TRIL,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
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
    row_in = i < L
    col_in = j < L
    row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
    col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
    qr = _load_rows(q_ptr, pid_bh * L * D, i, row_in, c, D)
    kr = _load_rows(k_ptr, pid_bh * L * D, j, col_in, c, D)
    n_types = T // H
    t0 = h * (H // T)
    # int64 offsets: B * T * L * L overflows int32 from L = 2^15 / sqrt(B T) on
    tile_off = i.to(tl.int64)[:, None] * L + j[None, :]
    in_tile = row_in[:, None] & col_in[None, :]
    for tt in range(0, n_types):
        bt = b * T + t0 + tt
        sbv = tl.load(sb_ptr + bt * L + i, mask=row_in, other=0.0).to(tl.float32)
        ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
        s, valid = _scores(qr, kr, sbv, ebv, i, j, row_ok, col_ok, TRIL)
        s = tl.where(valid, s, float("-inf"))
        tl.store(out_ptr + bt * L * L + tile_off, s.to(out_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _grad_scores_tile(rows, i, j, row_ok, col_ok, TRIL):
    """dScores on a tile in float32, 0 at masked spans (their scores are the constant -inf).
    ``rows``: pointers to column 0 of rows i of dScores."""
    first = tl.where(TRIL != 0, i, 0)  # the first candidate column of each row
    valid = row_ok[:, None] & col_ok[None, :] & (j[None, :] >= first[:, None])
    return tl.load(rows[:, None] + j[None, :], mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _gp_scores_bwd_rows_kernel(k_ptr, mask_ptr, grad_ptr, dq_ptr, dsb_ptr, H, T, L, D, TRIL,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows pass: d_start_bias = row sums of dScores, dq = (sum over the head's types) dScores k."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in = i < L
    row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
    dq = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    j_lo = tl.where(TRIL != 0, (pid_m * BLOCK_M // BLOCK_N).to(tl.int32) * BLOCK_N, 0)
    for tt in range(0, n_types):
        bt = b * T + t0 + tt
        rows = grad_ptr + bt * L * L + i.to(tl.int64) * L
        dsb = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(j_lo, L, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            col_in = j < L
            col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
            kr = _load_rows(k_ptr, pid_bh * L * D, j, col_in, c, D)
            p = _grad_scores_tile(rows, i, j, row_ok, col_ok, TRIL)
            dsb += tl.sum(p, axis=1)
            dq += tl.dot(p, kr, input_precision=DOT_PRECISION)
        tl.store(dsb_ptr + bt * L + i, dsb, mask=row_in)
    _store_rows(dq_ptr, pid_bh * L * D, i, row_in, c, D, dq)


@triton.jit
def _gp_scores_bwd_cols_kernel(q_ptr, mask_ptr, grad_ptr, dk_ptr, deb_ptr, H, T, L, D, TRIL,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Columns pass: d_end_bias = column sums of dScores, dk = dScores^T q (no atomics: each
    program owns its keys)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in = j < L
    col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    n_types = T // H
    t0 = h * (H // T)
    i_hi = tl.where(TRIL != 0, tl.minimum((pid_n + 1).to(tl.int32) * BLOCK_N, L), L)
    for tt in range(0, n_types):
        bt = b * T + t0 + tt
        deb = tl.zeros([BLOCK_N], tl.float32)
        for i0 in range(0, i_hi, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            row_in = i < L
            row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
            qr = _load_rows(q_ptr, pid_bh * L * D, i, row_in, c, D)
            p = _grad_scores_tile(grad_ptr + bt * L * L + i.to(tl.int64) * L, i, j, row_ok, col_ok, TRIL)
            deb += tl.sum(p, axis=0)
            dk += tl.dot(tl.trans(p), qr, input_precision=DOT_PRECISION)
        tl.store(deb_ptr + bt * L + j, deb, mask=col_in)
    _store_rows(dk_ptr, pid_bh * L * D, j, col_in, c, D, dk)


# ---------------------------------------------------------------------------------------------
# Launchers.


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_h: int
    num_warps: int
    num_stages: int = 1  # no software pipelining: with 2-3 stages the backward kernels spill


MAX_HEAD_SIZE = 64


def tile_for(head_size: int) -> Tile:
    """The one configuration: 32 x 32 score tiles over 4 warps in one pipeline stage, the head
    padded to 64 channels (masked loads). It compiles without a stack frame on sm_80 and sm_90;
    64 x 64 tiles, 8 warps, 2-3 stages, a 128-channel head, and (oddly) 16- or 32-channel heads
    all left ptxas spilling into a small stack."""
    if head_size > MAX_HEAD_SIZE:
        raise ValueError(f"the Triton GlobalPointer kernels serve head sizes up to {MAX_HEAD_SIZE}, got {head_size}")
    return Tile(32, 32, MAX_HEAD_SIZE, 4, 1)


def scores_tile_for(head_size: int) -> Tile:
    """The scores op's configuration: 16 x 32 tiles (16 query rows), 4 warps, one stage, head
    padded to 64. With 32 x 32 tiles the rows pass of the backward compiled with a 16-byte stack
    on sm_80 (and 32 x 16 with an 8-byte one on sm_90); 16 x 32 is clean on both."""
    if head_size > MAX_HEAD_SIZE:
        raise ValueError(f"the Triton GlobalPointer kernels serve head sizes up to {MAX_HEAD_SIZE}, got {head_size}")
    return Tile(16, 32, MAX_HEAD_SIZE, 4, 1)


def _rotated(x: torch.Tensor, rope: int, base: float, scale: float) -> torch.Tensor:
    """``scale * R x`` in float32, contiguous: the rows the kernels read."""
    from kexue.reference.global_pointer import apply_rope

    x = x.float()
    if rope:
        x = apply_rope(x, "interleaved" if rope == 1 else "half", base)
    return (x * scale).contiguous()


def _unrotated(g: torch.Tensor, rope: int, base: float, scale: float, dtype) -> torch.Tensor:
    """Gradient wrt the un-rotated rows: ``scale * R^T g`` in ``dtype``."""
    from kexue.reference.global_pointer import apply_rope

    if rope:
        g = apply_rope(g, "interleaved" if rope == 1 else "half", base, inverse=True)
    return (g * scale).to(dtype)


def _dense_labels(row_ptr, cols, dense, batch, types, length) -> torch.Tensor:
    if dense.dim() == 4:
        return dense.contiguous().view(torch.uint8)
    from kexue.reference.global_pointer import dense_labels

    return dense_labels(row_ptr, cols, batch, types, length).view(torch.uint8)


def _common(q, k, sb, mask, rope, base, tile):
    batch, heads, length, d = q.shape
    if d > MAX_HEAD_SIZE:
        raise ValueError(f"the Triton GlobalPointer kernels serve head sizes up to {MAX_HEAD_SIZE}, got {d}")
    scale = 1.0 / max(d, 1) ** 0.5
    qr, kr = _rotated(q, rope, base, scale), _rotated(k, rope, base, 1.0)
    return (batch, heads, sb.shape[1], length, d, qr, kr, scale, tile or tile_for(d),
            mask.contiguous().view(torch.uint8))


def loss_forward(q, k, sb, eb, mask, row_ptr, cols, dense, rope, base, tril, *, tile: Tile | None = None):
    """``(loss (B, T), lse (B, T, 2))`` in float32; arguments as the C++ backend's."""
    batch, heads, types, length, d, qr, kr, _, tile, m8 = _common(q, k, sb, mask, rope, base, tile)
    loss = torch.zeros(batch, types, dtype=torch.float32, device=q.device)
    lse = torch.zeros(batch, types, 2, dtype=torch.float32, device=q.device)
    if batch == 0 or types == 0 or length == 0:
        return loss, lse
    labels = _dense_labels(row_ptr, cols, dense, batch, types, length)
    n_blk = triton.cdiv(length, tile.block_m)
    part = torch.empty(batch * types, n_blk, 5, dtype=torch.float32, device=q.device)
    _gp_loss_fwd_kernel[(n_blk, batch * heads)](
        qr, kr, sb, eb, m8, labels, part, heads, types, length, d, int(bool(tril)),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    part = part.view(batch, types, n_blk, 5)
    lse = torch.stack((_finish(part[..., 0], part[..., 1]), _finish(part[..., 2], part[..., 3])), -1)
    bad = part[..., 4].sum(-1) > 0
    lse[..., 1] = torch.where(bad, float("inf"), lse[..., 1])
    return lse.sum(-1), lse


def _finish(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_blocks e^m s) over the last dim, with empty blocks (m = -inf, s = 0)."""
    m = torch.cat((m, torch.zeros_like(m[..., :1])), -1)
    s = torch.cat((s, torch.ones_like(s[..., :1])), -1)
    top = m.amax(-1, keepdim=True)
    return (top + torch.log((s * torch.exp(m - top)).sum(-1, keepdim=True))).squeeze(-1)


def loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, dense, lse, rope, base, tril, *, tile: Tile | None = None):
    """``(dq, dk, d_start_bias, d_end_bias)`` in the inputs' dtypes."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8 = _common(q, k, sb, mask, rope, base, tile)
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.to(sb.dtype), deb.to(eb.dtype)
    labels = _dense_labels(row_ptr, cols, dense, batch, types, length)
    grad = grad.float().contiguous()
    lse = lse.float().contiguous()
    dqr, dkr = torch.empty_like(qr), torch.empty_like(kr)
    args = (heads, types, length, d, int(bool(tril)))
    meta = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    _gp_loss_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        qr, kr, sb, eb, m8, labels, grad, lse, dqr, dsb, *args, **meta)
    _gp_loss_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        qr, kr, sb, eb, m8, labels, grad, lse, dkr, deb, *args, **meta)
    # s = <scale R q, R k>: dq = scale R^T dqr, dk = R^T dkr (dkr already carries the scale via qr)
    return (_unrotated(dqr, rope, base, scale, q.dtype), _unrotated(dkr, rope, base, 1.0, k.dtype),
            dsb.to(sb.dtype), deb.to(eb.dtype))


def scores_forward(q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """Masked ``(B, T, L, L)`` scores in q's dtype (``-inf`` where masked); arguments as the C++
    backend's."""
    batch, heads, types, length, d, qr, kr, _, tile, m8 = _common(q, k, sb, mask, rope, base,
                                                                  tile or scores_tile_for(q.shape[-1]))
    out = torch.empty(batch, types, length, length, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(length, tile.block_m) * triton.cdiv(length, tile.block_n), batch * heads)
    _gp_scores_fwd_kernel[grid](
        qr, kr, sb.contiguous(), eb.contiguous(), m8, out, heads, types, length, d, int(bool(tril)),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    return out


def scores_backward(grad, q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * scores)`` over the unmasked spans,
    in the inputs' dtypes. ``grad``: ``(B, T, L, L)`` of q's dtype."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8 = _common(q, k, sb, mask, rope, base,
                                                                      tile or scores_tile_for(q.shape[-1]))
    dsb = torch.empty(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.empty_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.zero_().to(sb.dtype), deb.zero_().to(eb.dtype)
    grad = grad.contiguous()
    dqr, dkr = torch.empty_like(qr), torch.empty_like(kr)
    args = (heads, types, length, d, int(bool(tril)))
    meta = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps,
                num_stages=tile.num_stages)
    _gp_scores_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        kr, m8, grad, dqr, dsb, *args, **meta)
    _gp_scores_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        qr, m8, grad, dkr, deb, *args, **meta)
    return (_unrotated(dqr, rope, base, scale, q.dtype), _unrotated(dkr, rope, base, 1.0, k.dtype),
            dsb.to(sb.dtype), deb.to(eb.dtype))


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for tests/gpu_compile.py.

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def all_tiles() -> list[Tile]:
    return sorted({tile_for(d) for d in range(1, MAX_HEAD_SIZE + 1)})


def all_scores_tiles() -> list[Tile]:
    return sorted({scores_tile_for(d) for d in range(1, MAX_HEAD_SIZE + 1)})


def _config(name, kernel, sig, tile, dtype) -> dict:
    consts = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h)
    tag = f"{str(dtype).removeprefix('torch.')} {tile.block_m}x{tile.block_n}x{tile.block_h} w{tile.num_warps}"
    ints = dict(H="i32", T="i32", L="i32", D="i32", TRIL="i32")
    return dict(
        name=f"global_pointer_{name} {tag}",
        kernel=kernel,
        signature=dict(**sig, **ints, **dict.fromkeys(consts, "constexpr")),
        constexprs=consts,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, ptr in _PTR.items():
        inputs = dict(q_ptr="*fp32", k_ptr="*fp32", sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", lab_ptr="*u8")
        loss = [
            ("fwd", _gp_loss_fwd_kernel, dict(**inputs, part_ptr="*fp32")),
            ("bwd_rows", _gp_loss_bwd_rows_kernel,
             dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dq_ptr="*fp32", dsb_ptr="*fp32")),
            ("bwd_cols", _gp_loss_bwd_cols_kernel,
             dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dk_ptr="*fp32", deb_ptr="*fp32")),
        ]
        scores = [
            ("scores_fwd", _gp_scores_fwd_kernel,
             dict(q_ptr="*fp32", k_ptr="*fp32", sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", out_ptr=ptr)),
            ("scores_bwd_rows", _gp_scores_bwd_rows_kernel,
             dict(k_ptr="*fp32", mask_ptr="*u8", grad_ptr=ptr, dq_ptr="*fp32", dsb_ptr="*fp32")),
            ("scores_bwd_cols", _gp_scores_bwd_cols_kernel,
             dict(q_ptr="*fp32", mask_ptr="*u8", grad_ptr=ptr, dk_ptr="*fp32", deb_ptr="*fp32")),
        ]
        for tiles, kernels in ((all_tiles(), loss), (all_scores_tiles(), scores)):
            for tile in tiles:
                configs += [_config(name, kernel, sig, tile, dtype) for name, kernel, sig in kernels]
    return configs


AOT_CONFIGS = _aot_configs()
