"""Learning-rate schedules with Lion and Tiger: torch LR schedulers, zero_grad, and piecewise_linear."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger, piecewise_linear
from tests.sign_optim.helpers import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_and_zero_grad(backend):
    p = torch.zeros(10, requires_grad=True)
    opt = Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = 0.0
    with kexue.use_backend(backend):
        for t in range(4):
            p.grad = -torch.ones(10)  # sign(c) = -1: each step adds the current lr
            opt.step()
            expected += 0.1 * 0.5**t
            sched.step()
            opt.zero_grad()
            assert p.grad is None
            opt.step()  # no grad: nothing happens
    torch.testing.assert_close(p.detach(), torch.full((10,), expected), rtol=1e-6, atol=0)


def test_piecewise_linear_schedule():
    f = piecewise_linear({10: 1.0, 20: 0.5, 40: 0.1})
    assert [f(0), f(5), f(10), f(15), f(30), f(40), f(1000)] == pytest.approx([0, 0.5, 1, 0.75, 0.3, 0.1, 0.1])
    assert piecewise_linear({0: 1})(123) == 1.0
    p = torch.zeros(3, requires_grad=True)
    opt = Tiger([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, piecewise_linear({4: 1.0}))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # p has no gradient: nothing moves, but the scheduler sees the usual order
        sched.step()
    assert lrs == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
