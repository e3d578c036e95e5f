"""The raw custom ops (torch.ops.kexue.entropy_normalize and its backward) check their inputs'
layout themselves: they are reached without the public function (raw calls, compiled graphs), and
a short target or gradient would otherwise be read past its end by the Triton kernel, which has no
bounds of its own (it trusts R from x). Every case names the argument in a ValueError."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import entropy_norm as ref
from tests.conftest import triton_unavailable_reason
from tests.helpers import fresh_probs, reachable_targets

BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []
TOL = ref.default_tol(torch.float32)
FWD = torch.ops.kexue.entropy_normalize
BWD = torch.ops.kexue.entropy_normalize_backward


def rows(r=4, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return fresh_probs(r, n, generator=g).float(), reachable_targets(r, n, generator=g).float()


FORWARD_CASES = {
    "short target": (lambda x, t: (x, t[:2], False, 20, TOL), "target"),
    "long target": (lambda x, t: (x, torch.cat([t, t]), False, 20, TOL), "target"),
    "float64 target": (lambda x, t: (x, t.double(), False, 20, TOL), "target"),
    "1-d x": (lambda x, t: (x[0], t[:1], False, 20, TOL), "x must be"),
    "empty rows": (lambda x, t: (x[:, :0], t, False, 20, TOL), "x must be"),
    "transposed x": (lambda x, t: (x.t(), torch.ones(x.shape[1]), False, 20, TOL), "contiguous"),
    "max_iter 0": (lambda x, t: (x, t, False, 0, TOL), "max_iter"),
    "tol nan": (lambda x, t: (x, t, False, 20, float("nan")), "tol"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_raw_forward_refuses_bad_layouts(backend, case):
    make, match = FORWARD_CASES[case]
    x, t = rows()
    with kexue.use_backend(backend), pytest.raises(ValueError, match=match):
        FWD(*make(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["grad_y", "grad_gamma", "gamma", "stats"])
def test_raw_backward_refuses_short_inputs(backend, arg):
    x, t = rows()
    with kexue.use_backend(backend):
        y, gamma, stats = FWD(x, t, False, 20, TOL)
        args = dict(grad_y=torch.ones_like(y), grad_gamma=torch.ones_like(gamma), gamma=gamma, stats=stats)
        args[arg] = args[arg][:2]  # two rows of four
        with pytest.raises(ValueError, match=arg):
            BWD(args["grad_y"], args["grad_gamma"], x, args["gamma"], args["stats"], False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_ops_still_answer_good_input(backend):
    """The checks refuse nothing the public function sends: the raw op equals the reference."""
    x, t = rows()
    with kexue.use_backend(backend):
        y, gamma, stats = FWD(x, t, False, 20, TOL)
        gx, gt = BWD(torch.ones_like(y), torch.zeros_like(gamma), x, gamma, stats, False)
    y_ref, gamma_ref, _ = ref.entropy_normalize_forward(x.double(), t.double(), False, 50, 1e-12)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gamma.double(), gamma_ref, rtol=1e-4, atol=1e-6)
    assert gx.shape == x.shape and gt.shape == t.shape and bool(torch.isfinite(gx).all())
