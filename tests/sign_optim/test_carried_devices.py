"""One-pass Tiger on every device and backend pair: the CUDA C++ step carries the sums of squares too.

Each test runs on "targets", (device, backend) pairs: the C++ CPU step always, and with a GPU the
CUDA C++ step and the Triton one on CUDA tensors. On a machine without a GPU only the CPU target
runs, which still exercises the tests themselves. What they check on each target: the carried
step is bit for bit the two-pass one and carries from the second step on (the table flags say no
pre-pass reads theta); the CUDA step agrees with the CPU step to float32 rounding; a state_dict
saved on one target resumes on another; and on CUDA a step makes no host synchronisation.
"""

from __future__ import annotations

import io

import pytest
import torch

import kexue
from kexue import _backend
from kexue.ops import sign_optim as ops
from kexue.optim import Tiger
from tests.sign_optim.helpers import NATIVE
from tests.sign_optim.test_one_pass import CONFIGS, FlagSpy, _assert_same, _grads, _groups, _model


def _targets() -> list[tuple[str, str]]:
    out = [("cpu", "cpu")] if NATIVE else []
    if torch.cuda.is_available():
        probe = torch.zeros(1, device="cuda")
        out += [("cuda", b) for b in ("cuda", "triton") if _backend.reasons(ops.OP, probe)[b] is None]
    return out


TARGETS = _targets()
CUDA_TARGETS = [t for t in TARGETS if t[0] == "cuda"]
pytestmark = pytest.mark.skipif(not TARGETS, reason="neither the C++ CPU step nor a CUDA device is available")


def _on(device, dtype=torch.float32, seed=3):
    return {k: v.detach().to(device).requires_grad_() for k, v in _model(dtype, seed).items()}


def _pair(device, dtype, seed, **options):
    a, b = _on(device, dtype, seed), _on(device, dtype, seed)
    ga, opts = _groups(a, **dict(options))
    gb, _ = _groups(b, **dict(options))
    return a, Tiger(ga, lr=3e-2, **opts), b, Tiger(gb, lr=3e-2, **opts)


def _set_grads(params, t, nan_at=None):
    for k, g in _grads(params, t, nan_at).items():
        params[k].grad = g.to(params[k].device)


def _step_both(a, one, b, two, t, nan_at=None):
    _set_grads(a, t, nan_at)
    _set_grads(b, t, nan_at)
    one.step()
    two.forget_carried_rms()  # the two-pass step: never trust a carried sum
    two.step()


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_carried_step_is_the_two_pass_step(target, dtype, config, monkeypatch):
    device, backend = target
    options = dict(CONFIGS[config])
    nan_at = options.pop("nan_at", None)
    a, one, b, two = _pair(device, dtype, 3, **options)
    spy = FlagSpy(monkeypatch)
    with kexue.use_backend(backend):
        for t in range(5):
            _step_both(a, one, b, two, t, nan_at)
            _assert_same(a, one, b, two, f"step {t}")
            # w_big, w (whole-tensor RMS), emb (row RMS) carry from the second step: no pre-pass
            # reads theta; the bias has no RMS.
            assert spy.carried(-2) == [t > 0, t > 0, t > 0, False], f"step {t}"
            assert not any(spy.carried(-1))


def _exact_sums(p: torch.Tensor, per_row: bool) -> torch.Tensor:
    x = p.detach().double().cpu()
    return x.pow(2).sum(-1) if per_row else x.pow(2).sum().reshape(1)


# float32 sums of 256 squares per thread (65536-element items over 256 threads; rows: groups of 8
# per lane, here one), then a 32-lane tree: relative error below (256 + 5) * 2^-24 < 2e-5.
SUM_RTOL = 2e-5


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
def test_agrees_with_the_cpu_step(target):
    """The carried sums are the sums of squares of theta as stored (float64 of float32 partials),
    and the steps agree with the C++ CPU step's to float32 rounding; an element whose momentum
    is within rounding of zero may move the other way (a few at most)."""
    if not NATIVE:
        pytest.skip("needs the C++ CPU step as the reference")
    device, backend = target
    ref, ref_opt, _, _ = _pair("cpu", torch.float32, 4)
    got, got_opt, _, _ = _pair(device, torch.float32, 4)
    for t in range(4):
        _set_grads(ref, t)
        _set_grads(got, t)
        with kexue.use_backend("cpu"):
            ref_opt.step()
        with kexue.use_backend(backend):
            got_opt.step()
    for k in ref:
        x, y = got[k].detach().cpu(), ref[k].detach()
        far = ~torch.isclose(x, y, rtol=1e-5, atol=1e-6)
        assert int(far.sum()) <= max(3, x.numel() // 10_000), f"param {k}: {int(far.sum())} elements differ"
        sums = got_opt.state[got[k]].get("rms_ssq")
        if k == "b":
            assert sums is None
            continue
        assert sums.device == got[k].device and sums.dtype == torch.float64
        exact = _exact_sums(got[k], per_row=k == "emb")
        assert torch.allclose(sums.cpu(), exact, rtol=SUM_RTOL, atol=0), f"rms_ssq of {k}"


PAIRS = [(s, d) for s in TARGETS for d in TARGETS if s != d or len(TARGETS) == 1]


@pytest.mark.parametrize("src, dst", PAIRS, ids=lambda t: f"{t[0]}-{t[1]}")
def test_state_dict_round_trip(src, dst, monkeypatch):
    """Saved on one target, loaded on another (the sums travel in the state as float64 on the
    params' device): the first step after the load reads theta, later ones carry, and every step
    is bit for bit the two-pass step on the loading target."""
    a, one, _, _ = _pair(src[0], torch.float32, 8)
    with kexue.use_backend(src[1]):
        for t in range(2):
            _set_grads(a, t)
            one.step()
    buf = io.BytesIO()
    torch.save(one.state_dict(), buf)
    saved = buf.getvalue()

    def resumed():
        params = {k: v.detach().clone().to(dst[0]).requires_grad_() for k, v in a.items()}
        opt = Tiger(_groups(params)[0], lr=3e-2)
        opt.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))
        return params, opt

    (c, carried), (d, two_pass) = resumed(), resumed()
    sums = carried.state[c["emb"]]["rms_ssq"]
    assert sums.device == c["emb"].device and sums.shape == (50,)
    assert torch.equal(sums.cpu(), one.state[a["emb"]]["rms_ssq"].cpu())
    spy = FlagSpy(monkeypatch)
    with kexue.use_backend(dst[1]):
        for t in range(2, 5):
            _step_both(c, carried, d, two_pass, t)
            _assert_same(c, carried, d, two_pass, f"step {t}")
            assert spy.carried(-2) == [t > 2, t > 2, t > 2, False]


@pytest.mark.skipif(not CUDA_TARGETS, reason="needs a CUDA device: it watches CUDA host synchronisation")
@pytest.mark.parametrize("target", CUDA_TARGETS, ids=lambda t: t[1])
def test_carried_steps_make_no_host_synchronisation(target):
    """Matrices, an embedding table (row sums) and a bias, NaN guard on, lr changing every step."""
    device, backend = target
    a, opt, _, _ = _pair(device, torch.float32, 6, grad_accum_steps=2)
    with kexue.use_backend(backend):
        for t in range(3):  # plans built, carried sums started
            _set_grads(a, t)
            opt.step()
        grads = [{k: g.to(device) for k, g in _grads(a, t).items()} for t in range(3, 7)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i, g in enumerate(grads):
                for k, v in g.items():
                    a[k].grad = v
                opt.param_groups[0]["lr"] = 1e-2 * (i + 1)
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in a.values())
