"""Lion and Tiger (kexue.optim) on the C++ CPU and torch backends against the float64 oracle.

Every step of every configuration is checked element by element against
kexue.reference.sign_optim.lion_step / tiger_step run in float64 from the optimizer's own state
(tests/sign_optim/helpers.py explains the tolerance: the rounding of float32 arithmetic and of
the storage dtype, nothing wider).
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger
from kexue.optim._sign_base import flat_params
from kexue.reference import sign_optim as R
from tests.conftest import DEVICE, triton_unavailable_reason
from tests.sign_optim.helpers import EPS32, Trace, assert_rounded, snapshot

NATIVE = kexue.backends()["cpu"]["available"]
# The Triton kernels run on CPU tensors in the interpreter (tests/conftest.py) when there is no GPU.
BACKENDS = (
    (["cpu"] if NATIVE else [])
    + ["torch"]
    + (["triton"] if DEVICE.type == "cpu" and triton_unavailable_reason() is None else [])
)

# Odd sizes: a single element, sizes that are not multiples of the 1024-element tile, a tensor
# spanning two 65536-element work items, rows of an embedding table, and an empty tensor.
SHAPES = [(1,), (5, 7), (257,), (3, 1000), (70_001,), (0, 4)]


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def random_grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype) for p in params]


# ---------------------------------------------------------------------------------------------
# Oracle adaptors: the reference in the spec's own terms, given an optimizer group's options.


def _masks(opt, group, p, flat_index, t):
    """The ChildTuning mask (bool) and gradient multiplier the oracle should use for p."""
    if group["child_tuning"] == "F":
        keys = R.stream_keys(group["seed"], flat_index, t, R.MASK_STREAM)
        return R.child_tuning_f_gate(keys, group["reserve_p"], p.numel()).view(p.shape), 1.0 / group["reserve_p"]
    mask = opt.state.get(p, {}).get("child_tuning_mask")
    if group["child_tuning"] == "D" and mask is not None:
        return mask, (1.0 / group["reserve_p"] if group["child_tuning_rescale"] else 1.0)
    return None, 1.0


def _g_eff(grad, group, mask, scale):
    g = -grad if group["maximize"] else grad
    return g if mask is None else torch.where(mask, g * scale, torch.zeros_like(g))


def run_oracle(opt, params, grads, algo):
    """One oracle step from the optimizer's current state: exact params/momenta and check scales."""
    thetas, moms, seen = snapshot(opt, params)
    flat = {id(p): i for i, p in enumerate(flat_params(opt))}
    pos = {id(p): i for i, p in enumerate(params)}
    n = len(params)
    amb = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    c_scale = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    lr_bound = [0.0] * n
    for group in opt.param_groups:
        idx = [pos[id(p)] for p in group["params"] if id(p) in pos and grads[pos[id(p)]] is not None]
        if not idx:
            continue
        ps = [params[i] for i in idx]
        t = [int(opt.state[p].get("step", 0)) if p in opt.state else 0 for p in ps]
        masks, scales, g64 = [], [], []
        for i, p, ti in zip(idx, ps, t, strict=True):
            mask, scale = _masks(opt, group, p, flat[id(p)], ti)
            masks.append(mask)
            scales.append(scale)
            g64.append(grads[i].double())
        common = dict(
            maximize=group["maximize"],
            grad_masks=masks,
            mask_scale=scales,
            mask_update=group["mask_update"],
            lazy_rows=group["embedding"] and group["drift_guard"],
            freeze_absent=group["freeze_absent_momentum"],
        )
        th, mo = [thetas[i] for i in idx], [moms[i] for i in idx]
        if algo == "lion":
            b1, b2 = group["betas"]
            for j, i in enumerate(idx):
                g = _g_eff(g64[j], group, masks[j], scales[j])
                c = b1 * mo[j] + (1 - b1) * g
                amb[i] = c.abs() < 8 * EPS32 * (b1 * mo[j].abs() + (1 - b1) * g.abs())
                c_scale[i] = b2 * mo[j].abs() + (1 - b2) * g.abs()
                lr_bound[i] = group["lr"]
            R.lion_step(th, g64, mo, lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"], **common)
        else:
            k, beta = group["grad_accum_steps"], group["beta"]
            where = {id(q): j for j, q in enumerate(group["params"])}
            kinds = [opt._kind(group, where[id(p)], p) for p in ps]
            for j, i in enumerate(idx):
                g = _g_eff(g64[j], group, masks[j], scales[j])
                b1 = beta if t[j] % k == 0 else 1.0
                c = b1 * mo[j] + (1 - beta) / k * g
                c_scale[i] = b1 * mo[j].abs() + (1 - beta) / k * g.abs()
                amb[i] = c.abs() < 8 * EPS32 * c_scale[i]
                rms = group["rms_scale"]
                factor = (
                    group["elementwise_lr"]
                    if kinds[j] in ("bias", "gamma")
                    else (
                        float(rms)
                        if rms is not True and rms is not False
                        else (th[j].abs().max().item() if th[j].numel() and rms else 1.0)
                    )
                )
                lr_bound[i] = group["lr"] * factor + (1.0 if group["nan_guard"] else 0.0)
            R.tiger_step(
                th,
                g64,
                mo,
                lr=group["lr"],
                beta=beta,
                step=t,
                grad_accum_steps=k,
                kinds=kinds,
                weight_decay=group["weight_decay"],
                elementwise_lr=group["elementwise_lr"],
                rms_scale=group["rms_scale"],
                nan_guard=group["nan_guard"],
                shrink_ratio=group["shrink_ratio"],
                row_seen=[seen[i] for i in idx],
                **common,
            )
    return thetas, moms, seen, amb, c_scale, lr_bound


def drive(opt, params, steps, grads_at, backend, algo, trace=None):
    """Run ``steps`` steps, checking each against the oracle. ``grads_at(t)`` -> list (None: no grad)."""
    trace = trace or Trace()
    for t in range(steps):
        grads = grads_at(t)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        before = [p.detach().double().clone() for p in params]
        thetas, moms, seen, amb, c_scale, lr_bound = run_oracle(opt, params, grads, algo)
        with kexue.use_backend(backend):
            opt.step()
        for i, p in enumerate(params):
            if grads[i] is None:
                assert p not in opt.state or "exp_avg" not in opt.state[p]
                assert torch.equal(p.detach().double(), before[i]), "a param without grad moved"
                continue
            scale_p = torch.maximum(before[i].abs(), thetas[i].abs()) + lr_bound[i]
            assert_rounded(p, thetas[i], scale_p, f"step {t} param {i}", loose=amb[i], loose_by=2 * lr_bound[i])
            assert_rounded(opt.state[p]["exp_avg"], moms[i], c_scale[i], f"step {t} momentum {i}")
            if seen[i] is not None:
                assert torch.equal(opt.state[p]["row_seen"], seen[i]), f"step {t} row_seen {i}"
            trace.ambiguous += int(amb[i].sum())
            trace.checked += p.numel()
    assert trace.ambiguous <= max(3, trace.checked // 10_000), f"too many sign-ambiguous elements: {trace}"
    return trace


# ---------------------------------------------------------------------------------------------
# Lion.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, momentum_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_lion_matches_oracle(backend, dtype, momentum_dtype):
    params = make_params(SHAPES, dtype)
    # a learning rate large enough that steps show in 16-bit params too
    lr = 1e-2 if dtype == torch.float32 else 5e-2
    opt = Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.3, momentum_dtype=momentum_dtype)
    drive(opt, params, 4, lambda t: random_grads(params, 100 + t), backend, "lion")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_options_matches_oracle(backend):
    """Two groups with their own hyperparameters, maximize, a param without grad, betas at 0."""
    params = make_params([(5, 7), (300,), (4, 3), (2,)], torch.float32, seed=1)
    opt = Lion(
        [
            {"params": params[:2], "maximize": True},
            {"params": params[2:], "lr": 3e-2, "betas": (0.0, 0.5), "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )

    def grads_at(t):
        gs = random_grads(params, 200 + t)
        gs[3] = None  # never has a grad
        return gs

    drive(opt, params, 4, grads_at, backend, "lion")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_uses_old_momentum_and_sign_zero(backend):
    # c = 0.9 * 1 + 0.1 * (-5) = 0.4 > 0 (step down) while the new momentum 0.5 - 2.5 < 0.
    p = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.5), weight_decay=0.5)
    p.grad = torch.tensor([0.0, 0.0, 0.0])
    with kexue.use_backend(backend):
        opt.step()  # m = 0, g = 0: sign(0) = 0, only the decay acts
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0, -3.0]) * (1 - 0.1 * 0.5))
    opt.state[p]["exp_avg"].fill_(1.0)
    before = p.detach().clone()
    p.grad = torch.tensor([-5.0, -5.0, -5.0])
    with kexue.use_backend(backend):
        opt.step()
    expected = before * (1 - 0.1 * 0.5) - 0.1
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((3,), -2.0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Tiger.

TIGER_CONFIGS = {
    "default": dict(),
    "accumulate3": dict(grad_accum_steps=3, weight_decay=0.1),
    "rms_constant": dict(rms_scale=0.125),
    "no_rms_maximize": dict(rms_scale=False, maximize=True, nan_guard=None),
    "bf16_state": dict(momentum_dtype=torch.bfloat16),
    "child_tuning_f": dict(child_tuning="F", reserve_p=0.4),
    "child_tuning_f_grad_only": dict(child_tuning="F", reserve_p=0.5, mask_update=False),
    "nan_tensor": dict(nan_guard="tensor"),
    "nan_global": dict(nan_guard="global", grad_accum_steps=2),
}


def _tiger_params(dtype=torch.float32):
    # matrix, "gamma" (named like a norm weight), "bias", and a big matrix over several items
    shapes = [(5, 7), (96,), (96,), (2, 33_001)]
    params = make_params(shapes, dtype, seed=3)
    params[1].data = params[1].data * 0.1 + 1  # norm gains sit around 1
    names = ["lin.weight", "norm.weight", "lin.bias", "big.weight"]
    return params, list(zip(names, params, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(TIGER_CONFIGS))
def test_tiger_matches_oracle(backend, config):
    options = TIGER_CONFIGS[config]
    params, named = _tiger_params()
    opt = Tiger(named, lr=2e-2, seed=11, **options)
    assert [opt._kind(opt.param_groups[0], i, p) for i, p in enumerate(params)] == ["matrix", "gamma", "bias", "matrix"]

    def grads_at(t):
        gs = random_grads(params, 300 + t)
        if config.startswith("nan") and t in (2, 3):
            gs[0].view(-1)[3] = float("nan")  # one NaN in one tensor
        return gs

    drive(opt, params, 6, grads_at, backend, "tiger")
    if config == "nan_global":  # every tensor was shrunk on the NaN steps: the gain moved towards 1
        assert all(int(opt.state[p]["step"]) == 6 for p in params)


@pytest.mark.skipif(not NATIVE, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("nan_guard", ["tensor", "global"])
def test_tiger_cache_batches_match_oracle(nan_guard):
    """The CPU step runs its pre-pass (RMS, NaN check) and main pass batch by batch, each batch
    reading about 32 MB in its pre-pass (csrc/cpu/sign_optim.cpp, cache_batches). With three
    tensors of 36 MB of params + grads, every tensor is a batch of its own under the per-tensor
    guard, and the one "global" group must stay one batch: a NaN in the last tensor still holds
    back the tensors before it, whose pre-pass and update would otherwise already be done."""
    params = make_params([(3, 1_500_000)] * 3 + [(1000,)], torch.float32, seed=5)
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    opt = Tiger(named, lr=2e-2, nan_guard=nan_guard)

    def grads_at(t):
        gs = random_grads(params, 500 + t)
        if t == 1:
            gs[2].view(-1)[-1] = float("nan")
        return gs

    # drive checks both steps against the oracle, which shrinks tensors 0-2 on step 1 under
    # "global" and only tensor 2 under "tensor": a split group would fail it.
    drive(opt, params, 2, grads_at, "cpu", "tiger")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiger_16bit_params(backend, dtype):
    params, named = _tiger_params(dtype)
    opt = Tiger(named, lr=5e-2, weight_decay=0.1)
    drive(opt, params, 3, lambda t: random_grads(params, 400 + t), backend, "tiger")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accum, freeze", [(1, False), (1, True), (3, False)])
def test_embedding_rows_match_oracle(backend, accum, freeze):
    """Row-wise RMS, lazy rows (absent rows), accumulation windows with rows seen earlier."""
    table = make_params([(50, 33)], torch.float32, seed=5)[0]
    other = make_params([(4, 33)], torch.float32, seed=6)[0]
    opt = Tiger(
        [{"params": [table], "embedding": True, "freeze_absent_momentum": freeze}, {"params": [other]}],
        lr=3e-2,
        grad_accum_steps=accum,
        weight_decay=0.2,
    )

    def grads_at(t):
        g = random_grads([table, other], 500 + t)
        rows = torch.Generator().manual_seed(t)
        absent = torch.randperm(50, generator=rows)[:35]  # most rows absent in each micro-step
        g[0][absent] = 0
        return g

    drive(opt, [table, other], 7, grads_at, backend, "tiger")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_embedding_and_child_tuning_d_match_oracle(backend):
    table, dense = make_params([(40, 16), (6, 9)], torch.float32, seed=7)
    opt = Lion(
        [
            {"params": [table], "embedding": True},
            {"params": [dense], "child_tuning": "D", "child_tuning_rescale": True, "reserve_p": 0.5},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    opt.set_child_tuning_masks({dense: torch.rand(6, 9, generator=torch.Generator().manual_seed(0)) < 0.5})

    def grads_at(t):
        g = random_grads([table, dense], 600 + t)
        g[0][t * 5 : (t + 1) * 5 + 20] = 0
        return g

    drive(opt, [table, dense], 4, grads_at, backend, "lion")


# ---------------------------------------------------------------------------------------------
# Agreement with the public implementations, for the options they share.


def _in_lockstep(ours, theirs, a, b, seed, beta):
    """Step both optimizers on the same grads; after each step compare, then re-sync ``theirs`` to
    ``ours`` so that every step is compared from the same state. ``beta``: the momentum's decay."""
    for t in range(5):
        grads = random_grads(ours, seed + t)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        m_prev = [
            b.state[q]["exp_avg"].double().clone() if q in b.state else torch.zeros_like(g, dtype=torch.float64)
            for q, g in zip(theirs, grads, strict=True)
        ]
        a.step()
        b.step()
        for p, q, g, m in zip(ours, theirs, grads, m_prev, strict=True):
            # the same float32 formulas (decay first, then the sign step): equal up to rounding order
            assert_rounded(p, q.detach().double(), q.detach().double().abs() + 1e-2, f"step {t}")
            scale = beta * m.abs() + (1 - beta) * g.double().abs()
            assert_rounded(a.state[p]["exp_avg"], b.state[q]["exp_avg"].double(), scale, f"step {t} momentum")
            with torch.no_grad():
                q.copy_(p)
                b.state[q]["exp_avg"].copy_(a.state[p]["exp_avg"])


def test_lion_equals_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours = make_params([(6, 50), (300,)], torch.float32, seed=8)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = Lion(ours, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)
    b = lion_pytorch.Lion(theirs, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.5)
    _in_lockstep(ours, theirs, a, b, 700, beta=0.98)


def test_tiger_equals_pytorch_optimizer():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours = make_params([(6, 50), (300,)], torch.float32, seed=9)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    # pytorch-optimizer's Tiger: no RMS factor, no tensor kinds, no NaN guard, no accumulation.
    a = Tiger(ours, lr=1e-2, beta=0.965, weight_decay=0.3, kind="matrix", rms_scale=1.0, nan_guard=None)
    b = pytorch_optimizer.Tiger(theirs, lr=1e-2, beta=0.965, weight_decay=0.3, foreach=False)
    _in_lockstep(ours, theirs, a, b, 800, beta=0.965)


def test_tiger_accumulation_equals_one_step_on_the_mean_gradient():
    """Spec (d): k micro-steps == one step on the averaged gradient with beta applied once."""
    k = 4
    acc = make_params([(7, 30)], torch.float64, seed=10)
    one = [p.detach().clone().requires_grad_() for p in acc]
    a = Tiger(acc, lr=1e-2, grad_accum_steps=k, weight_decay=0.1)
    b = Tiger(one, lr=1e-2, grad_accum_steps=1, weight_decay=0.1)
    for window in range(3):
        m_prev = b.state[one[0]]["exp_avg"].double().clone() if one[0] in b.state else 0.0
        micro = [random_grads(acc, 900 + window * k + i)[0] for i in range(k)]
        for i, g in enumerate(micro):
            acc[0].grad = g
            a.step()
            if i < k - 1:
                assert torch.equal(acc[0].detach(), one[0].detach())  # no move inside a window
        one[0].grad = torch.stack(micro).mean(0)
        b.step()
        torch.testing.assert_close(acc[0].detach(), one[0].detach(), rtol=0, atol=1e-12)
        # float32 momentum: both are beta m + (1 - beta) mean(g) to float32 rounding of the partial sums
        scale = 0.965 * abs(m_prev) + 0.035 / k * sum(g.abs() for g in micro)
        assert_rounded(a.state[acc[0]]["exp_avg"], b.state[one[0]]["exp_avg"].double(), scale, "momentum")
        with torch.no_grad():
            b.state[one[0]]["exp_avg"].copy_(a.state[acc[0]]["exp_avg"])


def test_triton_table_layout_matches_the_reference():
    """triton_kernels/sign_optim_layout.py keeps its own copy of the table layout (it must import without
    kexue); it has to be the reference's (and so the C++ header's, which the oracle tests cover)."""
    tk = pytest.importorskip("kexue.triton_kernels.sign_optim_layout")
    names = [
        "LR",
        "WD",
        "C_M",
        "C_G",
        "M_M",
        "M_G",
        "GSCALE",
        "SHRINK",
        "CENTRE",
        "NUM_FLOATS",
        "FLAGS",
        "NAN_GROUP",
        "ROW_LEN",
        "MASK_K0",
        "MASK_K1",
        "MASK_THRESHOLD",
        "ROUND_K0",
        "ROUND_K1",
        "NUM_INTS",
        "USE_NEW_MOMENTUM",
        "UPDATE",
        "RMS_TENSOR",
        "RMS_ROW",
        "LAZY_ROWS",
        "FREEZE_ABSENT",
        "MASK_F",
        "MASK_D",
        "MASK_UPDATE",
        "STOCHASTIC_ROUND",
        "SHRINK_NOW",
    ]
    assert {n: getattr(tk, n) for n in names} == {n: getattr(R, n) for n in names}
