"""GlobalPointer in Triton: the fused multilabel loss, forward and backward.

The arithmetic follows csrc/include/kexue/global_pointer.h and the float64 oracle
python/kexue/reference/global_pointer.py. Canonical layout: q, k ``(B, H, L, d)`` with ``H = 1``
(one pair shared by the T types) or ``H = T``; biases ``(B, T, L)``; mask ``(B, L)``; labels dense
``(B, T, L, L)`` (sparse labels are expanded to a byte mask by the launcher: one byte per span).

Three kernels, each program owning a block of one (batch, head) and looping over the types of the
head and over the other axis in tiles, recomputing the ``(BLOCK_M, BLOCK_N)`` score tiles:

* forward, rows: per row an online log-sum-exp of the negatives and of the negated positives;
  the block's rows are reduced to one partial state per (b, t, block), combined by the launcher
  with the implicit extra logit 0. Positives on masked spans are counted (the loss is then +inf).
* backward, rows: ``P = dL/ds`` per tile, row sums -> ``d_start_bias``, ``P k`` -> dq.
* backward, columns: column sums -> ``d_end_bias``, ``P^T q`` -> dk (no atomics: each program
  owns its keys).

RoPE is applied in-kernel from ``(L, d/2)`` cos/sin tables computed in float64 by the launcher; a
rotary pair is the channels ``(c * PAIR_MUL, c * PAIR_MUL + PAIR_OFF)``: (2c, 2c+1) for the
interleaved layout, (c, c + d/2) for rotate_half, and without RoPE the tables are cos 1, sin 0.
Dots run in float32 with ``input_precision="ieee"`` (exact fp32, no TF32) whatever the storage
dtype. Block sizes depend on the head size only (:func:`tile_for`).

STATUS: correct in the Triton interpreter (tests/test_triton_global_pointer.py), but not yet
shippable: compiled ahead of time for sm_80 / sm_90 every configuration keeps LOCAL 0 but has a
stack frame (STACK 500..13000 bytes; REG at the 255 ceiling, or oddly REG 32 for the row
backward), which tests/gpu_compile.py rejects. Ruled out so far (no change): 16x16 and 32x32
tiles, TF32 and 3xTF32 dots, int32 in-head offsets, scalar type-loop bounds, contiguous rotary
pairs, no label loads, no cos/sin loads; the PTX has no alloca, no .local and no calls, so the
frame is ptxas spilling. The kernels are therefore not registered as a kexue backend (CUDA tensors
use the torch reference for the loss) and ``AOT_CONFIGS`` is empty; :func:`candidate_configs`
lists what the launchers would use, for whoever takes this up (feed them to
``tests/gpu_compile.compile_config``).
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
def _pairs(c, HALF, D, PAIR_MUL, PAIR_OFF):
    """Channels (a, b) of rotary pair c and whether each exists (odd d without RoPE)."""
    ca = c * PAIR_MUL
    cb = ca + PAIR_OFF
    ok = c < HALF
    return ca, cb, ok & (ca < D), ok & (cb < D)


@triton.jit
def _load_rotated(ptr, base, pos, pos_ok, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, scale):
    """Rows ``pos`` of one head, rotated by their position and scaled: (a, b) halves in fp32."""
    ca, cb, ma, mb = _pairs(c, HALF, D, PAIR_MUL, PAIR_OFF)
    head = ptr + base  # int64 scalar base; int32 offsets within one head
    rows = pos[:, None] * D
    a = tl.load(head + rows + ca[None, :], mask=pos_ok[:, None] & ma[None, :], other=0.0).to(tl.float32)
    b = tl.load(head + rows + cb[None, :], mask=pos_ok[:, None] & mb[None, :], other=0.0).to(tl.float32)
    tab = pos[:, None] * HALF + c[None, :]
    tmask = pos_ok[:, None] & (c < HALF)[None, :]
    cs = tl.load(cos_ptr + tab, mask=tmask, other=1.0)
    sn = tl.load(sin_ptr + tab, mask=tmask, other=0.0)
    return (a * cs - b * sn) * scale, (b * cs + a * sn) * scale


@triton.jit
def _store_unrotated(ptr, base, pos, pos_ok, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, ga, gb):
    """Gradient wrt the un-rotated rows: R^T (ga, gb), stored in ptr's dtype."""
    ca, cb, ma, mb = _pairs(c, HALF, D, PAIR_MUL, PAIR_OFF)
    tab = pos[:, None] * HALF + c[None, :]
    tmask = pos_ok[:, None] & (c < HALF)[None, :]
    cs = tl.load(cos_ptr + tab, mask=tmask, other=1.0)
    sn = tl.load(sin_ptr + tab, mask=tmask, other=0.0)
    head = ptr + base
    rows = pos[:, None] * D
    out_ty = ptr.dtype.element_ty
    tl.store(head + rows + ca[None, :], (ga * cs + gb * sn).to(out_ty), mask=pos_ok[:, None] & ma[None, :])
    tl.store(head + rows + cb[None, :], (gb * cs - ga * sn).to(out_ty), mask=pos_ok[:, None] & mb[None, :])


