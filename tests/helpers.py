"""Comparison helpers shared by the tests: float64 oracle, relative error, poisoned outputs."""

from __future__ import annotations

import torch

# Relative-error budgets against a float64 reference (docs/ARCHITECTURE.md, "Verifying kernels without a GPU").
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64, after checking that NaN and inf sit in the same places."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    same_nan = torch.equal(torch.isnan(out64), torch.isnan(ref64))
    assert same_nan, f"NaN pattern differs: {int(torch.isnan(out64).sum())} vs {int(torch.isnan(ref64).sum())} NaNs"
    inf_out, inf_ref = torch.isinf(out64), torch.isinf(ref64)
    assert torch.equal(inf_out, inf_ref) and torch.equal(out64[inf_out], ref64[inf_ref]), "inf pattern differs"
    keep = torch.isfinite(ref64)
    diff = torch.linalg.vector_norm(out64[keep] - ref64[keep])
    scale = torch.linalg.vector_norm(ref64[keep])
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", factor: float = 1.0):
    err = rel_err(out, ref)
    budget = RTOL[dtype] * factor
    assert err <= budget, f"{what}: relative error {err:.3g} > {budget:.3g} ({dtype})"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so that an element a kernel forgets to write fails the test."""
    return torch.full_like(t, float("nan"))


def fresh_probs(rows: int, n: int, dtype=torch.float64, sharpness: float = 2.0, generator=None) -> torch.Tensor:
    """Random distributions with a spread of entropies (never zeros, never uniform)."""
    z = torch.randn(rows, n, dtype=torch.float64, generator=generator) * sharpness
    return torch.softmax(z, -1).to(dtype)


def reachable_targets(rows: int, n: int, dtype=torch.float64, generator=None) -> torch.Tensor:
    """Targets strictly inside (0, log n), spread over the range."""
    import math

    frac = 0.05 + 0.9 * torch.rand(rows, dtype=torch.float64, generator=generator)
    return (frac * math.log(max(n, 2))).to(dtype)
