"""Lion and Tiger with ``capturable=True``: bitwise the plain step, with no host synchronisation.

In capturable mode the step counter is a device tensor, lr may be a tensor written in place,
GradScaler's flag and scale stay on the device, and the per-step values are computed by torch
ops into the dynamic table that the kernels read (kexue/optim/_capturable.py). Every backend
available here (C++, torch, Triton in the interpreter) must give the same bits as the plain step,
over many steps of every option that depends on the step.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kexue
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger, piecewise_linear
from kexue.reference import sign_optim as R
from tests.conftest import DEVICE
from tests.sign_optim.test_step import BACKENDS

# Backends whose capturable step must not synchronise (the torch backend, a float64 fallback,
# reads values on the host by design: see kexue/optim/_sign_base.py).
NO_SYNC_BACKENDS = [b for b in BACKENDS if b != "torch"]


def _params(seed: int, small: bool) -> dict[str, torch.Tensor]:
    """An embedding table, matrices, a bias and a norm gain; fp32 and one bf16 matrix."""
    g = torch.Generator().manual_seed(seed)
    n = 37 if small else 300
    shapes = {"emb": (11, 6), "w1": (5, n), "w2": (n,), "bias": (7,), "norm.weight": (5,), "w16": (3, 9)}
    out = {}
    for name, shape in shapes.items():
        dtype = torch.bfloat16 if name == "w16" else torch.float32
        out[name] = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return out


def _grads(params: dict[str, torch.Tensor], t: int, nan_at: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    grads = {name: torch.randn(p.shape, generator=g).to(p.dtype) for name, p in params.items()}
    grads["emb"][torch.arange(11) % 3 == t % 3] = 0  # rows absent this step: the drift guard
    if t == nan_at:
        grads["w2"][3] = float("nan")  # Tiger's NaN guard on one tensor
    return grads


def _groups(opt_cls, params: dict[str, torch.Tensor], lr):
    """Param groups exercising every step-dependent column: the lr (and Tiger's factors), the
    accumulation rule, ChildTuning-F and stochastic-rounding keys, lazy rows."""

    def named(*names):
        return [(name, params[name]) for name in names]

    emb = {"params": named("emb"), "embedding": True}
    dense = {"params": named("w1", "w2"), "child_tuning": "F", "reserve_p": 0.6}
    small = {"params": named("bias", "norm.weight")}
    low = {"params": named("w16"), "stochastic_rounding": True, "momentum_dtype": torch.bfloat16}
    if opt_cls is Tiger:
        emb["grad_accum_steps"] = 2
        dense["grad_accum_steps"] = 3
        low["rms_scale"] = 0.25
    return [emb, dense, small, low]


def _make(opt_cls, params, capturable: bool, lr):
    kwargs = {"lr": lr, "weight_decay": 0.1, "seed": 7, "capturable": capturable}
    return opt_cls(_groups(opt_cls, params, lr), **kwargs)


def _copy(params):
    return {name: p.detach().clone().requires_grad_() for name, p in params.items()}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that NaNs (Tiger's NaN guard) compare equal to themselves."""
    return x.detach().view(torch.int16 if x.element_size() == 2 else torch.int32)


def _assert_same(plain, cap, opt_plain, opt_cap, what):
    for name in plain:
        p, q = plain[name], cap[name]
        assert torch.equal(_bits(p), _bits(q)), f"{what}: {name}"
        sp, sq = opt_plain.state[p], opt_cap.state[q]
        assert torch.equal(_bits(sp["exp_avg"]), _bits(sq["exp_avg"])), f"{what}: momentum of {name}"
        assert isinstance(sp["step"], int) and isinstance(sq["step"], torch.Tensor)
        assert sq["step"].dtype == torch.float32 and sq["step"].device == q.device
        assert sq["step"].item() == sp["step"], f"{what}: step of {name}"
        if "row_seen" in sp:
            assert torch.equal(sp["row_seen"], sq["row_seen"]), f"{what}: row_seen of {name}"


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


# ---------------------------------------------------------------------------------------------
# No host synchronisation.


class _NoSync(TorchDispatchMode):
    """Fails on every op that reads a tensor's value into Python (``.item()``, ``bool()``,
    ``float()``, ``int()`` all reach ``_local_scalar_dense``) or that has a data-dependent
    output size."""

    FORBIDDEN = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "item", "masked_select", "unique"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Inside: any read of a tensor's value on the host fails, except reads of the host tables
    the optimizer builds from Python values and hands to the kernel (CPU tensors by contract).
    On the CPU ``tolist()``/``numpy()`` reach no dispatcher op, so they are patched too."""
    tables: set[int] = set()
    original = ops.fused_step

    def recording(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn=None):
        tables.update((id(hyper), id(ints)))
        return original(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)

    def guard(name):
        method = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):
            if id(self) not in tables:
                raise AssertionError(f"host synchronisation: Tensor.{name} of a {tuple(self.shape)} tensor")
            return method(self, *args, **kwargs)

        return checked

    monkeypatch.setattr(ops, "fused_step", recording)
    for name in ("tolist", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    try:
        with _NoSync():
            yield
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("backend", NO_SYNC_BACKENDS)
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_step_makes_no_host_sync(backend, opt_cls, monkeypatch):
    params = _params(2, small=True)
    opt = _make(opt_cls, params, True, torch.tensor(1e-2, dtype=torch.float64))
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    with kexue.use_backend(backend):
        opt.step()  # first step: creates the state, copies the constant tables once
        before = {name: p.detach().clone() for name, p in params.items()}
        # As GradScaler.step hands them over: the flag and the scale stay on the device.
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with no_host_sync(monkeypatch):
            opt.step()
            opt.param_groups[0]["lr"].fill_(5e-3)  # a scheduler writing the tensor in place
            opt.step()
        del opt.grad_scale, opt.found_inf
    assert all(not torch.equal(p, before[name]) for name, p in params.items() if name != "emb")
    assert opt.state[params["w1"]]["step"].item() == 3


def test_no_sync_detector_catches_a_sync(monkeypatch):
    """The detector fails the plain step, which reads a tensor lr and GradScaler's flag on the
    host: so it would catch such a read added to the capturable step."""
    params = _params(3, small=True)
    opt = _make(Lion, params, False, torch.tensor(1e-2, dtype=torch.float64))
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    opt.step()
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync(monkeypatch):
        opt.step()
    t = torch.tensor([1.0, 2.0])
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: t.tolist(), lambda: float(t.sum())):
        with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync(monkeypatch):
            read()


# ---------------------------------------------------------------------------------------------
# GradScaler.


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


# ---------------------------------------------------------------------------------------------
# state_dict.


@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_state_dict_round_trip(opt_cls):
    params = _params(4, small=True)
    opt = _make(opt_cls, params, True, torch.tensor(1e-2, dtype=torch.float64))
    for t in range(2):
        for name, g in _grads(params, t).items():
            params[name].grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(isinstance(s["step"], torch.Tensor) for s in saved["state"].values())
    resumed_params = _copy(params)
    resumed = _make(opt_cls, resumed_params, True, torch.tensor(1e-2, dtype=torch.float64))
    resumed.load_state_dict(saved)
    for t in range(2, 5):
        for ps in (params, resumed_params):
            for name, g in _grads(ps, t).items():
                ps[name].grad = g
        opt.step()
        resumed.step()
        for name in params:
            assert torch.equal(params[name], resumed_params[name])
            st = resumed.state[resumed_params[name]]["step"]
            assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.item() == t + 1


@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_plain_state_dict_into_capturable_and_back(opt_cls):
    """A plain run's state (int steps) loaded into a capturable optimizer gets tensor steps on
    the parameters' device and continues bitwise as the plain run; and the other way round."""
    plain = _params(5, small=True)
    opt_plain = _make(opt_cls, plain, False, 1e-2)
    for t in range(3):
        for name, g in _grads(plain, t).items():
            plain[name].grad = g
        opt_plain.step()
    cap = _copy(plain)
    opt_cap = _make(opt_cls, cap, True, 1e-2)
    opt_cap.load_state_dict(copy.deepcopy(opt_plain.state_dict()))
    assert all(g["capturable"] for g in opt_cap.param_groups)  # its own mode, not the saved one
    for q in cap.values():
        st = opt_cap.state[q]["step"]
        assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.device == q.device
        assert st.item() == 3
    back = _copy(plain)
    opt_back = _make(opt_cls, back, False, 1e-2)
    opt_back.load_state_dict(copy.deepcopy(opt_cap.state_dict()))
    assert all(isinstance(opt_back.state[q]["step"], int) for q in back.values())
    for t in range(3, 6):
        for ps in (plain, cap, back):
            for name, g in _grads(ps, t).items():
                ps[name].grad = g
        opt_plain.step()
        opt_cap.step()
        opt_back.step()
        _assert_same(plain, cap, opt_plain, opt_cap, f"step {t}")
        for name in plain:
            assert torch.equal(plain[name], back[name])


def test_pickled_capturable_optimizer_steps_alike():
    """An unpickled optimizer (params, tensor steps and all) rebuilds its caches and steps alike."""
    params = _params(10, small=True)
    opt = _make(Lion, params, True, 1e-2)
    for name, g in _grads(params, 0).items():
        params[name].grad = g
    opt.step()
    twin = pickle.loads(pickle.dumps(opt))
    twin_params = {name: p for g in twin.param_groups for name, p in zip(g["param_names"], g["params"], strict=True)}
    assert all(isinstance(twin.state[p]["step"], torch.Tensor) for p in twin_params.values())
    for ps in (params, twin_params):
        for name, g in _grads(ps, 1).items():
            ps[name].grad = g
    opt.step()
    twin.step()
    for name in params:
        assert torch.equal(params[name], twin_params[name])


# ---------------------------------------------------------------------------------------------
# Bad input, helpers, the op.


def test_capturable_rejects_bad_lr_and_flag():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be a real number"):
        Lion([p], lr=torch.tensor(-1.0), capturable=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be a real number"):
        Tiger([p], lr=torch.tensor([1e-3, 2e-3]), capturable=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: capturable must be a bool"):
        Lion([p], capturable="yes")


def test_stream_keys_from_step_equal_host_keys():
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (64,), generator=g).tolist() + [0, 2**64 - 1]
    rows = [(s, i % 50, (i * 7919) % (1 << 24)) for i, s in enumerate(seeds)]
    prefixes = torch.tensor([[R.stream_prefix(s, i) >> 32, R.stream_prefix(s, i) & 0xFFFFFFFF] for s, i, _ in rows])
    steps = torch.tensor([float(t) for *_, t in rows], dtype=torch.float32)
    for stream in (R.MASK_STREAM, R.ROUND_STREAM):
        k0, k1 = R.stream_keys_from_step(prefixes, steps, stream)
        expected = [R.stream_keys(s, i, t, stream) for s, i, t in rows]
        assert k0.tolist() == [e[0] for e in expected]
        assert k1.tolist() == [e[1] for e in expected]


@pytest.mark.parametrize("schedule", [{40: 1.0, 160: 0.5, 640: 0.1, 1280: 0.01}, {0: 1.0}, {0: 0.5, 10: 2.0}])
def test_piecewise_linear_on_a_step_tensor(schedule):
    f = piecewise_linear(schedule)
    steps = list(range(0, 1500, 7)) + [40, 160, 1280, 1281]
    on_device = f(torch.tensor(steps, dtype=torch.float32))
    assert on_device.dtype == torch.float64
    assert on_device.tolist() == [f(s) for s in steps]


def _step_op_arguments(seed: int) -> list:
    """Copies of the arguments one capturable Tiger step hands to the fused op (tables included)."""
    params = _params(seed, small=True)
    opt = _make(Tiger, params, True, torch.tensor(1e-2, dtype=torch.float64))
    calls = []
    original = ops.fused_step

    def recording(*args):
        calls.append(
            [[None if x is None else x.detach().clone() for x in a] if isinstance(a, list) else a.clone() for a in args]
        )
        return original(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "fused_step", recording)
        for name, g in _grads(params, 0).items():
            params[name].grad = g
        opt.step()
    (args,) = calls
    return args


def test_opcheck_with_dynamic_table():
    """The custom op's schema with the dynamic table (captured from a capturable step)."""
    args = _step_op_arguments(6)
    assert args[-1] is not None and args[-1].shape == (len(args[0]), R.NUM_DYN)
    assert (args[-2][:, R.FLAGS] & R.DYNAMIC).all()
    torch.library.opcheck(torch.ops.kexue.sign_optim_step.default, tuple(args))


# ---------------------------------------------------------------------------------------------
# CUDA graphs (only where a GPU is present).


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("opt_cls", [Lion, Tiger])
def test_capturable_step_in_a_cuda_graph(opt_cls):
    """Capture one step after a warm-up, replay it with new grads and lr: equal to eager steps."""
    eager = {k: v.detach().cuda().requires_grad_() for k, v in _params(8, small=False).items()}
    graphed = {k: v.detach().clone().requires_grad_() for k, v in eager.items()}
    lr = [torch.tensor(1e-2, dtype=torch.float64, device="cuda") for _ in range(2)]
    opt_e, opt_g = _make(opt_cls, eager, True, lr[0]), _make(opt_cls, graphed, True, lr[1])
    for name, g in _grads(eager, 0).items():  # warm-up on a side stream, as torch asks
        eager[name].grad, graphed[name].grad = g.cuda(), g.cuda().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt_e.step()
        opt_g.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for t in range(1, 6):
        for name, g in _grads(eager, t).items():
            eager[name].grad.copy_(g.cuda())
            graphed[name].grad.copy_(g.cuda())
        for x in lr:
            x.fill_(1e-2 / t)
        opt_e.step()
        graph.replay()
        for name in eager:
            assert torch.equal(eager[name], graphed[name]), f"step {t}: {name}"


def test_custom_op_with_dynamic_table_under_torch_compile():
    """torch.compile(fullgraph=True) traces the op with the dynamic table; same bits as eager."""
    args = _step_op_arguments(9)
    eager = [[None if x is None else x.clone() for x in a] if isinstance(a, list) else a for a in args]
    before = [x.clone() for x in args[0]]

    def step(*a):
        torch.ops.kexue.sign_optim_step(*a)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*eager)
    for got, want in zip(args[0] + args[2] + args[4], eager[0] + eager[2] + eager[4], strict=True):
        assert torch.equal(_bits(got), _bits(want)) if got.is_floating_point() else torch.equal(got, want)
    # the compiled call stepped (the tensors in accumulation windows only update their momenta)
    assert sum(not torch.equal(x, y) for x, y in zip(args[0], before, strict=True)) == 3
