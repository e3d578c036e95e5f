"""A capturable step makes no host synchronisation, and the detector that checks it catches one."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger
from tests.sign_optim.capturable_helpers import NO_SYNC_BACKENDS, _grads, _make, _params, no_host_sync


@pytest.mark.parametrize("backend", NO_SYNC_BACKENDS)
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_step_makes_no_host_sync(backend, opt_cls, monkeypatch):
    params = _params(2, small=True)
    opt = _make(opt_cls, params, True, torch.tensor(1e-2, dtype=torch.float64))
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    with kexue.use_backend(backend):
        opt.step()  # first step: creates the state, copies the constant tables once
        before = {name: p.detach().clone() for name, p in params.items()}
        # As GradScaler.step hands them over: the flag and the scale stay on the device.
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with no_host_sync(monkeypatch):
            opt.step()
            opt.param_groups[0]["lr"].fill_(5e-3)  # a scheduler writing the tensor in place
            opt.step()
        del opt.grad_scale, opt.found_inf
    assert all(not torch.equal(p, before[name]) for name, p in params.items() if name != "emb")
    assert opt.state[params["w1"]]["step"].item() == 3


def test_no_sync_detector_catches_a_sync(monkeypatch):
    """The detector fails the plain step, which reads a tensor lr and GradScaler's flag on the
    host: so it would catch such a read added to the capturable step."""
    params = _params(3, small=True)
    opt = _make(Lion, params, False, torch.tensor(1e-2, dtype=torch.float64))
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    opt.step()
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync(monkeypatch):
        opt.step()
    t = torch.tensor([1.0, 2.0])
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: t.tolist(), lambda: float(t.sum())):
        with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync(monkeypatch):
            read()