@triton.jit
def _scores(qa, qb, ka, kb, sbv, ebv, i, j, row_ok, col_ok, TRIL):
    """Score tile (rows i, cols j) and whether each span is a candidate."""
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PRECISION) + tl.dot(qb, tl.trans(kb), input_precision=DOT_PRECISION)
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
def _gp_loss_fwd_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, cos_ptr, sin_ptr, part_ptr,
                        H, T, L, D, HALF, PAIR_MUL, PAIR_OFF, TRIL, scale,
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
    qa, qb = _load_rotated(q_ptr, pid_bh * L * D, i, row_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, scale)
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
            ka, kb = _load_rotated(k_ptr, pid_bh * L * D, j, col_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL,
                                   PAIR_OFF, 1.0)
            ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
            s, valid = _scores(qa, qb, ka, kb, sbv, ebv, i, j, row_ok, col_ok, TRIL)
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
def _gp_loss_bwd_rows_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, cos_ptr, sin_ptr, grad_ptr, lse_ptr,
                             dq_ptr, dsb_ptr, H, T, L, D, HALF, PAIR_MUL, PAIR_OFF, TRIL, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    row_in = i < L
    row_ok = row_in & (tl.load(mask_ptr + b * L + i, mask=row_in, other=0) != 0)
    qa, qb = _load_rotated(q_ptr, pid_bh * L * D, i, row_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, scale)
    dqa = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
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
            ka, kb = _load_rotated(k_ptr, pid_bh * L * D, j, col_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL,
                                   PAIR_OFF, 1.0)
            ebv = tl.load(eb_ptr + bt * L + j, mask=col_in, other=0.0).to(tl.float32)
            s, valid = _scores(qa, qb, ka, kb, sbv, ebv, i, j, row_ok, col_ok, TRIL)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in)
            p = _grad_tile(s, valid, y, g, ln, lp)
            dsb += tl.sum(p, axis=1)
            dqa += tl.dot(p, ka, input_precision=DOT_PRECISION)
            dqb += tl.dot(p, kb, input_precision=DOT_PRECISION)
        tl.store(dsb_ptr + bt * L + i, dsb, mask=row_in)
    _store_unrotated(dq_ptr, pid_bh * L * D, i, row_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF,
                     dqa * scale, dqb * scale)


@triton.jit
def _gp_loss_bwd_cols_kernel(q_ptr, k_ptr, sb_ptr, eb_ptr, mask_ptr, lab_ptr, cos_ptr, sin_ptr, grad_ptr, lse_ptr,
                             dk_ptr, deb_ptr, H, T, L, D, HALF, PAIR_MUL, PAIR_OFF, TRIL, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    c = tl.arange(0, BLOCK_H)
    j = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)
    col_in = j < L
    col_ok = col_in & (tl.load(mask_ptr + b * L + j, mask=col_in, other=0) != 0)
    ka, kb = _load_rotated(k_ptr, pid_bh * L * D, j, col_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, 1.0)
    dka = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
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
            qa, qb = _load_rotated(q_ptr, pid_bh * L * D, i, row_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL,
                                   PAIR_OFF, scale)
            sbv = tl.load(sb_ptr + bt * L + i, mask=row_in, other=0.0).to(tl.float32)
            s, valid = _scores(qa, qb, ka, kb, sbv, ebv, i, j, row_ok, col_ok, TRIL)
            y = _labels_tile(lab_ptr, bt, L, i, j, row_in, col_in)
            p = _grad_tile(s, valid, y, g, ln, lp)
            deb += tl.sum(p, axis=0)
            pt = tl.trans(p)
            dka += tl.dot(pt, qa, input_precision=DOT_PRECISION)
            dkb += tl.dot(pt, qb, input_precision=DOT_PRECISION)
        tl.store(deb_ptr + bt * L + j, deb, mask=col_in)
    _store_unrotated(dk_ptr, pid_bh * L * D, j, col_in, c, cos_ptr, sin_ptr, HALF, D, PAIR_MUL, PAIR_OFF, dka, dkb)


# ---------------------------------------------------------------------------------------------
# Launchers.


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_h: int
    num_warps: int


MAX_HEAD_SIZE = 256


