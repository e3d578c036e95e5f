"""Tile-level building blocks shared by the GlobalPointer Triton kernels
(:mod:`global_pointer_loss_kernels`, :mod:`global_pointer_score_kernels`): token and span masks,
the positives of a tile read from CSR rows, and the loss's dL/ds tile (row loads and stores, with
their RoPE, are in :mod:`global_pointer_rope`).

Every program owns a block of rows (or columns) of one (batch, head) and walks the other axis in
tiles. State that belongs to one (batch, type) and one row or column (the online log-sum-exp of
the loss, the bias gradients) lives in small ``(B, T, L, ...)`` fp32 buffers that the program owns
(read-modify-write through :func:`add_owned`, no atomics): the type loop sits inside the tile loop,
so that state cannot stay in registers for a runtime T.

Positives come as CSR over the rows (b, t, i): ``row_ptr (B*T*L + 1,)``, ``cols (N,)``; a tile's
label mask is built by comparing the columns of its rows' positives with the tile's columns.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The kernels' integers that are 1 in ordinary use: one head (H = 1, Efficient GlobalPointer's
# shared q/k), one type (T = 1), tril (TRIL = 1, the default) or a one-token sequence (L = 1).
# Triton's JIT compiles an integer equal to 1 as a constant, code the static check
# (tests/gpu_compile.py, which compiles them as runtime integers) never saw: with T the constant 1
# nine float32 score-forward and three TF32 row-backward configurations kept 136..152-byte stacks
# (triton 3.9). So the kernels keep them runtime values (``do_not_specialize``); they only steer
# scalar index arithmetic and loop bounds.
RUNTIME_INTS = ("H", "T", "L", "TRIL")


@triton.jit
def batch_head(H):
    """``(b, h, b * H + h)`` of this program (grid axis 1), the divisions in int32: a 64-bit
    division is a ptxas subroutine call, whose frame showed up as a stack in the compiled
    kernels. Offsets then grow from the int64 results."""
    bh = tl.program_id(1)
    return (bh // H).to(tl.int64), bh % H, bh.to(tl.int64)


@triton.jit
def token_ok(mask_ptr, b, L, pos):
    """(in range, real token) for positions ``pos`` of batch element b."""
    pos_in = pos < L
    return pos_in, pos_in & (tl.load(mask_ptr + b * L + pos, mask=pos_in, other=0) != 0)


@triton.jit
def candidates(i, j, row_ok, col_ok, TRIL):
    """Whether each span (i, j) of the tile is a candidate (both tokens real; i <= j with tril)."""
    first = tl.where(TRIL != 0, i, 0)  # the first candidate column of each row
    return row_ok[:, None] & col_ok[None, :] & (j[None, :] >= first[:, None])


@triton.jit
def tile_dots(qr, kr, valid, DOT_PREC: tl.constexpr):
    """``Q K^T`` of a tile, once for all the types of its head: 0 on the non-candidates (which
    every caller masks again). The select is what keeps it once: left as a plain dot, whose one
    use is the type loop's ``dots + bias``, Triton's combine pass folds that add into the dot's
    accumulator, which moves the dot into the type loop and recomputes it for every type."""
    return tl.where(valid, tl.dot(qr, tl.trans(kr), input_precision=DOT_PREC), 0.0)


@triton.jit
def labels_tile(row_ptr, cols_ptr, bt, L, i, j, row_in):
    """The tile's positives of (b, t) = bt from the CSR rows: True at (i, j) if j is a positive
    end of row i. Loops over the most positives any row of the block has (usually 0 or 1)."""
    r = bt * L + i
    lo = tl.load(row_ptr + r, mask=row_in, other=0)
    hi = tl.load(row_ptr + r + 1, mask=row_in, other=0)
    y = (i[:, None] < 0) & (j[None, :] < 0)
    for p in range(0, tl.max(hi - lo, axis=0)):
        col = tl.load(cols_ptr + lo + p, mask=lo + p < hi, other=-1)
        y = y | (col[:, None] == j[None, :])
    return y


@triton.jit
def bias(ptr, bt, L, pos, pos_ok):
    return tl.load(ptr + bt * L + pos, mask=pos_ok, other=0.0).to(tl.float32)


@triton.jit
def add_owned(ptr, pos, pos_in, value):
    """``ptr[pos] += value`` on entries this program alone owns (no atomics needed)."""
    tl.store(ptr + pos, tl.load(ptr + pos, mask=pos_in, other=0.0) + value, mask=pos_in)


@triton.jit
def grad_tile(s, valid, y, g, ln, lp):
    """dL/ds on a tile with one exp per score: g e^{s - lse_neg} at negatives, -g e^{-s - lse_pos}
    at positives, 0 at non-candidates."""
    e = g * tl.exp(tl.where(y, -s - lp, s - ln))
    return tl.where(valid, tl.where(y, -e, e), 0.0)
