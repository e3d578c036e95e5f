"""The CUDA C++ fallbacks (csrc/cuda/*.cu) on CUDA tensors, against the float64 reference.

Without a GPU these kernels are only compiled and checked for spills (.ci/check-cuda), and this
whole file is skipped; it is the check to run on a machine with one (every test here needs a
CUDA device and a kexue._C built with CUDA). Each test runs a public op on CUDA tensors forced
onto the "cuda" backend, then the same op on float64 copies through the "torch" backend (the
reference), and compares outputs and gradients with the budgets the CPU tests use.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.optim import Lion, Tiger
from tests.biohash.helpers import random_batch
from tests.global_pointer.helpers import make_problem
from tests.helpers import DTYPES, assert_close
from tests.sign_optim.helpers import EPS32, SHAPES, ulp

pytestmark = pytest.mark.skipif(
    not kexue.backends()["cuda"]["available"], reason=str(kexue.backends()["cuda"]["reason"])
)

CUDA = torch.device("cuda")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _both(fn, inputs, dtype):
    """fn(*inputs) on the cuda backend in `dtype`, and on the torch backend in float64."""
    ours = _leaves(*(t.to(CUDA, dtype) for t in inputs))
    theirs = _leaves(*(t.to(CUDA, torch.float64) for t in inputs))
    with kexue.use_backend("cuda"):
        out = fn(*ours)
    with kexue.use_backend("torch"):
        want = fn(*theirs)
    return ours, out, theirs, want


def _grads(out, leaves, want, ref_leaves, seed):
    g = torch.randn(want.shape, dtype=torch.float64, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
    ok = torch.isfinite(want)
    g = torch.where(ok, g, 0.0)
    got = torch.autograd.grad(out, leaves, g.to(out.dtype))
    exp = torch.autograd.grad(torch.where(ok, want, 0.0), ref_leaves, g.to(out.dtype).double())
    return got, exp


def _half_factor(dtype):
    return 2.0 if dtype in (torch.float16, torch.bfloat16) else 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 1000), (3, 4097)])
def test_entropy_normalize(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2, -1)
    target = 0.5 * math.log(shape[-1])  # halfway to uniform
    ours, y, theirs, y64 = _both(lambda t: kexue.ops.entropy_normalize(t, target), [x], dtype)
    assert y.dtype == dtype and y.device.type == CUDA.type
    assert_close(y, y64, dtype, "y")
    got, exp = _grads(y, ours, y64, theirs, 1)
    assert_close(got[0], exp[0], dtype, "grad x", factor=_half_factor(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 65, 32), (1, 2, 130, 64), (1, 1, 1, 16), (2, 4, 77, 128)])
def test_logn_attention(dtype, causal, shape):
    B, H, L, D = shape
    gen = torch.Generator().manual_seed(L + D)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(B, L, generator=gen) > 0.2
    mask[:, 0] = True
    mask_cuda = mask.to(CUDA)

    def fn(q, k, v):
        return kexue.ops.logn_attention(q, k, v, causal=causal, train_len=32, key_padding_mask=mask_cuda)

    ours, out, theirs, want = _both(fn, [q, k, v], dtype)
    assert out.dtype == dtype
    assert_close(out, want, dtype, "out")
    got, exp = _grads(out, ours, want, theirs, 2)
    for name, a, b in zip("qkv", got, exp, strict=False):
        assert_close(a, b, dtype, f"grad {name}", factor=_half_factor(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 130, 2, 64), (3, 1, 1, 8)])
def test_global_pointer_scores_and_loss(dtype, shape):
    q, k, sb, eb, mask, labels = make_problem(*shape, seed=sum(shape))
    mask, labels = mask.to(CUDA), labels.to(CUDA)

    def scores(q, k, sb, eb):
        return kexue.ops.global_pointer_scores(q, k, sb, eb, mask)

    ours, s, theirs, s64 = _both(scores, [q, k, sb, eb], dtype)
    assert_close(s, s64, dtype, "scores")
    got, exp = _grads(s, ours, s64, theirs, 3)
    for name, a, b in zip(("dq", "dk", "dsb", "deb"), got, exp, strict=False):
        assert_close(a, b, dtype, f"scores {name}", factor=_half_factor(dtype))

    def loss(q, k, sb, eb):
        return kexue.ops.global_pointer_loss(q, k, sb, eb, labels, mask, reduction="none")

    ours, out, theirs, out64 = _both(loss, [q, k, sb, eb], dtype)
    assert_close(out, out64, dtype, "loss")
    got, exp = _grads(out, ours, out64, theirs, 4)
    for name, a, b in zip(("dq", "dk", "dsb", "deb"), got, exp, strict=False):
        assert_close(a, b, dtype, f"loss {name}", factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(400, 97, 32), (65, 40, 64), (7, 30, 7), (1024, 300, 32)])
def test_biohash_hash_activations_and_hamming(dtype, shape):
    num_hidden, num_inputs, k = shape
    W = kexue.ops.new_synapses(num_hidden, num_inputs, dtype=dtype, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(num_hidden)
    ids, offsets, weights = random_batch(37, num_inputs, max_len=11, generator=gen)
    w = weights.to(torch.float32 if dtype != torch.float64 else dtype)
    Wc, idc, offc, wc = W.to(CUDA), ids.to(CUDA), offsets.to(CUDA), w.to(CUDA)
    for packed in (True, False):
        for weight_arg, weight_cuda in ((None, None), (w, wc)):
            with kexue.use_backend("torch"):
                want = kexue.ops.biohash(ids, offsets, weight_arg, W, k, packed=packed)
                want_act = kexue.ops.biohash_activations(ids, offsets, weight_arg, W)
            with kexue.use_backend("cuda"):
                got = kexue.ops.biohash(idc, offc, weight_cuda, Wc, k, packed=packed)
                act = kexue.ops.biohash_activations(idc, offc, weight_cuda, Wc)
            # the kernels round their float32 sums like the reference: bit for bit (spec: exact codes)
            assert torch.equal(got.cpu(), want), (packed, weight_arg is None)
            assert torch.equal(act.cpu(), want_act)
    codes = kexue.ops.biohash(ids, offsets, None, W, k)
    with kexue.use_backend("torch"):
        d_want, i_want = kexue.ops.hamming_topk(codes[:5], codes, 6)
    with kexue.use_backend("cuda"):
        d_got, i_got = kexue.ops.hamming_topk(codes[:5].to(CUDA), codes.to(CUDA), 6)
    assert torch.equal(d_got.cpu(), d_want) and torch.equal(i_got.cpu(), i_want)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("algo", ["lion", "tiger"])
@pytest.mark.parametrize(
    "dtype, momentum_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_sign_optim_step(backend, algo, dtype, momentum_dtype):
    """Three steps of the cuda (or triton) backend on CUDA tensors against the C++ CPU backend on CPU copies
    (which the CPU tests hold to the float64 oracle). Both do the same float32 arithmetic, so they
    agree to the last bit of the storage dtype (FMA contraction may differ), except on the rare
    elements whose c lies within rounding of zero: there one sign step, 2 lr times the RMS factor."""
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    lr = 1e-2
    runs = {}
    for name, device in ((backend, CUDA), ("cpu", torch.device("cpu"))):
        params = [torch.nn.Parameter(p.to(device, dtype)) for p in init]
        cls = Lion if algo == "lion" else Tiger
        opt = cls(
            [(f"l{i}.weight", p) for i, p in enumerate(params)], lr=lr, weight_decay=0.1, momentum_dtype=momentum_dtype
        )
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.to(device, dtype)
            with kexue.use_backend(name):
                opt.step()
        runs[name] = [(p.detach().cpu(), opt.state[p]["exp_avg"].cpu()) for p in params]
    flipped = total = 0
    for (p, m), (p_cpu, m_cpu) in zip(runs[backend], runs["cpu"], strict=True):
        assert p.dtype == dtype and m.dtype == momentum_dtype
        last_bits = 2 * ulp(p_cpu, dtype)
        diff = (p.double() - p_cpu.double()).abs()
        assert bool((diff <= last_bits + 2 * lr * 3).all()), f"param off by {diff.max().item():.3g}"
        flipped += int((diff > last_bits).sum())
        total += p.numel()
        # m' = b m + (1 - b) g: float32 rounding of its two terms (grads here are N(0, 1), |g| < 6)
        m_diff = (m.double() - m_cpu.double()).abs()
        m_tol = 2 * ulp(m_cpu, momentum_dtype) + 8 * EPS32 * (m_cpu.double().abs() + 6.0)
        assert bool((m_diff <= m_tol).all()), f"momentum off by {m_diff.max().item():.3g}"
    assert flipped <= max(3, total // 1000), f"{flipped} of {total} elements took a different sign step"
