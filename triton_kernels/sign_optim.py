"""Lion / Tiger: the fused multi-tensor step in Triton (CUDA tensors; CPU tensors in the interpreter).

The contract is the one of ``kexue::sign_optim_step`` (python/kexue/ops/sign_optim.py): lists of
params, grads, momenta, optional ChildTuning-D masks and per-row "seen" flags, and a per-tensor
table of coefficients and flags (csrc/include/kexue/sign_optim.h). Every tensor of a call is
served by one launch per (param dtype, momentum dtype), not one per tensor: the kernels read the
tensors' addresses from a table, as ATen's multi_tensor_apply does, and each program takes one
work item of at most ``CHUNK`` elements (whole rows for tensors updated row by row).

Up to three launches, because two reductions must finish before the update that reads them:

1. ``_prepass_kernel`` (only if a tensor needs it): per work item, the sum of squares of theta
   (Tiger's whole-tensor RMS) and whether the gradient holds a NaN or inf (Tiger's guard);
2. ``_finish_kernel``: per tensor, adds its items' partial sums in a fixed order (so that two runs
   give identical bits: no float atomics) into the effective learning rate, and raises the NaN
   flag of the tensor's guard group (an integer atomic max, which is order-independent);
3. ``_step_kernel``: the update. Per-row quantities (row RMS, whether a row of an embedding table
   has any gradient) are computed by the program that owns the row, in a first sweep over it,
   right before the row is updated.

Each element is read and written once by the update (param, grad, momentum in; param, momentum
out), plus the pre-pass reads of theta / grad where Tiger asks for them. The arithmetic is in
float32 registers whatever the storage dtype; per-tensor coefficients are formed in float64 and
rounded once, as the C++ kernel does. Never autotune these kernels: they write their inputs.

Capturable mode: rows flagged DYNAMIC read their per-step values (lr, momentum coefficient,
gradient scale, update switch, skip flag, random keys) from the dynamic table ``dyn`` on the
device, so nothing on the host depends on the step; the device copies of the host tables are then
the same at every step and are kept (:func:`_plan`), so a step after the first copies nothing
from the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# The table layout comes from its one definition, kexue/_sign_table.py (loaded by path when this
# module is imported from the source tree without kexue, as tests/gpu_compile.py may).
def _load_table():
    try:
        from kexue import _sign_table
    except ImportError:
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[1] / "python" / "kexue" / "_sign_table.py"
        spec = importlib.util.spec_from_file_location("_kexue_sign_table", path)
        _sign_table = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_sign_table)
    return _sign_table


_T = _load_table()
LR, WD, C_M, C_G, M_M, M_G, GSCALE, SHRINK, CENTRE = (
    _T.LR,
    _T.WD,
    _T.C_M,
    _T.C_G,
    _T.M_M,
    _T.M_G,
    _T.GSCALE,
    _T.SHRINK,
    _T.CENTRE,
)
FLAGS, NAN_GROUP, ROW_LEN, MASK_K0, MASK_K1, MASK_THRESHOLD, ROUND_K0, ROUND_K1 = (
    _T.FLAGS,
    _T.NAN_GROUP,
    _T.ROW_LEN,
    _T.MASK_K0,
    _T.MASK_K1,
    _T.MASK_THRESHOLD,
    _T.ROUND_K0,
    _T.ROUND_K1,
)
NUM_FLOATS, NUM_INTS, NUM_DYN = _T.NUM_FLOATS, _T.NUM_INTS, _T.NUM_DYN
D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP = _T.D_LR, _T.D_M_M, _T.D_GSCALE, _T.D_UPDATE, _T.D_SKIP
D_MASK_K0, D_MASK_K1, D_ROUND_K0, D_ROUND_K1 = _T.D_MASK_K0, _T.D_MASK_K1, _T.D_ROUND_K0, _T.D_ROUND_K1
USE_NEW_MOMENTUM, UPDATE, RMS_TENSOR, RMS_ROW = _T.USE_NEW_MOMENTUM, _T.UPDATE, _T.RMS_TENSOR, _T.RMS_ROW
LAZY_ROWS, FREEZE_ABSENT, MASK_F, MASK_D = _T.LAZY_ROWS, _T.FREEZE_ABSENT, _T.MASK_F, _T.MASK_D
MASK_UPDATE, STOCHASTIC_ROUND, SHRINK_NOW, DYNAMIC = _T.MASK_UPDATE, _T.STOCHASTIC_ROUND, _T.SHRINK_NOW, _T.DYNAMIC
RMS_CARRIED, SSQ_OUT = _T.RMS_CARRIED, _T.SSQ_OUT

# The same flags and columns as constexpr globals, readable inside @triton.jit functions.
_K_NEW_MOMENTUM = tl.constexpr(USE_NEW_MOMENTUM)
_K_UPDATE = tl.constexpr(UPDATE)
_K_RMS_TENSOR = tl.constexpr(RMS_TENSOR)
_K_RMS_ROW = tl.constexpr(RMS_ROW)
_K_LAZY_ROWS = tl.constexpr(LAZY_ROWS)
_K_FREEZE_ABSENT = tl.constexpr(FREEZE_ABSENT)
_K_MASK_F = tl.constexpr(MASK_F)
_K_MASK_D = tl.constexpr(MASK_D)
_K_MASK_UPDATE = tl.constexpr(MASK_UPDATE)
_K_STOCHASTIC = tl.constexpr(STOCHASTIC_ROUND)
_K_SHRINK_NOW = tl.constexpr(SHRINK_NOW)
_K_DYNAMIC = tl.constexpr(DYNAMIC)
_K_RMS_CARRIED = tl.constexpr(RMS_CARRIED)
_K_SSQ_OUT = tl.constexpr(SSQ_OUT)
_NF = tl.constexpr(NUM_FLOATS)
_NI = tl.constexpr(NUM_INTS)
_ND = tl.constexpr(NUM_DYN)
_C_LR, _C_WD, _C_CM, _C_CG = tl.constexpr(LR), tl.constexpr(WD), tl.constexpr(C_M), tl.constexpr(C_G)
_C_MM, _C_MG, _C_GSCALE = tl.constexpr(M_M), tl.constexpr(M_G), tl.constexpr(GSCALE)
_C_SHRINK, _C_CENTRE = tl.constexpr(SHRINK), tl.constexpr(CENTRE)
_C_FLAGS, _C_NAN_GROUP, _C_ROW_LEN = tl.constexpr(FLAGS), tl.constexpr(NAN_GROUP), tl.constexpr(ROW_LEN)
_C_MASK_K0, _C_MASK_K1, _C_MASK_THR = tl.constexpr(MASK_K0), tl.constexpr(MASK_K1), tl.constexpr(MASK_THRESHOLD)
_C_ROUND_K0, _C_ROUND_K1 = tl.constexpr(ROUND_K0), tl.constexpr(ROUND_K1)
_D_LR, _D_MM, _D_GSCALE, _D_UPDATE, _D_SKIP = (tl.constexpr(c) for c in (D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP))
_D_MASK_K0, _D_MASK_K1 = tl.constexpr(D_MASK_K0), tl.constexpr(D_MASK_K1)
_D_ROUND_K0, _D_ROUND_K1 = tl.constexpr(D_ROUND_K0), tl.constexpr(D_ROUND_K1)

# Columns of the address table (the launcher's own, not part of the op's contract).
A_PARAM, A_GRAD, A_MOM, A_MASK, A_SEEN, A_SSQ = range(6)
NUM_ADDRS = 6
_A_PARAM, _A_GRAD, _A_MOM, _A_MASK, _A_SEEN, _A_SSQ = (
    tl.constexpr(c) for c in (A_PARAM, A_GRAD, A_MOM, A_MASK, A_SEEN, A_SSQ)
)
_NA = tl.constexpr(NUM_ADDRS)

CHUNK = 65536  # elements per work item (as ATen's multi_tensor_apply)
BLOCK = 512  # elements per tile of the element-wise sweeps
ROW_COLS = 128  # columns per tile of the row-wise sweeps (rows of any length: looped)
NUM_WARPS = 8

# Storage codes of the constexpr dtype arguments.
_F32, _BF16, _F16 = 0, 1, 2
_CODES = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}
_TL_NAMES = {_F32: "fp32", _BF16: "bf16", _F16: "fp16"}


# ---------------------------------------------------------------------------------------------
# Element pieces.


@triton.jit
def _float_ptr(addr, CODE: tl.constexpr):
    """An int64 address as a pointer to the storage type ``CODE``."""
    if CODE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float16))
    return ptr


@triton.jit
def _mix32(x):
    """The "lowbias32" integer hash of sign_optim.h, on uint32 (multiplication wraps mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _element_bits(k0, k1, index):
    """32 random bits per element index (int64), the same function as element_bits() in C++."""
    index = index.to(tl.int64)
    lo = index.to(tl.uint32)  # truncation: the low word
    hi = (index >> 32).to(tl.uint32)
    return _mix32(_mix32(lo ^ k0) ^ hi ^ k1)


@triton.jit
def _store_float(ptr, offs, inb, x, CODE: tl.constexpr, stochastic, k0, k1):
    """Store float32 ``x`` in the storage type: round to nearest even, or (bfloat16 with
    ``stochastic``) add 16 random bits below the kept mantissa and truncate. Returns the stored
    values as float32 (what a later load would give: the carried sums of squares are of these)."""
    if CODE == 0:
        tl.store(ptr + offs, x, mask=inb)
        stored = x
    elif CODE == 1:
        # On the bits, as float_to_bf16_bits() in C++ (the interpreter's own cast truncates).
        u = x.to(tl.uint32, bitcast=True)
        bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(x != x, (u >> 16) | 0x40, bits)  # NaN stays a quiet NaN
        if stochastic:
            noise = _element_bits(k0, k1, offs) & 0xFFFF
            bits = tl.where((u & 0x7F800000) != 0x7F800000, (u + noise) >> 16, bits)
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inb)
        stored = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        tl.store(ptr + offs, x.to(tl.float16), mask=inb)
        stored = x.to(tl.float16).to(tl.float32)
    return stored


