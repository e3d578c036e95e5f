"""Sign optimizers, Triton side: the reductions around the step (Tiger's sums and NaN flags).

``_prepass_kernel`` sums theta's squares (the whole-tensor RMS, when not carried) and looks for a
non-finite gradient (the NaN guard), one partial per work item; ``_finish_kernel`` adds each
tensor's partials in item order (deterministic: no float atomics) into lr * RMS(theta) and raises
its guard group's flag; ``_ssq_out_kernel`` adds the step kernel's partial sums of the stored
theta into the tensor's carried sum (one-pass Tiger); ``_row_sums`` recomputes per-row sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sign_optim_layout import (
    _A_GRAD,
    _A_PARAM,
    _A_SSQ,
    _C_FLAGS,
    _C_LR,
    _C_NAN_GROUP,
    _D_LR,
    _K_DYNAMIC,
    _K_RMS_CARRIED,
    _K_RMS_TENSOR,
    _K_SHRINK_NOW,
    _K_UPDATE,
    _NA,
    _ND,
    _NF,
    _NI,
    _float_ptr,
    _tile_offsets,
)
from .sign_optim_tiles import _dyn_or, _load


@triton.jit
def _prepass_tile(p_ptr, g_ptr, offs, inb, rms, guard, acc, found, FULL: tl.constexpr):
    if rms:
        x = _load(p_ptr, offs, inb, FULL).to(tl.float32)
        acc += x * x
    if guard:
        g = _load(g_ptr, offs, inb, FULL).to(tl.float32)
        # NaN or +-inf: the exponent all ones (on the bits, as non_finite() in C++)
        found = tl.maximum(found, ((g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000).to(tl.int32))
    return acc, found


@triton.jit
def _prepass_kernel(
    items_ptr, addr_ptr, ints_ptr, ssq_ptr, nan_ptr, PARAM: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr
):
    """Per work item: sum of squares of theta (RMS_TENSOR and UPDATE, unless the sum is carried),
    any NaN/inf in the grad. Full tiles unmasked (vector accesses with VEC > 1), then the tail."""
    it = tl.program_id(0).to(tl.int64)
    t = tl.load(items_ptr + 3 * it)
    begin = tl.load(items_ptr + 3 * it + 1)
    end = tl.load(items_ptr + 3 * it + 2)
    flags = tl.load(ints_ptr + t * _NI + _C_FLAGS)
    rms = ((flags & _K_RMS_TENSOR) != 0) & ((flags & _K_UPDATE) != 0) & ((flags & _K_RMS_CARRIED) == 0)
    guard = tl.load(ints_ptr + t * _NI + _C_NAN_GROUP) >= 0
    p_ptr = _float_ptr(tl.load(addr_ptr + t * _NA + _A_PARAM), PARAM, VEC)
    g_ptr = _float_ptr(tl.load(addr_ptr + t * _NA + _A_GRAD), PARAM, VEC)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    full_end = begin + (end - begin) // BLOCK * BLOCK
    for s in range(begin, full_end, BLOCK):
        acc, found = _prepass_tile(p_ptr, g_ptr, _tile_offsets(s, BLOCK, VEC), end, rms, guard, acc, found, True)
    if full_end < end:
        offs = _tile_offsets(full_end, BLOCK, VEC)
        acc, found = _prepass_tile(p_ptr, g_ptr, offs, offs < end, rms, guard, acc, found, False)
    tl.store(ssq_ptr + it, tl.sum(acc, axis=0))
    tl.store(nan_ptr + it, tl.max(found, axis=0))


@triton.jit
def _finish_kernel(
    fin_ptr, addr_ptr, hyper_ptr, ints_ptr, dyn_ptr, ssq_ptr, nan_ptr, lr_ptr, group_nan_ptr, BLOCK: tl.constexpr
):
    """Per tensor: lr * RMS(theta) from its items' partial sums (fixed order) or from the sum
    carried from the previous step (RMS_CARRIED), and its NaN flag into its guard group."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(fin_ptr + 4 * i)
    first = tl.load(fin_ptr + 4 * i + 1)
    count = tl.load(fin_ptr + 4 * i + 2)
    numel = tl.load(fin_ptr + 4 * i + 3)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(first, first + count, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        inb = offs < first + count
        acc += tl.load(ssq_ptr + offs, mask=inb, other=0.0).to(tl.float64)
        found = tl.maximum(found, tl.load(nan_ptr + offs, mask=inb, other=0))
    flags = tl.load(ints_ptr + t * _NI + _C_FLAGS)
    dynamic = (flags & _K_DYNAMIC) != 0
    lr = _dyn_or(dyn_ptr + t * _ND, _D_LR, dynamic, tl.load(hyper_ptr + t * _NF + _C_LR))
    total = tl.sum(acc, axis=0)
    if (flags & _K_RMS_CARRIED) != 0:
        total = tl.load(tl.load(addr_ptr + t * _NA + _A_SSQ).to(tl.pointer_type(tl.float64)))
    tl.store(lr_ptr + t, lr * tl.sqrt(total / numel.to(tl.float64)))
    group = tl.load(ints_ptr + t * _NI + _C_NAN_GROUP)
    if (group >= 0) & (tl.max(found, axis=0) != 0):
        tl.atomic_max(group_nan_ptr + group, 1)


@triton.jit
def _row_sums(
    p_ptr, ssq_rows, row_begin, row_end, row_len, PARAM: tl.constexpr, ROWS: tl.constexpr, ROW_COLS: tl.constexpr
):
    """Per-row sums of squares of theta over rows [row_begin, row_end), into ``ssq_rows`` (float64),
    in the order of the step kernel's first sweep."""
    cols0 = tl.arange(0, ROW_COLS)
    for r0 in range(row_begin, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        ssq = tl.zeros([ROWS], dtype=tl.float32)
        for c0 in range(0, row_len, ROW_COLS):
            cols = c0 + cols0
            offs = rows[:, None] * row_len + cols[None, :]
            inb = row_ok[:, None] & (cols < row_len)[None, :]
            x = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            ssq += tl.sum(x * x, axis=1)
        tl.store(ssq_rows + rows, ssq.to(tl.float64), mask=row_ok)


@triton.jit
def _ssq_out_kernel(fin_ptr, addr_ptr, ints_ptr, group_nan_ptr, part_ptr, BLOCK: tl.constexpr):
    """Per whole-tensor SSQ_OUT tensor: its items' sums (in item order, as _finish_kernel adds the
    pre-pass sums) into its ssq; left alone where theta was kept and the sum was carried."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.load(fin_ptr + 4 * i)
    first = tl.load(fin_ptr + 4 * i + 1)
    count = tl.load(fin_ptr + 4 * i + 2)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for s in range(first, first + count, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < first + count, other=0.0).to(tl.float64)
    flags = tl.load(ints_ptr + t * _NI + _C_FLAGS)
    group = tl.load(ints_ptr + t * _NI + _C_NAN_GROUP)
    shrunk = ((group >= 0) & (tl.load(group_nan_ptr + tl.maximum(group, 0)) != 0)) | ((flags & _K_SHRINK_NOW) != 0)
    written = shrunk | ((flags & _K_UPDATE) != 0)
    if written | ((flags & _K_RMS_CARRIED) == 0):
        tl.store(tl.load(addr_ptr + t * _NA + _A_SSQ).to(tl.pointer_type(tl.float64)), tl.sum(acc, axis=0))
