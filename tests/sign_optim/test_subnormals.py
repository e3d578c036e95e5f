"""Subnormal params, grads and momenta survive the native steps, bit for bit.

The CUDA C++ step is compiled with --use_fast_math, whose -ftz=true would flush float32
subnormals to zero; its arithmetic goes through csrc/include/kexue/ieee_float.h so that it keeps
them as the C++ CPU step does (.ci/sass_counts.py --sign-optim checks the SASS for .FTZ). Here the
values are chosen so that every float32 operation of the step is exact or rounds once whatever
the compiler contracts: subnormals that are multiples of 16 * 2^-149, dyadic normal gradients,
betas of 1/2, lr = 2^-10 and decay 1 - lr * wd = 1 - 2^-11, two steps. So each native step must
equal the exact update (computed in float64) to the bit, and the CUDA step the CPU step. A flush
would show: a subnormal momentum or decayed theta becomes 0, a subnormal c takes no sign step, a
row of an embedding table whose gradient is subnormal counts as absent.

Targets: the C++ CPU step (everywhere it is built) and the CUDA C++ step on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import _backend
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import NATIVE

TINY = 2.0**-149  # the smallest float32 subnormal
LR, WD = 2.0**-10, 0.5
SHAPES = {"flat": (4099,), "matrix": (33, 65)}
ROWS = (40, 24)  # an embedding table: lazy rows


def _targets() -> list[str]:
    out = ["cpu"] if NATIVE else []
    if torch.cuda.is_available() and _backend.reasons(ops.OP, torch.zeros(1, device="cuda"))["cuda"] is None:
        out.append("cuda")
    return out


TARGETS = _targets()
pytestmark = pytest.mark.skipif(not TARGETS, reason="neither the C++ CPU step nor the CUDA C++ step is available")


def _subnormals(shape, gen) -> torch.Tensor:
    """Multiples of 16 * 2^-149 below 2^-130 in magnitude: halving them and adding two of them is exact."""
    k = torch.randint(-(2**15), 2**15, shape, generator=gen, dtype=torch.int64)
    return (k * 16).double() * TINY


def _problem(seed: int = 0):
    """Params (subnormal or zero) and two steps of gradients; each element's gradients are of one
    class in both steps (zero, subnormal, or a normal dyadic j / 16), so momenta stay exact."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = {}, [{}, {}]
    for name, shape in {**SHAPES, "emb": ROWS}.items():
        params[name] = torch.where(torch.rand(shape, generator=gen) < 0.2, 0.0, _subnormals(shape, gen))
        cls = torch.randint(0, 3, shape, generator=gen)
        if name == "emb":  # whole rows: absent (zero) or subnormal
            cls = torch.randint(0, 2, (shape[0], 1), generator=gen).expand(shape)
        for g in grads:
            normal = torch.randint(-256, 256, shape, generator=gen).double() / 16
            g[name] = torch.where(cls == 0, 0.0, torch.where(cls == 1, _subnormals(shape, gen), normal))
    for p in params.values():
        assert bool(((p.abs() < 2.0**-126) & (p != 0)).any())
    return params, grads


def _run(target: str, algo: str, momentum_dtype):
    params, grads = _problem()
    ps = {k: torch.nn.Parameter(v.float().to(target)) for k, v in params.items()}
    if algo == "lion":
        opt = Lion(
            [{"params": [ps[k] for k in SHAPES]}, {"params": [ps["emb"]], "embedding": True}],
            lr=LR,
            betas=(0.5, 0.5),
            weight_decay=WD,
            momentum_dtype=momentum_dtype,
        )
    else:
        opt = Tiger(
            [{"params": [ps["matrix"]], "kind": "matrix"}, {"params": [ps["flat"]], "kind": "bias"}],
            lr=LR,
            beta=0.5,
            weight_decay=WD,
            momentum_dtype=momentum_dtype,
        )
    stepped = [k for k in ps if any(p is ps[k] for grp in opt.param_groups for p in grp["params"])]
    history = []
    for g in grads:
        for k in stepped:
            ps[k].grad = g[k].float().to(target)
        with kexue.use_backend(target):
            opt.step()
        history.append({k: (ps[k].detach().cpu().clone(), opt.state[ps[k]]["exp_avg"].cpu().clone()) for k in stepped})
    return params, grads, history


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _exact_momenta(params, grads, momentum_dtype, names):
    """m_t = m_{t-1} / 2 + g_t / 2 (betas of 1/2), exact in float64, stored in momentum_dtype."""
    m = {k: torch.zeros_like(params[k]) for k in names}
    out = []
    for g in grads:
        m = {k: (0.5 * m[k] + 0.5 * g[k]).to(momentum_dtype).double() for k in names}
        out.append(m)
    return out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algo", ["lion", "tiger"])