@triton.jit
def _update_tile(
    p_ptr,
    g_ptr,
    m_ptr,
    mask_ptr,
    offs,
    inb,
    live,
    freeze,
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
    PARAM: tl.constexpr,
    MOM: tl.constexpr,
):
    """One tile of the element update (sign_optim.h): momentum always, theta if UPDATE.

    ``live``: elements whose row may move; ``freeze``: elements whose momentum stays (absent rows
    under FREEZE_ABSENT); ``lr``/``decay``: scalars or per-row columns. Returns the squares of the
    stored theta (zeros where theta is not written: the caller knows).
    """
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    gated = ((flags & _K_MASK_F) != 0) | use_dmask
    if (flags & _K_MASK_F) != 0:
        keep = (_element_bits(mk0, mk1, offs) >> 8) < mthr
    elif use_dmask:
        keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    else:
        keep = inb
    g = tl.where(keep, g * gscale, 0.0)
    m_new = m_m * m + m_g * g
    squares = tl.zeros_like(g)
    if (flags & _K_UPDATE) != 0:
        if (flags & _K_NEW_MOMENTUM) != 0:  # Tiger: the new momentum
            c = m_new
        else:  # Lion: interpolate the OLD momentum with the gradient
            c = c_m * m + c_g * g
        s = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c))  # sign(0) = 0, NaN stays NaN
        theta = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        stepped = theta * decay - lr * s
        movable = live & (keep | ~(gated & ((flags & _K_MASK_UPDATE) != 0)))  # masked ones stay
        theta = tl.where(movable, stepped, theta)
        stored = _store_float(p_ptr, offs, inb, theta, PARAM, stochastic, rk0, rk1)
        squares = tl.where(inb, stored * stored, 0.0)
    m_new = tl.where(freeze, m, m_new)
    _store_float(m_ptr, offs, inb, m_new, MOM, False, 0, 0)
    return squares


