"""Log-n attention: Triton forward and backward kernels (FlashAttention-2 style) and launchers.

Layout: contiguous ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``, or packed variable-length
sequences (``VARLEN``, the flash-attn varlen layout) ``q (Tq, Hq, D)``, ``k, v (Tk, Hkv, D)`` with
``(nseq + 1,)`` offsets ``cu_q``, ``cu_k``; the kernels take strides, so one body serves both.
Query head ``h`` reads key/value head ``h // (Hq // Hkv)``. One program per (batch or sequence x
query head, block of query rows) in the forward and the dQ kernel, per (batch or sequence x query
head, block of keys) in the dK/dV kernel; a packed program looks its sequence's rows up in the
offsets and returns at once when its block lies past the sequence's end (the grid is sized by the
longest sequence). Each query row's
scale is computed in the kernel from the number of keys it sees (:func:`_row_scale`, the rule of
csrc/include/kexue/logn_attention.h): from its position when there is no padding mask, from a
per-batch prefix count of unpadded keys otherwise. The scale multiplies the fp32 scores, not q,
so 16-bit q is never rounded after scaling. Scores are kept in base 2 (``exp2``); ``lse`` is
returned in natural log.

Configurations are fixed per head_dim (:func:`tiles`), not autotuned; ``AOT_CONFIGS`` lists each
one for tests/gpu_compile.py. float32 inputs use ``input_precision="ieee"`` dots (no TF32), so
they meet the float32 error budget.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class Tiles(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    dq_warps: int = 0  # the dQ kernel's (backward only): see tiles()


def tiles(head_dim: int, backward: bool, dtype: torch.dtype) -> Tiles:
    """The fixed configuration for a head size, pass and dtype (chosen so that every one compiles
    for sm_80 and sm_90 without spills; float32 dots without TF32 hold whole operands in
    registers, hence its smaller tiles)."""
    d = block_d(head_dim)
    # The dQ kernel runs with fewer warps than the dK/dV one: at 8 warps (256 threads) ptxas aims
    # at 128 registers a thread, where it sat at the edge and some switch combinations put a few
    # bytes on the stack; each dq_warps below is the one that compiled clean for every switch.
    if dtype == torch.float32:
        if backward:
            return Tiles(16, 32, 4, 2) if d <= 32 else Tiles(16, 32, 8, 4)
        return Tiles(32, 32, 4) if d <= 64 else Tiles(16, 32, 8)
    if backward:
        return Tiles(32, 64, 4, 4) if d <= 32 else Tiles(32, 32, 8, 4)
    return Tiles(64, 64, 4) if d <= 32 else (Tiles(64, 64, 8) if d <= 64 else Tiles(64, 32, 8))


def block_d(head_dim: int) -> int:
    """head_dim padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(head_dim))


# ---------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _sequence_start(cu_ptr, b):
    """Row ``cu[b]`` and length ``cu[b + 1] - cu[b]`` of packed sequence ``b``, both int64: the
    row loops then count in int64, and ``row * (heads * D)`` cannot overflow in a long sequence."""
    start = tl.load(cu_ptr + b).to(tl.int64)
    return start, tl.load(cu_ptr + b + 1).to(tl.int64) - start