def test_subnormal_momenta_are_exact(target, algo, momentum_dtype):
    params, grads, history = _run(target, algo, momentum_dtype)
    want = _exact_momenta(params, grads, momentum_dtype, history[0].keys())
    subnormal = 0
    for t, (got, exp) in enumerate(zip(history, want, strict=True)):
        for k, (_, m) in got.items():
            assert m.dtype == momentum_dtype
            if k == "emb":  # absent rows keep or decay their momentum by the embedding rules
                present = grads[t][k].ne(0).any(dim=1)
                m, e = m[present], exp[k].to(momentum_dtype)[present]
            else:
                e = exp[k].to(momentum_dtype)
            assert torch.equal(_bits(m), _bits(e)), f"step {t}, {k}: momentum differs from the exact value"
            subnormal += int(((m.double().abs() < 2.0**-126) & (m != 0)).sum())
    assert subnormal > 1000, "the test exercised too few subnormal momenta"


@pytest.mark.parametrize("target", TARGETS)
def test_lion_subnormal_params_are_exact(target):
    """theta' = theta (1 - lr wd) - lr sign(c), c = m / 2 + g / 2: a subnormal c steps by lr, a zero c
    leaves theta decayed (a subnormal product, rounded once), a row with subnormal gradients moves."""
    params, grads, history = _run(target, "lion", torch.float32)
    decay = 1.0 - LR * WD
    theta = {k: params[k] for k in history[0]}
    m = {k: torch.zeros_like(theta[k]) for k in theta}
    kept = 0
    for t, g in enumerate(grads):
        for k in theta:
            c = 0.5 * m[k] + 0.5 * g[k]
            new = (theta[k] * decay - LR * torch.sign(c)).float().double()
            if k == "emb":
                present = g[k].ne(0).any(dim=1, keepdim=True)
                new = torch.where(present, new, history[t][k][0].double())  # absent rows: not checked here
                if t == 0:  # from a subnormal theta: a sign step of lr on every element
                    assert bool((new[present.expand_as(new)].abs() >= LR / 2).all()), "a subnormal row did not move"
            got = history[t][k][0]
            assert torch.equal(_bits(got), _bits(new.float())), f"step {t}, {k}: params differ from the exact update"
            kept += int(((c == 0) & (theta[k] != 0)).sum())
            theta[k], m[k] = new, c
    assert kept > 100, "too few subnormal params were only decayed"


@pytest.mark.skipif("cuda" not in TARGETS or "cpu" not in TARGETS, reason="needs the CUDA C++ and C++ CPU steps")
@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algo", ["lion", "tiger"])
def test_cuda_step_is_the_cpu_step_on_subnormals(algo, momentum_dtype):
    *_, on_gpu = _run("cuda", algo, momentum_dtype)
    *_, on_cpu = _run("cpu", algo, momentum_dtype)
    for t, (a, b) in enumerate(zip(on_gpu, on_cpu, strict=True)):
        for k in a:
            assert torch.equal(_bits(a[k][0]), _bits(b[k][0])), f"step {t}, {k}: params"
            assert torch.equal(_bits(a[k][1]), _bits(b[k][1])), f"step {t}, {k}: momentum"
