"""Row arithmetic shared by the entropy normalization kernels (Triton).

Every piece here is one step of csrc/include/kexue/entropy_norm.h and of the float64 oracle
python/kexue/reference/entropy_norm.py, written for a tile of rows: the logits of a tile, the scan
that classifies a row (maximum, ties at it, support, NaN), the classification itself, the moments
of ``exp(gamma * u)``, the safeguarded Newton step, and the numerators of y. The kernels that use
them are in entropy_norm_tile.py (rows in one tile), entropy_norm_stream.py (longer rows, forward)
and entropy_norm_backward.py. Tiles are (BLOCK_M, BLOCK_N); per-row values are (BLOCK_M,).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Row kinds, as in entropy_norm.h (RowKind) and the reference.
NEWTON = tl.constexpr(0)
UNIFORM = tl.constexpr(1)
ARGMAX = tl.constexpr(2)
INVALID = tl.constexpr(3)


@triton.jit
def tile_at(row_base, row_ok, c, n_cols):
    """Offsets and in-bounds mask of the tile at columns ``c`` of the rows starting at ``row_base``."""
    return row_base[:, None] + c[None, :], row_ok[:, None] & (c[None, :] < n_cols)


@triton.jit
def logits_of(x, mask, LOGITS: tl.constexpr):
    """z in float32 of values ``x`` already loaded: x itself, or log x for probabilities; -inf
    outside the row.

    Out-of-row lanes read as -inf, i.e. exactly like masked entries: they drop out of every sum
    through the ``finite`` mask, so no size has to be a multiple of the block. Taking the loaded
    values (not a pointer) lets a kernel that also needs p itself load x once.
    """
    z = x.to(tl.float32)
    if not LOGITS:
        z = tl.log(z)  # p = 0 -> -inf (masked), p < 0 -> NaN (invalid row)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def load_logits(x_ptr, offs, mask, LOGITS: tl.constexpr):
    """z of a tile (see logits_of), loaded from memory."""
    return logits_of(tl.load(x_ptr + offs, mask=mask, other=1.0), mask, LOGITS)


@triton.jit
def count(mask, axis):
    """Counts of a boolean tensor along ``axis`` as int32.

    Summed as float32 (exact: a tile has far fewer than 2**24 lanes) because LLVM turns an integer
    sum of a boolean vector into a popcount of the vector bitcast through a stack slot, which
    shows up as STACK in the sm_90 cubin.
    """
    return tl.sum(tl.where(mask, 1.0, 0.0), axis=axis).to(tl.int32)


@triton.jit
def any_set(mask, axis):
    """Whether any lane of a boolean tensor is set along ``axis``, as int32 (see count for why
    not a reduction over integers)."""
    return tl.max(tl.where(mask, 1.0, 0.0), axis=axis).to(tl.int32)


@triton.jit
def scan_tile(z, m, ties, support, bad):
    """Fold one tile into the running row maximum, the count of entries equal to it, the count of
    finite entries and the NaN flag (so the scan needs one pass, not a second one for ties)."""
    finite = z > float("-inf")  # false for NaN too
    tile_max = tl.max(tl.where(finite, z, float("-inf")), axis=1)
    tile_ties = count(finite & (z == tile_max[:, None]), 1)
    ties = tl.where(tile_max > m, tile_ties, tl.where(tile_max == m, ties + tile_ties, ties))
    m = tl.maximum(m, tile_max)
    support += count(finite, 1)
    # +inf makes z - m NaN (inf - inf), so the reference counts it as a NaN row as well.
    bad = tl.maximum(bad, any_set((z != z) | (z == float("inf")), 1))
    return m, ties, support, bad


@triton.jit
def classify(target, support, ties, bad):
    """classify_row of entropy_norm.h; later assignments win, as in the reference.

    The thresholds are compared in float64, as on every backend, so that a target of exactly
    float32(log n) lands in the same class everywhere (float32 logs differ in the last bit between
    libraries); a NaN target makes the row invalid.
    """
    t = target.to(tl.float64)
    kind = tl.zeros_like(support) + NEWTON
    kind = tl.where(t <= tl.log(ties.to(tl.float64)), ARGMAX, kind)
    kind = tl.where(t >= tl.log(support.to(tl.float64)), UNIFORM, kind)
    kind = tl.where((bad != 0) | (support == 0) | (t != t), INVALID, kind)
    return kind


@triton.jit
def shift(z, m):
    """(u, finite): u = z - m on finite entries, 0 elsewhere, so masked lanes never meet inf."""
    finite = z > float("-inf")
    return tl.where(finite, z - m[:, None], 0.0), finite


@triton.jit
def moments(u, finite, gamma):
    """Row sums of e, e*u, e*u^2 with e = exp(gamma * u) on finite entries (e <= 1 as u <= 0)."""
    e = tl.where(finite, tl.exp(gamma[:, None] * u), 0.0)
    eu = e * u
    return tl.sum(e, axis=1), tl.sum(eu, axis=1), tl.sum(eu * u, axis=1)


@triton.jit
def newton_step(gamma, lo, hi, active, s0, s1, s2, target, tol):
    """newton_step of entropy_norm.h for every row at once; inactive rows keep their state.

    H(gamma) = log s0 - gamma * mean, -dH/dgamma = gamma * Var. A Newton step that leaves the
    bracket (lo, hi) of the root (or is NaN) falls back to doubling while no upper bound is known,
    else to bisection. A step smaller than tol * gamma is taken and ends the row.
    """
    mean = s1 / s0
    entropy = tl.log(s0) - gamma * mean
    variance = tl.maximum(s2 / s0 - mean * mean, 0.0)
    excess = entropy - target  # > 0: too flat, sharpen (larger gamma)
    slope = gamma * variance
    newton = gamma + excess / slope
    small = (slope > 0.0) & (tl.abs(newton - gamma) <= tol * gamma)
    on_target = excess == 0.0
    lo_new = tl.where(excess > 0.0, gamma, lo)
    hi_new = tl.where(excess < 0.0, gamma, hi)
    inside = (slope > 0.0) & (newton > lo_new) & (newton < hi_new)  # false for NaN
    fallback = tl.where(hi_new == float("inf"), 2.0 * gamma, 0.5 * (lo_new + hi_new))
    stepped = tl.where(inside, newton, fallback)
    stepped = tl.where(small, newton, tl.where(on_target, gamma, stepped))
    gamma = tl.where(active, stepped, gamma)
    lo = tl.where(active, lo_new, lo)
    hi = tl.where(active, hi_new, hi)
    active = active & ~small & ~on_target
    return gamma, lo, hi, active


@triton.jit
def numerators(u, finite, g, argmax):
    """exp(g * u) on finite entries; for argmax rows (gamma = inf) the indicator of the maxima,
    written directly rather than as a limit (no 0 * inf)."""
    e = tl.where(finite, tl.exp(g[:, None] * u), 0.0)
    top = tl.where(finite & (u == 0.0), 1.0, 0.0)
    return tl.where(argmax[:, None], top, e)


@triton.jit
def row_outputs(kind, gamma, m, log_s0, gamma_ptr, stats_ptr, rows, row_ok):
    """Store gamma (0 uniform, inf argmax, NaN invalid) and the stats (m, log s0) of each row."""
    invalid = kind == INVALID
    gamma_out = tl.where(kind == UNIFORM, 0.0, gamma)
    gamma_out = tl.where(kind == ARGMAX, float("inf"), gamma_out)
    gamma_out = tl.where(invalid, float("nan"), gamma_out)
    tl.store(gamma_ptr + rows, gamma_out, mask=row_ok)
    tl.store(stats_ptr + 2 * rows, tl.where(invalid, float("nan"), m), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, tl.where(invalid, float("nan"), log_s0), mask=row_ok)
