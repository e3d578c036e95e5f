"""The CUDA C++ step's 128-bit accesses change no bit.

The step moves a tensor whose arrays all start on 16 bytes as 128-bit loads and stores, and any
other tensor element by element, in groups of 8 elements that a thread visits in the same order
either way (csrc/include/kexue/sign_optim_access.cuh). So the same values at aligned addresses
(vector path) and at unaligned ones (scalar path) must leave the same params, momenta and carried
sums of squares, bit for bit, after every step: for each dtype pair, odd lengths (a tail group),
two work items, rows of whole groups and not, Tiger's whole-tensor and per-row RMS (carried from
the second step), its NaN guard, ChildTuning-F, stochastic rounding, and gradients at odd offsets
in one flat buffer (as DDP's buckets).

Targets: the CUDA C++ step on a GPU, and the C++ CPU step everywhere (it has no vector form, so
there the test checks only itself and the CPU step's indifference to addresses). The vector path
against the reference: tests/test_cuda_backends.py::test_sign_optim_step holds the CUDA step on
(aligned) tensors of odd sizes to the C++ CPU step, which the oracle tests hold to float64.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import _backend
from kexue.ops import sign_optim as ops
from kexue.optim import Lion, Tiger
from tests.sign_optim.helpers import NATIVE


def _targets() -> list[tuple[str, str]]:
    out = [("cpu", "cpu")] if NATIVE else []
    if torch.cuda.is_available() and _backend.reasons(ops.OP, torch.zeros(1, device="cuda"))["cuda"] is None:
        out.append(("cuda", "cuda"))
    return out


TARGETS = _targets()
pytestmark = pytest.mark.skipif(not TARGETS, reason="neither the C++ CPU step nor the CUDA C++ step is available")
IDS = {"ids": lambda t: t[1]}

# Odd lengths around a group of 8 and a work item of 65536; rows of 24 (whole groups) and 20.
SHAPES = {"one": (1,), "seven": (7,), "eight": (8,), "nine": (9,), "odd": (4099,), "two_items": (65536 + 13,)}
ROWS = {"emb24": (50, 24), "emb20": (30, 20)}


def _values(shapes: dict, dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _placed(values: dict, device: str, offset: int) -> dict:
    """Copies of ``values`` on ``device``, each ``offset`` elements into a buffer of its own."""
    out = {}
    for k, v in values.items():
        buf = torch.empty(v.numel() + offset, dtype=v.dtype, device=device)
        view = buf[offset:].view(v.shape)
        view.copy_(v)
        out[k] = view.detach().requires_grad_()
        assert (out[k].data_ptr() % 16 == 0) == (offset == 0)
    return out


def _bucket(grads: dict, device: str) -> dict:
    """The gradients as views into one flat buffer, each after one element of padding."""
    n = sum(g.numel() + 1 for g in grads.values())
    flat = torch.zeros(n, dtype=next(iter(grads.values())).dtype, device=device)
    out, at = {}, 0
    for k, g in grads.items():
        out[k] = flat[at + 1 : at + 1 + g.numel()].view(g.shape)
        out[k].copy_(g)
        at += g.numel() + 1
    return out


def _grads(params: dict, t: int, nan_at=None) -> dict:
    g = _values({k: p.shape for k, p in params.items()}, next(iter(params.values())).dtype, 100 + t)
    for k in ROWS:
        if k in g:
            g[k][::3] = 0  # absent rows: lazy updates
    if nan_at is not None and t == nan_at:
        g["odd"][5] = float("nan")
    return g


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(torch.uint8).cpu()


def _assert_same(a: dict, one, b: dict, two, what: str):
    for k in a:
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{what}: param {k}"
        sa, sb = one.state[a[k]], two.state[b[k]]
        assert torch.equal(_bits(sa["exp_avg"]), _bits(sb["exp_avg"])), f"{what}: momentum {k}"
        assert ("rms_ssq" in sa) == ("rms_ssq" in sb)
        if "rms_ssq" in sa:
            assert torch.equal(_bits(sa["rms_ssq"]), _bits(sb["rms_ssq"])), f"{what}: carried sums of {k}"


def _run(target, make, dtype, steps=4, nan_at=None, grads_in_bucket=False):
    """Two optimizers from ``make(params)`` over the same values: ``a`` aligned, ``b`` at an odd
    element offset (or with its gradients in a bucket at odd offsets); compared after each step."""
    device, backend = target
    values = _values({**SHAPES, **ROWS}, dtype, 7)
    a = _placed(values, device, 0)
    b = _placed(values, device, 0 if grads_in_bucket else 1)
    one, two = make(a), make(b)
    with kexue.use_backend(backend):
        for t in range(steps):
            grads = _grads(a, t, nan_at)
            ga = _placed(grads, device, 0)
            gb = _bucket(grads, device) if grads_in_bucket else _placed(grads, device, 1)
            for k in a:
                a[k].grad, b[k].grad = ga[k], gb[k]
            one.step()
            two.step()
            _assert_same(a, one, b, two, f"step {t}")
    assert not torch.equal(_bits(a["odd"]), _bits(values["odd"])), "the params did not move"


PAIRS = [(p, m) for p in (torch.float32, torch.bfloat16, torch.float16) for m in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("target", TARGETS, **IDS)
@pytest.mark.parametrize("dtype, momentum_dtype", PAIRS, ids=str)
def test_lion_vector_path_is_the_scalar_path(target, dtype, momentum_dtype):
    def make(p):
        groups = [
            {"params": [p[k] for k in SHAPES]},
            {"params": [p[k] for k in ROWS], "embedding": True},  # lazy rows, a warp per row
        ]
        return Lion(groups, lr=1e-2, weight_decay=0.1, momentum_dtype=momentum_dtype)

    _run(target, make, dtype)


@pytest.mark.parametrize("target", TARGETS, **IDS)
@pytest.mark.parametrize("options", [{"child_tuning": "F", "reserve_p": 0.5}, {"stochastic_rounding": True}], ids=str)
def test_lion_random_bits_follow_the_element(target, options):
    """ChildTuning-F's mask and stochastic rounding draw bits per element index, in groups too."""
    _run(target, lambda p: Lion(list(p.values()), lr=1e-2, seed=3, **options), torch.bfloat16)


TIGER = {
    "plain": {},
    "accumulation": {"grad_accum_steps": 2},
    "nan_guard_shrinks": {"nan_at": 2},
    "bucket": {"grads_in_bucket": True},
}


@pytest.mark.parametrize("target", TARGETS, **IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(TIGER))
def test_tiger_vector_path_is_the_scalar_path(target, dtype, config):
    """Whole-tensor RMS (the pre-pass, then carried sums), row RMS and biases: the sums of squares
    are formed in the same order on both paths, so even the carried sums agree bit for bit."""
    options = dict(TIGER[config])
    nan_at, bucket = options.pop("nan_at", None), options.pop("grads_in_bucket", False)

    def make(p):
        groups = [
            {"params": [p["two_items"], p["odd"], p["nine"]], "kind": "matrix"},
            {"params": [p[k] for k in ROWS], "embedding": True},
            {"params": [p["one"], p["seven"], p["eight"]], "kind": "bias"},
        ]
        return Tiger(groups, lr=3e-2, **options)

    _run(target, make, dtype, steps=5, nan_at=nan_at, grads_in_bucket=bucket)
