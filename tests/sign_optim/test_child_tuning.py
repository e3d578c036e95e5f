"""ChildTuning: the F mask's statistics, masked elements never move, the gradient-only mask still
decays, and the Fisher-information masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import FisherInformation, Lion, Tiger
from kexue.reference import sign_optim as R
from tests.sign_optim.helpers import BACKENDS, make_params, random_grads


def test_child_tuning_f_mask_statistics():
    keys = R.stream_keys(seed=1, param_index=0, step=0, stream=R.MASK_STREAM)
    n = 200_000
    for p in (0.1, 0.3, 0.9):
        kept = R.child_tuning_f_gate(keys, p, n).double().mean().item()
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)
    a = R.child_tuning_f_gate(R.stream_keys(1, 0, 0, R.MASK_STREAM), 0.5, 1000)
    b = R.child_tuning_f_gate(R.stream_keys(1, 0, 1, R.MASK_STREAM), 0.5, 1000)
    c = R.child_tuning_f_gate(R.stream_keys(1, 1, 0, R.MASK_STREAM), 0.5, 1000)
    assert 0.4 < (a == b).double().mean() < 0.6 and 0.4 < (a == c).double().mean() < 0.6  # fresh each step/param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["lion", "tiger"])
@pytest.mark.parametrize("mode", ["F", "D"])
def test_child_tuning_masked_elements_never_move(backend, algo, mode):
    params = make_params([(30, 40), (77,)], torch.float32, seed=2)
    start = [p.detach().clone() for p in params]
    cls, kw = (Lion, dict(lr=1e-2)) if algo == "lion" else (Tiger, dict(lr=1e-2, kind="matrix"))
    opt = cls(params, weight_decay=0.5, child_tuning=mode, reserve_p=0.3, seed=4, **kw)
    fixed = {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3 for i, p in enumerate(params)}
    if mode == "D":
        opt.set_child_tuning_masks(fixed)
    with kexue.use_backend(backend):
        for t in range(4):
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, random_grads(params, 10 + t), strict=True):
                p.grad = g
            opt.step()
            for i, p in enumerate(params):
                if mode == "F":
                    keys = R.stream_keys(4, i, t, R.MASK_STREAM)
                    keep = R.child_tuning_f_gate(keys, 0.3, p.numel()).view(p.shape)
                else:
                    keep = fixed[p]
                assert torch.equal(p.detach()[~keep], before[i][~keep]), f"masked elements moved at step {t}"
                assert (p.detach()[keep] != before[i][keep]).float().mean() > 0.99
    assert not all(torch.equal(p.detach(), s) for p, s in zip(params, start, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_child_tuning_gradient_only_mask_still_decays(backend):
    """mask_update=False (the official code's masking): masked elements follow momentum and decay."""
    p = torch.ones(1000, requires_grad=True)
    opt = Lion([p], lr=1e-2, weight_decay=0.5, child_tuning="D", mask_update=False)
    mask = torch.arange(1000) % 2 == 0
    opt.set_child_tuning_masks({p: mask})
    p.grad = torch.ones(1000)
    with kexue.use_backend(backend):
        opt.step()
    assert torch.allclose(p.detach()[~mask], torch.full((500,), 1 - 1e-2 * 0.5))  # decay only, m = 0
    assert torch.allclose(p.detach()[mask], torch.full((500,), 1 - 1e-2 * 0.5 - 1e-2))


def test_fisher_information_masks():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fisher = FisherInformation(model.parameters(), max_grad_norm=1.0)
    g = torch.Generator().manual_seed(0)
    grads_before = None
    for _ in range(3):
        model.zero_grad()
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        grads_before = [p.grad.clone() for p in model.parameters()]
        fisher.accumulate()
    assert all(torch.equal(p.grad, gb) for p, gb in zip(model.parameters(), grads_before, strict=True))
    masks = fisher.masks(reserve_p=0.25)
    for p, score in zip(fisher.params, fisher.scores(), strict=True):
        m = masks[p]
        assert m.dtype == torch.bool and m.shape == p.shape
        assert int(m.sum()) == max(1, round(0.25 * p.numel()))  # no ties in continuous scores
        assert score[m].min() >= score[~m].max()
    glob = fisher.masks(reserve_p=0.25, scope="global")
    total = sum(p.numel() for p in fisher.params)
    assert sum(int(m.sum()) for m in glob.values()) == round(0.25 * total)
    opt = Lion(model.parameters(), child_tuning="D")
    opt.set_child_tuning_masks(masks)
    assert all(torch.equal(opt.state[p]["child_tuning_mask"], masks[p]) for p in fisher.params)
