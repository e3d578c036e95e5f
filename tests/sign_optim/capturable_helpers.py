"""Shared by the capturable tests: params, grads and groups to step, optimizer copies, bitwise
comparison, and the no-host-synchronisation detector."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kexue.ops import sign_optim as ops
from kexue.optim import Tiger
from tests.sign_optim.helpers import BACKENDS

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
