"""The Triton step's launch plan: kept between steps, rebuilt only when the call's structure changes.

The plan (triton_kernels/sign_optim_plan.py) is built once per call structure and kept between
steps: a spy on ``build_plan`` counts the builds while the optimizer steps on CPU tensors under the
interpreter. The per-step values (lr, weight decay) travel in the tables uploaded at each step, so
changing them must not rebuild the plan, and the step must still use the new values. On CUDA, a
step must make no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import _backend
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger
from tests.conftest import DEVICE, triton_unavailable_reason

needs_triton = pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))


@pytest.fixture
def builds(monkeypatch):
    """The list of plan builds made during the test (the cache starts empty)."""
    plan = pytest.importorskip("kexue.triton_kernels.sign_optim_plan")
    plan.clear_plans()
    made = []
    real = plan.build_plan

    def spy(device, structure):
        made.append(structure)
        return real(device, structure)

    monkeypatch.setattr(plan, "build_plan", spy)
    yield made
    plan.clear_plans()


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 40), (40,), (3, 5)]  # 3 x 5: 15 elements, a masked tail only
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def _run(opt, params, steps, seed=1, before_step=None):
    for i in range(steps):
        _grads(params, seed + i)
        if before_step is not None:
            before_step(i)
        opt.step()


@needs_triton
def test_same_step_twice_builds_one_plan_and_uploads_nothing_new(builds):
    from kexue.triton_kernels import sign_optim_plan as plan

    params = _params()
    opt = Lion(params, lr=1e-3, weight_decay=0.1)
    grads = None
    with kexue.use_backend("triton"):
        for i in range(3):
            if grads is None:
                _grads(params, 1)
                grads = [p.grad for p in params]
            opt.step()  # the same gradient tensors each step: the same addresses
            (cached,) = plan._PLANS.values()
            if i == 0:
                tables = cached.tables
    assert len(builds) == 1
    assert cached.tables is tables  # same lr, same addresses: nothing uploaded after the first step


@needs_triton
def test_lr_and_weight_decay_changes_do_not_rebuild_and_are_applied(builds):
    from kexue.triton_kernels import sign_optim_plan as plan

    def schedule(opt):
        def before(i):
            opt.param_groups[0]["lr"] = 1e-3 / (i + 1)
            opt.param_groups[0]["weight_decay"] = 0.1 * (i + 1)

        return before

    with kexue.use_backend("triton"):
        a = _params()
        opt_a = Lion(a, lr=1e-3, weight_decay=0.1)
        _run(opt_a, a, 3, before_step=schedule(opt_a))
        assert len(builds) == 1
        # The same run with the cache emptied before every step: bitwise the same.
        b = _params()
        opt_b = Lion(b, lr=1e-3, weight_decay=0.1)
        hook = schedule(opt_b)

        def fresh(i):
            plan.clear_plans()
            hook(i)

        _run(opt_b, b, 3, before_step=fresh)
        # And without the schedule: different, so the new values did reach the kernel.
        c = _params()
        _run(Lion(c, lr=1e-3, weight_decay=0.1), c, 3)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x.detach(), y.detach())
        assert not torch.equal(x.detach(), z.detach())


@needs_triton
def test_new_param_dtype_or_group_rebuilds(builds):
    params = _params()
    opt = Lion(params, lr=1e-3)
    with kexue.use_backend("triton"):
        _run(opt, params, 2)
        assert len(builds) == 1
        extra = _params(torch.bfloat16, seed=5)[:1]  # a new group, a new dtype
        opt.add_param_group({"params": extra, "lr": 2e-3})
        _run(opt, params + extra, 2)
        assert len(builds) == 2
        more = _params(seed=6)[:1]  # one more float32 parameter
        opt.add_param_group({"params": more})
        _run(opt, params + extra + more, 1)
        assert len(builds) == 3
        opt.param_groups[2]["embedding"] = True  # a structural option: rows, lazy updates
        _run(opt, params + extra + more, 1)
        assert len(builds) == 4


@needs_triton
def test_tiger_builds_twice_then_keeps_its_plan(builds):
    """Tiger's first step reads theta for RMS(theta); from the second on the sum is carried
    (RMS_CARRIED, a structural flag): two plans, then none, across lr changes and micro-steps."""
    params = _params()
    opt = Tiger(params, lr=1e-3, grad_accum_steps=2)
    with kexue.use_backend("triton"):
        _run(opt, params, 6, before_step=lambda i: opt.param_groups[0].__setitem__("lr", 1e-3 * (i + 1)))
    assert len(builds) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: it watches CUDA host synchronisation")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("algo", [Lion, Tiger])
def test_a_plain_step_makes_no_host_synchronisation(backend, algo):
    params = [p.detach().cuda().requires_grad_() for p in _params()]
    reason = _backend.reasons(ops.OP, params[0])[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot serve this step: {reason}")
    opt = algo(params, lr=1e-3)
    with kexue.use_backend(backend):
        _run(opt, params, 3)  # compiles, builds the plans, starts Tiger's carried sums
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _run(opt, params, 3, seed=10, before_step=lambda i: opt.param_groups[0].__setitem__("lr", 1e-4 * (i + 1)))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
