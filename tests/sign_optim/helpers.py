"""Driving Lion/Tiger step by step against the float64 oracle, element by element.

Each step starts the oracle from the optimizer's own current state (params, momentum, per-row
flags) upcast to float64, so every step is checked on its own and errors cannot accumulate or
hide. The check is elementwise and to the rounding of the storage dtype:

    |out - exact| <= 0.5 ulp_dtype(exact) + 8 * 2^-24 * scale

where scale bounds the magnitudes the float32 arithmetic went through (8 float32 roundings at
most). The one place where float32 and float64 may legitimately disagree by more is the sign of a
c (or m) that lies within float32 rounding of zero; such elements (counted, and required to be
rare) may differ by one sign step, 2 * lr * RMS.

The oracle tests share what they run on from here too: the backends (BACKENDS), the odd sizes
(SHAPES), the param and grad builders, and the drivers (run_oracle, drive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

import kexue
from kexue.optim._sign_base import flat_params
from kexue.reference import sign_optim as R
from tests.conftest import DEVICE, triton_unavailable_reason

MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}
EPS32 = 2.0**-24


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` numbers at |x| (float64); subnormals use the smallest normal's spacing."""
    tiny = torch.finfo(dtype).tiny
    _, exp = torch.frexp(x.double().abs().clamp(min=tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 1 - MANTISSA[dtype])


def assert_rounded(
    out: Tensor, exact: Tensor, scale: Tensor, what: str, loose: Tensor | None = None, loose_by: Tensor | float = 0.0
) -> None:
    """``out`` (any dtype) equals the float64 ``exact`` to the rounding of float32 math + storage."""
    out64 = out.detach().double()
    assert torch.equal(torch.isnan(out64), torch.isnan(exact)), f"{what}: NaN pattern differs"
    scale = torch.nan_to_num(torch.as_tensor(scale, dtype=torch.float64), nan=0.0)  # a NaN grad left unused
    tol = 0.5 * ulp(exact, out.dtype) + 8 * EPS32 * scale
    if loose is not None:
        tol = torch.where(loose, tol + loose_by, tol)
    err = (out64 - exact).abs()
    bad = ~(err <= tol) & ~torch.isnan(exact)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements off; first at flat index {i}: "
            f"got {out64.reshape(-1)[i].item()!r}, exact {exact.reshape(-1)[i].item()!r}, "
            f"tolerance {tol.reshape(-1)[i].item():.3g}"
        )


@dataclass
class Trace:
    """What a run saw: sign-ambiguous element counts and the number of elements checked."""

    ambiguous: int = 0
    checked: int = 0
    moved: list = field(default_factory=list)


def snapshot(opt: torch.optim.Optimizer, params: list[Tensor], momentum_dtype=torch.float32):
    """float64 copies of params, momenta (zeros before the first step) and row_seen flags."""
    thetas, moms, seen = [], [], []
    for p in params:
        st = opt.state.get(p, {})
        thetas.append(p.detach().double().clone())
        m = st.get("exp_avg")
        moms.append(torch.zeros_like(p, dtype=torch.float64) if m is None else m.double().clone())
        s = st.get("row_seen")
        seen.append(None if s is None else s.clone())
    return thetas, moms, seen


def check_step(
    params, opt, thetas_before, moms_before, exact_thetas, exact_moms, c_scale, lr_bound, trace: Trace, ambiguous
):
    """Compare the optimizer's state after a step with the oracle's float64 result."""
    for i, p in enumerate(params):
        m = opt.state[p]["exp_avg"]
        amb = ambiguous[i]
        trace.ambiguous += int(amb.sum())
        trace.checked += p.numel()
        scale_p = torch.maximum(thetas_before[i].abs(), exact_thetas[i].abs()) + lr_bound[i]
        assert_rounded(p, exact_thetas[i], scale_p, f"param {i}", loose=amb, loose_by=2 * lr_bound[i])
        assert_rounded(m, exact_moms[i], c_scale[i], f"momentum {i}")


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
