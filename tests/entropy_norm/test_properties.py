"""Property-based tests of entropy normalization on every available backend.

Hypothesis draws batch shapes (empty batches and block edges included), dtypes, the dim holding
the distribution (so inputs are non-contiguous views), probabilities or logits, masked entries
(0 / -inf), NaN and +inf at random positions, and targets anywhere in [0, log n], now and then a
negative probability or an out-of-range target. Every backend must match the float64 reference
on the same rounded input (NaN in the same places), or raise the torch backend's exception type.
Small and seeded by default; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import kexue
from kexue.reference import entropy_norm as ref
from tests.conftest import triton_unavailable_reason
from tests.helpers import RTOL, rel_err

# Backends that serve CPU tensors here (Triton under the interpreter when there is no GPU).
BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []
FAST = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    rows = draw(st.integers(0, 4))
    n = draw(st.sampled_from([1, 2, 7, 64, 65, 300]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    logits = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(rows, n, generator=g, dtype=torch.float64) * 2
    x = z if logits else torch.softmax(z, -1)
    specials = [math.nan, math.inf, -math.inf if logits else 0.0, -math.inf if logits else 0.0]
    for value in draw(st.lists(st.sampled_from(specials), max_size=3)):
        if x.numel():
            x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=g))] = value
    if not logits and x.numel() and draw(st.integers(0, 9)) == 7:
        x.view(-1)[0] = -0.25  # a negative probability: refused
    target = torch.rand(rows, generator=g, dtype=torch.float64) * math.log(n)
    if rows and draw(st.integers(0, 9)) == 7:
        target[0] = draw(st.sampled_from([-0.5, math.log(n) + 1.0, math.nan]))
    x = x.to(dtype)
    layout = draw(st.sampled_from(["rows", "strided rows", "columns"]))
    if layout == "rows":
        return x, x, target, 1, logits
    if layout == "strided rows":  # the same (R, n) values as a non-contiguous view
        return x, x.t().contiguous().t(), target, 1, logits
    return x, x.t().contiguous(), target, 0, logits  # each distribution along dim 0


def _outcome(backend, x_in, target, dim, logits):
    """entropy_normalize of ``x_in`` along ``dim`` as ``(y as (R, n) rows, gamma)``, or the
    exception type it raised, or None where the backend does not serve the dtype."""
    try:
        with kexue.use_backend(backend):
            y, gamma = kexue.ops.entropy_normalize(
                x_in, target.to(ref.compute_dtype(x_in.dtype)), dim=dim, logits=logits, return_gamma=True
            )
            return (y if dim == 1 else y.t()), gamma
    except kexue.BackendUnavailableError:
        return None
    except Exception as e:
        return type(e)


def _check(problem):
    x, x_in, target, dim, logits = problem
    expected = _outcome("torch", x_in, target, dim, logits)
    if isinstance(expected, type):
        for backend in BACKENDS:
            got = _outcome(backend, x_in, target, dim, logits)
            assert got is None or got is expected, f"{backend}: {got} where the reference raises {expected}"
        return
    y64, gamma64, _ = ref.entropy_normalize_forward(
        x.double().contiguous(), target.contiguous(), logits, 60, ref.default_tol(torch.float64)
    )
    for backend in BACKENDS:
        got = _outcome(backend, x_in, target, dim, logits)
        if got is None:
            continue
        assert not isinstance(got, type), f"{backend} raised {got}"
        y, gamma = got
        assert y.dtype == x.dtype and y.shape == x.shape
        if y.numel():
            assert rel_err(y, y64) <= RTOL[x.dtype], backend  # rel_err checks NaN/inf positions first
            assert torch.equal(torch.isnan(gamma), torch.isnan(gamma64)), backend


@seed(17)
@FAST
@given(problems())
def test_every_backend_equals_reference(problem):
    _check(problem)


@pytest.mark.slow
@SLOW
@given(problems())
def test_every_backend_equals_reference_long(problem):
    _check(problem)
