"""Driving Lion/Tiger step by step against the float64 oracle, element by element.

Each step starts the oracle from the optimizer's own current state (params, momentum, per-row
flags) upcast to float64, so every step is checked on its own and errors cannot accumulate or
hide. The check is elementwise and to the rounding of the storage dtype:

    |out - exact| <= 0.5 ulp_dtype(exact) + 8 * 2^-24 * scale

where scale bounds the magnitudes the float32 arithmetic went through (8 float32 roundings at
most). The one place where float32 and float64 may legitimately disagree by more is the sign of a
c (or m) that lies within float32 rounding of zero; such elements (counted, and required to be
rare) may differ by one sign step, 2 * lr * RMS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}
EPS32 = 2.0**-24


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` numbers at |x| (float64); subnormals use the smallest normal's spacing."""
    tiny = torch.finfo(dtype).tiny
    _, exp = torch.frexp(x.double().abs().clamp(min=tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - MANTISSA[dtype])


def assert_rounded(
    out: Tensor, exact: Tensor, scale: Tensor, what: str, loose: Tensor | None = None, loose_by: Tensor | float = 0.0
) -> None:
    """``out`` (any dtype) equals the float64 ``exact`` to the rounding of float32 math + storage."""
    out64 = out.detach().double()
    assert torch.equal(torch.isnan(out64), torch.isnan(exact)), f"{what}: NaN pattern differs"
    scale = torch.nan_to_num(torch.as_tensor(scale, dtype=torch.float64), nan=0.0)  # a NaN grad left unused
    tol = 0.5 * ulp(exact, out.dtype) + 8 * EPS32 * scale
    if loose is not None:
        tol = torch.where(loose, tol + loose_by, tol)
    err = (out64 - exact).abs()
    bad = ~(err <= tol) & ~torch.isnan(exact)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements off; first at flat index {i}: "
            f"got {out64.reshape(-1)[i].item()!r}, exact {exact.reshape(-1)[i].item()!r}, "
            f"tolerance {tol.reshape(-1)[i].item():.3g}"
        )


@dataclass
class Trace:
    """What a run saw: sign-ambiguous element counts and the number of elements checked."""

    ambiguous: int = 0
    checked: int = 0
    moved: list = field(default_factory=list)


def snapshot(opt: torch.optim.Optimizer, params: list[Tensor], momentum_dtype=torch.float32):
    """float64 copies of params, momenta (zeros before the first step) and row_seen flags."""
    thetas, moms, seen = [], [], []
    for p in params:
        st = opt.state.get(p, {})
        thetas.append(p.detach().double().clone())
        m = st.get("exp_avg")
        moms.append(torch.zeros_like(p, dtype=torch.float64) if m is None else m.double().clone())
        s = st.get("row_seen")
        seen.append(None if s is None else s.clone())
    return thetas, moms, seen


def check_step(
    params, opt, thetas_before, moms_before, exact_thetas, exact_moms, c_scale, lr_bound, trace: Trace, ambiguous
):
    """Compare the optimizer's state after a step with the oracle's float64 result."""
    for i, p in enumerate(params):
        m = opt.state[p]["exp_avg"]
        amb = ambiguous[i]
        trace.ambiguous += int(amb.sum())
        trace.checked += p.numel()
        scale_p = torch.maximum(thetas_before[i].abs(), exact_thetas[i].abs()) + lr_bound[i]
        assert_rounded(p, exact_thetas[i], scale_p, f"param {i}", loose=amb, loose_by=2 * lr_bound[i])
        assert_rounded(m, exact_moms[i], c_scale[i], f"momentum {i}")
