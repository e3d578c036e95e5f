"""Entropy normalization in Triton: forward (solve gamma, write y) and backward.

Each row z of ``x (R, n)`` (logits, or ``log x`` for probabilities) becomes
``y = softmax(gamma * z)`` with ``gamma >= 0`` solved so that the entropy of y equals the row's
target. The arithmetic follows csrc/include/kexue/entropy_norm.h and the float64 oracle
python/kexue/reference/entropy_norm.py step for step: the same row classification (Newton /
uniform / argmax / invalid), the same safeguarded Newton iteration started at gamma = 1 with all
rows of a program in lock step, the same convergence test, and the same stats
``(m, log sum exp(gamma * (z - m)))`` that let the backward rebuild y in full precision.

One program handles BLOCK_M rows. Two layouts, chosen by a constexpr:

* SINGLE_TILE: the whole row fits one BLOCK_M x BLOCK_N tile. x is read once, the shifted logits
  stay in registers, and every Newton iteration is arithmetic on registers only.
* chunked: rows longer than the largest tile are streamed in chunks of BLOCK_N, once per pass:
  forward = scan (max, ties, support, NaN) + one pass per Newton iteration + normaliser + write;
  backward = means + centred sums + write.

All math runs in float32 whatever the storage dtype. Block sizes come from :func:`forward_tile`
and :func:`backward_tile` (a heuristic on n, not autotuned); ``AOT_CONFIGS`` lists every
configuration the launchers can pick so that tests/gpu_compile.py can compile each one for sm_80
and sm_90 ahead of time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Row kinds, as in entropy_norm.h (RowKind) and the reference.
_NEWTON = tl.constexpr(0)
_UNIFORM = tl.constexpr(1)
_ARGMAX = tl.constexpr(2)
_INVALID = tl.constexpr(3)


# ---------------------------------------------------------------------------------------------
# Pieces shared by both layouts. Every tile is (BLOCK_M, BLOCK_N); per-row values are (BLOCK_M,).


@triton.jit
def _tile_at(row_base, row_ok, c, n_cols):
    """Offsets and in-bounds mask of the tile at columns ``c`` of the rows starting at ``row_base``."""
    return row_base[:, None] + c[None, :], row_ok[:, None] & (c[None, :] < n_cols)


@triton.jit
def _load_logits(x_ptr, offs, mask, LOGITS: tl.constexpr):
    """z of a tile in float32: x itself, or log x for probabilities; -inf outside the row.

    Out-of-row lanes read as -inf, i.e. exactly like masked entries: they drop out of every sum
    through the ``finite`` mask, so no size has to be a multiple of the block.
    """
    z = tl.load(x_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    if not LOGITS:
        z = tl.log(z)  # p = 0 -> -inf (masked), p < 0 -> NaN (invalid row)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _count(mask):
    """Row counts of a boolean tile as int32.

    Summed as float32 (exact: a tile has far fewer than 2**24 lanes) because LLVM turns an integer
    sum of a boolean vector into a popcount of the vector bitcast through a stack slot, which
    shows up as STACK in the sm_90 cubin.
    """
    return tl.sum(tl.where(mask, 1.0, 0.0), axis=1).to(tl.int32)


@triton.jit
def _any(mask, axis):
    """Whether any lane of a boolean tensor is set along ``axis``, as int32 (see _count for why
    not a reduction over integers)."""
    return tl.max(tl.where(mask, 1.0, 0.0), axis=axis).to(tl.int32)


@triton.jit
def _scan_tile(z, m, ties, support, bad):
    """Fold one tile into the running row maximum, the count of entries equal to it, the count of
    finite entries and the NaN flag (so the scan needs one pass, not a second one for ties)."""
    finite = z > float("-inf")  # false for NaN too
    tile_max = tl.max(tl.where(finite, z, float("-inf")), axis=1)
    tile_ties = _count(finite & (z == tile_max[:, None]))
    ties = tl.where(tile_max > m, tile_ties, tl.where(tile_max == m, ties + tile_ties, ties))
    m = tl.maximum(m, tile_max)
    support += _count(finite)
    # +inf makes z - m NaN (inf - inf), so the reference counts it as a NaN row as well.
    bad = tl.maximum(bad, _any((z != z) | (z == float("inf")), 1))
    return m, ties, support, bad


@triton.jit
def _classify(target, support, ties, bad):
    """classify_row of entropy_norm.h; later assignments win, as in the reference.

    The thresholds are compared in float64, as on every backend, so that a target of exactly
    float32(log n) lands in the same class everywhere (float32 logs differ in the last bit between
    libraries); a NaN target makes the row invalid.
    """
    t = target.to(tl.float64)
    kind = tl.zeros_like(support) + _NEWTON
    kind = tl.where(t <= tl.log(ties.to(tl.float64)), _ARGMAX, kind)
    kind = tl.where(t >= tl.log(support.to(tl.float64)), _UNIFORM, kind)
    kind = tl.where((bad != 0) | (support == 0) | (t != t), _INVALID, kind)
    return kind


@triton.jit
def _shift(z, m):
    """(u, finite): u = z - m on finite entries, 0 elsewhere, so masked lanes never meet inf."""
    finite = z > float("-inf")
    return tl.where(finite, z - m[:, None], 0.0), finite


@triton.jit
def _moments(u, finite, gamma):
    """Row sums of e, e*u, e*u^2 with e = exp(gamma * u) on finite entries (e <= 1 as u <= 0)."""
    e = tl.where(finite, tl.exp(gamma[:, None] * u), 0.0)
    eu = e * u
    return tl.sum(e, axis=1), tl.sum(eu, axis=1), tl.sum(eu * u, axis=1)


@triton.jit
def _newton_step(gamma, lo, hi, active, s0, s1, s2, target, tol):
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
def _numerators(u, finite, g, argmax):
    """exp(g * u) on finite entries; for argmax rows (gamma = inf) the indicator of the maxima,
    written directly rather than as a limit (no 0 * inf)."""
    e = tl.where(finite, tl.exp(g[:, None] * u), 0.0)
    top = tl.where(finite & (u == 0.0), 1.0, 0.0)
    return tl.where(argmax[:, None], top, e)


# ---------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _entropy_norm_fwd_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    gamma_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    max_iter,
    tol,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: R * n may exceed 2**31
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    row_base = rows * n_cols
    cols = tl.arange(0, BLOCK_N)
    tol = tl.cast(tol, tl.float32)  # pinned: a Python float may arrive as fp64 under torch.compile
    target = tl.load(target_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # -- scan: row maximum, ties at the maximum, finite entries, NaN/+inf. Rows past the end see
    # only -inf, classify as INVALID and so never hold the Newton loop open.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ties = tl.zeros([BLOCK_M], tl.int32)
    support = tl.zeros([BLOCK_M], tl.int32)
    bad = tl.zeros([BLOCK_M], tl.int32)
    if SINGLE_TILE:
        offs, mask = _tile_at(row_base, row_ok, cols, n_cols)
        z = _load_logits(x_ptr, offs, mask, LOGITS)
        m, ties, support, bad = _scan_tile(z, m, ties, support, bad)
        u, finite = _shift(z, m)  # stays in registers for the rest of the kernel
    else:
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            z_c = _load_logits(x_ptr, offs_c, mask_c, LOGITS)
            m, ties, support, bad = _scan_tile(z_c, m, ties, support, bad)
    kind = _classify(target, support, ties, bad)

    # -- safeguarded Newton on gamma, all rows of the block in lock step, until each has
    # converged (or hit the target exactly) or max_iter passes are spent.
    gamma = tl.full([BLOCK_M], 1.0, tl.float32)  # gamma = 1: the input distribution itself
    lo = tl.zeros([BLOCK_M], tl.float32)
    hi = tl.full([BLOCK_M], float("inf"), tl.float32)
    active = kind == _NEWTON
    it = tl.zeros([], tl.int32)
    while (it < max_iter) & (_any(active, 0) > 0):
        if SINGLE_TILE:
            s0, s1, s2 = _moments(u, finite, gamma)
        else:
            s0 = tl.zeros([BLOCK_M], tl.float32)
            s1 = tl.zeros([BLOCK_M], tl.float32)
            s2 = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
                u_c, finite_c = _shift(_load_logits(x_ptr, offs_c, mask_c, LOGITS), m)
                a0, a1, a2 = _moments(u_c, finite_c, gamma)
                s0 += a0
                s1 += a1
                s2 += a2
        gamma, lo, hi, active = _newton_step(gamma, lo, hi, active, s0, s1, s2, target, tol)
        it += 1

    # -- output: y = e / s0 with e = exp(g * u) at the final gamma (g = 0 for uniform and invalid
    # rows, the indicator of the maxima for argmax rows); y and stats are NaN for invalid rows.
    g = tl.where(kind == _NEWTON, gamma, 0.0)
    argmax = kind == _ARGMAX
    invalid = kind == _INVALID
    if SINGLE_TILE:
        e = _numerators(u, finite, g, argmax)
        s0 = tl.sum(e, axis=1)
        y = e / s0[:, None]
        y = tl.where(invalid[:, None], float("nan"), y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        s0 = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, finite_c = _shift(_load_logits(x_ptr, offs_c, mask_c, LOGITS), m)
            s0 += tl.sum(_numerators(u_c, finite_c, g, argmax), axis=1)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, finite_c = _shift(_load_logits(x_ptr, offs_c, mask_c, LOGITS), m)
            y = _numerators(u_c, finite_c, g, argmax) / s0[:, None]
            y = tl.where(invalid[:, None], float("nan"), y)
            tl.store(y_ptr + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)

    gamma_out = tl.where(kind == _UNIFORM, 0.0, gamma)
    gamma_out = tl.where(argmax, float("inf"), gamma_out)
    gamma_out = tl.where(invalid, float("nan"), gamma_out)
    tl.store(gamma_ptr + rows, gamma_out, mask=row_ok)
    tl.store(stats_ptr + 2 * rows, tl.where(invalid, float("nan"), m), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, tl.where(invalid, float("nan"), tl.log(s0)), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward. With y rebuilt from the stats, ubar = E_y[u], gbar = E_y[G], var = E_y[(u-ubar)^2],
# cov = E_y[(G-gbar)(u-ubar)], k = (cov + grad_gamma) / var (backward_coefficient):
#   grad_z = gamma * y * ((G - gbar) - k (u - ubar)),   grad_target = -k / gamma,
# zero for rows solved at a limit (gamma 0 or inf), invalid rows (NaN) and rows with var = 0.


@triton.jit
def _bwd_tile(grad_y_ptr, x_ptr, offs, mask, m, gs, log_s0, live_gamma, LOGITS: tl.constexpr):
    """(u, y, G) of a tile: shifted logits, y rebuilt in float32, the incoming gradient.

    All three are 0 on masked entries and on whole rows without a finite positive gamma, so those
    rows come out of the sums with var = 0 and need no flag of their own later on (fewer live
    predicates: ptxas otherwise spills them on some configurations).
    """
    z = _load_logits(x_ptr, offs, mask, LOGITS)
    u, finite = _shift(z, m)
    keep = finite & live_gamma[:, None]
    u = tl.where(keep, u, 0.0)  # rows with m = +inf would otherwise carry -inf
    y = tl.where(keep, tl.exp(gs[:, None] * u - log_s0[:, None]), 0.0)
    grad = tl.where(keep, tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    return u, y, grad


@triton.jit
def _bwd_grad_x(x_ptr, offs, mask, u, y, grad, ubar, gbar, k, gs, live, LOGITS: tl.constexpr):
    """grad_x of a tile; for probabilities grad_x = grad_z / p where p > 0 (z = log p), else 0."""
    grad_z = gs[:, None] * y * ((grad - gbar[:, None]) - k[:, None] * (u - ubar[:, None]))
    grad_z = tl.where(live[:, None], grad_z, 0.0)
    if not LOGITS:
        p = tl.load(x_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        grad_z = tl.where(p > 0.0, grad_z / tl.where(p > 0.0, p, 1.0), 0.0)
    return grad_z


@triton.jit
def _entropy_norm_bwd_kernel(
    grad_y_ptr,
    grad_gamma_ptr,
    x_ptr,
    gamma_ptr,
    stats_ptr,
    grad_x_ptr,
    grad_target_ptr,
    n_rows,
    n_cols,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    row_base = rows * n_cols
    cols = tl.arange(0, BLOCK_N)

    gamma = tl.load(gamma_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad_gamma = tl.load(grad_gamma_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    m = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0).to(tl.float32)
    log_s0 = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    live_gamma = (gamma > 0.0) & (gamma < float("inf"))  # false for NaN
    gs = tl.where(live_gamma, gamma, 0.0)

    if SINGLE_TILE:
        offs, mask = _tile_at(row_base, row_ok, cols, n_cols)
        u, y, grad = _bwd_tile(grad_y_ptr, x_ptr, offs, mask, m, gs, log_s0, live_gamma, LOGITS)
        ubar = tl.sum(y * u, axis=1)
        gbar = tl.sum(y * grad, axis=1)
        du = u - ubar[:, None]
        var = tl.sum(y * du * du, axis=1)
        cov = tl.sum(y * (grad - gbar[:, None]) * du, axis=1)
    else:
        # Means first, then centred sums in a second pass (not E[u^2] - E[u]^2, which cancels),
        # as the single tile does in registers.
        ubar = tl.zeros([BLOCK_M], tl.float32)
        gbar = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            ubar += tl.sum(y_c * u_c, axis=1)
            gbar += tl.sum(y_c * grad_c, axis=1)
        var = tl.zeros([BLOCK_M], tl.float32)
        cov = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            du = u_c - ubar[:, None]
            var += tl.sum(y_c * du * du, axis=1)
            cov += tl.sum(y_c * (grad_c - gbar[:, None]) * du, axis=1)

    live = var > 0.0  # implies live_gamma: other rows were zeroed by _bwd_tile, so var = 0
    k = tl.where(live, (cov + grad_gamma) / tl.where(live, var, 1.0), 0.0)
    tl.store(grad_target_ptr + rows, tl.where(live, -k / tl.where(live, gs, 1.0), 0.0), mask=row_ok)

    if SINGLE_TILE:
        gx = _bwd_grad_x(x_ptr, offs, mask, u, y, grad, ubar, gbar, k, gs, live, LOGITS)
        tl.store(grad_x_ptr + offs, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK_N):
            offs_c, mask_c = _tile_at(row_base, row_ok, start + cols, n_cols)
            u_c, y_c, grad_c = _bwd_tile(grad_y_ptr, x_ptr, offs_c, mask_c, m, gs, log_s0, live_gamma, LOGITS)
            gx = _bwd_grad_x(x_ptr, offs_c, mask_c, u_c, y_c, grad_c, ubar, gbar, k, gs, live, LOGITS)
            tl.store(grad_x_ptr + offs_c, gx.to(grad_x_ptr.dtype.element_ty), mask=mask_c)


# ---------------------------------------------------------------------------------------------
# Block sizes and launchers.


class Tile(NamedTuple):
    """A launch configuration: rows per program, columns per tile, layout, warps."""

    block_m: int
    block_n: int
    single_tile: bool
    num_warps: int


# Rows up to these lengths live in registers; longer rows are streamed in chunks of _CHUNK.block_n.
# The forward keeps u (16 fp32 values a thread at 16 warps at n = 8192) while the Newton loop
# reuses it many times; the backward holds u, y and G at once, which at n = 8192 exceeds the 128
# registers a thread of a 512-thread program may use (it spilled on sm_90), and makes only
# three passes, so it switches to chunks earlier.
MAX_SINGLE_TILE_FORWARD = 8192
MAX_SINGLE_TILE_BACKWARD = 4096
_CHUNK = Tile(block_m=1, block_n=2048, single_tile=False, num_warps=8)  # 8 fp32 lanes a thread
_MIN_BLOCK_N = 16
# Short rows are packed several to a program so that a tile holds this many elements.
_TILE_ELEMENTS = 512


def _tile(n: int, max_single: int) -> Tile:
    if n > max_single:
        return _CHUNK
    block_n = max(_MIN_BLOCK_N, triton.next_power_of_2(n))
    block_m = max(1, _TILE_ELEMENTS // block_n)
    if block_m > 1:
        # Each thread holds one column of several rows, and with it the per-row Newton state
        # (gamma, bracket, target, flags) of each of those rows. 8 warps on 512 elements keep that
        # to 2 rows a thread (about 60 registers); 4 rows a thread went past 80 registers, where
        # ptxas traded a few bytes of stack for occupancy on sm_90.
        num_warps = 8
    else:
        num_warps = min(16, max(4, block_n // 256))  # 8 fp32 lanes a thread, 16 at n = 8192
    return Tile(block_m, block_n, True, num_warps)


def forward_tile(n: int) -> Tile:
    """The configuration :func:`forward` uses for rows of length n."""
    return _tile(n, MAX_SINGLE_TILE_FORWARD)


def backward_tile(n: int) -> Tile:
    """The configuration :func:`backward` uses for rows of length n."""
    return _tile(n, MAX_SINGLE_TILE_BACKWARD)


def all_tiles(tile_for) -> list[Tile]:
    """Every configuration ``tile_for`` (:func:`forward_tile` or :func:`backward_tile`) can return:
    it depends on n only through next_power_of_2(n), so powers of two cover every n."""
    tiles = {tile_for(1 << k) for k in range(0, 31)}
    return sorted(tiles, key=lambda t: (not t.single_tile, t.block_n))


def _launch_args(tile: Tile, logits: bool) -> dict:
    return dict(
        LOGITS=bool(logits),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        SINGLE_TILE=tile.single_tile,
        num_warps=tile.num_warps,
    )


def forward(
    x: torch.Tensor, target: torch.Tensor, logits: bool, max_iter: int, tol: float, *, tile: Tile | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, gamma, stats)`` for rows ``x (R, n)`` and targets ``(R,)``; see the reference.

    ``tile`` overrides :func:`forward_tile` (tests use it to reach the chunked layout with small rows).
    """
    x = x.contiguous()
    target = target.to(torch.float32).contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    gamma = torch.empty(rows, dtype=torch.float32, device=x.device)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, gamma, stats
    tile = tile or forward_tile(n)
    grid = (triton.cdiv(rows, tile.block_m),)
    _entropy_norm_fwd_kernel[grid](
        x, target, y, gamma, stats, rows, n, int(max_iter), float(tol), **_launch_args(tile, logits)
    )
    return y, gamma, stats


