"""The capturable step's op: bad lr and flag, stream keys, schedules on a step tensor, opcheck and
torch.compile with a dynamic table, and CUDA graph capture (only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger, piecewise_linear
from kexue.reference import sign_optim as R
from tests.conftest import DEVICE
from tests.sign_optim.capturable_helpers import _bits, _grads, _make, _params


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
