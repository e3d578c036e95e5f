"""RoPE inside the GlobalPointer Triton kernels: the q/k tiles are rotated as they are loaded
(:func:`load_rotated`) and the dq/dk tiles rotated back as they are stored (:func:`store_unrotated`),
so the launcher neither rotates nor rounds the rows in an eager pass.

The rotation acts on channel pairs: (2p, 2p+1) for the interleaved layout (``ROPE == 1``),
(p, p + d/2) for rotate-half (``ROPE == 2``; the launcher pads each half to ``WIDTH / 2`` channels
when d < WIDTH, so the pair of p is always p + WIDTH / 2). A rotated tile is handed to the dots in
*pair order* (a_0, b_0, a_1, b_1, ...): q and k are permuted alike, so ``Q K^T`` is unchanged, and
the gradient tiles come back in the same order. The angles ``pos * base^(-2p/d)`` are read from a
float32 table of cos and sin per position that the launcher computes in float64 (and caches for a
power-of-two number of positions): ``(positions, 2, WIDTH/2)``, one entry per pair, for
rotate-half; ``(positions, 2, WIDTH)``, one entry per channel, for the interleaved layout (pair p's
cos on channels 2p and 2p+1, its sin negated on 2p and as is on 2p+1), so that the interleaved
layout rotates whole rows, ``x cos + swap(x) sin``, with every load a vector load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _angles(rope_ptr, pos, pos_ok, HALF: tl.constexpr):
    p = tl.arange(0, HALF)
    at = rope_ptr + pos[:, None] * (2 * HALF) + p[None, :]
    cos = tl.load(at, mask=pos_ok[:, None], other=0.0)
    sin = tl.load(at + HALF, mask=pos_ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def _channel_angles(rope_ptr, pos, pos_ok, WIDTH: tl.constexpr):
    """The interleaved layout's ``(M, WIDTH)`` cos and signed sin per channel."""
    c = tl.arange(0, WIDTH)
    at = rope_ptr + pos[:, None] * (2 * WIDTH) + c[None, :]
    cos = tl.load(at, mask=pos_ok[:, None], other=0.0)
    sin = tl.load(at + WIDTH, mask=pos_ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def _swap_pairs(x):
    """``x[:, c ^ 1]`` of an ``(M, WIDTH)`` tile, in registers (each thread holds whole pairs)."""
    M: tl.constexpr = x.shape[0]
    WIDTH: tl.constexpr = x.shape[1]
    even, odd = tl.split(tl.reshape(x, (M, WIDTH // 2, 2)))
    return tl.reshape(tl.join(odd, even), (M, WIDTH))


@triton.jit
def load_rotated(ptr, base, pos, pos_ok, rope_ptr, scale, WIDTH: tl.constexpr, ROPE: tl.constexpr):
    """``scale * R x`` for the rows ``pos`` of one head (``(M, WIDTH)`` rows of stride WIDTH,
    zero-padded by the launcher), 0 where ``pos_ok`` is False (a padded token's row is never read,
    so NaN there cannot reach a real span), rounded to ptr's dtype for the dots. With RoPE the
    channels come in pair order (see the module docstring)."""
    M: tl.constexpr = pos.shape[0]
    HALF: tl.constexpr = WIDTH // 2
    rows = ptr + base + pos[:, None] * WIDTH
    if ROPE == 0:
        c = tl.arange(0, WIDTH)
        x = tl.load(rows + c[None, :], mask=pos_ok[:, None], other=0.0).to(tl.float32)
        return (x * scale).to(ptr.dtype.element_ty)
    if ROPE == 1:
        # pair order is the natural order here. The row is read once, in vector loads; each
        # channel's neighbour c ^ 1 comes from swapping the pairs in registers (each thread holds
        # whole pairs). The rotation stays in the full-width form: rotating the split halves and
        # joining them kept a 72-240 byte stack with fp32 IEEE dots on 128-channel tiles.
        c = tl.arange(0, WIDTH)
        x = tl.load(rows + c[None, :], mask=pos_ok[:, None], other=0.0).to(tl.float32)
        cos, sin = _channel_angles(rope_ptr, pos, pos_ok, WIDTH)
        return ((x * cos + _swap_pairs(x) * sin) * scale).to(ptr.dtype.element_ty)
    # rotate-half: the halves load as two vectorized tiles, joined into pair order
    p = tl.arange(0, HALF)
    a = tl.load(rows + p[None, :], mask=pos_ok[:, None], other=0.0).to(tl.float32)
    b = tl.load(rows + HALF + p[None, :], mask=pos_ok[:, None], other=0.0).to(tl.float32)
    cos, sin = _angles(rope_ptr, pos, pos_ok, HALF)
    ra = (a * cos - b * sin) * scale
    rb = (b * cos + a * sin) * scale
    return tl.reshape(tl.join(ra, rb), (M, WIDTH)).to(ptr.dtype.element_ty)


@triton.jit
def store_unrotated(ptr, base, pos, pos_in, rope_ptr, scale, value, WIDTH: tl.constexpr, ROPE: tl.constexpr):
    """Rows ``pos`` of ``ptr`` = ``scale * R^T value``: the gradient wrt the un-rotated rows of a
    gradient tile ``value (M, WIDTH)`` computed against rotated rows (in pair order with RoPE)."""
    M: tl.constexpr = pos.shape[0]
    HALF: tl.constexpr = WIDTH // 2
    rows = ptr + base + pos[:, None] * WIDTH
    if ROPE == 0:
        c = tl.arange(0, WIDTH)
        tl.store(rows + c[None, :], (value * scale).to(ptr.dtype.element_ty), mask=pos_in[:, None])
    elif ROPE == 1:  # R^T: the same rotation with the sines negated
        c = tl.arange(0, WIDTH)
        cos, sin = _channel_angles(rope_ptr, pos, pos_in, WIDTH)
        out = (value * cos - _swap_pairs(value) * sin) * scale
        tl.store(rows + c[None, :], out.to(ptr.dtype.element_ty), mask=pos_in[:, None])
    else:
        ga, gb = tl.split(tl.reshape(value, (M, HALF, 2)))
        cos, sin = _angles(rope_ptr, pos, pos_in, HALF)
        da = (ga * cos + gb * sin) * scale
        db = (gb * cos - ga * sin) * scale
        p = tl.arange(0, HALF)
        tl.store(rows + p[None, :], da.to(ptr.dtype.element_ty), mask=pos_in[:, None])
        tl.store(rows + HALF + p[None, :], db.to(ptr.dtype.element_ty), mask=pos_in[:, None])
