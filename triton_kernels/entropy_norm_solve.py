"""The temperature solve of streamed entropy normalization (Triton): gamma from sampled moments.

A row too long for one tile cannot afford one pass over memory per Newton iteration. Instead each
pass over the row gathers, for SAMPLES values of gamma at once, the sums s0 = sum e, s1 = sum e u,
s2 = sum e u^2 with e = exp(gamma u), u = z - max z. Per sample that is L = log s0 and its first
two derivatives in gamma, L' = s1/s0 (the mean of u under y) and L'' = s2/s0 - L'^2 (its variance),
and H(gamma) = L - gamma L' is the entropy. Between two neighbouring samples a < b that bracket the
target, the quintic Hermite interpolant of L through (L, L', L'') at both ends gives L, L', L''
anywhere in between with an error of order (b - a)^6 L^(6) / 46080; once (b - a) times the larger
standard deviation sqrt(L'') at the ends is at most TRUST, that error is below float32 rounding of
the sums for the rows we tried, and the root of H = target on the interpolant (a safeguarded Newton
on registers) is the solution, its L the normaliser. entropy_norm_stream.py places the samples.
"""

from __future__ import annotations

import triton
import triton.language as tl

SAMPLES = tl.constexpr(8)
TRUST = tl.constexpr(0.25)  # (b - a) * sqrt(max L'') of an interval whose interpolant is final
NARROW = tl.constexpr(0.1)  # (b - a) * sqrt(max L'') below which L' is the cubic, not the quintic's slope
VAR_RATIO = tl.constexpr(1.5)  # most L''(b) / L''(a) (or its inverse) of a final interval
MODEL_STEPS = tl.constexpr(12)  # Newton/bisection steps on the interpolant (registers only)


@triton.jit
def sample_sums(u, finite, gammas):
    """(s0, s1, s2), each (SAMPLES,), of a (1, BLOCK_N) tile of u at the (SAMPLES,) values of gamma."""
    e = tl.where(finite, tl.exp(gammas[:, None] * u), 0.0)  # (SAMPLES, BLOCK_N); e <= 1 as u <= 0
    eu = e * u
    return tl.sum(e, axis=1), tl.sum(eu, axis=1), tl.sum(eu * u, axis=1)


@triton.jit
def pick(v, k, j):
    """v[j] of a (SAMPLES,) vector as a (1,) tensor (j is one too): a masked sum, no gather."""
    return tl.sum(tl.where(k == j, v, 0.0), axis=0, keep_dims=True)


@triton.jit
def mean_var(s0, s1, s2):
    mean = s1 / s0
    return mean, tl.maximum(s2 / s0 - mean * mean, 0.0)


@triton.jit
def hermite(h, dl, mean_a, var_a, mean_b, var_b, t):
    """(L(a + t h) - L(a), L', L'') on [a, b = a + h] from L, L', L'' at both ends.

    L is the quintic through L, L', L'' at a and b (in t the end data scale by h and h^2;
    p(t) = sum c_i t^i with c0 = 0, c1, c2 from a and c3..c5 from the conditions at t = 1).
    L' is that quintic's derivative, except on intervals narrower than NARROW standard deviations:
    there the derivative would divide the float32 rounding of dl by a small h, and the cubic
    through L', L'' at both ends (a weighted mean of end data, its own error of order
    (h sigma)^4 / 384) is the better of the two. L'' (the Newton slope only) is linear in t.
    """
    c1 = mean_a * h
    c2 = 0.5 * var_a * h * h
    r0 = dl - (c1 + c2)
    r1 = mean_b * h - (c1 + 2.0 * c2)
    r2 = var_b * h * h - 2.0 * c2
    c3 = 10.0 * r0 - 4.0 * r1 + 0.5 * r2
    c4 = -15.0 * r0 + 7.0 * r1 - r2
    c5 = 6.0 * r0 - 3.0 * r1 + 0.5 * r2
    p = t * (c1 + t * (c2 + t * (c3 + t * (c4 + t * c5))))
    # cubic Hermite basis: h00 = 2t^3 - 3t^2 + 1, h10 = t^3 - 2t^2 + t, h01 = 1 - h00, h11 = t^3 - t^2
    t2 = t * t
    h01 = t2 * (3.0 - 2.0 * t)
    cubic = mean_a + (mean_b - mean_a) * h01 + h * (var_a * (t2 * t - 2.0 * t2 + t) + var_b * (t2 * t - t2))
    quintic = (c1 + t * (2.0 * c2 + t * (3.0 * c3 + t * (4.0 * c4 + t * 5.0 * c5)))) / h
    narrow = h * tl.sqrt(tl.maximum(var_a, var_b)) < NARROW
    mean = tl.where(narrow, cubic, quintic)
    var = var_a + (var_b - var_a) * t
    return p, mean, var


@triton.jit
def model_root(a, b, s0_a, mean_a, var_a, s0_b, mean_b, var_b, target):
    """(gamma, L(gamma)) with H(gamma) = target on the interpolant over [a, b].

    H(a) >= target >= H(b) (the samples bracket the root). Starts from the secant of H, then takes
    Newton steps in t = (gamma - a) / h, replaced by bisection whenever one leaves the shrinking
    bracket [lo, hi] (or is NaN).
    """
    h = b - a
    log_a = tl.log(s0_a)
    dl = tl.log(s0_b / s0_a)  # a ratio: no cancellation between two logs of size log n
    h_a = log_a - a * mean_a
    h_b = log_a + dl - b * mean_b
    t = tl.minimum(tl.maximum((h_a - target) / (h_a - h_b), 0.0), 1.0)
    t = tl.where(t == t, t, 0.5)
    lo = 0.0 * t
    hi = lo + 1.0
    for _ in tl.static_range(MODEL_STEPS):
        p, mean, var = hermite(h, dl, mean_a, var_a, mean_b, var_b, t)
        g = a + t * h
        excess = log_a + p - g * mean - target  # > 0: still too flat, the root lies above
        lo = tl.where(excess > 0.0, t, lo)
        hi = tl.where(excess < 0.0, t, hi)
        step = t + excess / (g * var * h)  # dH/dt = -gamma L'' h
        inside = (step > lo) & (step < hi)  # false for NaN
        t = tl.where(excess == 0.0, t, tl.where(inside, step, 0.5 * (lo + hi)))
    p, _, _ = hermite(h, dl, mean_a, var_a, mean_b, var_b, t)
    return a + t * h, log_a + p


@triton.jit
def untrusted(a, b, var_a, var_b):
    """Whether the interpolant over [a, b] is not yet final (see the module docstring); true for an
    unbounded bracket (inf, or NaN from inf * 0)."""
    big = tl.maximum(var_a, var_b)
    spread = (b - a) * tl.sqrt(big)
    # Where the variance changes fast across [a, b] (a row turning one-hot at large gamma), the
    # entropy is tiny and so is its slope: the spread alone says too little there.
    steep = big > VAR_RATIO * tl.minimum(var_a, var_b)
    return (spread > TRUST) | (spread != spread) | steep
