"""Odd inputs that must work: the NaN guard, non-contiguous and empty params, float64 params, and
the custom op under torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import Lion, Tiger
from kexue.reference import sign_optim as R
from tests.sign_optim.helpers import BACKENDS, assert_rounded


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_guard_keeps_momentum_and_shrinks_towards_the_centre(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    opt = Tiger(model.named_parameters(), lr=1e-2)  # named: LayerNorm weight -> "gamma" (centre 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with kexue.use_backend(backend):
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moms = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[0, 0] = float("nan")
    with kexue.use_backend(backend):
        opt.step()
    w = dict(model.named_parameters())
    torch.testing.assert_close(w["0.weight"].detach(), before["0.weight"] * 0.99, rtol=1e-6, atol=0)
    assert torch.equal(opt.state[w["0.weight"]]["exp_avg"], moms["0.weight"])
    assert not torch.equal(w["1.weight"].detach(), before["1.weight"])  # per-tensor: others step normally
    opt.param_groups[0]["nan_guard"] = "global"
    model[0].weight.grad[0, 0] = float("nan")
    gain = w["1.weight"].detach().clone()
    with kexue.use_backend(backend):
        opt.step()
    torch.testing.assert_close(w["1.weight"].detach(), (gain - 1) * 0.99 + 1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_param_and_empty_tensors(backend):
    base = torch.randn(8, 6)
    p = torch.empty_strided((8, 6), (1, 8)).copy_(base).requires_grad_()  # a leaf with transposed strides
    assert not p.is_contiguous()
    empty = torch.zeros(0, 5, requires_grad=True)
    ref = p.detach().double().clone()
    m = torch.zeros_like(ref)
    opt = Lion([p, empty], lr=1e-2, weight_decay=0.1)
    for t in range(3):
        g = torch.randn(8, 6, generator=torch.Generator().manual_seed(t))
        p.grad, empty.grad = g, torch.zeros(0, 5)
        R.lion_step([ref], [g.double()], [m], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
        with kexue.use_backend(backend):
            opt.step()
    assert_rounded(p, ref, ref.abs() + 1e-2, "non-contiguous param")
    assert opt.state[empty]["exp_avg"].shape == (0, 5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="kexue._C not built")
def test_float64_params_fall_back_to_the_torch_backend():
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = Lion([p], lr=1e-2)
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()  # automatic choice: torch serves float64
    p.grad = torch.randn(5, dtype=torch.float64)
    with kexue.use_backend("cpu"), pytest.raises(kexue.BackendUnavailableError, match=r"\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ps = [torch.randn(4, 6), torch.randn(3, 5, dtype=torch.bfloat16)]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros(4, 6), torch.zeros(3, 5, dtype=torch.bfloat16)]
    hyper = torch.tensor([[1e-2, 0.1, 0.9, 0.1, 0.99, 0.01, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    ints = torch.zeros(2, R.NUM_INTS, dtype=torch.int64)
    ints[:, R.FLAGS] = R.UPDATE
    ints[:, R.NAN_GROUP] = -1
    ints[1, R.FLAGS] |= R.RMS_ROW | R.LAZY_ROWS
    ints[1, R.ROW_LEN] = 5
    with kexue.use_backend(backend):
        seen = [torch.empty(0, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)]
        masks = [None, torch.rand(3, 5) < 0.5]
        ints[1, R.FLAGS] |= R.MASK_D
        sums = [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
        torch.library.opcheck(torch.ops.kexue.sign_optim_step.default, (ps, gs, ms, masks, seen, sums, hyper, ints))
