"""Log-n attention backward, dK and dV: one program per (batch or sequence x key/value head,
block of keys), over every query head of the GQA group. See :mod:`.logn_attention_bwd_tiles` for
the split and the tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logn_attention_bwd_tiles import attention_configs
from .logn_attention_rules import RUNTIME_INTS, dot, sequence_start, value_columns


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    key_ok,
    q_base,
    do_base,
    lse_base,
    delta_base,
    sc_base,
    start,
    cols,
    dcol,
    vcol,
    b,
    Lq,
    Lk,
    mask_ptr,
    stride_qm,
    D,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_DV: tl.constexpr,
):
    """One query block's contribution to a key block's dK, dV, in transposed form (keys as rows).
    ``MASKED``: the block may hold rows past Lq or before the diagonal."""
    rows = start + tl.arange(0, BLOCK_M)
    q_at = rows[:, None] * stride_qm + dcol[None, :]
    qT_at = rows[None, :] * stride_qm + dcol[:, None]
    row_ok = rows < Lq
    # (the masks of the unmasked step fold away: EVEN_D and in-range rows make them all true)
    q_mask = (row_ok[:, None] | (not MASKED)) & ((dcol[None, :] < D) | EVEN_D)
    qT_mask = (row_ok[None, :] | (not MASKED)) & ((dcol[:, None] < D) | EVEN_D)
    q = tl.load(q_base + q_at, mask=q_mask, other=0.0)
    do = tl.load(do_base + q_at, mask=q_mask, other=0.0)
    if IEEE == 1:
        # float32 FMA dots: a register transpose sends this variant to local memory; load twice
        qT = tl.load(q_base + qT_at, mask=qT_mask, other=0.0)
        doT = tl.load(do_base + qT_at, mask=qT_mask, other=0.0)
    else:
        qT = tl.trans(q)
        doT = tl.trans(do)
    if MASKED:
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sc = tl.load(sc_base + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
        sc = tl.load(sc_base + rows)
    sc2 = sc * 1.4426950408889634
    sT = dot(k, qT, IEEE)
    pT = tl.exp2(sT * sc2[None, :] - (lse * 1.4426950408889634)[None, :])
    # built in the transposed orientation directly (a transposed bool tile would cost a shuffle)
    if MASKED:
        okT = (rows < Lq)[None, :] & (cols < Lk)[:, None]
        if CAUSAL:
            okT = okT & (cols[:, None] <= rows[None, :] + (Lk - Lq))
        if HAS_MASK:
            okT = okT & key_ok[:, None]
        pT = tl.where(okT, pT, 0.0)
    elif HAS_MASK:
        pT = tl.where(key_ok[:, None], pT, 0.0)
    if SPLIT_DV:  # this program's columns of q and dO (the scores above took every column)
        s_at = rows[:, None] * stride_qm + vcol[None, :]
        s_mask = (row_ok[:, None] | (not MASKED)) & ((vcol[None, :] < D) | EVEN_D)
        q_s = tl.load(q_base + s_at, mask=s_mask, other=0.0)
        do_s = tl.load(do_base + s_at, mask=s_mask, other=0.0)
    else:
        q_s = q
        do_s = do
    dv += dot(pT.to(do.dtype), do_s, IEEE)
    dpT = dot(v, doT, IEEE)
    dsT = pT * (dpT - delta[None, :]) * sc[None, :]  # dS^T of the scaled scores, times the row scale
    dk += dot(dsT.to(q.dtype), q_s, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=RUNTIME_INTS)
def logn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    sc_ptr,
    mask_ptr,
    dk_ptr,
    dv_ptr,
    cu_q_ptr,
    cu_k_ptr,
    Hq,
    Hkv,
    Lq,
    Lk,
    D,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_lb,
    stride_lh,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # dk, dv: like k, v (input dtype), at strides (kb, kh, kn).
    bh = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    b = (bh // Hkv).to(tl.int64)  # 32-bit division, then widen
    hk = (bh % Hkv).to(tl.int64)
    groups = Hq // Hkv
    if VARLEN:
        q_start, Lq = sequence_start(cu_q_ptr, b)
        k_start, Lk = sequence_start(cu_k_ptr, b)
        if pid_n * BLOCK_N >= Lk:
            return
        q_off = q_start * stride_qm
        kv_off = k_start * stride_kn + hk * stride_kh
        l_off = q_start
    else:
        q_off = b * stride_qb
        kv_off = b * stride_kb + hk * stride_kh
        l_off = b * stride_lb
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < Lk) & (dcol[None, :] < D)
    kv_at = cols[:, None] * stride_kn + dcol[None, :]
    k = tl.load(k_ptr + kv_off + kv_at, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off + kv_at, mask=kv_mask, other=0.0)
    if HAS_MASK:  # the program's keys are fixed: their padding is read once
        key_ok = tl.load(mask_ptr + b * Lk + cols, mask=cols < Lk, other=1) == 0
    else:
        key_ok = cols < Lk
    vcol = value_columns(dcol, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if CAUSAL:
        # query rows below n0 - (Lk - Lq) see none of these keys; rows from n0 + BLOCK_N - 1 -
        # (Lk - Lq) on see all of them: between lies the diagonal, the only masked part.
        lo = tl.minimum(tl.maximum(n0 - (Lk - Lq), 0), Lq) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - (Lk - Lq), 0), Lq)
        mid = tl.minimum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Lq // BLOCK_M * BLOCK_M)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    full_end = Lq // BLOCK_M * BLOCK_M
    tail = tl.maximum(full_end, mid)  # the ragged last query block, if any, starts here
    n_full = (full_end - mid) // BLOCK_M  # per query head of the group
    n_masked = (mid - lo) // BLOCK_M + (tail < Lq).to(tl.int32)
    # keys past Lk in this block (the last one) are zero and their rows are not stored: only the
    # query-side bounds and the causal diagonal need masks.
    # One flat loop over (query head of the group, query block) per stage rather than a loop over
    # heads around a loop over blocks: a single loop is what Triton software-pipelines (the
    # nested form kept dK/dV live across two loop levels, which cost a stack frame at d=128).
    for i in range(groups * n_full):  # whole query blocks that see every key here
        g = i // n_full
        h = hk * groups + g
        start = mid + (i - g * n_full) * BLOCK_M
        dk, dv = _dkdv_step(
            dk,
            dv,
            k,
            v,
            key_ok,
            q_ptr + q_off + h * stride_qh,
            do_ptr + q_off + h * stride_qh,
            lse_ptr + l_off + h * stride_lh,
            delta_ptr + l_off + h * stride_lh,
            sc_ptr + l_off + h * stride_lh,
            start,
            cols,
            dcol,
            vcol,
            b,
            Lq,
            Lk,
            mask_ptr,
            stride_qm,
            D,
            False,
            CAUSAL,
            HAS_MASK,
            EVEN_D,
            IEEE,
            BLOCK_M,
            BLOCK_DV < BLOCK_D,
        )
    for i in range(groups * n_masked):  # the diagonal blocks, then the ragged last one
        g = i // n_masked
        h = hk * groups + g
        j = i - g * n_masked
        start = tl.where(lo + j * BLOCK_M < mid, lo + j * BLOCK_M, tail)
        dk, dv = _dkdv_step(
            dk,
            dv,
            k,
            v,
            key_ok,
            q_ptr + q_off + h * stride_qh,
            do_ptr + q_off + h * stride_qh,
            lse_ptr + l_off + h * stride_lh,
            delta_ptr + l_off + h * stride_lh,
            sc_ptr + l_off + h * stride_lh,
            start,
            cols,
            dcol,
            vcol,
            b,
            Lq,
            Lk,
            mask_ptr,
            stride_qm,
            D,
            True,
            CAUSAL,
            HAS_MASK,
            EVEN_D,
            IEEE,
            BLOCK_M,
            BLOCK_DV < BLOCK_D,
        )
    # the store's offsets are recomputed here, in int64 so that no compiler pass merges them with
    # the load's: held across the loop they took 64 registers a thread (sm_90 TF32 d=128: a stack)
    cols64 = cols.to(tl.int64)
    st_at = cols64[:, None] * stride_kn + vcol[None, :]
    st_mask = (cols64[:, None] < Lk) & (vcol[None, :] < D)
    tl.store(dk_ptr + kv_off + st_at, dk.to(dk_ptr.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptr + kv_off + st_at, dv.to(dv_ptr.dtype.element_ty), mask=st_mask)


AOT_CONFIGS = attention_configs("dkdv", logn_bwd_dkdv_kernel, ("dk_ptr", "dv_ptr"))
