"""Log-n attention: the Triton backward kernels and their tile table.

Three kernels, FlashAttention-2's split:

* ``logn_bwd_prep_kernel``: per query row, ``delta = rowsum(o * dO) - dlse`` and the row's
  softmax scale, both float32, in the layout of ``lse``. The scale rule (30 Newton steps under
  gradmax) thus runs once per (row, head), not once per (key block x query block) in the others.
* ``logn_bwd_dkdv_kernel``: one program per (batch or sequence x key/value head, block of keys);
  it walks every query head of its group and every query block that sees its keys, accumulates dK
  and dV in float32 registers and writes them once, in the input dtype (no per-query-head slabs,
  no reduction afterwards, no atomics). Causal programs skip the query blocks before their keys
  and mask only the blocks that straddle the diagonal.
* ``logn_bwd_dq_kernel``: one program per (batch or sequence x query head, block of queries),
  two-stage like the forward.

Tiles: the dK/dV dots have the key block as M, the dQ dots the query block, so each is 64 rows a
warpgroup (wgmma on sm_90) or 16 rows a warp (mma.sync), as in the forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .logn_attention_rules import allowed, block_d, dot, gpu_targets, row_scale, sequence_start, visible


class Tiles(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


class BwdTiles(NamedTuple):
    dkdv: Tiles  # block_n: keys per program (the dots' M), block_m: queries per step
    dq: Tiles  # block_m: queries per program (the dots' M), block_n: keys per step


# family -> padded head dim -> tiles for 16-bit inputs. dK/dV: the key block is the dots' M, so
# 128 keys on 8 warps is 64 rows a warpgroup on sm_90 (wgmma, no replicated tile), 64 keys on 4
# warps 16 rows a warp on mma.sync targets; 16 query rows a step keep the score tile (128 x 16
# fp32) small next to the dK and dV accumulators (128 x d fp32 each). On sm_90 that holds up to
# d=128 since the loop over (query head, query block) is flat (see the kernel); sm_80 keeps 8
# warps on 32 x 32 from d=128 on (16 rows a warp kept a 40..128 byte stack in triton 3.9), whose
# score tiles are replicated across warps (flagged so by tests/gpu_compile.py); dQ at d=256 likewise.
_T = Tiles
# On sm_80 / sm_86 ptxas keeps 8 to 24 bytes on a stack (at 80 to 170 registers: not pressure)
# for some (head dim, stages, switches): the stage counts there are the ones that compiled clean
# for every switch combination.
_TILES_16 = {
    90: {d: BwdTiles(_T(16, 128, 8, 2), _T(128, 64, 8, 2)) for d in (16, 32, 64, 128)},
    80: {
        16: BwdTiles(_T(16, 64, 4, 2), _T(64, 32, 4, 1)),
        32: BwdTiles(_T(16, 64, 4, 1), _T(64, 32, 4, 1)),
        64: BwdTiles(_T(16, 64, 4, 1), _T(64, 32, 4, 2)),
    },
}
_TILES_16[80][128] = BwdTiles(_T(32, 32, 8, 2), _T(64, 32, 4, 2))
for _f in (80, 90):
    _TILES_16[_f][256] = BwdTiles(_T(16, 32, 8, 1), _T(16, 16, 4, 1))
_TILES_16[86] = _TILES_16[80]
# A head dim that is not a multiple of 16 makes the row strides unaligned: the JIT then compiles
# scalar loads, whose addresses take the registers. In that form (triton 3.9, sm_90) the 16 x 128
# dK/dV tile keeps a 360..530 byte stack at d=128, and every dQ tile of 64 rows or more one of
# 16..1000 bytes (64 x 32 on 4 warps: 16..24 at d=64, 340..660 at d=128). Those heads take the
# 32 x 32 dK/dV tile from d=128 on (mma.sync, replicated, no stack) and 16 x 32 dQ tiles.
_TILES_16_UNALIGNED = {
    (90, 64): BwdTiles(_T(16, 128, 8, 2), _T(16, 32, 4, 2)),
    (90, 128): BwdTiles(_T(32, 32, 8, 2), _T(16, 32, 4, 2)),
}
# float32 without TF32 (FMA dots): small tiles, sized to compile without spills
_TILES_IEEE = {
    16: BwdTiles(_T(16, 32, 2, 2), _T(16, 32, 2, 2)),
    32: BwdTiles(_T(16, 32, 2, 2), _T(16, 32, 2, 2)),
    64: BwdTiles(_T(16, 32, 4, 2), _T(16, 32, 4, 2)),
    128: BwdTiles(_T(16, 32, 8, 2), _T(16, 32, 4, 2)),
    256: BwdTiles(_T(16, 16, 8, 1), _T(16, 16, 4, 1)),
}


def tiles(family: int, head_dim: int, dot_mode: int) -> BwdTiles:
    d = block_d(head_dim)
    if dot_mode == 1:
        return _TILES_IEEE[d]
    if head_dim % 16 and (family, d) in _TILES_16_UNALIGNED:
        return _TILES_16_UNALIGNED[family, d]
    return _TILES_16[family][d]


# ---------------------------------------------------------------------------------------------
# Preprocess: delta and the row scale.


@triton.jit
def logn_bwd_prep_kernel(
    out_ptr,
    do_ptr,
    dlse_ptr,
    delta_ptr,
    sc_ptr,
    mask_ptr,
    prefix_ptr,
    cu_q_ptr,
    cu_k_ptr,
    Hq,
    Lq,
    Lk,
    D,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_lb,
    stride_lh,
    base,
    inv_log_train,
    min_n,
    inv_sqrt_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    LOGN: tl.constexpr,
    CLIP: tl.constexpr,
    GRADMAX: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta, sc (and dlse, lse) at strides (lb, lh, 1); out, do at (qb, qh, qm).
    bh = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    b = (bh // Hq).to(tl.int64)  # 32-bit division, then widen
    h = (bh % Hq).to(tl.int64)
    if VARLEN:
        q_start, Lq = sequence_start(cu_q_ptr, b)
        k_start, Lk = sequence_start(cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
        q_off = q_start * stride_qm + h * stride_qh
        l_off = q_start + h * stride_lh
    else:
        q_off = b * stride_qb + h * stride_qh
        l_off = b * stride_lb + h * stride_lh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    io_mask = row_ok[:, None] & (dcol[None, :] < D)
    at = q_off + rows[:, None] * stride_qm + dcol[None, :]
    o = tl.load(out_ptr + at, mask=io_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + at, mask=io_mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + l_off + rows, mask=row_ok, other=0.0)
    n = visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX)
    tl.store(delta_ptr + l_off + rows, delta, mask=row_ok)
    tl.store(sc_ptr + l_off + rows, sc, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# dK, dV.


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
    dv += dot(pT.to(do.dtype), do, IEEE)
    dpT = dot(v, doT, IEEE)
    dsT = pT * (dpT - delta[None, :]) * sc[None, :]  # dS^T of the scaled scores, times the row scale
    dk += dot(dsT.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
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
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < Lk) & (dcol[None, :] < D)
    kv_at = kv_off + cols[:, None] * stride_kn + dcol[None, :]
    k = tl.load(k_ptr + kv_at, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_at, mask=kv_mask, other=0.0)
    if HAS_MASK:  # the program's keys are fixed: their padding is read once
        key_ok = tl.load(mask_ptr + b * Lk + cols, mask=cols < Lk, other=1) == 0
    else:
        key_ok = cols < Lk
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
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
        )
    tl.store(dk_ptr + kv_at, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_at, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------------------------
# dQ.


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
    dq += dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
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
        )
    dq = dq * sc[:, None]
    tl.store(dq_ptr + q_off + q_at, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launch.

_PREP_ROWS = 64


def launch(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, pb, mask_u8, prefix, scalars, flags, family: int):
    """dq like q, dk / dv like k / v (input dtype), over problem ``pb`` (see the launchers)."""
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    even_d, bd = d == block_d(d), block_d(d)
    delta = torch.empty_like(lse)
    sc = torch.empty_like(lse)
    dlse = lse if grad_lse is None else grad_lse  # never read without HAS_DLSE
    rule = {key: flags[key] for key in ("CAUSAL", "HAS_MASK", "LOGN", "CLIP", "GRADMAX", "VARLEN")}
    logn_bwd_prep_kernel[(pb.nseq * hq, triton.cdiv(pb.max_q, _PREP_ROWS))](
        out,
        grad_out,
        dlse,
        delta,
        sc,
        mask_u8,
        prefix,
        pb.cu_q,
        pb.cu_k,
        hq,
        pb.lq,
        pb.lk,
        d,
        *pb.q_strides,
        *pb.l_strides,
        *scalars,
        **rule,
        HAS_DLSE=grad_lse is not None,
        BLOCK_M=_PREP_ROWS,
        BLOCK_D=bd,
        num_warps=4,
    )
    t = tiles(family, d, flags["IEEE"])
    common = dict(
        CAUSAL=flags["CAUSAL"],
        HAS_MASK=flags["HAS_MASK"],
        IEEE=flags["IEEE"],
        VARLEN=flags["VARLEN"],
        EVEN_D=even_d,
        BLOCK_D=bd,
    )
    if pb.max_k > 0:
        logn_bwd_dkdv_kernel[(pb.nseq * hkv, triton.cdiv(pb.max_k, t.dkdv.block_n))](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            sc,
            mask_u8,
            dk,
            dv,
            pb.cu_q,
            pb.cu_k,
            hq,
            hkv,
            pb.lq,
            pb.lk,
            d,
            *pb.q_strides,
            *pb.k_strides,
            *pb.l_strides,
            **common,
            BLOCK_M=t.dkdv.block_m,
            BLOCK_N=t.dkdv.block_n,
            num_warps=t.dkdv.num_warps,
            num_stages=t.dkdv.num_stages,
        )
    if pb.max_q > 0:
        logn_bwd_dq_kernel[(pb.nseq * hq, triton.cdiv(pb.max_q, t.dq.block_m))](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            sc,
            mask_u8,
            dq,
            pb.cu_q,
            pb.cu_k,
            hq,
            hkv,
            pb.lq,
            pb.lk,
            d,
            *pb.q_strides,
            *pb.k_strides,
            *pb.l_strides,
            **common,
            BLOCK_M=t.dq.block_m,
            BLOCK_N=t.dq.block_n,
            num_warps=t.dq.num_warps,
            num_stages=t.dq.num_stages,
        )


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for tests/gpu_compile.py (see the forward's list).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SWITCHES = ((False, False, False), (True, True, False), (True, False, True))  # causal, mask, varlen
HEAD_DIMS = (16, 32, 64, 96, 128)  # GPUs stop at 128 (MAX_HEAD_DIM in the launchers)
UNALIGNED_HEAD_DIMS = (40, 72)  # not multiples of 16: unaligned row strides (sm_90 has tiles for them)
_STRIDES_WITH_D = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn")
_ARCHS = {90: (90,), 80: (80,), 86: (86, 89)}
_INTS = (
    "Hq",
    "Hkv",
    "Lq",
    "Lk",
    "D",
    "stride_qb",
    "stride_qh",
    "stride_qm",
    "stride_kb",
    "stride_kh",
    "stride_kn",
    "stride_lb",
    "stride_lh",
)


def _expect(family: int, mode: int, tile: Tiles, kernel: str, head_dim: int) -> tuple:
    """What the static check demands: tensor cores for 16-bit inputs; on sm_90, for head dims that
    are multiples of 16, wgmma and unreplicated tiles in both kernels (demanded, not derived from
    the tile: a table change that loses them fails the check); elsewhere the same where the dots'
    M (keys in dK/dV, queries in dQ) gives each warp 16 rows (64 a warpgroup on sm_90)."""
    if mode != 0:
        return ()
    if family == 90 and head_dim % 16 == 0:
        return ("wgmma", "no_replication", "tensor_cores")
    rows = tile.block_n if kernel == "dkdv" else tile.block_m
    if rows < (64 * tile.num_warps // 4 if family == 90 else 16 * tile.num_warps):
        return ("tensor_cores",)
    return ("wgmma", "no_replication", "tensor_cores") if family == 90 else ("no_replication", "tensor_cores")


def _aot_configs() -> list[dict]:
    configs = []
    for family, archs in _ARCHS.items():
        for dtype, ptr in _PTR.items():
            mode = int(dtype == torch.float32)
            if mode == 1 and family != 80:
                continue
            for d in HEAD_DIMS + (UNALIGNED_HEAD_DIMS if family == 90 and mode == 0 else ()):
                t, bd = tiles(family, d, mode), block_d(d)
                unaligned = ("Lq", "Lk") if d % 16 == 0 else ("Lq", "Lk", "D", *_STRIDES_WITH_D)
                for causal, has_mask, varlen in _SWITCHES:
                    switches = (
                        ("causal" if causal else "full") + (" mask" if has_mask else "") + (" varlen" if varlen else "")
                    )
                    for name, kernel, tile, outs in (
                        ("dkdv", logn_bwd_dkdv_kernel, t.dkdv, ("dk_ptr", "dv_ptr")),
                        ("dq", logn_bwd_dq_kernel, t.dq, ("dq_ptr",)),
                    ):
                        consts = dict(
                            CAUSAL=causal,
                            HAS_MASK=has_mask,
                            IEEE=mode,
                            VARLEN=varlen,
                            EVEN_D=d == bd,
                            BLOCK_M=tile.block_m,
                            BLOCK_N=tile.block_n,
                            BLOCK_D=bd,
                        )
                        sig = dict(
                            q_ptr=ptr,
                            k_ptr=ptr,
                            v_ptr=ptr,
                            do_ptr=ptr,
                            lse_ptr="*fp32",
                            delta_ptr="*fp32",
                            sc_ptr="*fp32",
                            mask_ptr="*u8",
                            **dict.fromkeys(outs, ptr),
                            cu_q_ptr="*i32",
                            cu_k_ptr="*i32",
                            **dict.fromkeys(_INTS, "i32"),
                            **dict.fromkeys(consts, "constexpr"),
                        )
                        configs.append(
                            dict(
                                name=(
                                    f"logn_bwd_{name} {f'sm{family}' if mode == 0 else 'any-sm'} {str(dtype)[6:]} d{d} "
                                    f"{switches} {tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"
                                ),
                                kernel=kernel,
                                signature=sig,
                                constexprs=consts,
                                num_warps=tile.num_warps,
                                num_stages=tile.num_stages,
                                archs=archs if mode == 0 else (80, 86, 89, 90),
                                unaligned_ints=unaligned,
                                # the launcher aligns every pointer (see _aligned there): no plain form
                                aligned_only=True,
                                expect=_expect(family, mode, tile, name, d),
                            )
                        )
    # the preprocess kernel: no dots; one configuration per dtype with every switch on
    for dtype, ptr in _PTR.items():
        for d in (64, 128, 256):
            consts = dict(
                CAUSAL=True,
                HAS_MASK=True,
                LOGN=True,
                CLIP=False,
                GRADMAX=True,
                VARLEN=False,
                HAS_DLSE=True,
                BLOCK_M=_PREP_ROWS,
                BLOCK_D=d,
            )
            sig = dict(
                out_ptr=ptr,
                do_ptr=ptr,
                dlse_ptr="*fp32",
                delta_ptr="*fp32",
                sc_ptr="*fp32",
                mask_ptr="*u8",
                prefix_ptr="*i32",
                cu_q_ptr="*i32",
                cu_k_ptr="*i32",
                **dict.fromkeys(
                    ("Hq", "Lq", "Lk", "D", "stride_qb", "stride_qh", "stride_qm", "stride_lb", "stride_lh"), "i32"
                ),
                **dict.fromkeys(("base", "inv_log_train", "min_n", "inv_sqrt_d"), "fp32"),
                **dict.fromkeys(consts, "constexpr"),
            )
            configs.append(
                dict(
                    name=f"logn_bwd_prep {str(dtype)[6:]} d{d} causal mask gradmax",
                    kernel=logn_bwd_prep_kernel,
                    signature=sig,
                    constexprs=consts,
                    num_warps=4,
                    unaligned_ints=("Lq", "Lk"),
                )
            )
    return configs


AOT_CONFIGS = gpu_targets(_aot_configs())
