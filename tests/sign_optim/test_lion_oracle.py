"""Lion (kexue.optim) on every backend against the float64 oracle, step by step and element by element
(tests/sign_optim/helpers.py explains the check), with and without its options."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.optim import Lion
from tests.sign_optim.helpers import BACKENDS, SHAPES, drive, make_params, random_grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, momentum_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_lion_matches_oracle(backend, dtype, momentum_dtype):
    params = make_params(SHAPES, dtype)
    # a learning rate large enough that steps show in 16-bit params too
    lr = 1e-2 if dtype == torch.float32 else 5e-2
    opt = Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.3, momentum_dtype=momentum_dtype)
    drive(opt, params, 4, lambda t: random_grads(params, 100 + t), backend, "lion")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_options_matches_oracle(backend):
    """Two groups with their own hyperparameters, maximize, a param without grad, betas at 0."""
    params = make_params([(5, 7), (300,), (4, 3), (2,)], torch.float32, seed=1)
    opt = Lion(
        [
            {"params": params[:2], "maximize": True},
            {"params": params[2:], "lr": 3e-2, "betas": (0.0, 0.5), "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )

    def grads_at(t):
        gs = random_grads(params, 200 + t)
        gs[3] = None  # never has a grad
        return gs

    drive(opt, params, 4, grads_at, backend, "lion")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_uses_old_momentum_and_sign_zero(backend):
    # c = 0.9 * 1 + 0.1 * (-5) = 0.4 > 0 (step down) while the new momentum 0.5 - 2.5 < 0.
    p = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.5), weight_decay=0.5)
    p.grad = torch.tensor([0.0, 0.0, 0.0])
    with kexue.use_backend(backend):
        opt.step()  # m = 0, g = 0: sign(0) = 0, only the decay acts
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0, -3.0]) * (1 - 0.1 * 0.5))
    opt.state[p]["exp_avg"].fill_(1.0)
    before = p.detach().clone()
    p.grad = torch.tensor([-5.0, -5.0, -5.0])
    with kexue.use_backend(backend):
        opt.step()
    expected = before * (1 - 0.1 * 0.5) - 0.1
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((3,), -2.0), rtol=0, atol=0)
