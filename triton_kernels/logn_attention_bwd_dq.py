"""Log-n attention backward, dQ: one program per (batch or sequence x query head, block of
queries), two-stage like the forward (whole key tiles unmasked, then the diagonal and the ragged
last tile). See :mod:`.logn_attention_bwd_tiles` for the split and the tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logn_attention_bwd_tiles import attention_configs
from .logn_attention_rules import RUNTIME_INTS, allowed, dot, sequence_start, value_columns


@triton.jit
def _dq_step(
    dq,
    q,
    do,
    lse2,
    delta,
    sc2,
    k_base,
    v_base,
    start,
    rows,
    dcol,
    vcol,
    b,
    Lq,
    Lk,
    mask_ptr,
    stride_kn,
    D,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_DV: tl.constexpr,
):
    cols = start + tl.arange(0, BLOCK_N)
    kv_at = cols[:, None] * stride_kn + dcol[None, :]
    if MASKED:
        kv_mask = cols[:, None] < Lk
        if not EVEN_D:
            kv_mask = kv_mask & (dcol[None, :] < D)
        k = tl.load(k_base + kv_at, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_at, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + kv_at)
        v = tl.load(v_base + kv_at)
    else:
        k = tl.load(k_base + kv_at, mask=dcol[None, :] < D, other=0.0)
        v = tl.load(v_base + kv_at, mask=dcol[None, :] < D, other=0.0)
    s = dot(q, tl.trans(k), IEEE)
    p = tl.exp2(s * sc2[:, None] - lse2[:, None])
    if MASKED or HAS_MASK:
        ok = allowed(rows, cols, b, Lq, Lk, mask_ptr, MASKED, CAUSAL and MASKED, HAS_MASK)
        p = tl.where(ok, p, 0.0)
    dp = dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    if SPLIT_DV:  # this program's columns of k (the scores above took every column)
        s_at = cols[:, None] * stride_kn + vcol[None, :]
        s_mask = ((cols[:, None] < Lk) | (not MASKED)) & ((vcol[None, :] < D) | EVEN_D)
        k_s = tl.load(k_base + s_at, mask=s_mask, other=0.0)
    else:
        k_s = k
    dq += dot(ds.to(k.dtype), k_s, IEEE)
    return dq


@triton.jit(do_not_specialize=RUNTIME_INTS)
def logn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    sc_ptr,
    mask_ptr,
    dq_ptr,
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
    bh = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    if CAUSAL:  # longest blocks first
        pid_m = tl.num_programs(1) - 1 - pid_m
    # 32-bit division (a 64-bit one is a called subroutine that can cost a stack frame), then widen
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = (bh % Hq // (Hq // Hkv)).to(tl.int64)
    if VARLEN:
        q_start, Lq = sequence_start(cu_q_ptr, b)
        k_start, Lk = sequence_start(cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
        q_off = q_start * stride_qm + h * stride_qh
        kv_off = k_start * stride_kn + hk * stride_kh
        l_off = q_start + h * stride_lh
    else:
        q_off = b * stride_qb + h * stride_qh
        kv_off = b * stride_kb + hk * stride_kh
        l_off = b * stride_lb + h * stride_lh
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    q_mask = row_ok[:, None] & (dcol[None, :] < D)
    q_at = rows[:, None] * stride_qm + dcol[None, :]  # from scalar bases: see the forward
    q = tl.load(q_ptr + q_off + q_at, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_off + q_at, mask=q_mask, other=0.0)
    k_base = k_ptr + kv_off
    v_base = v_ptr + kv_off
    lse2 = tl.load(lse_ptr + l_off + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + l_off + rows, mask=row_ok, other=0.0)
    sc = tl.load(sc_ptr + l_off + rows, mask=row_ok, other=0.0)
    sc2 = sc * 1.4426950408889634
    vcol = value_columns(dcol, BLOCK_D, BLOCK_DV)
    dq = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if CAUSAL:
        full = tl.minimum(tl.maximum(m0 + (Lk - Lq) + 1, 0), Lk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + (Lk - Lq), 0), Lk)
    else:
        full = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    for start in range(0, full, BLOCK_N):
        dq = _dq_step(
            dq,
            q,
            do,
            lse2,
            delta,
            sc2,
            k_base,
            v_base,
            start,
            rows,
            dcol,
            vcol,
            b,
            Lq,
            Lk,
            mask_ptr,
            stride_kn,
            D,
            False,
            CAUSAL,
            HAS_MASK,
            EVEN_D,
            IEEE,
            BLOCK_N,
            BLOCK_DV < BLOCK_D,
        )
    for start in range(full, hi, BLOCK_N):
        dq = _dq_step(
            dq,
            q,
            do,
            lse2,
            delta,
            sc2,
            k_base,
            v_base,
            start,
            rows,
            dcol,
            vcol,
            b,
            Lq,
            Lk,
            mask_ptr,
            stride_kn,
            D,
            True,
            CAUSAL,
            HAS_MASK,
            EVEN_D,
            IEEE,
            BLOCK_N,
            BLOCK_DV < BLOCK_D,
        )
    dq = dq * sc[:, None]
    if BLOCK_DV < BLOCK_D:  # the store covers this program's columns only
        q_at = rows[:, None] * stride_qm + vcol[None, :]
        q_mask = row_ok[:, None] & (vcol[None, :] < D)
    tl.store(dq_ptr + q_off + q_at, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


AOT_CONFIGS = attention_configs("dq", logn_bwd_dq_kernel, ("dq_ptr",))
