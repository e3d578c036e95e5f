"""Lion and Tiger agree with the public implementations (lion-pytorch, pytorch_optimizer) for the
options they share, and Tiger's gradient accumulation equals one step on the mean gradient."""

from __future__ import annotations

import pytest
import torch

from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import assert_rounded, make_params, random_grads


def _in_lockstep(ours, theirs, a, b, seed, beta):
    """Step both optimizers on the same grads; after each step compare, then re-sync ``theirs`` to
    ``ours`` so that every step is compared from the same state. ``beta``: the momentum's decay."""
    for t in range(5):
        grads = random_grads(ours, seed + t)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        m_prev = [
            b.state[q]["exp_avg"].double().clone() if q in b.state else torch.zeros_like(g, dtype=torch.float64)
            for q, g in zip(theirs, grads, strict=True)
        ]
        a.step()
        b.step()
        for p, q, g, m in zip(ours, theirs, grads, m_prev, strict=True):
            # the same float32 formulas (decay first, then the sign step): equal up to rounding order
            assert_rounded(p, q.detach().double(), q.detach().double().abs() + 1e-2, f"step {t}")
            scale = beta * m.abs() + (1 - beta) * g.double().abs()
            assert_rounded(a.state[p]["exp_avg"], b.state[q]["exp_avg"].double(), scale, f"step {t} momentum")
            with torch.no_grad():
                q.copy_(p)
                b.state[q]["exp_avg"].copy_(a.state[p]["exp_avg"])


def test_lion_equals_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours = make_params([(6, 50), (300,)], torch.float32, seed=8)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = Lion(ours, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)
    b = lion_pytorch.Lion(theirs, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)
    _in_lockstep(ours, theirs, a, b, 700, beta=0.98)


def test_tiger_equals_pytorch_optimizer():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours = make_params([(6, 50), (300,)], torch.float32, seed=9)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    # pytorch-optimizer's Tiger: no RMS factor, no tensor kinds, no NaN guard, no accumulation.
    a = Tiger(ours, lr=1e-2, beta=0.965, weight_decay=0.3, kind="matrix", rms_scale=1.0, nan_guard=None)
    b = pytorch_optimizer.Tiger(theirs, lr=1e-2, beta=0.965, weight_decay=0.3, foreach=False)
    _in_lockstep(ours, theirs, a, b, 800, beta=0.965)


def test_tiger_accumulation_equals_one_step_on_the_mean_gradient():
    """Spec (d): k micro-steps == one step on the averaged gradient with beta applied once."""
    k = 4
    acc = make_params([(7, 30)], torch.float64, seed=10)
    one = [p.detach().clone().requires_grad_() for p in acc]
    a = Tiger(acc, lr=1e-2, grad_accum_steps=k, weight_decay=0.1)
    b = Tiger(one, lr=1e-2, grad_accum_steps=1, weight_decay=0.1)
    for window in range(3):
        m_prev = b.state[one[0]]["exp_avg"].double().clone() if one[0] in b.state else 0.0
        micro = [random_grads(acc, 900 + window * k + i)[0] for i in range(k)]
        for i, g in enumerate(micro):
            acc[0].grad = g
            a.step()
            if i < k - 1:
                assert torch.equal(acc[0].detach(), one[0].detach())  # no move inside a window
        one[0].grad = torch.stack(micro).mean(0)
        b.step()
        torch.testing.assert_close(acc[0].detach(), one[0].detach(), rtol=0, atol=1e-12)
        # float32 momentum: both are beta m + (1 - beta) mean(g) to float32 rounding of the partial sums
        scale = 0.965 * abs(m_prev) + 0.035 / k * sum(g.abs() for g in micro)
        assert_rounded(a.state[acc[0]]["exp_avg"], b.state[one[0]]["exp_avg"].double(), scale, "momentum")
        with torch.no_grad():
            b.state[one[0]]["exp_avg"].copy_(a.state[acc[0]]["exp_avg"])
