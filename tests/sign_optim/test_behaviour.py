"""Lion and Tiger as torch optimizers: reproducibility, ChildTuning, the embedding-drift guard,
state_dict, schedulers, errors, and the custom op itself. The oracle comparisons are in
tests/sign_optim/test_step.py."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import kexue
from kexue.optim import (
    FisherInformation,
    Lion,
    Tiger,
    embedding_param_groups,
    find_embedding_weights,
    piecewise_linear,
    tiger_param_groups,
)
from kexue.reference import sign_optim as R
from tests.sign_optim.helpers import assert_rounded
from tests.sign_optim.test_step import BACKENDS, make_params, random_grads


def train(opt_factory, shapes, steps, backend, dtype=torch.float32, grads_seed=0):
    params = make_params(shapes, dtype, seed=1)
    opt = opt_factory(params)
    with kexue.use_backend(backend):
        for t in range(steps):
            for p, g in zip(params, random_grads(params, grads_seed + t), strict=True):
                p.grad = g
            opt.step()
    return params, opt


# ---------------------------------------------------------------------------------------------
# Reproducibility.


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_is_bitwise_identical(backend):
    shapes = [(3, 700), (70_001,)]  # two work items in the second tensor

    def factory(seed):
        return lambda ps: Lion(ps, lr=5e-2, weight_decay=0.1, child_tuning="F", stochastic_rounding=True, seed=seed)

    a, _ = train(factory(7), shapes, 3, backend, torch.bfloat16)
    b, _ = train(factory(7), shapes, 3, backend, torch.bfloat16)
    c, _ = train(factory(8), shapes, 3, backend, torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])  # another seed draws other masks and roundings


@pytest.mark.skipif("cpu" not in BACKENDS, reason="kexue._C not built")
def test_independent_of_thread_count():
    shapes = [(3, 700), (140_001,), (64, 48)]

    def factory(ps):
        return Tiger(
            [{"params": ps[:2], "child_tuning": "F"}, {"params": ps[2:], "embedding": True}],
            lr=1e-2,
            seed=3,
            stochastic_rounding=True,
        )

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = train(factory, shapes, 3, "cpu", torch.bfloat16)
        torch.set_num_threads(max(2, threads))
        many, _ = train(factory, shapes, 3, "cpu", torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, many, strict=True))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backends_agree_bitwise_on_masks_and_rounding(backend):
    """The kernels and the torch backend draw the same ChildTuning-F masks and roundings."""
    shapes = [(5, 300), (70_001,)]

    def factory(ps):
        return Lion(ps, lr=5e-2, child_tuning="F", reserve_p=0.3, seed=5, mask_update=True, stochastic_rounding=True)

    start = make_params(shapes, torch.bfloat16, seed=1)
    a, _ = train(factory, shapes, 2, backend, torch.bfloat16)
    b, _ = train(factory, shapes, 2, "torch", torch.bfloat16)
    for x, y, x0 in zip(a, b, start, strict=True):
        assert torch.equal(x != x0, y != x0)  # the same elements moved: the same masks
        # The same stochastic roundings: equal bits except where float32 arithmetic differs by an
        # ulp right at a rounding boundary (FMA contraction in the kernels), which is rare.
        assert (x.view(torch.int16) != y.view(torch.int16)).double().mean() < 1e-3
        assert_rounded(x, y.double(), y.double().abs(), f"{backend} vs torch backend")


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


def test_stochastic_rounding_is_unbiased():
    x = torch.full((100_000,), 1.0 + 2.0**-10)  # 1/8 of a bf16 ulp above 1
    r = R.to_bf16_stochastic(x, R.stream_keys(2, 0, 0, R.ROUND_STREAM)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(r.double().mean().item() - (1.0 + 2.0**-10)) < 5 * 2.0**-7 * math.sqrt(0.125 * 0.875 / x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_moves_bf16_params_by_tiny_updates(backend):
    """lr far below half a bf16 ulp: nearest rounding never moves, stochastic rounding moves on average."""

    def run(sr):
        p = torch.ones(20_000, dtype=torch.bfloat16, requires_grad=True)
        opt = Lion([p], lr=1e-4, stochastic_rounding=sr, seed=0)
        with kexue.use_backend(backend):
            for _ in range(20):
                p.grad = torch.ones_like(p)
                opt.step()
        return p.detach().double()

    assert torch.equal(run(False), torch.ones(20_000, dtype=torch.float64))
    mean = run(True).mean().item()
    assert abs(mean - (1 - 20 * 1e-4)) < 2e-4  # exact path: 1 - 20 lr


# ---------------------------------------------------------------------------------------------
# ChildTuning: masked elements never move.


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


# ---------------------------------------------------------------------------------------------
# The embedding anomaly (kexue.fm/archives/9736) and the guard.


def train_embedding(opt_cls, guard, backend, steps=300, **kw):
    """Tokens 0..29 appear every step; tokens 30..39 only in the first 5 steps, then never."""
    torch.manual_seed(0)
    emb = nn.Embedding(40, 8)
    target = torch.randn(40, 8)
    opt = opt_cls(embedding_param_groups(emb, drift_guard=guard), **kw)
    rare = torch.arange(30, 40)
    with kexue.use_backend(backend):
        for t in range(steps):
            tokens = torch.cat([torch.arange(30), rare]) if t < 5 else torch.arange(30)
            loss = ((emb(tokens) - target[tokens]) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t == 4:
                after_last_seen = emb.weight.detach()[rare].clone()
    return emb.weight.detach(), after_last_seen, rare


# 600 interpreted launches for Triton on a machine without GPU: in `make test-all` only.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS])
@pytest.mark.parametrize(
    "opt_cls, kw", [(Lion, dict(lr=0.05, weight_decay=0.1)), (Tiger, dict(lr=0.05, weight_decay=0.1, nan_guard=None))]
)
def test_embedding_drift_and_guard(backend, opt_cls, kw):
    weight, seen_last, rare = train_embedding(opt_cls, False, backend, **kw)
    fixed_point = 1 / kw["weight_decay"]  # |theta*| = 1/lambda per component
    drifted = weight[rare].abs()
    # Without the guard the absent rows are pushed by sign(stale momentum) towards +-1/lambda:
    assert drifted.min() > 0.5 * fixed_point, drifted.min()
    assert weight[rare].norm(dim=1).mean() > 3 * seen_last.norm(dim=1).mean()
    weight, seen_last, rare = train_embedding(opt_cls, True, backend, **kw)
    assert torch.equal(weight[rare], seen_last)  # with the guard: bit-identical since last seen
    assert weight[:30].abs().max() < 0.5 * fixed_point  # the frequent tokens train normally


def test_embedding_helpers():
    model = nn.ModuleDict(
        {"tok": nn.Embedding(10, 4), "bag": nn.EmbeddingBag(5, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    assert {id(p) for p in find_embedding_weights(model)} == {id(model.tok.weight), id(model.bag.weight)}
    groups = embedding_param_groups(model, lr=1e-3)
    assert [len(g["params"]) for g in groups] == [4, 2] and groups[1]["embedding"] and groups[1]["lr"] == 1e-3
    tg = tiger_param_groups(model)
    kinds = {g["kind"]: [n for n, _ in g["params"]] for g in tg}
    assert kinds == {
        "matrix": ["lin.weight"],
        "embedding": ["tok.weight", "bag.weight"],
        "bias": ["lin.bias", "norm.bias"],
        "gamma": ["norm.weight"],
    }
    opt = Tiger(tg)
    assert opt.param_groups[1]["embedding"] is True


# ---------------------------------------------------------------------------------------------
# state_dict, schedulers, zero_grad.


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_and_zero_grad(backend):
    p = torch.zeros(10, requires_grad=True)
    opt = Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = 0.0
    with kexue.use_backend(backend):
        for t in range(4):
            p.grad = -torch.ones(10)  # sign(c) = -1: each step adds the current lr
            opt.step()
            expected += 0.1 * 0.5**t
            sched.step()
            opt.zero_grad()
            assert p.grad is None
            opt.step()  # no grad: nothing happens
    torch.testing.assert_close(p.detach(), torch.full((10,), expected), rtol=1e-6, atol=0)


def test_piecewise_linear_schedule():
    f = piecewise_linear({10: 1.0, 20: 0.5, 40: 0.1})
    assert [f(0), f(5), f(10), f(15), f(30), f(40), f(1000)] == pytest.approx([0, 0.5, 1, 0.75, 0.3, 0.1, 0.1])
    assert piecewise_linear({0: 1})(123) == 1.0
    p = torch.zeros(3, requires_grad=True)
    opt = Tiger([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, piecewise_linear({4: 1.0}))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # p has no gradient: nothing moves, but the scheduler sees the usual order
        sched.step()
    assert lrs == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


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


# ---------------------------------------------------------------------------------------------
# Odd inputs that must work.


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


# ---------------------------------------------------------------------------------------------
# Errors: clear, naming the group and parameter, and raised before anything changes.


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda ps: Lion(ps, lr=-1e-3), ValueError, r"Lion: param_groups\[0\]: lr must be a real number in \[0.0"),
        (lambda ps: Lion(ps, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must lie in \[0, 1\)"),
        (lambda ps: Lion(ps, betas=(-0.1, 0.9)), ValueError, r"betas\[0\] must lie in \[0, 1\)"),
        (lambda ps: Lion(ps, betas=0.9), ValueError, "betas must be a pair"),
        (lambda ps: Lion(ps, weight_decay=-0.1), ValueError, "weight_decay"),
        (
            lambda ps: Lion([{"params": ps[:1]}, {"params": ps[1:], "lr": float("nan")}]),
            ValueError,
            r"param_groups\[1\]: lr",
        ),
        (lambda ps: Tiger(ps, beta=1.0), ValueError, r"beta must be a real number in \[0.0, 1.0\)"),
        (lambda ps: Tiger(ps, grad_accum_steps=0), ValueError, "grad_accum_steps must be an int >= 1"),
        (lambda ps: Tiger(ps, kind="weights"), ValueError, "kind must be one of"),
        (lambda ps: Tiger(ps, nan_guard="any"), ValueError, "nan_guard must be one of"),
        (lambda ps: Tiger(ps, shrink_ratio=0.0), ValueError, "shrink_ratio"),
        (lambda ps: Tiger(ps, rms_scale=-1.0), ValueError, "rms_scale"),
        (lambda ps: Tiger(ps, grad_accum_steps=2, freeze_absent_momentum=True), ValueError, "freeze_absent_momentum"),
        (lambda ps: Lion(ps, child_tuning="E"), ValueError, "child_tuning must be None, 'F' or 'D'"),
        (lambda ps: Lion(ps, reserve_p=0.0), ValueError, "reserve_p"),
        (lambda ps: Lion(ps, momentum_dtype=torch.float16), ValueError, "momentum_dtype"),
        (lambda ps: Lion(ps, momentum=0.9), TypeError, "unexpected option"),
    ],
)
def test_bad_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make(make_params([(2, 3), (4,)], torch.float32))


def _set_grads(ps):
    for p in ps:
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (lambda opt, ps: opt.param_groups[1].update(lr=-1.0), ValueError, r"param_groups\[1\]: lr"),
        (
            lambda opt, ps: setattr(ps[2], "grad", torch.randn(3, 3).to_sparse()),
            TypeError,
            r"param_groups\[1\]\['params'\]\[0\]: Lion does not support sparse gradients",
        ),
        (
            lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 3, dtype=torch.float16)),
            TypeError,
            r"\['params'\]\[0\]: state 'exp_avg' has dtype torch.float16",
        ),
        (lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 4)), ValueError, "has shape"),
        (
            lambda opt, ps: opt.state[ps[2]].update(exp_avg=torch.zeros(3, 3, device="meta")),
            ValueError,
            r"\[1\]\['params'\]\[0\]: state 'exp_avg' is on meta, the parameter on cpu",
        ),
    ],
)
def test_bad_step_inputs_change_nothing(spoil, error, match):
    ps = make_params([(2, 3), (4,), (3, 3)], torch.float32)
    opt = Lion([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)
    _set_grads(ps)
    opt.step()
    _set_grads(ps)
    spoil(opt, ps)
    before = [p.detach().clone() for p in ps]
    moms = [opt.state[p]["exp_avg"].clone() for p in ps[:2]]
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before, strict=True))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(ps[:2], moms, strict=True))
    assert all(int(opt.state[p]["step"]) == 1 for p in ps[:2])


def test_complex_grads_and_embedding_shape_errors():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]: complex"):
        Lion([z]).step()
    v = torch.zeros(5, requires_grad=True)
    v.grad = torch.ones(5)
    with pytest.raises(ValueError, match="an 'embedding' group holds tables"):
        Lion([v], embedding=True).step()
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        Lion([v]).set_child_tuning_masks({torch.zeros(5): torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(5,\)"):
        Lion([v]).set_child_tuning_masks({v: torch.ones(4, dtype=torch.bool)})
