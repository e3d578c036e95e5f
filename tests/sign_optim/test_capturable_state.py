"""Capturable state: state_dict round trips (into and out of the plain optimizer) and pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from kexue.optim import Lion, Tiger
from tests.sign_optim.capturable_helpers import _assert_same, _copy, _grads, _make, _params


@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_state_dict_round_trip(opt_cls):
    params = _params(4, small=True)
    opt = _make(opt_cls, params, True, torch.tensor(1e-2, dtype=torch.float64))
    for t in range(2):
        for name, g in _grads(params, t).items():
            params[name].grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(isinstance(s["step"], torch.Tensor) for s in saved["state"].values())
    resumed_params = _copy(params)
    resumed = _make(opt_cls, resumed_params, True, torch.tensor(1e-2, dtype=torch.float64))
    resumed.load_state_dict(saved)
    for t in range(2, 5):
        for ps in (params, resumed_params):
            for name, g in _grads(ps, t).items():
                ps[name].grad = g
        opt.step()
        resumed.step()
        for name in params:
            assert torch.equal(params[name], resumed_params[name])
            st = resumed.state[resumed_params[name]]["step"]
            assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.item() == t + 1


@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_plain_state_dict_into_capturable_and_back(opt_cls):
    """A plain run's state (int steps) loaded into a capturable optimizer gets tensor steps on
    the parameters' device and continues bitwise as the plain run; and the other way round."""
    plain = _params(5, small=True)
    opt_plain = _make(opt_cls, plain, False, 1e-2)
    for t in range(3):
        for name, g in _grads(plain, t).items():
            plain[name].grad = g
        opt_plain.step()
    cap = _copy(plain)
    opt_cap = _make(opt_cls, cap, True, 1e-2)
    opt_cap.load_state_dict(copy.deepcopy(opt_plain.state_dict()))
    assert all(g["capturable"] for g in opt_cap.param_groups)  # its own mode, not the saved one
    for q in cap.values():
        st = opt_cap.state[q]["step"]
        assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.device == q.device
        assert st.item() == 3
    back = _copy(plain)
    opt_back = _make(opt_cls, back, False, 1e-2)
    opt_back.load_state_dict(copy.deepcopy(opt_cap.state_dict()))
    assert all(isinstance(opt_back.state[q]["step"], int) for q in back.values())
    for t in range(3, 6):
        for ps in (plain, cap, back):
            for name, g in _grads(ps, t).items():
                ps[name].grad = g
        opt_plain.step()
        opt_cap.step()
        opt_back.step()
        _assert_same(plain, cap, opt_plain, opt_cap, f"step {t}")
        for name in plain:
            assert torch.equal(plain[name], back[name])


def test_pickled_capturable_optimizer_steps_alike():
    """An unpickled optimizer (params, tensor steps and all) rebuilds its caches and steps alike."""
    params = _params(10, small=True)
    opt = _make(Lion, params, True, 1e-2)
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    opt.step()
    twin = pickle.loads(pickle.dumps(opt))
    twin_params = {name: p for g in twin.param_groups for name, p in zip(g["param_names"], g["params"], strict=True)}
    assert all(isinstance(twin.state[p]["step"], torch.Tensor) for p in twin_params.values())
    for ps in (params, twin_params):
        for name, g in _grads(ps, 1).items():
            ps[name].grad = g
    opt.step()
    twin.step()
    for name in params:
        assert torch.equal(params[name], twin_params[name])
