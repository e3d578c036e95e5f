"""GlobalPointer loss and scores on the C++ CPU and torch backends against the float64 oracle: forward,
backward, gradcheck, label forms and edge cases, masked positions, and any CPU worker count.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import global_pointer_loss, global_pointer_scores
from kexue.reference import global_pointer as ref
from tests.global_pointer.helpers import CPU_BACKENDS, NATIVE, _issue16_problem, canonical64, make_problem
from tests.helpers import assert_close, rel_err

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def oracle_loss(q, k, sb, eb, mask, labels, rope="interleaved", tril=True):
    """(B, T) float64 losses and (B, T, L, L) scores from the reference on the same values."""
    q4, k4, s4, e4 = canonical64(q, k, sb, eb)
    loss, _ = ref.global_pointer_loss_forward(q4, k4, s4, e4, mask, labels, rope, 10000.0, tril)
    return loss


# (B, L, T, d, shared): lengths not multiples of the 32-row block, one block, one token, empty batch
SHAPES = [
    (2, 37, 3, 8, True),
    (3, 70, 2, 6, False),
    (1, 1, 2, 4, True),
    (2, 33, 4, 16, True),
    (1, 65, 2, 4, False),
    (0, 5, 2, 4, True),
    (4, 32, 1, 2, True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_forward_backward_matches_oracle(backend, dtype, shape, nan_empty):
    batch, length, types, d, shared = shape
    q, k, sb, eb, mask, labels = make_problem(
        batch, length, types, d, shared=shared, dtype=dtype, seed=length * 7 + types
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    with kexue.use_backend(backend):
        loss = global_pointer_loss(*leaves, labels, mask, reduction="none")
    assert loss.dtype == dtype and loss.shape == (batch, types)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, sb, eb)]
    q4, k4, s4, e4 = leaves64[0], leaves64[1], leaves64[2], leaves64[3]
    q4 = q4.unsqueeze(1) if q4.dim() == 3 else q4.transpose(1, 2)
    k4 = k4.unsqueeze(1) if k4.dim() == 3 else k4.transpose(1, 2)
    loss64, _ = ref.global_pointer_loss_forward(
        q4, k4, s4.transpose(1, 2), e4.transpose(1, 2), mask, labels, "interleaved", 10000.0, True
    )
    assert_close(loss, loss64, dtype, "loss")
    if batch == 0:
        return
    w = torch.rand(batch, types, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((loss * w.to(dtype)).sum(), leaves)
    grads64 = torch.autograd.grad((loss64 * w).sum(), leaves64)
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=False):
        assert a.dtype == dtype
        # the gradient's input is the loss weight rounded to dtype: 2x the output budget
        assert_close(a, b, dtype, name, factor=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rope", [True, "half", False])
@pytest.mark.parametrize("tril", [True, False])
def test_scores_forward_backward_match_oracle(backend, dtype, rope, tril, nan_empty):
    q, k, sb, eb, mask, _ = make_problem(3, 41, 3, 6, shared=rope is not False, dtype=dtype, tril=tril, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    with kexue.use_backend(backend):
        s = global_pointer_scores(*leaves, mask, rope=rope, tril_mask=tril)
    rope_name = {True: "interleaved", "half": "half", False: None}[rope]
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, sb, eb)]
    q4, k4, s4, e4 = canonical64(*leaves64)
    s64 = ref.global_pointer_scores(q4, k4, s4, e4, mask, rope_name, tril)
    assert s.dtype == dtype
    assert_close(s, s64, dtype, "scores")
    grad = torch.randn(s.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad(s, leaves, grad.to(dtype))
    ok = torch.isfinite(s64)
    grads64 = torch.autograd.grad(torch.where(ok, s64, 0.0), leaves64, torch.where(ok, grad.to(dtype).double(), 0.0))
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=False):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 9, 2, 4, seed=7, density=0.15)
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    idx = labels.nonzero()
    # fast_mode: random projections of the Jacobian instead of every column (seconds, not minutes)
    with kexue.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: global_pointer_loss(*a, labels, mask, reduction="none"), leaves)
        assert torch.autograd.gradcheck(
            lambda *a: global_pointer_loss(*a, idx, mask, reduction="sum"), leaves, fast_mode=True
        )
        per_type = make_problem(2, 6, 2, 4, shared=False, seed=8)
        leaves2 = [t.clone().requires_grad_() for t in per_type[:4]]
        assert torch.autograd.gradcheck(
            lambda *a: global_pointer_loss(*a, per_type[5], per_type[4], rope="half", tril_mask=False),
            leaves2,
            fast_mode=True,
        )

        def finite_scores(*a):
            s = global_pointer_scores(*a, mask)
            return torch.where(torch.isfinite(s), s, 0.0)

        assert torch.autograd.gradcheck(finite_scores, leaves, fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_and_sparse_labels_agree(backend):
    q, k, sb, eb, mask, labels = make_problem(3, 45, 4, 8, seed=10, density=0.1)
    idx = labels.nonzero()
    shuffled = torch.cat((idx, idx[:5]))[torch.randperm(len(idx) + 5, generator=torch.Generator().manual_seed(0))]
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    with kexue.use_backend(backend):
        dense = global_pointer_loss(*leaves, labels, mask, reduction="none")
        gd = torch.autograd.grad(dense.sum(), leaves)
        sparse = global_pointer_loss(*leaves, shuffled, mask, reduction="none")  # unsorted, with duplicates
        gs = torch.autograd.grad(sparse.sum(), leaves)
        as_list = global_pointer_loss(*leaves, idx.tolist(), mask, reduction="none")
    assert rel_err(sparse, dense) < 1e-13 and rel_err(as_list, dense) < 1e-13
    for a, b in zip(gs, gd, strict=False):
        assert rel_err(a, b) < 1e-13


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["all_negative", "all_positive"])
def test_label_edge_cases(backend, which):
    q, k, sb, eb, mask, _ = make_problem(2, 35, 2, 4, seed=11)
    ok = ref.span_mask(mask, 2, 35, True, "cpu").expand(2, 2, 35, 35)
    labels = torch.zeros_like(ok) if which == "all_negative" else ok.clone()
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    with kexue.use_backend(backend):
        loss = global_pointer_loss(*leaves, labels, mask, reduction="none")
        grads = torch.autograd.grad(loss.sum(), leaves)
    q4, k4, s4, e4 = canonical64(q, k, sb, eb)
    s = ref.global_pointer_scores(q4, k4, s4, e4, mask, "interleaved", True)
    flat = s.flatten(-2)
    keep = torch.isfinite(flat)
    if which == "all_negative":  # log(1 + sum e^s), no positive term
        expected = torch.log1p(torch.where(keep, flat.exp(), 0.0).sum(-1))
    else:
        expected = torch.log1p(torch.where(keep, (-flat).exp(), 0.0).sum(-1))
    assert rel_err(loss, expected) < 1e-12
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_scores_stay_finite(backend):
    # Scores of +-200: a positive far above every negative must not cancel anything (the kernels
    # keep positives out of the negatives' sum instead of subtracting them).
    q, k, sb, eb, mask, labels = make_problem(1, 20, 1, 4, seed=12, density=0.1)
    sb = sb * 0 + torch.where(labels.any(-1)[0, 0], 200.0, -200.0)[None, :, None]
    with kexue.use_backend(backend):
        loss = global_pointer_loss(q, k, sb, eb, labels, mask, reduction="none")
    assert torch.isfinite(loss).all()
    assert rel_err(loss, oracle_loss(q, k, sb, eb, mask, labels)) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_masked_positions_never_influence_the_result(backend, poison):
    """Whatever padded tokens hold in q, k or the biases, the loss, the scores and every gradient
    at real tokens are those of clean inputs, and the gradients at padded tokens are 0."""
    q, k, b, m = _issue16_problem()
    labels = torch.tensor([[0, 0, 1, 5], [0, 1, 2, 2]])
    dirty = [t.clone() for t in (q, k, b, b)]
    for t in dirty:
        t[0, 7:] = poison
    with kexue.use_backend(backend):
        results = []
        for inputs in ((q, k, b, b), dirty):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = global_pointer_loss(*leaves, labels, m, reduction="none")
            scores = global_pointer_scores(*leaves, m)
            weight = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1))
            total = loss.sum() + scores.masked_fill(torch.isinf(scores), 0).mul(weight).sum()
            results.append((loss, scores, torch.autograd.grad(total, leaves)))
    (loss, scores, grads), (loss2, scores2, grads2) = results
    assert torch.isfinite(loss2).all()
    assert_close(loss2, loss, torch.float32, "loss")
    assert torch.equal(torch.isinf(scores2), torch.isinf(scores)) and (scores2[torch.isinf(scores2)] < 0).all()
    assert_close(
        scores2.masked_fill(torch.isinf(scores2), 0),
        scores.masked_fill(torch.isinf(scores), 0),
        torch.float32,
        "scores",
    )
    for a, c in zip(grads2, grads, strict=False):
        assert torch.isfinite(a).all()
        assert torch.equal(a[0, 7:], torch.zeros_like(a[0, 7:]))
        assert_close(a, c, torch.float32, "grad")


@pytest.mark.skipif(not NATIVE, reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("threads", [1, 3, 7])
def test_cpu_kernels_give_the_same_answer_for_any_worker_count(threads):
    """Blocks are handed out dynamically (whichever worker is free takes the next one), so the
    worker that processes a block varies from call to call: the result must not depend on it,
    up to the order in which the workers' shares are summed."""
    q, k, sb, eb, mask, labels = make_problem(3, 100, 4, 16, dtype=torch.float32, seed=31)
    previous = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
            with kexue.use_backend("cpu"):
                loss = global_pointer_loss(*leaves, labels, mask, reduction="none")
                scores = global_pointer_scores(*leaves, mask)
            grads = torch.autograd.grad(loss.sum() + scores.masked_fill(torch.isinf(scores), 0).sum(), leaves)
            results.append((loss, scores, grads))
    finally:
        torch.set_num_threads(previous)
    (loss1, scores1, grads1), (loss_n, scores_n, grads_n) = results
    assert torch.equal(scores1, scores_n)  # every score is written by one block, whoever runs it
    assert_close(loss_n, loss1.double(), torch.float32, "loss")
    for a, b in zip(grads_n, grads1, strict=True):
        assert_close(a, b.double(), torch.float32, "grad")
