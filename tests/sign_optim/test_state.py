"""Lion/Tiger state_dict loading and meta tensors: each bad input is a clear error, nothing loads."""

from __future__ import annotations

import copy

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger


def _stepped(cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 4, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
    opt = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    with kexue.use_backend("torch"):
        opt.step()
    return params, opt


def _unchanged(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k]["exp_avg"], v["exp_avg"])


@pytest.mark.parametrize("missing", ["state", "param_groups"])
def test_state_dict_without_a_key(missing):
    _, opt = _stepped(Lion)
    saved = opt.state_dict()
    del saved[missing]
    with pytest.raises(ValueError, match=f"no '{missing}' entry"):
        opt.load_state_dict(saved)


def test_a_model_state_dict_is_refused():
    _, opt = _stepped(Tiger)
    with pytest.raises(ValueError, match="no 'state' entry.*model's state_dict"):
        opt.load_state_dict(torch.nn.Linear(2, 2).state_dict())


@pytest.mark.parametrize("saved_by, loaded_by, missing", [(Lion, Tiger, "beta"), (Tiger, Lion, "betas")])
def test_the_other_algorithms_state_is_refused(saved_by, loaded_by, missing):
    _, source = _stepped(saved_by, 1)
    _, target = _stepped(loaded_by, 2)
    before = target.state_dict()
    with pytest.raises(ValueError, match=f"no \\[.*'{missing}'.*not saved by {loaded_by.__name__}"):
        target.load_state_dict(source.state_dict())
    _unchanged(target, before)


def test_a_state_without_its_momentum_is_refused():
    _, opt = _stepped(Tiger)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live per-parameter dicts
    del saved["state"][1]["exp_avg"]
    before = opt.state_dict()
    with pytest.raises(ValueError, match="parameter 1 has a step count but no 'exp_avg'"):
        opt.load_state_dict(saved)
    _unchanged(opt, before)


def test_a_state_dict_that_is_not_a_dict():
    _, opt = _stepped(Lion)
    with pytest.raises(TypeError, match="expects a dict, got list"):
        opt.load_state_dict([1, 2])


@pytest.mark.parametrize("cls", [Lion, Tiger])
def test_meta_tensors_are_named(cls):
    """(torch itself refuses a meta gradient on a parameter with data.)"""
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: the parameter is on the meta"):
        cls([p]).step()


def test_meta_lr_is_named():
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr is a tensor on the meta device"):
        Lion([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor(1e-3, device="meta"))
