"""Stochastic rounding of 16-bit params: unbiased, and tiny updates still move bf16 params."""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.optim import Lion
from kexue.reference import sign_optim as R
from tests.sign_optim.helpers import BACKENDS


def test_stochastic_rounding_is_unbiased():
    x = torch.full((100_000,), 1.0 + 2.0**-10)  # 1/8 of a bf16 ulp above 1
    r = R.to_bf16_stochastic(x, R.stream_keys(2, 0, 0, R.ROUND_STREAM)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(r.double().mean().item() - (1.0 + 2.0**-10)) < 5 * 2.0**-7 * math.sqrt(0.125 * 0.875 / x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_moves_bf16_params_by_tiny_updates(backend):
    """lr far below half a bf16 ulp: nearest rounding never moves, stochastic rounding moves on average."""

    def run(sr):
        p = torch.ones(20_000, dtype=torch.bfloat16, requires_grad=True)
        opt = Lion([p], lr=1e-4, stochastic_rounding=sr, seed=0)
        with kexue.use_backend(backend):
            for _ in range(20):
                p.grad = torch.ones_like(p)
                opt.step()
        return p.detach().double()

    assert torch.equal(run(False), torch.ones(20_000, dtype=torch.float64))
    mean = run(True).mean().item()
    assert abs(mean - (1 - 20 * 1e-4)) < 2e-4  # exact path: 1 - 20 lr
