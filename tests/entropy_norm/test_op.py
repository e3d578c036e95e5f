"""Entropy normalization through the public op, on the C++ CPU and torch backends.

The float64 reference is the oracle. The Triton kernels are covered in
tests/entropy_norm/test_triton_*.py (interpreter on CPU), the CUDA ones by `make check-cuda`.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.ops import entropy_normalize
from kexue.reference import entropy_norm as ref
from tests.helpers import RTOL, assert_close, fresh_probs, reachable_targets, rel_err

NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def entropy(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return -torch.where(y > 0, y * torch.log(y), 0.0).sum(-1)


def oracle(x: torch.Tensor, target: torch.Tensor, logits: bool, max_iter: int = 60):
    """Float64 reference on the same (already rounded) input values."""
    return ref.entropy_normalize_forward(
        x.double().contiguous(), target.double().contiguous(), logits, max_iter, ref.default_tol(torch.float64)
    )


def run_rows(backend: str, x, target, logits=False, max_iter=20, tol=None):
    tol = ref.default_tol(ref.compute_dtype(x.dtype)) if tol is None else tol
    with kexue.use_backend(backend):
        return torch.ops.kexue.entropy_normalize(x, target, logits, max_iter, tol)


# ---------------------------------------------------------------------------------------------
# The reference itself: the math of the post.


def test_reference_reaches_target_and_is_a_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 37, dtype=torch.float64, generator=g) * 3
    t = reachable_targets(16, 37, generator=g)
    y, gamma, stats = oracle(z, t, logits=True)
    assert torch.allclose(entropy(y), t, atol=1e-10, rtol=0)
    assert torch.allclose(y, torch.softmax(gamma[:, None] * z, -1), atol=1e-14, rtol=0)
    # order preserved
    assert torch.equal(z.argsort(-1), y.argsort(-1))
    assert torch.allclose(stats[:, 0], z.amax(-1))


def test_reference_matches_the_posts_iteration():
    # Su's update: H <- -sum p log p; gamma <- 1 + (H* - H) / (H^2 - sum p (log p)^2); p <- p^gamma / sum.
    g = torch.Generator().manual_seed(2)
    p = fresh_probs(8, 50, generator=g)
    t = reachable_targets(8, 50, generator=g)
    q = p.clone()
    for _ in range(30):
        h = -(q * q.log()).sum(-1, keepdim=True)
        gam = 1 + (t[:, None] - h) / (h * h - (q * q.log() ** 2).sum(-1, keepdim=True))
        q = q**gam
        q = q / q.sum(-1, keepdim=True)
    y, _, _ = oracle(p, t, logits=False)
    assert rel_err(y, q) < 1e-12


def test_first_newton_step_is_the_posts_first_order_expansion():
    # One iteration from gamma = 1: gamma = 1 + (H* - H) / (H^2 - E[(log p)^2]).
    g = torch.Generator().manual_seed(3)
    p = fresh_probs(4, 20, generator=g)
    t = reachable_targets(4, 20, generator=g)
    _, gamma, _ = ref.entropy_normalize_forward(p, t, False, 1, 1e-12)
    h = -(p * p.log()).sum(-1)
    expected = 1 + (t - h) / (h * h - (p * p.log() ** 2).sum(-1))
    inside = expected > 0  # a step below zero is replaced by bisection
    assert torch.allclose(gamma[inside], expected[inside], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Kernels against the oracle.

SHAPES = [(1, 1), (3, 2), (5, 15), (4, 16), (6, 17), (7, 123), (2, 1000), (3, 4097)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_oracle(backend, dtype, logits, shape, nan_empty):
    rows, n = shape
    g = torch.Generator().manual_seed(rows * 1000 + n)
    p = fresh_probs(rows, n, generator=g)
    x = (torch.log(p) if logits else p).to(dtype)
    t = reachable_targets(rows, n, generator=g).to(ref.compute_dtype(dtype))
    y, gamma, stats = run_rows(backend, x, t, logits)
    y64, gamma64, stats64 = oracle(x, t, logits)
    assert y.dtype == dtype and gamma.dtype == ref.compute_dtype(dtype)
    assert_close(y, y64, dtype, "y")
    # gamma: a float32 solve is as good as float32 entropy evaluation allows (1e-5 relative).
    assert_close(gamma, gamma64, torch.float64 if dtype == torch.float64 else torch.float32, "gamma")
    assert_close(stats, stats64, torch.float64 if dtype == torch.float64 else torch.float32, "stats")
    if dtype in (torch.float32, torch.float64) and n > 1:
        assert torch.allclose(entropy(y), t.double(), atol=1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (5, 15), (6, 17), (3, 300)])
def test_backward_matches_oracle(backend, dtype, logits, shape, nan_empty):
    rows, n = shape
    g = torch.Generator().manual_seed(7 + rows * n)
    p = fresh_probs(rows, n, generator=g)
    x = (torch.log(p) if logits else p).to(dtype)
    ct = ref.compute_dtype(dtype)
    t = reachable_targets(rows, n, generator=g).to(ct)
    grad_y = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    grad_gamma = torch.randn(rows, generator=g, dtype=torch.float64).to(ct)
    _, gamma64, stats64 = oracle(x, t, logits)
    gx64, gt64 = ref.entropy_normalize_backward(
        grad_y.double(), grad_gamma.double(), x.double(), gamma64, stats64, logits
    )
    _, gamma, stats = run_rows(backend, x, t, logits)
    with kexue.use_backend(backend):
        gx, gt = torch.ops.kexue.entropy_normalize_backward(grad_y, grad_gamma, x, gamma, stats, logits)
    assert gx.dtype == dtype and gt.dtype == ct
    assert_close(gx, gx64, dtype, "grad_x")
    assert_close(gt, gt64, torch.float64 if dtype == torch.float64 else torch.float32, "grad_target")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(11)
    p = fresh_probs(3, 9, generator=g).requires_grad_()
    z = (torch.randn(3, 9, dtype=torch.float64, generator=g) * 2).requires_grad_()
    t = reachable_targets(3, 9, generator=g).requires_grad_()
    with kexue.use_backend(backend):
        assert torch.autograd.gradcheck(lambda p, t: entropy_normalize(p, t, return_gamma=True), (p, t))
        assert torch.autograd.gradcheck(lambda z, t: entropy_normalize(z, t, logits=True, return_gamma=True), (z, t))
        # masked logits, and a target tensor broadcast over a batch dimension
        zm = z.detach().clone()
        zm[0, :4] = -math.inf
        zm.requires_grad_()
        t1 = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z, t: entropy_normalize(z, t, logits=True), (zm, t1))


# ---------------------------------------------------------------------------------------------
# Edge rows: answered exactly, never NaN unless the input is.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_edge_rows(backend, dtype, nan_empty):
    n = 6
    inf = math.inf
    z = torch.tensor(
        [
            [0.3] * n,  # uniform: any target below log 6 can only give the argmax limit (itself)
            [-inf, 2.0, -inf, -inf, -inf, -inf],  # one finite entry: one-hot whatever the target
            [1.0, 1.0, 0.0, -inf, -1.0, 0.5],  # target above log(#finite): uniform over the support
            [1.0, 1.0, 0.0, -2.0, -1.0, 0.5],  # target below log(#ties): uniform over the two maxima
            [1.0, math.nan, 0.0, -2.0, -1.0, 0.5],  # NaN in, NaN out
            [-inf] * n,  # no finite entry: NaN, as softmax
            [1.0, inf, 0.0, -2.0, -1.0, 0.5],  # +inf: NaN, as softmax
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target at log n: uniform
        ],
        dtype=torch.float64,
    )
    # the last target sits just above log n (the ops layer accepts that much slack): uniform
    t = torch.tensor([1.0, 0.5, math.log(5) + 0.1, 0.2, 1.0, 1.0, 1.0, math.log(n) + 1e-6], dtype=torch.float64)
    x = z.to(dtype)
    ct = ref.compute_dtype(dtype)
    y, gamma, _ = run_rows(backend, x, t.to(ct), True)
    y = y.double()
    expected = torch.tensor(
        [
            [1 / 6] * 6,
            [0, 1, 0, 0, 0, 0],
            [0.2, 0.2, 0.2, 0, 0.2, 0.2],
            [0.5, 0.5, 0, 0, 0, 0],
            [math.nan] * 6,
            [math.nan] * 6,
            [math.nan] * 6,
            [1 / 6] * 6,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(y, expected, rtol=RTOL[dtype], atol=RTOL[dtype], equal_nan=True)
    assert gamma[1] == 0 and gamma[2] == 0 and gamma[7] == 0
    assert gamma[0] == math.inf and gamma[3] == math.inf
    assert torch.isnan(gamma[4:7]).all()
    # probabilities with zeros: zero stays zero, the rest is renormalised
    p = torch.tensor([[0.0, 0.5, 0.25, 0.25]], dtype=dtype)
    y, _, _ = run_rows(backend, p, torch.tensor([0.9], dtype=ct), False)
    assert y[0, 0] == 0 and torch.isfinite(y).all()
    assert abs(float(entropy(y)[0]) - 0.9) < (1e-5 if dtype != torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_rows_have_zero_gradient(backend):
    z = torch.tensor([[0.3] * 4, [1.0, 1.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, 0.1, math.log(4)], dtype=torch.float64, requires_grad=True)
    with kexue.use_backend(backend):
        y = entropy_normalize(z, t, logits=True)
    (y * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z)) and torch.equal(t.grad, torch.zeros_like(t))


# ---------------------------------------------------------------------------------------------
# PyTorch conventions: shapes, strides, batch 0, compile, opcheck, errors.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_any_dim_batch_shape_and_non_contiguous(backend):
    g = torch.Generator().manual_seed(5)
    base = fresh_probs(2 * 3 * 10, 8, generator=g).reshape(2, 3, 10, 8).float()
    x = base.transpose(2, 3)  # (2, 3, 8, 10): distributions of 8 along dim=2, not the last dim
    assert not x.is_contiguous()
    t = torch.rand(2, 1, 10, generator=g) * math.log(8) * 0.8 + 0.1  # broadcast over dim 1
    with kexue.use_backend(backend):
        y, gamma = entropy_normalize(x, t, dim=2, return_gamma=True)
    assert y.shape == x.shape and gamma.shape == (2, 3, 10)
    expected, gamma64, _ = oracle(base.reshape(-1, 8), t.expand(2, 3, 10).reshape(-1), False)
    assert_close(y.movedim(2, -1).reshape(-1, 8), expected, torch.float32)
    assert_close(gamma.reshape(-1), gamma64, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    x = torch.rand(0, 3, 7, requires_grad=True)
    with kexue.use_backend(backend):
        y, gamma = entropy_normalize(x, 1.0, return_gamma=True)
    assert y.shape == (0, 3, 7) and gamma.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_max_iter_gives_rough_control():
    g = torch.Generator().manual_seed(9)
    p = fresh_probs(32, 64, generator=g, sharpness=1.0)
    t = torch.full((32,), 2.5, dtype=torch.float64)
    errs = []
    for it in (1, 2, 3, 20):
        y = entropy_normalize(p, t, max_iter=it)
        errs.append(float((entropy(y) - t).abs().max()))
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-9


def test_torch_compile_no_graph_break():
    g = torch.Generator().manual_seed(4)
    x = fresh_probs(6, 33, generator=g).float().requires_grad_()
    t = reachable_targets(6, 33, generator=g).float()

    def f(x, t):
        return entropy_normalize(x * 1.0, t).pow(2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, t)
    (gc,) = torch.autograd.grad(out, x)
    (ge,) = torch.autograd.grad(f(x, t), x)
    assert torch.allclose(out, f(x, t)) and torch.allclose(gc, ge)


@pytest.mark.slow
def test_torch_compile_inductor():
    x = fresh_probs(6, 33).float()
    compiled = torch.compile(lambda x: entropy_normalize(x, 1.5) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), entropy_normalize(x, 1.5) * 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    g = torch.Generator().manual_seed(6)
    x = fresh_probs(5, 11, generator=g).to(dtype).requires_grad_()
    t = reachable_targets(5, 11, generator=g).float().requires_grad_()
    with kexue.use_backend(backend):
        torch.library.opcheck(torch.ops.kexue.entropy_normalize.default, (x, t, False, 20, 1e-5))


def test_module():
    m = kexue.nn.EntropyNormalize(target=1.0, dim=0)
    x = fresh_probs(4, 5).float().t()  # (5, 4): distributions along dim 0
    y = m(x)
    assert y.shape == x.shape
    assert torch.allclose(entropy(y.t()), torch.full((4,), 1.0, dtype=torch.float64), atol=1e-5)
    y = m(x, target=torch.tensor(0.5))  # a per-call target overrides the module's
    assert torch.allclose(entropy(y.t()), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-5)
    assert "target=1.0" in repr(m)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: entropy_normalize([0.5, 0.5], 0.1), TypeError, "x must be a torch.Tensor"),
        (lambda: entropy_normalize(torch.ones(3, dtype=torch.int64), 0.1), TypeError, "x must have dtype"),
        (lambda: entropy_normalize(torch.rand(2, 4), 2.0), ValueError, r"target must lie in \[0, log n\]"),
        (lambda: entropy_normalize(torch.rand(2, 4), -0.1), ValueError, "target must lie"),
        (lambda: entropy_normalize(torch.rand(2, 4), torch.tensor([0.1, 5.0])), ValueError, "every target"),
        (lambda: entropy_normalize(torch.rand(2, 4), torch.rand(3)), ValueError, "does not broadcast"),
        (lambda: entropy_normalize(torch.rand(2, 4), torch.tensor([1, 1])), TypeError, "floating-point"),
        (lambda: entropy_normalize(torch.rand(2, 4), "1"), TypeError, "target must be a float"),
        (lambda: entropy_normalize(torch.rand(2, 4), 0.5, dim=2), ValueError, "dim=2 is out of range"),
        (lambda: entropy_normalize(torch.rand(2, 0), 0.5), ValueError, "at least one entry"),
        (lambda: entropy_normalize(torch.rand(2, 4), 0.5, max_iter=0), ValueError, "max_iter"),
        (lambda: entropy_normalize(torch.rand(2, 4), 0.5, tol=-1.0), ValueError, "tol"),
        (lambda: entropy_normalize(torch.tensor(0.5), 0.1), ValueError, "no dimension"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_forced_backend_that_cannot_serve_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("KEXUE_BACKEND", "cuda")
    with pytest.raises(kexue.BackendUnavailableError, match="'cuda' was forced"):
        entropy_normalize(torch.rand(2, 4), 0.5)
    monkeypatch.setenv("KEXUE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="KEXUE_BACKEND"):
        entropy_normalize(torch.rand(2, 4), 0.5)


def test_backends_report():
    report = kexue.backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"]["available"] is True
    for entry in report.values():
        assert entry["available"] == (entry["reason"] is None)