def tile_for(head_size: int) -> Tile:
    """Blocks for a head size: BLOCK_H covers half the head (tl.dot needs at least 16)."""
    block_h = max(16, triton.next_power_of_2((head_size + 1) // 2))
    if block_h <= 32:
        return Tile(64, 64, block_h, 4)
    return Tile(32, 32, block_h, 4)


def _rope_tables(length: int, d: int, rope: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """cos, sin ``(L, half)`` fp32 and the pair layout (half, PAIR_MUL, PAIR_OFF)."""
    from kexue.reference.global_pointer import rope_angles

    if rope == 0:
        half = (d + 1) // 2
        ones = torch.ones(max(length, 1), half, dtype=torch.float32, device=device)
        return ones, torch.zeros_like(ones), half, 1, half
    half = d // 2
    ang = rope_angles(max(length, 1), d, base)
    cos, sin = torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)
    if rope == 1:
        return cos, sin, half, 2, 1
    return cos, sin, half, 1, half


def _dense_labels(row_ptr, cols, dense, batch, types, length) -> torch.Tensor:
    if dense.dim() == 4:
        return dense.contiguous().view(torch.uint8)
    from kexue.reference.global_pointer import dense_labels

    return dense_labels(row_ptr, cols, batch, types, length).view(torch.uint8)


def _common(q, sb, mask, rope, base, tile):
    batch, heads, length, d = q.shape
    types = sb.shape[1]
    if d > MAX_HEAD_SIZE:
        raise ValueError(f"the Triton GlobalPointer kernels serve head sizes up to {MAX_HEAD_SIZE}, got {d}")
    cos, sin, half, mul, off = _rope_tables(length, d, rope, base, q.device)
    tile = tile or tile_for(d)
    return batch, heads, types, length, d, cos, sin, half, mul, off, tile, mask.contiguous().view(torch.uint8)


def loss_forward(q, k, sb, eb, mask, row_ptr, cols, dense, rope, base, tril, *, tile: Tile | None = None):
    """``(loss (B, T), lse (B, T, 2))`` in float32; arguments as the C++ backend's."""
    batch, heads, types, length, d, cos, sin, half, mul, off, tile, m8 = _common(q, sb, mask, rope, base, tile)
    loss = torch.zeros(batch, types, dtype=torch.float32, device=q.device)
    lse = torch.zeros(batch, types, 2, dtype=torch.float32, device=q.device)
    if batch == 0 or types == 0 or length == 0:
        return loss, lse
    labels = _dense_labels(row_ptr, cols, dense, batch, types, length)
    n_blk = triton.cdiv(length, tile.block_m)
    part = torch.empty(batch * types, n_blk, 5, dtype=torch.float32, device=q.device)
    _gp_loss_fwd_kernel[(n_blk, batch * heads)](
        q, k, sb, eb, m8, labels, cos, sin, part, heads, types, length, d, half, mul, off, int(bool(tril)),
        1.0 / d**0.5, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps)
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
    batch, heads, types, length, d, cos, sin, half, mul, off, tile, m8 = _common(q, sb, mask, rope, base, tile)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return dq, dk, dsb.to(sb.dtype), deb.to(eb.dtype)
    labels = _dense_labels(row_ptr, cols, dense, batch, types, length)
    grad = grad.float().contiguous()
    lse = lse.float().contiguous()
    args = (heads, types, length, d, half, mul, off, int(bool(tril)), 1.0 / d**0.5)
    meta = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, num_warps=tile.num_warps)
    _gp_loss_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        q, k, sb, eb, m8, labels, cos, sin, grad, lse, dq, dsb, *args, **meta)
    _gp_loss_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        q, k, sb, eb, m8, labels, cos, sin, grad, lse, dk, deb, *args, **meta)
    return dq, dk, dsb.to(sb.dtype), deb.to(eb.dtype)


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for tests/gpu_compile.py.

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def all_tiles() -> list[Tile]:
    return sorted({tile_for(d) for d in range(1, MAX_HEAD_SIZE + 1)})


def _aot_configs() -> list[dict]:
    ints = dict(H="i32", T="i32", L="i32", D="i32", HALF="i32", PAIR_MUL="i32", PAIR_OFF="i32", TRIL="i32",
                scale="fp32")
    configs = []
    for dtype, ptr in _PTR.items():
        for tile in all_tiles():
            consts = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h)
            tag = f"{str(dtype).removeprefix('torch.')} {tile.block_m}x{tile.block_n}x{tile.block_h} w{tile.num_warps}"
            inputs = dict(q_ptr=ptr, k_ptr=ptr, sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", lab_ptr="*u8",
                          cos_ptr="*fp32", sin_ptr="*fp32")
            kernels = [
                ("fwd", _gp_loss_fwd_kernel, dict(**inputs, part_ptr="*fp32")),
                ("bwd_rows", _gp_loss_bwd_rows_kernel,
                 dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dq_ptr=ptr, dsb_ptr="*fp32")),
                ("bwd_cols", _gp_loss_bwd_cols_kernel,
                 dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dk_ptr=ptr, deb_ptr="*fp32")),
            ]
            for name, kernel, sig in kernels:
                configs.append(dict(
                    name=f"global_pointer_{name} {tag}",
                    kernel=kernel,
                    signature=dict(**sig, **ints, **dict.fromkeys(consts, "constexpr")),
                    constexprs=consts,
                    num_warps=tile.num_warps,
                ))
    return configs


def candidate_configs() -> list[dict]:
    """The configurations the launchers pick, in tests/gpu_compile.py's format (see STATUS above)."""
    return _aot_configs()


AOT_CONFIGS: list[dict] = []  # see STATUS in the module docstring