# ---------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _prepass_kernel(items_ptr, addr_ptr, ints_ptr, ssq_ptr, nan_ptr, PARAM: tl.constexpr, BLOCK: tl.constexpr):
    """Per work item: sum of squares of theta (RMS_TENSOR and UPDATE, unless the sum is carried),
    any NaN/inf in the grad."""
    it = tl.program_id(0).to(tl.int64)
    t = tl.load(items_ptr + 3 * it)
    begin = tl.load(items_ptr + 3 * it + 1)
    end = tl.load(items_ptr + 3 * it + 2)
    flags = tl.load(ints_ptr + t * _NI + _C_FLAGS)
    rms = ((flags & _K_RMS_TENSOR) != 0) & ((flags & _K_UPDATE) != 0) & ((flags & _K_RMS_CARRIED) == 0)
    guard = tl.load(ints_ptr + t * _NI + _C_NAN_GROUP) >= 0
    p_ptr = _float_ptr(tl.load(addr_ptr + t * _NA + _A_PARAM), PARAM)
    g_ptr = _float_ptr(tl.load(addr_ptr + t * _NA + _A_GRAD), PARAM)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(begin, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        inb = offs < end
        if rms:
            x = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            acc += x * x
        if guard:
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            # NaN or +-inf: the exponent all ones (on the bits, as non_finite() in C++)
            found = tl.maximum(found, ((g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000).to(tl.int32))
    tl.store(ssq_ptr + it, tl.sum(acc, axis=0))
    tl.store(nan_ptr + it, tl.max(found, axis=0))


@triton.jit
def _dyn_or(dyn_row, slot, dynamic, static):
    """A dynamic-table value where the row is DYNAMIC, else the host table's ``static``."""
    return tl.where(dynamic, tl.load(dyn_row + slot, mask=dynamic, other=0.0), static)


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
):
    """The update of one work item: NaN-guard shrink, row by row, or element by element.

    SSQ_OUT: the sum of squares of theta as this item leaves it goes to ``part_ptr[item]`` (a
    whole-tensor sum, finished by _ssq_out_kernel), or per row straight into the tensor's ssq.
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
    p_ptr = _float_ptr(tl.load(av + _A_PARAM), PARAM)
    g_ptr = _float_ptr(tl.load(av + _A_GRAD), PARAM)
    m_ptr = _float_ptr(tl.load(av + _A_MOM), MOM)
    mask_addr = tl.load(av + _A_MASK)
    seen_addr = tl.load(av + _A_SEEN)
    ssq_rows = tl.load(av + _A_SSQ).to(tl.pointer_type(tl.float64))
    out = (flags & _K_SSQ_OUT) != 0
    carried = (flags & _K_RMS_CARRIED) != 0
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # whole-tensor sum of squares of theta as left
    mask_ptr = mask_addr.to(tl.pointer_type(tl.int8))
    seen_ptr = seen_addr.to(tl.pointer_type(tl.uint8))
    stochastic = (flags & _K_STOCHASTIC) != 0  # read for bfloat16 params only
    rk0 = tl.where(
        dynamic, _dyn_or(dv, _D_ROUND_K0, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_ROUND_K0).to(tl.uint32)
    )
    rk1 = tl.where(
        dynamic, _dyn_or(dv, _D_ROUND_K1, dynamic, 0.0).to(tl.uint32), tl.load(iv + _C_ROUND_K1).to(tl.uint32)
    )
    update = (flags & _K_UPDATE) != 0
    ROWS: tl.constexpr = BLOCK // ROW_COLS

    shrink_now = ((group >= 0) & (tl.load(group_nan_ptr + tl.maximum(group, 0)) != 0)) | ((flags & _K_SHRINK_NOW) != 0)
    if shrink_now:
        # Tiger's NaN guard: momentum untouched, theta <- (theta - centre) * shrink + centre.
        shrink = tl.load(h + _C_SHRINK).to(tl.float32)
        centre = tl.load(h + _C_CENTRE).to(tl.float32)
        for s in range(begin, end, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            inb = offs < end
            theta = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            stored = _store_float(p_ptr, offs, inb, (theta - centre) * shrink + centre, PARAM, stochastic, rk0, rk1)
            acc += tl.where(inb, stored * stored, 0.0)
        if out & (row_len > 0) & ((flags & _K_RMS_ROW) != 0):
            _row_sums(p_ptr, ssq_rows, begin // row_len, end // row_len, row_len, PARAM, BLOCK // ROW_COLS, ROW_COLS)
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
            for s in range(begin, end, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                inb = offs < end
                squares = _update_tile(
                    p_ptr,
                    g_ptr,
                    m_ptr,
                    mask_ptr,
                    offs,
                    inb,
                    inb,
                    offs < 0,
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
                    PARAM,
                    MOM,
                )
                if read_theta:
                    x = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                    squares = x * x
                acc += squares
    tl.store(part_ptr + it, tl.sum(acc, axis=0))


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


# ---------------------------------------------------------------------------------------------
# Launcher.


def _items(tensors: list[int], numels: list[int], row_lens: list[int]) -> tuple[list[tuple], list[tuple]]:
    """Work items ``[tensor, begin, end]`` of CHUNK elements (whole rows where ``row_lens[t]``),
    and for each tensor ``(tensor, first item, item count, numel)``."""
    items, spans = [], []
    for t in tensors:
        n, row_len = numels[t], row_lens[t]
        step = max(1, CHUNK // row_len) * row_len if row_len > 0 else CHUNK
        spans.append((t, len(items), -(-n // step), n))
        items.extend((t, b, min(n, b + step)) for b in range(0, n, step))
    return items, spans


def _table(rows: list[tuple], width: int, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, width).to(device)


@dataclass
class _Plan:
    """The device tables of one call: addresses, the host tables, and the launches' work items."""

    addr: torch.Tensor
    hyper: torch.Tensor
    ints: torch.Tensor
    prepass: list[tuple[int, int, torch.Tensor]]  # (param code, first slot, items) per launch
    prepass_slots: int
    spans: torch.Tensor | None  # per tensor: (tensor, first slot, slot count, numel), for _finish_kernel
    steps: list[tuple[int, int, int, torch.Tensor]]  # (param code, momentum code, first slot, items) per launch
    step_slots: int
    outs: torch.Tensor | None  # per whole-tensor SSQ_OUT tensor: its span of step slots, for _ssq_out_kernel


# Plans of capturable calls, by everything a plan depends on. A capturable step's host tables do not
# change from step to step, so after the first step the plan is found here and the call copies
# nothing from the host (a copy from pageable host memory is not allowed in CUDA graph capture).
_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_MAX_PLANS = 16


def _plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints) -> _Plan:
    device = params[0].device
    T = len(params)
    iv = ints.tolist()
    for t, r in enumerate(iv):
        if r[FLAGS] & DYNAMIC and r[FLAGS] & (SSQ_OUT | RMS_CARRIED):
            raise ValueError(
                f"sign_optim_step (triton): tensor {t}: carried sums of squares are not served "
                f"in capturable mode (DYNAMIC rows)"
            )
    numels = [p.numel() for p in params]
    # Row-wise work items only where the kernel goes row by row (as by_rows() in C++).
    row_lens = [r[ROW_LEN] if r[ROW_LEN] > 0 and r[FLAGS] & (RMS_ROW | LAZY_ROWS) else 0 for r in iv]
    addr = torch.tensor(
        [
            [
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                0 if mk is None else mk.data_ptr(),
                s.data_ptr() if s.numel() > 0 else 0,
                q.data_ptr() if q.numel() > 0 else 0,
            ]
            for p, g, m, mk, s, q in zip(params, grads, exp_avgs, masks, row_seen, ssq, strict=True)
        ],
        dtype=torch.int64,
    ).to(device)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for t in range(T):
        if numels[t] > 0:
            buckets[(_CODES[params[t].dtype], _CODES[exp_avgs[t].dtype])].append(t)

    def needs_rms(t: int) -> bool:
        flags = iv[t][FLAGS]
        return bool(flags & RMS_TENSOR and flags & UPDATE)

    def wants_prepass(t: int) -> bool:
        return (needs_rms(t) and not iv[t][FLAGS] & RMS_CARRIED) or iv[t][NAN_GROUP] >= 0

    # One partial sum and NaN flag per pre-pass item, all buckets in one buffer; each bucket writes
    # its slice, then _finish_kernel reads every tensor's span of it (an empty span for a tensor whose
    # sum of squares is carried and that has no NaN guard).
    spans, prepass, total = [], [], 0
    for (pcode, _), ts in buckets.items():
        pre = [t for t in ts if wants_prepass(t)]
        if pre:
            items, bucket_spans = _items(pre, numels, [0] * T)
            spans += [(t, total + first, count, n) for t, first, count, n in bucket_spans]
            prepass.append((pcode, total, _table(items, 3, device)))
            total += len(items)
        spans += [(t, total, 0, numels[t]) for t in ts if needs_rms(t) and not wants_prepass(t)]
    # One partial sum per step item likewise, for the tensors that hand on a whole-tensor sum.
    steps, outs, slots = [], [], 0
    for (pcode, mcode), ts in buckets.items():
        items, bucket_spans = _items(ts, numels, row_lens)
        outs += [
            (t, slots + first, count, n)
            for t, first, count, n in bucket_spans
            if iv[t][FLAGS] & SSQ_OUT and not row_lens[t]
        ]
        steps.append((pcode, mcode, slots, _table(items, 3, device)))
        slots += len(items)
    return _Plan(
        addr,
        hyper.to(device=device, dtype=torch.float64),
        ints.to(device=device, dtype=torch.int64),
        prepass,
        total,
        _table(spans, 4, device) if spans else None,
        steps,
        slots,
        _table(outs, 4, device) if outs else None,
    )


