"""Lion and Tiger under torch.amp.GradScaler: the unscale fused into the step, inf/NaN steps skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import BACKENDS


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = [
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for p in model.parameters()
    ]
    return params, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
@pytest.mark.parametrize("user_unscales", [False, True])
def test_scaled_steps_equal_unscaled_steps(backend, opt_cls, user_unscales):
    """A power-of-two scale is exact, so the scaled run equals the plain run bit for bit."""
    model = _model()
    plain = copy.deepcopy(model)
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.1)
    plain_opt = opt_cls(plain.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with kexue.use_backend(backend):
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(_loss(model, x)).backward()
            if user_unscales:  # e.g. to clip gradients before the step
                scaler.unscale_(opt)
            else:  # the grads stay scaled until the kernel reads them
                assert model[0].weight.grad.abs().max() > 100 * plain[0].weight.abs().max()
            scaler.step(opt)
            scaler.update()
            plain_opt.zero_grad()
            _loss(plain, x).backward()
            plain_opt.step()
            for p, q in zip(model.parameters(), plain.parameters(), strict=True):
                assert torch.equal(p, q)
                assert torch.equal(opt.state[p]["exp_avg"], plain_opt.state[q]["exp_avg"])
    assert scaler.get_scale() == 2.0**12
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # the scaler cleaned up


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_step_with_inf_or_nan_gradients_is_skipped(backend, bad):
    model = _model()
    opt = Tiger(model.parameters(), lr=1e-2, nan_guard="tensor")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 16)
    with kexue.use_backend(backend):
        scaler.scale(_loss(model, x)).backward()
        scaler.step(opt)
        scaler.update()
        params, state = _snapshot(model, opt)
        opt.zero_grad()
        x_bad = x.clone()
        x_bad[0, 0] = bad
        scaler.scale(_loss(model, x_bad)).backward()
        assert not torch.isfinite(model[0].weight.grad).all()
        scaler.step(opt)
        scaler.update()
    # Skipped whole: no shrink by the NaN guard, no momentum change, no step counted.
    for p, before, st in zip(model.parameters(), params, state, strict=True):
        assert torch.equal(p, before)
        assert torch.equal(opt.state[p]["exp_avg"], st["exp_avg"])
        assert opt.state[p]["step"] == st["step"] == 1
    assert scaler.get_scale() == 2.0**7  # backed off
