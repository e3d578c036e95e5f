"""Property-based checks of Lion and Tiger on every available backend (hypothesis, seeded).

Each example draws an optimizer (Lion or Tiger), parameter dtype and momentum dtype, a few tensors
of random shapes (empty ones included; Tiger's "matrix", "gamma" and "bias" kinds by name),
hyperparameters (learning rate, betas or beta, weight decay, maximize, accumulation, RMS rule, NaN
guard, ChildTuning-F), and gradients for a few steps holding NaN, +inf or -inf at random places
(or no gradient at all for a tensor). On each backend (cpu, torch, and triton under the
interpreter when present):

* every step equals the float64 reference step (kexue.reference.sign_optim, driven from the
  optimizer's own state by tests/sign_optim/helpers.py's ``run_oracle``): NaN and +-inf in the
  same places, finite values to the rounding of float32 arithmetic and the storage dtype (the
  non-finite rule is the reference's docstring: IEEE arithmetic, sign(NaN) = NaN, Tiger's guard
  on NaN and +-inf);
* a state_dict saved after some steps, loaded into a fresh optimizer over copies of the
  parameters, continues bit for bit as the original;
* Tiger's one-pass step (RMS carried from the previous step) is bit for bit the two-pass step.

A few examples run in the default suite; ``-m slow`` runs many more.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kexue
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import BACKENDS, assert_rounded, run_oracle

FAST = {"torch": 6, "cpu": 8, "triton": 2}
SLOW = {"torch": 150, "cpu": 300, "triton": 30}
SPECIALS = [math.nan, math.inf, -math.inf]


def _settings(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def problems(draw, backend):
    algo = draw(st.sampled_from(["lion", "tiger"]))
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend == "torch" else [])
    dtype = draw(st.sampled_from(dtypes))
    shapes = draw(
        st.lists(st.sampled_from([(1,), (7,), (0, 4), (5, 9), (3, 70), (1100,), (2, 3, 4)]), min_size=1, max_size=3)
    )
    options = {
        "lr": draw(st.sampled_from([1e-3, 1e-2, 5e-2])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.3])),
        "maximize": draw(st.booleans()),
        "momentum_dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
    }
    if draw(st.integers(0, 3)) == 3:
        options.update(child_tuning="F", reserve_p=draw(st.sampled_from([0.3, 0.7])), seed=draw(st.integers(0, 99)))
    if algo == "lion":
        options["betas"] = (draw(st.sampled_from([0.0, 0.9, 0.95])), draw(st.sampled_from([0.0, 0.98, 0.99])))
    else:
        options.update(
            beta=draw(st.sampled_from([0.0, 0.9, 0.965])),
            grad_accum_steps=draw(st.integers(1, 3)),
            rms_scale=draw(st.sampled_from([True, False, 0.125])),
            nan_guard=draw(st.sampled_from([None, "tensor", "global"])),
            shrink_ratio=draw(st.sampled_from([0.99, 0.5])),
        )
    steps = draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # names give Tiger its kinds: 2-d and up "matrix", 1-d "*.weight" "gamma" (around 1), else "bias"
    names = []
    for i, p in enumerate(params):
        name = f"layer{i}." + draw(st.sampled_from(["weight", "bias"]))
        if p.dim() == 1 and name.endswith("weight"):
            p.mul_(0.1).add_(1.0)
        names.append(name)
    grads = []
    for _ in range(steps):
        step = []
        for p in params:
            if draw(st.integers(0, 5)) == 5:
                step.append(None)  # no gradient this step: the tensor is skipped
                continue
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.numel():
                for value in draw(st.lists(st.sampled_from(SPECIALS), max_size=2)):
                    grad.view(-1)[int(torch.randint(0, p.numel(), (1,), generator=g))] = value
            step.append(grad.to(dtype))
        grads.append(step)
    return dict(algo=algo, dtype=dtype, names=names, params=[p.to(dtype) for p in params], grads=grads, **options)


def _optimizer(p, params):
    options = {k: v for k, v in p.items() if k not in ("algo", "dtype", "names", "params", "grads")}
    if p["algo"] == "lion":
        return Lion(params, **options)
    return Tiger(list(zip(p["names"], params, strict=True)), **options)


def _fresh(p):
    params = [t.clone().requires_grad_() for t in p["params"]]
    return params, _optimizer(p, params)


def _same_non_finite(out, exact, what):
    out = out.detach().double()
    assert torch.equal(torch.isnan(out), torch.isnan(exact)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(out), torch.isposinf(exact)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(out), torch.isneginf(exact)), f"{what}: -inf positions differ"
    return torch.isfinite(exact)


def check_matches_reference(backend, p):
    params, opt = _fresh(p)
    for t, grads in enumerate(p["grads"]):
        for param, grad in zip(params, grads, strict=True):
            param.grad = None if grad is None else grad.clone()
        before = [q.detach().double().clone() for q in params]
        thetas, moms, _, amb, c_scale, lr_bound = run_oracle(opt, params, grads, p["algo"])
        with kexue.use_backend(backend):
            opt.step()
        for i, param in enumerate(params):
            if grads[i] is None:
                assert torch.equal(param.detach().double(), before[i]) or torch.isnan(before[i]).any(), "moved"
                continue
            what = f"step {t} tensor {i}"
            fin = _same_non_finite(param, thetas[i], f"{what} param")
            scale = torch.maximum(before[i].abs(), thetas[i].abs()) + lr_bound[i]
            assert_rounded(
                param.detach()[fin], thetas[i][fin], scale[fin], f"{what} param", amb[i][fin], 2 * lr_bound[i]
            )
            m = opt.state[param]["exp_avg"]
            fin = _same_non_finite(m, moms[i], f"{what} momentum")
            assert_rounded(m[fin], moms[i][fin], c_scale[i].expand_as(moms[i])[fin], f"{what} momentum")


def _step(opt, params, grads, backend):
    for param, grad in zip(params, grads, strict=True):
        param.grad = None if grad is None else grad.clone()
    with kexue.use_backend(backend):
        opt.step()


def _assert_bitwise(params_a, opt_a, params_b, opt_b, what):
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8)), f"{what}: param {i}"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(sa) == sorted(sb), f"{what}: state keys of {i}"
        for key in ("exp_avg", "row_seen"):
            if key in sa:
                assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), f"{what}: {key} of {i}"


def check_state_dict_round_trip(backend, p):
    params, opt = _fresh(p)
    *first, last = p["grads"] + [p["grads"][0]]  # one more step after the reload
    for grads in first:
        _step(opt, params, grads, backend)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [q.detach().clone().requires_grad_() for q in params]
    restored = _optimizer(p, copies)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_bitwise(params, opt, copies, restored, "after the load")
    _step(opt, params, last, backend)
    _step(restored, copies, last, backend)
    _assert_bitwise(params, opt, copies, restored, "the step after the load")


def check_one_pass_is_two_pass(backend, p):
    p = dict(p, algo="tiger")
    if "betas" in p:  # a Lion problem, run as Tiger with its own defaults
        del p["betas"]
    params_a, one = _fresh(p)
    params_b, two = _fresh(p)
    for t, grads in enumerate(p["grads"] * 2):
        _step(one, params_a, grads, backend)
        two.forget_carried_rms()  # the two-pass step: RMS read from theta every time
        _step(two, params_b, grads, backend)
        _assert_bitwise(params_a, one, params_b, two, f"step {t}")


def _property(check, backend, examples):
    @_settings(examples)
    @given(p=problems(backend))
    def prop(p):
        check(backend, copy.deepcopy(p))

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_match_reference_on_random_problems(backend):
    _property(check_matches_reference, backend, FAST[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_on_random_problems(backend):
    _property(check_state_dict_round_trip, backend, max(1, FAST[backend] // 2))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ops.CARRIES_SSQ])
def test_one_pass_tiger_is_two_pass_on_random_problems(backend):
    _property(check_one_pass_is_two_pass, backend, max(1, FAST[backend] // 2))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_match_reference_on_many_random_problems(backend):
    _property(check_matches_reference, backend, SLOW[backend])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_on_many_random_problems(backend):
    _property(check_state_dict_round_trip, backend, SLOW[backend] // 3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ops.CARRIES_SSQ])
def test_one_pass_tiger_is_two_pass_on_many_random_problems(backend):
    _property(check_one_pass_is_two_pass, backend, SLOW[backend] // 3)
