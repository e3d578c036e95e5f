"""Sign optimizers, Triton side: the step kernel (one work item per program).

Per item: the NaN guard's shrink when its group saw a non-finite gradient; else the update, row by
row (embedding tables: row RMS, lazy rows) or element by element, with the coefficients of the
tensor's table row (or of the dynamic table, capturable mode). With SSQ_OUT it hands on the sum of
squares of theta as it stores it (one-pass Tiger).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sign_optim_layout import (
    _A_GRAD,
    _A_MASK,
    _A_MOM,
    _A_PARAM,
    _A_SEEN,
    _A_SSQ,
    _C_CENTRE,
    _C_CG,
    _C_CM,
    _C_FLAGS,
    _C_GSCALE,
    _C_LR,
    _C_MASK_K0,
    _C_MASK_K1,
    _C_MASK_THR,
    _C_MG,
    _C_MM,
    _C_NAN_GROUP,
    _C_ROUND_K0,
    _C_ROUND_K1,
    _C_ROW_LEN,
    _C_SHRINK,
    _C_WD,
    _D_GSCALE,
    _D_LR,
    _D_MASK_K0,
    _D_MASK_K1,
    _D_MM,
    _D_ROUND_K0,
    _D_ROUND_K1,
    _D_SKIP,
    _D_UPDATE,
    _K_DYNAMIC,
    _K_FREEZE_ABSENT,
    _K_LAZY_ROWS,
    _K_MASK_D,
    _K_RMS_CARRIED,
    _K_RMS_ROW,
    _K_RMS_TENSOR,
    _K_SHRINK_NOW,
    _K_SSQ_OUT,
    _K_STOCHASTIC,
    _K_UPDATE,
    _NA,
    _ND,
    _NF,
    _NI,
    _ROW_TILE,
    _byte_ptr,
    _float_ptr,
    _tile_offsets,
)
from .sign_optim_reduce import _row_sums
from .sign_optim_tiles import _dyn_or, _element_tile, _store_float, _update_tile


@triton.jit
def _step_kernel(
    items_ptr,
    addr_ptr,
    hyper_ptr,
    ints_ptr,
    dyn_ptr,
    lr_ptr,
    group_nan_ptr,
    part_ptr,
    PARAM: tl.constexpr,
    MOM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW_COLS: tl.constexpr,
    VEC: tl.constexpr,
):
    """The update of one work item: NaN-guard shrink, row by row, or element by element.

    SSQ_OUT: the sum of squares of theta as this item leaves it goes to ``part_ptr[item]`` (a
    whole-tensor sum, finished by _ssq_out_kernel), or per row straight into the tensor's ssq.

    ``VEC > 1`` (the launcher checked that every address of the item's tensor is 16-byte aligned
    and its row length, if any, a multiple of VEC): the full tiles of the element sweep go
    unmasked with alignment hints, so they compile to 16-byte accesses; the tail is masked. The
    row sweeps get the hints too (their column masks then change only every VEC elements).
    """
    it = tl.program_id(0).to(tl.int64)
    t = tl.load(items_ptr + 3 * it)
    begin = tl.load(items_ptr + 3 * it + 1)
    end = tl.load(items_ptr + 3 * it + 2)
    h = hyper_ptr + t * _NF
    iv = ints_ptr + t * _NI
    av = addr_ptr + t * _NA
    flags = tl.load(iv + _C_FLAGS)
    # Capturable mode (apply_dynamic() in sign_optim.h): this step's values from the device table.
    dynamic = (flags & _K_DYNAMIC) != 0
    dv = dyn_ptr + t * _ND
    end = tl.where(_dyn_or(dv, _D_SKIP, dynamic, 0.0) != 0, begin, end)  # skipped: an empty item
    flags = flags - tl.where(_dyn_or(dv, _D_UPDATE, dynamic, 1.0) == 0, flags & _K_UPDATE, 0)
    group = tl.load(iv + _C_NAN_GROUP)
    row_len = tl.load(iv + _C_ROW_LEN)
    if VEC > 1:
        row_len = tl.multiple_of(row_len, VEC)
    p_ptr = _float_ptr(tl.load(av + _A_PARAM), PARAM, VEC)
    g_ptr = _float_ptr(tl.load(av + _A_GRAD), PARAM, VEC)
    m_ptr = _float_ptr(tl.load(av + _A_MOM), MOM, VEC)
    mask_addr = tl.load(av + _A_MASK)
    seen_addr = tl.load(av + _A_SEEN)
    ssq_rows = tl.load(av + _A_SSQ).to(tl.pointer_type(tl.float64))
    out = (flags & _K_SSQ_OUT) != 0
    carried = (flags & _K_RMS_CARRIED) != 0
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # whole-tensor sum of squares of theta as left
    mask_ptr = _byte_ptr(mask_addr, tl.int8, VEC)
    seen_ptr = seen_addr.to(tl.pointer_type(tl.uint8))
    stochastic = (flags & _K_STOCHASTIC) != 0  # read for bfloat16 params only
    rk0 = tl.where(
        dynamic, _dyn_or(dv, _D_ROUND_K0, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_ROUND_K0).to(tl.uint32)
    )
    rk1 = tl.where(
        dynamic, _dyn_or(dv, _D_ROUND_K1, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_ROUND_K1).to(tl.uint32)
    )
    update = (flags & _K_UPDATE) != 0
    ROWS: tl.constexpr = _ROW_TILE // ROW_COLS

    shrink_now = ((group >= 0) & (tl.load(group_nan_ptr + tl.maximum(group, 0)) != 0)) | ((flags & _K_SHRINK_NOW) != 0)
    if shrink_now:
        # Tiger's NaN guard: momentum untouched, theta <- (theta - centre) * shrink + centre.
        shrink = tl.load(h + _C_SHRINK).to(tl.float32)
        centre = tl.load(h + _C_CENTRE).to(tl.float32)
        for s in range(begin, end, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            inb = offs < end
            theta = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            stored = _store_float(
                p_ptr, offs, inb, (theta - centre) * shrink + centre, PARAM, stochastic, rk0, rk1, False
            )
            acc += tl.where(inb, stored * stored, 0.0)
        if out & (row_len > 0) & ((flags & _K_RMS_ROW) != 0):
            _row_sums(p_ptr, ssq_rows, begin // row_len, end // row_len, row_len, PARAM, ROWS, ROW_COLS)
    else:
        lr64 = _dyn_or(dv, _D_LR, dynamic, tl.load(h + _C_LR))
        if ((flags & _K_RMS_TENSOR) != 0) & update:
            lr64 = tl.load(lr_ptr + t)  # lr * RMS(theta), from _finish_kernel
        wd = tl.load(h + _C_WD)
        c_m = tl.load(h + _C_CM).to(tl.float32)
        c_g = tl.load(h + _C_CG).to(tl.float32)
        m_m = _dyn_or(dv, _D_MM, dynamic, tl.load(h + _C_MM)).to(tl.float32)
        m_g = tl.load(h + _C_MG).to(tl.float32)
        gscale = _dyn_or(dv, _D_GSCALE, dynamic, tl.load(h + _C_GSCALE)).to(tl.float32)
        use_dmask = ((flags & _K_MASK_D) != 0) & (mask_addr != 0)
        mk0 = tl.where(
            dynamic, _dyn_or(dv, _D_MASK_K0, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_MASK_K0).to(tl.uint32)
        )
        mk1 = tl.where(
            dynamic, _dyn_or(dv, _D_MASK_K1, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_MASK_K1).to(tl.uint32)
        )
        mthr = tl.load(iv + _C_MASK_THR).to(tl.uint32)
        by_rows = (row_len > 0) & ((flags & (_K_RMS_ROW | _K_LAZY_ROWS)) != 0)
        if by_rows:
            lazy = (flags & _K_LAZY_ROWS) != 0
            row_rms = ((flags & _K_RMS_ROW) != 0) & update
            # Row sums read from theta: for the row lr, or to hand on where this call keeps theta.
            read_rows = ((flags & _K_RMS_ROW) != 0) & (update | out) & ~carried
            row_out = ((flags & _K_RMS_ROW) != 0) & out
            cols0 = tl.arange(0, ROW_COLS)
            for r0 in range(begin // row_len, end // row_len, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                row_ok = rows < end // row_len
                # First sweep over the rows: any gradient (lazy rows), sum of squares (row RMS).
                present = tl.zeros([ROWS], dtype=tl.int32)
                ssq = tl.zeros([ROWS], dtype=tl.float32)
                for c0 in range(0, row_len, ROW_COLS):
                    cols = c0 + cols0
                    offs = rows[:, None] * row_len + cols[None, :]
                    inb = row_ok[:, None] & (cols < row_len)[None, :]
                    if lazy:
                        g = tl.load(g_ptr + offs, mask=inb, other=0.0)
                        present = tl.maximum(present, tl.max((g != 0).to(tl.int32), axis=1))  # NaN counts
                    if read_rows:
                        x = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                        ssq += tl.sum(x * x, axis=1)
                ssq64 = ssq.to(tl.float64)
                if carried:
                    ssq64 = tl.load(ssq_rows + rows, mask=row_ok, other=0.0)
                live = row_ok
                freeze = rows < 0  # all False
                if lazy:
                    is_present = present != 0
                    live = is_present
                    if seen_addr != 0:
                        was_seen = tl.load(seen_ptr + rows, mask=row_ok, other=0) != 0
                        live = is_present | was_seen
                        # Remembered until the window's update micro-step, which clears it.
                        tl.store(seen_ptr + rows, (live & ~update).to(tl.uint8), mask=row_ok)
                    if (flags & _K_FREEZE_ABSENT) != 0:
                        freeze = ~is_present
                if row_rms:
                    row_lr64 = lr64 * tl.sqrt(ssq64 / row_len.to(tl.float64))
                else:
                    row_lr64 = lr64 + tl.zeros([ROWS], dtype=tl.float64)
                row_lr = row_lr64.to(tl.float32)
                row_decay = (1.0 - row_lr64 * wd).to(tl.float32)
                # Second sweep: the update, with the row's coefficients (and the squares it stores).
                new_ssq = tl.zeros([ROWS], dtype=tl.float32)
                for c0 in range(0, row_len, ROW_COLS):
                    cols = c0 + cols0
                    offs = rows[:, None] * row_len + cols[None, :]
                    inb = row_ok[:, None] & (cols < row_len)[None, :]
                    squares = _update_tile(
                        p_ptr,
                        g_ptr,
                        m_ptr,
                        mask_ptr,
                        offs,
                        inb,
                        live[:, None] & inb,
                        freeze[:, None] & inb,
                        row_lr[:, None],
                        row_decay[:, None],
                        c_m,
                        c_g,
                        m_m,
                        m_g,
                        gscale,
                        flags,
                        use_dmask,
                        mk0,
                        mk1,
                        mthr,
                        stochastic,
                        rk0,
                        rk1,
                        PARAM,
                        MOM,
                        False,
                    )
                    new_ssq += tl.sum(squares, axis=1)
                if row_out:
                    # Written rows: the squares just stored; kept rows: the sums read or carried.
                    kept = tl.where(carried, ssq64, ssq.to(tl.float64))
                    tl.store(ssq_rows + rows, tl.where(update, new_ssq.to(tl.float64), kept), mask=row_ok)
        else:
            lr = lr64.to(tl.float32)
            decay = (1.0 - lr64 * wd).to(tl.float32)
            read_theta = out & ~update & ~carried  # theta stays: hand on its sum
            # Whole tiles first, unmasked (the vector form's 16-byte accesses), then the tail.
            full_end = begin + (end - begin) // BLOCK * BLOCK
            for s in range(begin, full_end, BLOCK):
                acc += _element_tile(
                    p_ptr,
                    g_ptr,
                    m_ptr,
                    mask_ptr,
                    _tile_offsets(s, BLOCK, VEC),
                    end,
                    lr,
                    decay,
                    c_m,
                    c_g,
                    m_m,
                    m_g,
                    gscale,
                    flags,
                    use_dmask,
                    mk0,
                    mk1,
                    mthr,
                    stochastic,
                    rk0,
                    rk1,
                    read_theta,
                    PARAM,
                    MOM,
                    True,
                )
            if full_end < end:
                offs = _tile_offsets(full_end, BLOCK, VEC)
                acc += _element_tile(
                    p_ptr,
                    g_ptr,
                    m_ptr,
                    mask_ptr,
                    offs,
                    offs < end,
                    lr,
                    decay,
                    c_m,
                    c_g,
                    m_m,
                    m_g,
                    gscale,
                    flags,
                    use_dmask,
                    mk0,
                    mk1,
                    mthr,
                    stochastic,
                    rk0,
                    rk1,
                    read_theta,
                    PARAM,
                    MOM,
                    False,
                )
    tl.store(part_ptr + it, tl.sum(acc, axis=0))
