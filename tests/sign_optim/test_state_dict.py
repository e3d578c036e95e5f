"""Lion and Tiger state_dict: round trip, fp32 momentum of bf16 params, and a wrong shape loads nothing."""

from __future__ import annotations

import io

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import BACKENDS, assert_rounded, make_params, random_grads


def _steps(opt, params, seeds, backend):
    with kexue.use_backend(backend):
        for s in seeds:
            for p, g in zip(params, random_grads(params, s), strict=True):
                p.grad = g
            opt.step()


@pytest.mark.parametrize("save_backend, load_backend", [(b, c) for b in BACKENDS for c in BACKENDS])
def test_state_dict_round_trip(save_backend, load_backend):
    shapes = [(6, 20), (20,), (9, 5)]

    def factory(ps):
        opt = Tiger(
            [
                {"params": ps[:2], "momentum_dtype": torch.bfloat16, "child_tuning": "D"},
                {"params": ps[2:], "embedding": True},
            ],
            lr=1e-2,
            grad_accum_steps=2,
            seed=1,
        )
        opt.set_child_tuning_masks({ps[0]: torch.arange(120).view(6, 20) % 3 == 0})
        return opt

    straight = make_params(shapes, torch.float32, seed=3)
    opt = factory(straight)
    _steps(opt, straight, range(7), save_backend)

    resumed = make_params(shapes, torch.float32, seed=3)
    first = factory(resumed)
    _steps(first, resumed, range(3), save_backend)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = Tiger([{"params": resumed[:2]}, {"params": resumed[2:]}], lr=0.5)  # options come from the dict
    second.load_state_dict(torch.load(buf, weights_only=False))
    state = second.state[resumed[0]]
    assert state["exp_avg"].dtype == torch.bfloat16  # not cast to the param's dtype by torch
    assert state["child_tuning_mask"].dtype == torch.bool
    assert second.state[resumed[2]]["row_seen"].dtype == torch.uint8
    assert second.param_groups[0]["lr"] == 1e-2 and second.param_groups[1]["embedding"]
    _steps(second, resumed, range(3, 7), load_backend)
    for a, b in zip(straight, resumed, strict=True):
        if save_backend == load_backend:
            assert torch.equal(a, b)
        else:
            assert_rounded(b, a.detach().double(), a.detach().double().abs() + 1e-2, "across backends")


def test_state_dict_keeps_fp32_momentum_of_bf16_params():
    p = torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = Lion([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    exact = opt.state[p]["exp_avg"].clone()
    q = p.detach().clone().requires_grad_()
    other = Lion([q], lr=1e-2)
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["exp_avg"].dtype == torch.float32 and torch.equal(other.state[q]["exp_avg"], exact)
    other.state[q]["exp_avg"].add_(1)  # loaded state is a copy, not shared with the source
    assert torch.equal(opt.state[p]["exp_avg"], exact)


def test_load_state_dict_of_wrong_shape_is_an_error_and_loads_nothing():
    a = make_params([(3, 4), (5,)], torch.float32)
    opt = Lion(a, lr=1e-2)
    _steps(opt, a, [1], "torch")
    sd = opt.state_dict()
    b = make_params([(3, 4), (6,)], torch.float32)
    other = Lion(b, lr=0.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: state 'exp_avg' has shape \(5,\)"):
        other.load_state_dict(sd)
    assert len(other.state) == 0 and other.param_groups[0]["lr"] == 0.5
