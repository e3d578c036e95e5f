"""Errors: clear, naming the group and parameter, and raised before anything changes."""

from __future__ import annotations

import pytest
import torch

from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import make_params


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ps: Lion(ps, lr=-1e-3), ValueError, r"Lion: param_groups\[0\]: lr must be a real number in \[0.0"),
        (lambda ps: Lion(ps, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must lie in \[0, 1\)"),
        (lambda ps: Lion(ps, betas=(-0.1, 0.9)), ValueError, r"betas\[0\] must lie in \[0, 1\)"),
        (lambda ps: Lion(ps, betas=0.9), ValueError, "betas must be a pair"),
        (lambda ps: Lion(ps, weight_decay=-0.1), ValueError, "weight_decay"),
        (
            lambda ps: Lion([{"params": ps[:1]}, {"params": ps[1:], "lr": float("nan")}]),
            ValueError,
            r"param_groups\[1\]: lr",
        ),
        (lambda ps: Tiger(ps, beta=1.0), ValueError, r"beta must be a real number in \[0.0, 1.0\)"),
        (lambda ps: Tiger(ps, grad_accum_steps=0), ValueError, "grad_accum_steps must be an int >= 1"),
        (lambda ps: Tiger(ps, kind="weights"), ValueError, "kind must be one of"),
        (lambda ps: Tiger(ps, nan_guard="any"), ValueError, "nan_guard must be one of"),
        (lambda ps: Tiger(ps, shrink_ratio=0.0), ValueError, "shrink_ratio"),
        (lambda ps: Tiger(ps, rms_scale=-1.0), ValueError, "rms_scale"),
        (lambda ps: Tiger(ps, grad_accum_steps=2, freeze_absent_momentum=True), ValueError, "freeze_absent_momentum"),
        (lambda ps: Lion(ps, child_tuning="E"), ValueError, "child_tuning must be None, 'F' or 'D'"),
        (lambda ps: Lion(ps, reserve_p=0.0), ValueError, "reserve_p"),
        (lambda ps: Lion(ps, momentum_dtype=torch.float16), ValueError, "momentum_dtype"),
        (lambda ps: Lion(ps, momentum=0.9), TypeError, "unexpected option"),
    ],
)
def test_bad_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make(make_params([(2, 3), (4,)], torch.float32))


def _set_grads(ps):
    for p in ps:
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (lambda opt, ps: opt.param_groups[1].update(lr=-1.0), ValueError, r"param_groups\[1\]: lr"),
        (
            lambda opt, ps: setattr(ps[2], "grad", torch.randn(3, 3).to_sparse()),
            TypeError,
            r"param_groups\[1\]\['params'\]\[0\]: Lion does not support sparse gradients",
        ),
        (
            lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 3, dtype=torch.float16)),
            TypeError,
            r"\['params'\]\[0\]: state 'exp_avg' has dtype torch.float16",
        ),
        (lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 4)), ValueError, "has shape"),
        (
            lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 3, device="meta")),
            ValueError,
            r"\[1\]\['params'\]\[0\]: state 'exp_avg' is on meta, the parameter on cpu",
        ),
    ],
)
def test_bad_step_inputs_change_nothing(spoil, error, match):
    ps = make_params([(2, 3), (4,), (3, 3)], torch.float32)
    opt = Lion([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)
    _set_grads(ps)
    opt.step()
    _set_grads(ps)
    spoil(opt, ps)
    before = [p.detach().clone() for p in ps]
    moms = [opt.state[p]["exp_avg"].clone() for p in ps[:2]]
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before, strict=True))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(ps[:2], moms, strict=True))
    assert all(int(opt.state[p]["step"]) == 1 for p in ps[:2])


def test_complex_grads_and_embedding_shape_errors():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: complex"):
        Lion([z]).step()
    v = torch.zeros(5, requires_grad=True)
    v.grad = torch.ones(5)
    with pytest.raises(ValueError, match="an 'embedding' group holds tables"):
        Lion([v], embedding=True).step()
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        Lion([v]).set_child_tuning_masks({torch.zeros(5): torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(5,\)"):
        Lion([v]).set_child_tuning_masks({v: torch.ones(4, dtype=torch.bool)})
