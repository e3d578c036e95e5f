"""kexue.init.trunc_normal_tf_: the TF truncated normal's law, exact std and mean, dtypes, layouts,
generators, and bad arguments (statistical bounds in tests/init/helpers.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kexue.init import TF_TRUNCATED_STD_RATIO, bert_, trunc_normal_tf_
from tests.init.helpers import SPEC_RATIO, assert_normal_stats, gen


def truncated_cdf(x: torch.Tensor, bound: float = 2.0) -> torch.Tensor:
    """CDF of N(0, 1) conditioned on |x| <= bound."""
    phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    lo, hi = phi(torch.tensor(-bound, dtype=torch.float64)), phi(torch.tensor(bound, dtype=torch.float64))
    return ((phi(x) - lo) / (hi - lo)).clamp(0, 1)


def test_truncated_std_ratio_matches_spec_and_quadrature():
    assert abs(TF_TRUNCATED_STD_RATIO - SPEC_RATIO) < 5e-8
    x = torch.linspace(-2, 2, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * x * x)
    gamma = torch.trapezoid(x * x * density, x) / torch.trapezoid(density, x)
    assert abs(TF_TRUNCATED_STD_RATIO - math.sqrt(float(gamma))) < 1e-9


def test_trunc_normal_tf_law():
    std = 0.02
    t = torch.full((1000, 1000), float("nan"))
    out = trunc_normal_tf_(t, std=std, generator=gen())
    assert out is t
    assert torch.isfinite(t).all()
    # the cut is relative: nothing beyond 2 std, and the tail right up to it is populated
    # (the expected count in 1.99..2 std is ~560, so a narrower cut fails)
    assert float(t.abs().max()) <= 2 * std
    assert int((t.abs() > 1.99 * std).sum()) > 100
    # the realised std is 0.0176 for 0.02 (spec), not 0.02
    assert_normal_stats(t, 0.0, std * SPEC_RATIO, "truncated std 0.02")
    assert abs(float(t.double().std()) - 0.0176) < 5e-5
    # the whole law: empirical CDF against the truncated normal CDF (DKW bound, module docstring)
    z = torch.sort(t.flatten().double() / std).values
    n = z.numel()
    grid = torch.linspace(-2, 2, 81, dtype=torch.float64)
    empirical = torch.searchsorted(z, grid, right=True).double() / n
    eps = math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert float((empirical - truncated_cdf(grid)).abs().max()) <= eps


def test_trunc_normal_tf_is_not_torch_default_trunc_normal():
    # the spec's implementer trap: torch's default bounds are absolute (+-2), i.e. no truncation at std 0.02
    a = torch.empty(500, 1000)
    torch.nn.init.trunc_normal_(a, std=0.02, generator=gen())
    b = trunc_normal_tf_(torch.empty(500, 1000), std=0.02, generator=gen())
    assert float(a.abs().max()) > 0.08 and float(b.abs().max()) <= 0.04


def test_trunc_normal_tf_exact_std_and_mean():
    std, mean = 0.02, 1.5
    t = trunc_normal_tf_(
        torch.empty(800, 1000, dtype=torch.float64), std=std, mean=mean, exact_std=True, generator=gen(1)
    )
    assert_normal_stats(t, mean, std, "exact_std")
    assert float((t - mean).abs().max()) <= 2 * std / TF_TRUNCATED_STD_RATIO * (1 + 1e-12)
    assert float((t - mean).abs().max()) > 2 * std  # the cut widened with the draw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_trunc_normal_tf_dtypes(dtype):
    std = 0.5
    t = trunc_normal_tf_(torch.empty(500, 500, dtype=dtype), std=std, generator=gen(2))
    assert t.dtype == dtype
    # rounding to the storage dtype is monotone and 2 * std is 2 * (std in that dtype), exactly
    assert float(t.abs().max()) <= float(2 * torch.tensor(std, dtype=dtype))
    assert_normal_stats(t, 0.0, std * SPEC_RATIO, f"{dtype}", slack=torch.finfo(dtype).eps)


def test_trunc_normal_tf_non_contiguous_and_empty():
    base = torch.zeros(300, 400)
    view = base.t()  # not contiguous: filled in place through the view
    trunc_normal_tf_(view, std=0.1, generator=gen(3))
    assert int((base == 0).sum()) < 10
    assert_normal_stats(base, 0.0, 0.1 * SPEC_RATIO, "transposed view")
    empty = torch.empty(0, 7)
    assert trunc_normal_tf_(empty) is empty


def test_trunc_normal_tf_generator_reproducible_and_leaves_global_rng():
    a = trunc_normal_tf_(torch.empty(64, 64), generator=gen(5))
    state = torch.get_rng_state()
    b = trunc_normal_tf_(torch.empty(64, 64), generator=gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    c = trunc_normal_tf_(torch.empty(64, 64), generator=gen(6))
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"std": 0.0}, ValueError, "std"),
        ({"std": -0.02}, ValueError, "std"),
        ({"std": float("nan")}, ValueError, "std"),
        ({"std": float("inf")}, ValueError, "std"),
        ({"std": "0.02"}, TypeError, "std"),
        ({"std": True}, TypeError, "std"),
        ({"mean": float("nan")}, ValueError, "mean"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_trunc_normal_tf_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        trunc_normal_tf_(torch.empty(3), **kwargs)


def test_generator_on_another_device():
    with pytest.raises(ValueError, match="generator is on device cpu"):
        trunc_normal_tf_(torch.empty(4, device="meta"), generator=gen())
    with pytest.raises(ValueError, match="generator is on device cpu"):
        bert_(nn.Linear(4, 4, device="meta"), generator=gen())


def test_trunc_normal_tf_bad_tensor():
    with pytest.raises(TypeError, match="tensor"):
        trunc_normal_tf_([0.0, 1.0])
    with pytest.raises(TypeError, match="floating"):
        trunc_normal_tf_(torch.zeros(3, dtype=torch.int64))
