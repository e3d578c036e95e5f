"""Non-finite gradients: one rule on every backend, held to the float64 oracle.

The rule (kexue.optim.Lion's docstring): IEEE arithmetic with sign(+-0) = 0, sign(+-inf) = +-1,
sign(NaN) = NaN, so a NaN reaching the direction shows in theta instead of freezing the element;
elements ChildTuning masks out never see their gradient; Tiger's guard fires on NaN and on +-inf.
The same NaN, +inf and -inf gradients go through every available backend and the oracle.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger
from kexue.reference import sign_optim as R
from tests.sign_optim.helpers import BACKENDS

SHAPES = [(6, 7), (1500,), (5, 9)]
NAN, INF = float("nan"), float("inf")


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in SHAPES]


def _grads(seed, kinds=("nan", "+inf", "-inf")):
    """Random grads; tensor 0 holds a NaN, a +inf and a -inf, tensor 1 only a +inf, tensor 2 none."""
    g = torch.Generator().manual_seed(100 + seed)
    grads = [torch.randn(*s, generator=g) for s in SHAPES]
    values = {"nan": NAN, "+inf": INF, "-inf": -INF}
    for i, kind in enumerate(kinds):
        grads[0].view(-1)[5 * i + 1] = values[kind]
    grads[1][700] = INF
    return grads


def _compare(got, want, what):
    """Same NaN and inf positions (with sign), finite values to float32 rounding."""
    got, want = got.detach().double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf positions differ"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=2e-6, msg=what)


def _run(opt_cls, options, backend, steps=2):
    params = _params()
    opt = opt_cls(params, lr=1e-2, **options)
    with kexue.use_backend(backend):
        for t in range(steps):
            for p, g in zip(params, _grads(t), strict=True):
                p.grad = g
            opt.step()
    return params, [opt.state[p]["exp_avg"] for p in params]


def _oracle(opt_cls, options, steps=2):
    params = [p.detach().double() for p in _params()]
    moms = [torch.zeros_like(p) for p in params]
    for t in range(steps):
        grads = [g.double() for g in _grads(t)]
        if opt_cls is Lion:
            R.lion_step(params, grads, moms, lr=1e-2, weight_decay=options.get("weight_decay", 0.0))
        else:
            R.tiger_step(
                params,
                grads,
                moms,
                lr=1e-2,
                step=t,
                kinds=["matrix", "matrix", "matrix"],
                nan_guard=options.get("nan_guard", "tensor"),
            )
    return params, moms


CASES = {
    "lion": (Lion, {"weight_decay": 0.1}),
    "tiger_no_guard": (Tiger, {"nan_guard": None, "kind": "matrix"}),
    "tiger_tensor_guard": (Tiger, {"nan_guard": "tensor", "kind": "matrix"}),
    "tiger_global_guard": (Tiger, {"nan_guard": "global", "kind": "matrix"}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_gradients_follow_the_oracle(backend, case):
    opt_cls, options = CASES[case]
    params, moms = _run(opt_cls, options, backend)
    want_p, want_m = _oracle(opt_cls, options)
    for i in range(len(SHAPES)):
        _compare(params[i], want_p[i], f"{backend} {case} param {i}")
        _compare(moms[i], want_m[i], f"{backend} {case} momentum {i}")


def test_the_rule_itself():
    """What the oracle says, spelled out, so the test above cannot pass on a wrong oracle."""
    params, moms = _oracle(*CASES["lion"], steps=1)
    assert torch.isnan(params[0].view(-1)[1]) and torch.isnan(moms[0].view(-1)[1])  # NaN shows, not frozen
    assert torch.isfinite(params[0].view(-1)[6]) and torch.isposinf(moms[0].view(-1)[6])  # +inf: one step
    assert torch.isneginf(moms[0].view(-1)[11])
    assert torch.isfinite(params[2]).all()
    # The guard: tensors 0 (NaN) and 1 (+inf only) shrink and keep their momenta; tensor 2 steps.
    params, moms = _oracle(*CASES["tiger_tensor_guard"], steps=1)
    start = [p.detach().double() for p in _params()]
    for i in (0, 1):
        torch.testing.assert_close(params[i], start[i] * 0.99)
        assert not moms[i].any()
    assert moms[2].any() and torch.isfinite(params[2]).all()
    params, _ = _oracle(*CASES["tiger_global_guard"], steps=1)
    torch.testing.assert_close(params[2], start[2] * 0.99)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_non_finite_gradients_are_never_seen(backend):
    """ChildTuning-D: masked elements holding NaN or inf neither move nor poison their momentum."""
    p = torch.randn(40, 30, generator=torch.Generator().manual_seed(4)).requires_grad_()
    mask = torch.ones(40, 30, dtype=torch.bool)
    mask[3, 4] = mask[7, 8] = mask[9, 1] = False
    opt = Lion([{"params": [p], "child_tuning": "D"}], lr=1e-2)
    opt.set_child_tuning_masks({p: mask})
    before = p.detach().clone()
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    g[3, 4], g[7, 8], g[9, 1] = NAN, INF, -INF
    p.grad = g
    with kexue.use_backend(backend):
        opt.step()
    m = opt.state[p]["exp_avg"]
    assert torch.isfinite(p).all() and torch.isfinite(m).all()
    assert torch.equal(p.detach()[~mask], before[~mask]) and not m[~mask].any()
