"""Log-n attention: the Triton forward kernel (FlashAttention-2 structure); tiles in logn_attention_fwd_tiles.py.

One program per (batch or packed sequence x query head, block of BLOCK_M query rows); it keeps the
block's q in registers / shared memory and streams keys and values in BLOCK_N tiles with an online
softmax. Layouts and strides: see :mod:`.logn_attention` (the launchers).

Structure, and why:

* The key loop runs in two stages. Tiles every row of the block sees in full (all keys before the
  diagonal, or every whole tile when not causal) take no mask at all: no index arithmetic, no
  ``where``, no guarded max. Only the diagonal tiles of a causal call and the ragged last tile
  build the mask. A padding mask (HAS_MASK) is applied in every tile.
* The per-row scale ``scale_i * log2(e)`` is computed once per program and folded into the exp2
  argument as an FMA (``s * sc - m``); the max is taken on the raw scores and scaled after, which
  is exact because every scale is >= 0.
* Causal programs run longest first (the last row block is launched first), so the short blocks
  fill the tail of the launch.
* A head wider than 128 columns (256) is split across programs on the grid's third axis: each
  computes the scores over all columns but accumulates and stores only its BLOCK_DV output
  columns (``value_columns``; why in :data:`.logn_attention_rules.MAX_VALUE_BLOCK`).
* Tiles are chosen per target family and head dim (:func:`.logn_attention_fwd_tiles.tiles`) so that no warp recomputes
  another's scores: with chained dots Triton lays the warps along M, so BLOCK_M is 16 rows per
  warp on mma.sync targets and 64 rows per warpgroup (4 warps) for wgmma on sm_90.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _tile_tuner
from .logn_attention_fwd_tiles import candidates, tiles  # noqa: F401 (re-exported: the AOT list and tests use them)
from .logn_attention_rules import (
    RUNTIME_INTS,
    allowed,
    block_d,
    dot,
    row_length,
    row_scale,
    sequence_start,
    tuning_key,
    value_block,
    value_columns,
    value_slices,
    visible,
)


@triton.jit
def _attend(
    acc,
    l_i,
    m_i,
    q,
    sc,
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
):
    """One key tile of the online softmax. ``MASKED``: the tile may hold keys past Lk or past a
    row's diagonal (bounds and causal mask built); otherwise only the padding mask, if any."""
    cols = start + tl.arange(0, BLOCK_N)
    k_at = cols[:, None] * stride_kn + dcol[None, :]
    v_at = cols[:, None] * stride_kn + vcol[None, :]
    if MASKED:
        if EVEN_D:
            k = tl.load(k_base + k_at, mask=cols[:, None] < Lk, other=0.0)
            v = tl.load(v_base + v_at, mask=cols[:, None] < Lk, other=0.0)
        else:
            k = tl.load(k_base + k_at, mask=(cols[:, None] < Lk) & (dcol[None, :] < D), other=0.0)
            v = tl.load(v_base + v_at, mask=(cols[:, None] < Lk) & (vcol[None, :] < D), other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + k_at)
        v = tl.load(v_base + v_at)
    else:
        k = tl.load(k_base + k_at, mask=dcol[None, :] < D, other=0.0)
        v = tl.load(v_base + v_at, mask=vcol[None, :] < D, other=0.0)
    qk = dot(q, tl.trans(k), IEEE)
    if MASKED or HAS_MASK:
        if MASKED:
            ok = allowed(rows, cols, b, Lq, Lk, mask_ptr, True, CAUSAL, HAS_MASK)
            s = tl.where(ok, qk * sc[:, None], float("-inf"))
        else:  # padding only: a per-key bias (a full boolean tile costs registers the sm_80 tiles lack)
            pad = tl.load(mask_ptr + b * Lk + cols)
            s = qk * sc[:, None] + tl.where(pad == 0, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: stay at 0
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
    else:
        # every key visible to every row: the scale rides in the exp2 argument (one FMA)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sc)
        p = tl.exp2(qk * sc[:, None] - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=RUNTIME_INTS)
def logn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    prefix_ptr,
    out_ptr,
    lse_ptr,
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
    base,
    inv_log_train,
    min_n,
    inv_sqrt_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    LOGN: tl.constexpr,
    CLIP: tl.constexpr,
    GRADMAX: tl.constexpr,
    IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # q, out: (.., Hq, rows, D) at strides (qb, qh, qm); k, v at (kb, kh, kn); lse at (lb, lh, 1).
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
    vcol = value_columns(dcol, BLOCK_D, BLOCK_DV)
    row_ok = rows < Lq
    io_mask = row_ok[:, None] & (dcol[None, :] < D)
    # Scalar base pointers first, so that the tile offsets stay 32-bit within a sequence (int64
    # offset tiles cost registers, and on sm_90 a stack).
    q_at = rows[:, None] * stride_qm + dcol[None, :]
    q = tl.load(q_ptr + q_off + q_at, mask=io_mask, other=0.0)
    k_base = k_ptr + kv_off
    v_base = v_ptr + kv_off

    n = visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if CAUSAL:
        # row m0 (the block's first) sees keys j <= m0 + Lk - Lq: whole tiles below that need no mask
        full = tl.minimum(tl.maximum(m0 + (Lk - Lq) + 1, 0), Lk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + (Lk - Lq), 0), Lk)
    else:
        full = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    for start in range(0, full, BLOCK_N):
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            sc,
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
        )
    for start in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            sc,
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
        )

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, 0.0, m_i * 0.6931471805599453 + tl.log(tl.where(empty, 1.0, l_i)))
    # the store's offsets are recomputed in int64: no compiler pass merges them with the load's,
    # which held across the key loop took BLOCK_M * BLOCK_D / threads registers (see the dK/dV kernel)
    rows64 = rows.to(tl.int64)
    out_at = rows64[:, None] * stride_qm + vcol[None, :]
    out_mask = (rows64[:, None] < Lq) & (vcol[None, :] < D)
    tl.store(out_ptr + q_off + out_at, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if BLOCK_DV == BLOCK_D:
        tl.store(lse_ptr + l_off + rows, lse, mask=row_ok)
    elif tl.program_id(2) == 0:  # every slice has the same lse: the first writes it
        tl.store(lse_ptr + l_off + rows, lse, mask=row_ok)


def launch(q, k, v, out, lse, pb, mask_u8, prefix, scalars, flags, family: int) -> None:
    """Runs the forward over problem ``pb`` (see the launchers) with the family's tiles: the
    default, or the fastest of its candidates for this key once timed (``_tile_tuner``)."""
    d, hq, hkv = row_length(q.shape[-1]), q.shape[1], k.shape[1]  # rows padded by the launchers

    def run(t):
        _launch(q, k, v, out, lse, pb, mask_u8, prefix, scalars, flags, d, hq, hkv, t)

    key = tuning_key("logn_fwd", family, d, q.dtype, flags, max(pb.max_q, pb.max_k))
    _tile_tuner.pick(key, candidates(family, d, flags["IEEE"], flags["HAS_MASK"]), run, q.device)


def _launch(q, k, v, out, lse, pb, mask_u8, prefix, scalars, flags, d, hq, hkv, t) -> None:
    grid = (pb.nseq * hq, triton.cdiv(pb.max_q, t.block_m), value_slices(d))
    logn_fwd_kernel[grid](
        q,
        k,
        v,
        mask_u8,
        prefix,
        out,
        lse,
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
        *scalars,
        **flags,
        EVEN_D=d == block_d(d),
        BLOCK_DV=value_block(d),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