@triton.jit
def _visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Number of keys each of ``rows`` may see (int32)."""
    if CAUSAL:
        last = tl.minimum(tl.maximum(rows + (Lk - Lq) + 1, 0), Lk)
    else:
        last = tl.zeros_like(rows) + Lk
    if HAS_MASK:
        return tl.load(prefix_ptr + b * (Lk + 1) + last).to(tl.int32)
    return last.to(tl.int32)


@triton.jit
def _row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN: tl.constexpr, CLIP: tl.constexpr,
               GRADMAX: tl.constexpr):
    """The softmax scale (fp32) of rows that see ``n`` keys; see kexue/logn_attention.h."""
    nf = tl.maximum(n.to(tl.float32), min_n)
    if GRADMAX:
        log_n = tl.log(nf)
        x = tl.zeros_like(nf)
        for _ in tl.static_range(30):
            f = x + tl.log(1.0 + 2.0 * x) - log_n
            x = x - f / (1.0 + 2.0 / (1.0 + 2.0 * x))
        sc = tl.sqrt(x) * inv_sqrt_d
    elif LOGN:
        factor = tl.log(nf) * inv_log_train
        if CLIP:
            factor = tl.maximum(factor, 1.0)
        sc = base * factor
    else:
        sc = tl.zeros_like(nf) + base
    return sc


@triton.jit
def _allowed(rows, cols, b, Lq, Lk, mask_ptr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key ``cols`` exists and is visible to query ``rows``."""
    ok = (cols[None, :] < Lk) & (rows[:, None] >= 0)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
    if HAS_MASK:
        pad = tl.load(mask_ptr + b * Lk + cols, mask=cols < Lk, other=1)
        ok = ok & (pad[None, :] == 0)
    return ok


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE == 2: the interpreter with bfloat16 operands, whose tl.dot returns garbage in triton 3.9
    # (seen here: errors of 1e10 on a 16x16 product); the operands go to float32 first.
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# ---------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _logn_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, prefix_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                     Hq, Hkv, Lq, Lk, D, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_lb, stride_lh, base, inv_log_train, min_n, inv_sqrt_d,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOGN: tl.constexpr, CLIP: tl.constexpr,
                     GRADMAX: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # q, out: (.., Hq, rows, D) at strides (qb, qh, qm); k, v at (kb, kh, kn); lse at (lb, lh, 1).
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    if VARLEN:
        q_start, Lq = _sequence_start(cu_q_ptr, b)
        k_start, Lk = _sequence_start(cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
        q_off = q_start * stride_qm + h * stride_qh
        kv_off = k_start * stride_kn + hk * stride_kh
        l_off = q_start + h * stride_lh
    else:
        q_off = b * stride_qb + h * stride_qh
        kv_off = b * stride_kb + hk * stride_kh
        l_off = b * stride_lb + h * stride_lh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dcol < D
    # Scalar base pointers first, so that the tile offsets stay 32-bit within a sequence (as in
    # the dense layout before; int64 offset tiles cost registers, and sm_90 a stack).
    q_base = q_ptr + q_off
    k_base = k_ptr + kv_off
    v_base = v_ptr + kv_off
    q_at = rows[:, None] * stride_qm + dcol[None, :]
    q = tl.load(q_base + q_at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    n = _visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = _row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + (Lk - Lq), 0), Lk)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < Lk) & d_ok[None, :]
        kv_at = cols[:, None] * stride_kn + dcol[None, :]
        k = tl.load(k_base + kv_at, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_at, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * sc[:, None]
        s = tl.where(_allowed(rows, cols, b, Lq, Lk, mask_ptr, CAUSAL, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: stay at 0
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, 0.0, m_i * 0.6931471805599453 + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(out_ptr + q_off + q_at, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + l_off + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward: dK, dV per key block (one slab per query head); dQ per query block.


@triton.jit
def _logn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, prefix_ptr, dk_ptr, dv_ptr,
                          cu_q_ptr, cu_k_ptr, Hq, Hkv, Lq, Lk, D, stride_qb, stride_qh, stride_qm, stride_kb,
                          stride_kh, stride_kn, stride_lb, stride_lh, stride_ab, stride_ah, stride_an,
                          base, inv_log_train, min_n, inv_sqrt_d,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOGN: tl.constexpr, CLIP: tl.constexpr,
                          GRADMAX: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dk, dv: float32 accumulators, one per query head, at strides (ab, ah, an).
    bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    if VARLEN:
        q_start, Lq = _sequence_start(cu_q_ptr, b)
        k_start, Lk = _sequence_start(cu_k_ptr, b)
        if pid_n * BLOCK_N >= Lk:
            return
        q_off = q_start * stride_qm + h * stride_qh
        kv_off = k_start * stride_kn + hk * stride_kh
        l_off = q_start + h * stride_lh
        a_off = k_start * stride_an + h * stride_ah
    else:
        q_off = b * stride_qb + h * stride_qh
        kv_off = b * stride_kb + hk * stride_kh
        l_off = b * stride_lb + h * stride_lh
        a_off = b * stride_ab + h * stride_ah
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    kv_mask = (cols[:, None] < Lk) & d_ok[None, :]
    kv_at = kv_off + cols[:, None] * stride_kn + dcol[None, :]
    k = tl.load(k_ptr + kv_at, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_at, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries before row first - (Lk - Lq) cannot see these keys
        lo = tl.maximum(pid_n * BLOCK_N - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    # Transposed tiles (keys as rows): no register tensor is transposed, only loads, which keeps
    # the float32 variant out of local memory.
    for start in range(lo, Lq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_at = q_off + rows[:, None] * stride_qm + dcol[None, :]
        qT_at = q_off + rows[None, :] * stride_qm + dcol[:, None]
        q = tl.load(q_ptr + q_at, mask=q_mask, other=0.0)
        qT = tl.load(q_ptr + qT_at, mask=q_mask.T, other=0.0)
        do = tl.load(do_ptr + q_at, mask=q_mask, other=0.0)
        doT = tl.load(do_ptr + qT_at, mask=q_mask.T, other=0.0)
        lse = tl.load(lse_ptr + l_off + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + l_off + rows, mask=row_ok, other=0.0)
        n = _visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
        sc = _row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX)
        sT = _dot(k, qT, IEEE) * (sc * 1.4426950408889634)[None, :]
        okT = tl.trans(_allowed(rows, cols, b, Lq, Lk, mask_ptr, CAUSAL, HAS_MASK) & row_ok[:, None])
        pT = tl.where(okT, tl.exp2(sT - (lse * 1.4426950408889634)[None, :]), 0.0)
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, doT, IEEE)
        dsT = pT * (dpT - delta[None, :]) * sc[None, :]  # dS^T of the scaled scores, times the row scale
        dk += _dot(dsT.to(q.dtype), q, IEEE)
    a_at = a_off + cols[:, None] * stride_an + dcol[None, :]
    tl.store(dk_ptr + a_at, dk, mask=kv_mask)
    tl.store(dv_ptr + a_at, dv, mask=kv_mask)


@triton.jit
def _logn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, prefix_ptr, dq_ptr,
                        cu_q_ptr, cu_k_ptr, Hq, Hkv, Lq, Lk, D, stride_qb, stride_qh, stride_qm, stride_kb,
                        stride_kh, stride_kn, stride_lb, stride_lh, base, inv_log_train, min_n, inv_sqrt_d,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOGN: tl.constexpr, CLIP: tl.constexpr,
                        GRADMAX: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    if VARLEN:
        q_start, Lq = _sequence_start(cu_q_ptr, b)
        k_start, Lk = _sequence_start(cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
        q_off = q_start * stride_qm + h * stride_qh
        kv_off = k_start * stride_kn + hk * stride_kh
        l_off = q_start + h * stride_lh
    else:
        q_off = b * stride_qb + h * stride_qh
        kv_off = b * stride_kb + hk * stride_kh
        l_off = b * stride_lb + h * stride_lh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dcol < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_at = rows[:, None] * stride_qm + dcol[None, :]  # from scalar bases: see the forward
    q = tl.load(q_ptr + q_off + q_at, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_off + q_at, mask=q_mask, other=0.0)
    k_base = k_ptr + kv_off
    v_base = v_ptr + kv_off
    lse = tl.load(lse_ptr + l_off + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + l_off + rows, mask=row_ok, other=0.0)
    n = _visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = _row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + (Lk - Lq), 0), Lk)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < Lk) & d_ok[None, :]
        kv_at = cols[:, None] * stride_kn + dcol[None, :]
        k = tl.load(k_base + kv_at, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_at, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * (sc * 1.4426950408889634)[:, None]
        ok = _allowed(rows, cols, b, Lq, Lk, mask_ptr, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp2(s - (lse * 1.4426950408889634)[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sc[:, None]
    tl.store(dq_ptr + q_off + q_at, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments as the backends of kexue.ops.logn_attention receive them.


def _dot_mode(q) -> int:
    """0: native 16-bit dots; 1: float32 without TF32; 2: bfloat16 under the interpreter."""
    if q.dtype == torch.float32:
        return 1
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 2
    return 0


def _common(q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen=False):
    d = q.shape[-1]
    if mask is not None:
        b, lk = mask.shape
        prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=q.device)
        prefix[:, 1:] = torch.cumsum((~mask).to(torch.int32), dim=1)
        mask_u8 = mask.to(torch.uint8).contiguous()
    else:
        prefix = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read
        mask_u8 = torch.zeros(1, dtype=torch.uint8, device=q.device)
    scalars = (float(scale), 1.0 / math.log(train_len), max(1.0, float(min_n)), 1.0 / math.sqrt(d))
    flags = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, LOGN=bool(logn), CLIP=bool(clip),
                 GRADMAX=bool(gradmax), IEEE=_dot_mode(q), VARLEN=bool(varlen), BLOCK_D=block_d(d))
    return mask_u8, prefix, scalars, flags


class _Problem(NamedTuple):
    """What the kernels need to find rows: the number of (batch or sequence) x heads programs,
    the longest q and k, the Lq / Lk arguments, the offsets, and the strides of q-like tensors
    (q, out, dO, dQ), k-like ones (k, v) and lse-like ones (lse, delta), each (batch, head, row)."""
    nseq: int
    max_q: int
    max_k: int
    lq: int
    lk: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    q_strides: tuple
    k_strides: tuple
    l_strides: tuple


def _dense_problem(q, k, lse) -> _Problem:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), lse (B, Hq, Lq), all contiguous."""
    none = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read
    return _Problem(q.shape[0], q.shape[2], k.shape[2], q.shape[2], k.shape[2], none, none, q.stride()[:3],
                    k.stride()[:3], lse.stride()[:2])


def _packed_problem(q, k, lse, cu_q, cu_k, max_seqlen) -> _Problem:
    """q (Tq, Hq, D), k (Tk, Hkv, D), lse (Hq, Tq), all contiguous; rows of sequence s at
    cu[s] .. cu[s + 1]. Lq / Lk are unused (read from the offsets): 0."""
    return _Problem(cu_q.numel() - 1, max_seqlen, max_seqlen, 0, 0, cu_q, cu_k, (0, q.stride(1), q.stride(0)),
                    (0, k.stride(1), k.stride(0)), (0, lse.stride(0)))


def _forward(q, k, v, out, lse, pb: _Problem, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen):
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]  # heads are dimension 1 in both layouts
    if out.numel() == 0 or pb.max_q == 0:
        return
    mask_u8, prefix, scalars, flags = _common(q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen)
    t = tiles(d, backward=False, dtype=q.dtype)
    grid = (pb.nseq * hq, triton.cdiv(pb.max_q, t.block_m))
    _logn_fwd_kernel[grid](q, k, v, mask_u8, prefix, out, lse, pb.cu_q, pb.cu_k, hq, hkv, pb.lq, pb.lk, d,
                           *pb.q_strides, *pb.k_strides, *pb.l_strides, *scalars, **flags,
                           BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps)


def _backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, pb: _Problem, a_strides, mask, causal, scale,
              train_len, logn, clip, min_n, gradmax, varlen):
    """dq like q; dk, dv float32 accumulators with one slab per query head at ``a_strides``."""
    d = q.shape[-1]
    hq, hkv = q.shape[1], k.shape[1]
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Hq, Lq) or (Tq, Hq)
    if varlen:
        delta = delta.t()
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    mask_u8, prefix, scalars, flags = _common(q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen)
    t = tiles(d, backward=True, dtype=q.dtype)
    if pb.max_k > 0:
        _logn_bwd_dkdv_kernel[(pb.nseq * hq, triton.cdiv(pb.max_k, t.block_n))](
            q, k, v, grad_out, lse, delta, mask_u8, prefix, dk, dv, pb.cu_q, pb.cu_k, hq, hkv, pb.lq, pb.lk, d,
            *pb.q_strides, *pb.k_strides, *pb.l_strides, *a_strides, *scalars, **flags,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps)
    if pb.max_q > 0:
        _logn_bwd_dq_kernel[(pb.nseq * hq, triton.cdiv(pb.max_q, t.block_m))](
            q, k, v, grad_out, lse, delta, mask_u8, prefix, dq, pb.cu_q, pb.cu_k, hq, hkv, pb.lq, pb.lk, d,
            *pb.q_strides, *pb.k_strides, *pb.l_strides, *scalars, **flags,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.dq_warps)


def forward(q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    """``(out like q, lse (B, Hq, Lq) float32)`` for ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, hq, lq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    _forward(q, k, v, out, lse, _dense_problem(q, k, lse), mask, causal, scale, train_len, logn, clip, min_n, gradmax,
             False)
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    """``(grad_q, grad_k, grad_v)`` typed like the inputs."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    if q.numel() == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    dk = torch.empty(b, hq, lk, d, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    _backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, _dense_problem(q, k, lse), dk.stride()[:3], mask,
              causal, scale, train_len, logn, clip, min_n, gradmax, False)
    groups = hq // hkv
    dk = dk.view(b, hkv, groups, lk, d).sum(2).to(k.dtype)
    dv = dv.view(b, hkv, groups, lk, d).sum(2).to(v.dtype)
    return dq, dk, dv


def varlen_forward(q, k, v, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax):
    """``(out like q, lse (Hq, Tq) float32)`` for packed ``q (Tq, Hq, D)``, ``k, v (Tk, Hkv, D)``,
    offsets ``cu_q``, ``cu_k`` (nseq + 1,) and ``max_seqlen`` >= every sequence length."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    pb = _packed_problem(q, k, lse, cu_q.contiguous(), cu_k.contiguous(), max_seqlen)
    _forward(q, k, v, out, lse, pb, None, causal, scale, train_len, logn, clip, min_n, gradmax, True)
    return out, lse


def varlen_backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn,
                    clip, min_n, gradmax):
    """``(grad_q, grad_k, grad_v)`` of :func:`varlen_forward`, typed like the inputs."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    tk, hq, hkv, d = k.shape[0], q.shape[1], k.shape[1], q.shape[2]
    dq = torch.empty_like(q)
    # (Tk, Hq, D): keys of a sequence without queries are still written (zeros) by their program
    dk = torch.empty(tk, hq, d, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    pb = _packed_problem(q, k, lse, cu_q.contiguous(), cu_k.contiguous(), max_seqlen)
    _backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, pb, (0, dk.stride(1), dk.stride(0)), None, causal,
              scale, train_len, logn, clip, min_n, gradmax, True)
    groups = hq // hkv
    dk = dk.view(tk, hkv, groups, d).sum(2).to(k.dtype)
    dv = dv.view(tk, hkv, groups, d).sum(2).to(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Every tile configuration the launchers can pick (head_dim 32 / 64 / 128, each dtype), each with
# no switch on and with causal + mask + gradmax on, and packed (VARLEN) with causal + gradmax on,
# for ahead-of-time compilation (tests/gpu_compile.py).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SCALARS = dict(Hq="i32", Hkv="i32", Lq="i32", Lk="i32", D="i32",
                **dict.fromkeys(("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
                                 "stride_lb", "stride_lh"), "i32"))
_RULE = dict(base="fp32", inv_log_train="fp32", min_n="fp32", inv_sqrt_d="fp32")
_ACC_STRIDES = dict.fromkeys(("stride_ab", "stride_ah", "stride_an"), "i32")
# (causal, has_mask, gradmax, varlen): the lightest switches, the heaviest dense ones, the heaviest packed ones
_SWITCHES = ((False, False, False, False), (True, True, True, False), (True, False, True, True))


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, ptr in _PTR.items():
        for head_dim in (32, 64, 128):
            for causal, has_mask, gradmax, varlen in _SWITCHES:
                for backward_pass in (False, True):
                    t = tiles(head_dim, backward_pass, dtype)
                    consts = dict(CAUSAL=causal, HAS_MASK=has_mask, LOGN=True, CLIP=False, GRADMAX=gradmax,
                                  IEEE=int(dtype == torch.float32), VARLEN=varlen, BLOCK_M=t.block_m,
                                  BLOCK_N=t.block_n, BLOCK_D=head_dim)
                    tag = (f"{str(dtype).removeprefix('torch.')} d{head_dim} {'causal' if causal else 'full'}"
                           f"{' mask' if has_mask else ''}{' gradmax' if gradmax else ''}{' varlen' if varlen else ''} "
                           f"{t.block_m}x{t.block_n} w{t.num_warps}")
                    common = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr)
                    cu = dict(cu_q_ptr="*i32", cu_k_ptr="*i32")
                    if not backward_pass:
                        kernels = [("logn_fwd", _logn_fwd_kernel,
                                    dict(**common, mask_ptr="*u8", prefix_ptr="*i32", out_ptr=ptr, lse_ptr="*fp32",
                                         **cu, **_SCALARS, **_RULE))]
                    else:
                        bwd = dict(**common, do_ptr=ptr, lse_ptr="*fp32", delta_ptr="*fp32", mask_ptr="*u8",
                                   prefix_ptr="*i32")
                        kernels = [("logn_bwd_dkdv", _logn_bwd_dkdv_kernel,
                                    dict(**bwd, dk_ptr="*fp32", dv_ptr="*fp32", **cu, **_SCALARS, **_ACC_STRIDES,
                                         **_RULE)),
                                   ("logn_bwd_dq", _logn_bwd_dq_kernel,
                                    dict(**bwd, dq_ptr=ptr, **cu, **_SCALARS, **_RULE))]
                    for name, kernel, args in kernels:
                        warps = t.dq_warps if kernel is _logn_bwd_dq_kernel else t.num_warps
                        configs.append(dict(name=f"{name} {tag.replace(f'w{t.num_warps}', f'w{warps}')}",
                                            kernel=kernel,
                                            signature=dict(**args, **dict.fromkeys(consts, "constexpr")),
                                            constexprs=consts, num_warps=warps))
    return configs


AOT_CONFIGS = _aot_configs()
