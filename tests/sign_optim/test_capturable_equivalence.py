"""Lion and Tiger with ``capturable=True`` step bitwise as the plain step, with an lr tensor and under
GradScaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import Lion, Tiger, piecewise_linear
from tests.sign_optim.capturable_helpers import _assert_same, _copy, _grads, _make, _params
from tests.sign_optim.helpers import BACKENDS


@pytest.mark.parametrize(
    "backend, lr_kind",
    [(b, kind) for b in BACKENDS for kind in ("tensor", "float") if b != "triton" or kind == "tensor"],
)  # the interpreter is slow
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_equals_plain_bitwise(backend, opt_cls, lr_kind):
    """Many steps under a LambdaLR schedule (writing a tensor lr in place with fill_, or a float
    lr), every step-dependent option on: the capturable step gives the plain step's bits."""
    steps = 6 if backend == "triton" else 9
    plain = _params(0, small=backend == "triton")
    cap = _copy(plain)
    base = 2e-2 if opt_cls is Lion else 3e-2

    def lr0():
        return torch.tensor(base, dtype=torch.float64) if lr_kind == "tensor" else base

    opt_plain, opt_cap = _make(opt_cls, plain, False, lr0()), _make(opt_cls, cap, True, lr0())
    schedule = piecewise_linear({3: 1.0, 6: 0.25})
    sched_plain = torch.optim.lr_scheduler.LambdaLR(opt_plain, schedule)
    sched_cap = torch.optim.lr_scheduler.LambdaLR(opt_cap, schedule)
    if lr_kind == "tensor":
        assert isinstance(opt_cap.param_groups[0]["lr"], torch.Tensor)
    with kexue.use_backend(backend):
        for t in range(steps):
            for params in (plain, cap):
                for name, g in _grads(params, t, nan_at=4 if opt_cls is Tiger else None).items():
                    params[name].grad = g
            lr_before = opt_cap.param_groups[0]["lr"]
            opt_plain.step()
            opt_cap.step()
            _assert_same(plain, cap, opt_plain, opt_cap, f"step {t}")
            sched_plain.step()
            sched_cap.step()
            if lr_kind == "tensor":  # the scheduler wrote the same tensor in place
                assert opt_cap.param_groups[0]["lr"] is lr_before
    start = _params(0, backend == "triton").values()
    moved = [not torch.equal(p, q) for p, q in zip(plain.values(), start, strict=True)]
    assert all(moved)


@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_accepts_float32_lr_tensor(opt_cls):
    """A float32 lr tensor (torch's usual) is read exactly: equal to the plain step with the
    float32 value as a Python float."""
    plain = _params(1, small=True)
    cap = _copy(plain)
    lr32 = torch.tensor(1e-2, dtype=torch.float32)
    opt_plain = opt_cls(list(plain.values()), lr=float(lr32))
    opt_cap = opt_cls(list(cap.values()), lr=lr32.clone(), capturable=True)
    for t in range(3):
        for params in (plain, cap):
            for name, g in _grads(params, t).items():
                params[name].grad = g
        opt_plain.step()
        opt_cap.step()
        for p, q in zip(plain.values(), cap.values(), strict=True):
            assert torch.equal(p, q)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_under_grad_scaler_equals_plain(backend, opt_cls):
    """Scaled steps (unscale fused, flag on the device) with an inf at one step, which both skip:
    the capturable run equals the plain one bit for bit, and the skipped step is not counted."""
    models = [_model(), _model()]
    opts = [
        opt_cls(m.parameters(), lr=1e-2, weight_decay=0.1, capturable=c)
        for m, c in zip(models, (False, True), strict=True)
    ]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) for _ in models]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with kexue.use_backend(backend):
        for t in range(4):
            for model, opt, scaler in zip(models, opts, scalers, strict=True):
                opt.zero_grad()
                xb = x.clone()
                if t == 2:
                    xb[0, 0] = float("inf")
                scaler.scale(model(xb).pow(2).mean()).backward()
                scaler.step(opt)
                scaler.update()
            for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
                assert torch.equal(p, q), f"step {t}"
                assert torch.equal(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"])
                assert opts[1].state[q]["step"].item() == opts[0].state[p]["step"] == (t if t >= 2 else t + 1)
    assert scalers[1].get_scale() == 2.0**9  # backed off once
