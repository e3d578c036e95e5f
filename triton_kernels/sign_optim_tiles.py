"""Sign optimizers, Triton side: the element arithmetic of one tile (sign_optim.h in C++).

The random bits (ChildTuning-F masks, stochastic rounding), the store in the storage dtype, the
update of one tile of momentum and theta (and its element-wise form, with the squares of theta as
the tile leaves it), and the choice between a host-table and a dynamic-table (capturable mode) value.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sign_optim_layout import (
    _K_MASK_F,
    _K_MASK_UPDATE,
    _K_NEW_MOMENTUM,
    _K_UPDATE,
)


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
def _load(ptr, offs, inb, FULL: tl.constexpr):
    """The tile's values as stored (0 where out of bounds). A FULL tile lies inside its item and
    is loaded without a mask: a mask whose value may change every element would keep the
    compiler from vectorizing, however aligned the pointer."""
    if FULL:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=inb, other=0)
    return x


@triton.jit
def _store(ptr, offs, inb, x, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, x)
    else:
        tl.store(ptr + offs, x, mask=inb)


@triton.jit
def _store_float(ptr, offs, inb, x, CODE: tl.constexpr, stochastic, k0, k1, FULL: tl.constexpr):
    """Store float32 ``x`` in the storage type: round to nearest even, or (bfloat16 with
    ``stochastic``) add 16 random bits below the kept mantissa and truncate. Returns the stored
    values as float32 (what a later load would give: the carried sums of squares are of these)."""
    if CODE == 0:
        _store(ptr, offs, inb, x, FULL)
        stored = x
    elif CODE == 1:
        # On the bits, as float_to_bf16_bits() in C++ (the interpreter's own cast truncates).
        u = x.to(tl.uint32, bitcast=True)
        bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(x != x, (u >> 16) | 0x40, bits)  # NaN stays a quiet NaN
        if stochastic:
            noise = _element_bits(k0, k1, offs) & 0xFFFF
            bits = tl.where((u & 0x7F800000) != 0x7F800000, (u + noise) >> 16, bits)
        _store(ptr, offs, inb, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), FULL)
        stored = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        _store(ptr, offs, inb, x.to(tl.float16), FULL)
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
    FULL: tl.constexpr,
):
    """One tile of the element update (sign_optim.h): momentum always, theta if UPDATE.

    ``inb``: the elements inside the item (all of them, and not read, when FULL); ``live``:
    elements whose row may move; ``freeze``: elements whose momentum stays (absent rows under
    FREEZE_ABSENT); ``lr``/``decay``: scalars or per-row columns. Returns the squares of the
    stored theta (zeros where theta is not written: the caller knows).
    """
    g = _load(g_ptr, offs, inb, FULL).to(tl.float32)
    m = _load(m_ptr, offs, inb, FULL).to(tl.float32)
    gated = ((flags & _K_MASK_F) != 0) | use_dmask
    if (flags & _K_MASK_F) != 0:
        keep = (_element_bits(mk0, mk1, offs) >> 8) < mthr
    elif use_dmask:
        keep = _load(mask_ptr, offs, inb, FULL) != 0
    elif FULL:
        keep = offs >= 0  # all
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
        theta = _load(p_ptr, offs, inb, FULL).to(tl.float32)
        stepped = theta * decay - lr * s
        movable = live & (keep | ~(gated & ((flags & _K_MASK_UPDATE) != 0)))  # masked ones stay
        theta = tl.where(movable, stepped, theta)
        stored = _store_float(p_ptr, offs, inb, theta, PARAM, stochastic, rk0, rk1, FULL)
        if FULL:
            squares = stored * stored
        else:
            squares = tl.where(inb, stored * stored, 0.0)
    m_new = tl.where(freeze, m, m_new)
    _store_float(m_ptr, offs, inb, m_new, MOM, False, 0, 0, FULL)
    return squares


@triton.jit
def _dyn_or(dyn_row, slot, dynamic, static):
    """A dynamic-table value where the row is DYNAMIC, else the host table's ``static``."""
    return tl.where(dynamic, tl.load(dyn_row + slot, mask=dynamic, other=0.0), static)


@triton.jit
def _element_tile(
    p_ptr,
    g_ptr,
    m_ptr,
    mask_ptr,
    offs,
    inb,
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
    PARAM: tl.constexpr,
    MOM: tl.constexpr,
    FULL: tl.constexpr,
):
    """One tile of the element-wise sweep; the squares of theta as it leaves the tile (read back
    where this call keeps theta and must hand its sum on: ``read_theta``)."""
    if FULL:
        live = offs >= 0  # every element (``inb`` is not a mask then)
    else:
        live = inb
    squares = _update_tile(
        p_ptr,
        g_ptr,
        m_ptr,
        mask_ptr,
        offs,
        inb,
        live,
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
        FULL,
    )
    if read_theta:
        x = _load(p_ptr, offs, inb, FULL).to(tl.float32)
        squares = x * x
    return squares
