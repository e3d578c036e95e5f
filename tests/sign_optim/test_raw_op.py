"""``torch.ops.kexue.sign_optim_step`` called raw (or from a compiled graph) checks its tensors
and table before any backend runs: the Triton kernel trusts every length it is given, and a short
gradient or momentum there was read and written past its end. The arguments come from a real
optimizer step (captured), then one thing is broken at a time."""

from __future__ import annotations

import pytest
import torch

import kexue
import kexue.ops.sign_optim as sign_ops
from tests.conftest import triton_unavailable_reason

BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []


def captured_step(monkeypatch, backend, optimizer="Lion", **kw):
    """The arguments of one real fused step (after it ran), as lists that a test may edit."""
    seen = {}
    real = sign_ops.fused_step

    def spy(*args):
        seen["args"] = [list(a) if isinstance(a, list) else a for a in args]
        return real(*args)

    monkeypatch.setattr(sign_ops, "fused_step", spy)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 10, generator=g))
    p.grad = torch.randn(6, 10, generator=g)
    with kexue.use_backend(backend):
        getattr(kexue.optim, optimizer)([p], lr=1e-3, **kw).step()
    args = seen["args"]
    return dict(
        zip(("params", "grads", "exp_avgs", "masks", "row_seen", "ssq", "hyper", "ints"), args[:8], strict=True)
    ), p


def run(backend, a, dyn=None):
    with kexue.use_backend(backend):
        torch.ops.kexue.sign_optim_step(
            a["params"], a["grads"], a["exp_avgs"], a["masks"], a["row_seen"], a["ssq"], a["hyper"], a["ints"], dyn
        )


BREAKS = {
    "short grad": (lambda a: a["grads"].__setitem__(0, a["grads"][0].flatten()[:7]), ValueError, "grad"),
    "short momentum": (lambda a: a["exp_avgs"].__setitem__(0, a["exp_avgs"][0].flatten()[:7]), ValueError, "momentum"),
    "grad dtype": (lambda a: a["grads"].__setitem__(0, a["grads"][0].double()), TypeError, "grad dtype"),
    "momentum dtype": (lambda a: a["exp_avgs"].__setitem__(0, a["exp_avgs"][0].half()), TypeError, "momentum"),
    "missing grads": (lambda a: a["grads"].clear(), ValueError, "same length"),
    "hyper rows": (lambda a: a.__setitem__("hyper", a["hyper"][:0]), ValueError, "hyper"),
    "ints columns": (lambda a: a.__setitem__("ints", a["ints"][:, :3].contiguous()), ValueError, "ints"),
    "strided param": (lambda a: a["params"].__setitem__(0, a["params"][0].detach().t()), ValueError, "contiguous"),
    "short mask": (
        lambda a: a["masks"].__setitem__(0, torch.ones(7, dtype=torch.bool)),
        ValueError,
        "mask 0",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(BREAKS))
def test_raw_step_refuses_broken_arguments(monkeypatch, backend, case):
    a, p = captured_step(monkeypatch, backend)
    before = p.detach().clone()
    brk, error, match = BREAKS[case]
    brk(a)
    with pytest.raises(error, match=match):
        run(backend, a)
    assert torch.equal(p.detach(), before), "a refused step must not touch the params"


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_tiger_needs_its_carried_sums(monkeypatch, backend):
    """A Tiger table that asks for carried sums of squares with none given is refused."""
    a, _ = captured_step(monkeypatch, backend, optimizer="Tiger")
    flags = a["ints"][:, 0]
    if not bool((flags & (kexue._sign_table.RMS_CARRIED | kexue._sign_table.SSQ_OUT)).any()):
        pytest.fail("Tiger's step no longer carries sums of squares: update this test")
    a["ssq"] = []
    with pytest.raises(ValueError, match="sums of squares"):
        run(backend, a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_step_with_good_arguments_equals_the_optimizer(monkeypatch, backend):
    """The checks refuse nothing an optimizer sends: replaying its step moves the params again by
    the same rule (a second Lion step from the same state, on two copies)."""
    a, p = captured_step(monkeypatch, backend)
    twin = [t.clone() for t in a["params"]], [m.clone() for m in a["exp_avgs"]]
    run(backend, a)
    b = dict(a, params=twin[0], exp_avgs=twin[1])
    run(backend, b)
    torch.testing.assert_close(a["params"][0], b["params"][0], rtol=0, atol=0)
    torch.testing.assert_close(a["exp_avgs"][0], b["exp_avgs"][0], rtol=0, atol=0)