def _cached_plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints) -> _Plan:
    key = (
        params[0].device,
        hyper.numpy().tobytes(),
        ints.numpy().tobytes(),
        tuple(
            (
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                0 if mk is None else mk.data_ptr(),
                s.data_ptr() if s.numel() > 0 else 0,
                q.data_ptr() if q.numel() > 0 else 0,
                p.numel(),
                p.dtype,
                m.dtype,
            )
            for p, g, m, mk, s, q in zip(params, grads, exp_avgs, masks, row_seen, ssq, strict=True)
        ),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints)
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan


def fused_step(
    params,
    grads,
    exp_avgs,
    masks,
    row_seen,
    ssq,
    hyper: torch.Tensor,
    ints: torch.Tensor,
    dyn: torch.Tensor | None = None,
) -> None:
    """``kexue::sign_optim_step`` on the tensors' device: in place on params, momenta, row_seen and
    the carried sums of squares ``ssq``.

    ``dyn``: the dynamic table of capturable mode (on the device), or None.
    """
    T = len(params)
    if T == 0:
        return
    device = params[0].device
    if dyn is None:
        plan = _plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints)
    else:
        plan = _cached_plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints)
    dyn_d = plan.hyper if dyn is None else dyn  # without DYNAMIC rows the kernels never read it
    lr_eff = plan.hyper  # not read unless a pre-pass ran
    group_nan = torch.zeros(T, dtype=torch.int32, device=device)
    if plan.spans is not None:
        partial = torch.empty(max(1, plan.prepass_slots), dtype=torch.float32, device=device)
        nan = torch.empty(max(1, plan.prepass_slots), dtype=torch.int32, device=device)
        for pcode, offset, items in plan.prepass:
            _prepass_kernel[(items.shape[0],)](
                items,
                plan.addr,
                plan.ints,
                partial[offset:],
                nan[offset:],
                PARAM=pcode,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        lr_eff = torch.empty(T, dtype=torch.float64, device=device)
        _finish_kernel[(plan.spans.shape[0],)](
            plan.spans,
            plan.addr,
            plan.hyper,
            plan.ints,
            dyn_d,
            partial,
            nan,
            lr_eff,
            group_nan,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    parts = torch.empty(max(1, plan.step_slots), dtype=torch.float32, device=device)
    for pcode, mcode, offset, items in plan.steps:
        _step_kernel[(items.shape[0],)](
            items,
            plan.addr,
            plan.hyper,
            plan.ints,
            dyn_d,
            lr_eff,
            group_nan,
            parts[offset:],
            PARAM=pcode,
            MOM=mcode,
            BLOCK=BLOCK,
            ROW_COLS=ROW_COLS,
            num_warps=NUM_WARPS,
        )
    if plan.outs is not None:
        _ssq_out_kernel[(plan.outs.shape[0],)](
            plan.outs, plan.addr, plan.ints, group_nan, parts, BLOCK=BLOCK, num_warps=NUM_WARPS
        )


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for tests/gpu_compile.py.


def _aot_configs() -> list[dict]:
    configs = []
    for pcode, pname in _TL_NAMES.items():
        configs.append(
            {
                "kernel": _prepass_kernel,
                "name": f"sign_optim_prepass_{pname}",
                "num_warps": NUM_WARPS,
                "signature": {
                    "items_ptr": "*i64",
                    "addr_ptr": "*i64",
                    "ints_ptr": "*i64",
                    "ssq_ptr": "*fp32",
                    "nan_ptr": "*i32",
                    "PARAM": "constexpr",
                    "BLOCK": "constexpr",
                },
                "constexprs": {"PARAM": pcode, "BLOCK": BLOCK},
            }
        )
        for mcode in (_F32, _BF16):
            configs.append(
                {
                    "kernel": _step_kernel,
                    "name": f"sign_optim_step_{pname}_m{_TL_NAMES[mcode]}",
                    "num_warps": NUM_WARPS,
                    "signature": {
                        "items_ptr": "*i64",
                        "addr_ptr": "*i64",
                        "hyper_ptr": "*fp64",
                        "ints_ptr": "*i64",
                        "dyn_ptr": "*fp64",
                        "lr_ptr": "*fp64",
                        "group_nan_ptr": "*i32",
                        "part_ptr": "*fp32",
                        "PARAM": "constexpr",
                        "MOM": "constexpr",
                        "BLOCK": "constexpr",
                        "ROW_COLS": "constexpr",
                    },
                    "constexprs": {"PARAM": pcode, "MOM": mcode, "BLOCK": BLOCK, "ROW_COLS": ROW_COLS},
                }
            )
    configs.append(
        {
            "kernel": _finish_kernel,
            "name": "sign_optim_finish",
            "num_warps": NUM_WARPS,
            "signature": {
                "fin_ptr": "*i64",
                "addr_ptr": "*i64",
                "hyper_ptr": "*fp64",
                "ints_ptr": "*i64",
                "dyn_ptr": "*fp64",
                "ssq_ptr": "*fp32",
                "nan_ptr": "*i32",
                "lr_ptr": "*fp64",
                "group_nan_ptr": "*i32",
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": BLOCK},
        }
    )
    configs.append(
        {
            "kernel": _ssq_out_kernel,
            "name": "sign_optim_ssq_out",
            "num_warps": NUM_WARPS,
            "signature": {
                "fin_ptr": "*i64",
                "addr_ptr": "*i64",
                "ints_ptr": "*i64",
                "group_nan_ptr": "*i32",
                "part_ptr": "*fp32",
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": BLOCK},
        }
    )
    return configs


AOT_CONFIGS = _aot_configs()