def backward(
    grad_y: torch.Tensor,
    grad_gamma: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    stats: torch.Tensor,
    logits: bool,
    *,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_target)``: grad_x in x.dtype, grad_target (R,) float32."""
    x = x.contiguous()
    grad_y = grad_y.to(x.dtype).contiguous()  # y, hence its gradient, is stored in x.dtype
    grad_gamma = grad_gamma.to(torch.float32).contiguous()
    gamma = gamma.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    rows, n = x.shape
    grad_x = torch.empty_like(x)
    grad_target = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return grad_x, grad_target
    tile = tile or backward_tile(n)
    grid = (triton.cdiv(rows, tile.block_m),)
    _entropy_norm_bwd_kernel[grid](
        grad_y, grad_gamma, x, gamma, stats, grad_x, grad_target, rows, n, **_launch_args(tile, logits)
    )
    return grad_x, grad_target


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for ahead-of-time compilation (tests/gpu_compile.py).

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _aot_configs() -> list[dict]:
    def tag(dtype, logits, tile):
        layout = "" if tile.single_tile else " chunked"
        return (
            f"{str(dtype).removeprefix('torch.')} {'logits' if logits else 'probs'} "
            f"{tile.block_m}x{tile.block_n}{layout} w{tile.num_warps}"
        )

    def constexprs(logits, tile):
        return dict(LOGITS=logits, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_TILE=tile.single_tile)

    configs = []
    for dtype, ptr in _PTR.items():
        for logits in (True, False):
            for tile in all_tiles(forward_tile):
                consts = constexprs(logits, tile)
                configs.append(
                    dict(
                        name=f"entropy_norm_fwd {tag(dtype, logits, tile)}",
                        kernel=_entropy_norm_fwd_kernel,
                        signature=dict(
                            x_ptr=ptr,
                            target_ptr="*fp32",
                            y_ptr=ptr,
                            gamma_ptr="*fp32",
                            stats_ptr="*fp32",
                            n_rows="i32",
                            n_cols="i32",
                            max_iter="i32",
                            tol="fp32",
                            **dict.fromkeys(consts, "constexpr"),
                        ),
                        constexprs=consts,
                        num_warps=tile.num_warps,
                    )
                )
            for tile in all_tiles(backward_tile):
                consts = constexprs(logits, tile)
                configs.append(
                    dict(
                        name=f"entropy_norm_bwd {tag(dtype, logits, tile)}",
                        kernel=_entropy_norm_bwd_kernel,
                        signature=dict(
                            grad_y_ptr=ptr,
                            grad_gamma_ptr="*fp32",
                            x_ptr=ptr,
                            gamma_ptr="*fp32",
                            stats_ptr="*fp32",
                            grad_x_ptr=ptr,
                            grad_target_ptr="*fp32",
                            n_rows="i32",
                            n_cols="i32",
                            **dict.fromkeys(consts, "constexpr"),
                        ),
                        constexprs=consts,
                        num_warps=tile.num_warps,
                    )
                )
    return configs


AOT_CONFIGS = _aot_configs()
