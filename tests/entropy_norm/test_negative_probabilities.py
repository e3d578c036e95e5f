"""A negative probability is a ValueError on every path: eagerly, under torch.compile (where the
public function's data checks are skipped) and through the raw torch.ops.kexue op.

The check sits in the custom op's body, after the kernel: every backend turns a negative entry into
a NaN row, so gamma is the flag that sends the op looking for the negative entry.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.ops import entropy_normalize
from kexue.reference import entropy_norm as ref
from tests.conftest import triton_unavailable_reason
from tests.helpers import fresh_probs, reachable_targets

BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []
TOL = ref.default_tol(torch.float32)


def rows_with_negative(rows=4, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = fresh_probs(rows, n, generator=g).float()
    x[2, 5] = -0.25
    return x, reachable_targets(rows, n, generator=g).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_refuses_negative_probabilities(backend):
    x, t = rows_with_negative()
    with kexue.use_backend(backend), pytest.raises(ValueError, match="non-negative; found -0.25"):
        torch.ops.kexue.entropy_normalize(x, t, False, 20, TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_takes_negative_logits_and_legitimate_nan_rows(backend):
    x, t = rows_with_negative()
    with kexue.use_backend(backend):
        y, gamma, _ = torch.ops.kexue.entropy_normalize(x, t, True, 20, TOL)  # logits may be negative
        assert torch.isfinite(gamma).all() and torch.isfinite(y).all()
        p = x.abs()
        p[1, 3] = math.nan  # a NaN row is an answer, not an error
        y, gamma, _ = torch.ops.kexue.entropy_normalize(p, t, False, 20, TOL)
    assert torch.isnan(gamma[1]) and torch.isnan(y[1]).all()
    assert torch.isfinite(gamma[[0, 2, 3]]).all()


def test_eager_public_function_refuses_them():
    x, t = rows_with_negative()
    with pytest.raises(ValueError, match="non-negative"):
        entropy_normalize(x.t(), t, dim=0)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fullgraph_refuses_them(backend):
    compiled = torch.compile(lambda x, t: entropy_normalize(x * 1.0, t) * 2, fullgraph=True, backend=backend)
    x, t = rows_with_negative()
    good = x.abs()
    assert torch.allclose(compiled(good, t), entropy_normalize(good, t) * 2)  # compiles, and runs
    with pytest.raises(ValueError, match="non-negative; found -0.25"):
        compiled(x, t)


def test_compiled_with_autograd_refuses_them():
    compiled = torch.compile(lambda x, t: entropy_normalize(x, t).pow(2).sum(), fullgraph=True, backend="aot_eager")
    x, t = rows_with_negative()
    with pytest.raises(ValueError, match="non-negative"):
        compiled(x.requires_grad_(), t)
