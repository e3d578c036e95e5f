"""GlobalPointer on bad input: clear errors naming the argument (also under torch.compile and in the
raw op), or defined results for empty, length-one and fully padded rows.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import _global_pointer_inputs as ops
from kexue.ops import global_pointer_loss, global_pointer_scores, multilabel_crossentropy
from tests.global_pointer.helpers import CPU_BACKENDS, _issue16_problem, make_problem
from tests.helpers import rel_err


def test_bad_labels():
    q, k, sb, eb, mask, labels = make_problem(2, 8, 2, 4, seed=16)
    mask[1, 6:] = False
    for bad, match in [
        ([[2, 0, 1, 1]], "batch index out of range"),
        ([[0, 2, 1, 1]], "type index out of range"),
        ([[0, 0, 8, 8]], "start index out of range"),
        ([[0, 0, 1, -1]], "end index out of range"),
        ([[0, 0, 3, 2]], "start > end"),
        ([[1, 0, 5, 6]], "padded position"),
    ]:
        with pytest.raises(ValueError, match=match):
            global_pointer_loss(q, k, sb, eb, bad, mask)
    # start > end is allowed without the tril mask
    global_pointer_loss(q, k, sb, eb, [[0, 0, 3, 2]], mask, tril_mask=False)
    for backend in CPU_BACKENDS:
        with kexue.use_backend(backend):
            dense = torch.zeros_like(labels)
            dense[1, 1, 2, 7] = True  # padded end
            with pytest.raises(ValueError, match=r"labels\[1, 1\] marks a span that is masked"):
                global_pointer_loss(q, k, sb, eb, dense, mask)
            dense = torch.zeros_like(labels)
            dense[0, 1, 4, 3] = True  # start > end
            with pytest.raises(ValueError, match=r"labels\[0, 1\]"):
                global_pointer_loss(q, k, sb, eb, dense, mask)
    with pytest.raises(ValueError, match="dense labels must be"):
        global_pointer_loss(q, k, sb, eb, labels[:1], mask)
    with pytest.raises(TypeError, match="sparse labels must be integer"):
        global_pointer_loss(q, k, sb, eb, torch.zeros(3, 4), mask)
    with pytest.raises(ValueError, match="labels must be dense"):
        global_pointer_loss(q, k, sb, eb, torch.zeros(3, 5, dtype=torch.int64), mask)


def test_bad_shapes():
    q, k, sb, eb, mask, labels = make_problem(2, 8, 2, 4, seed=17)
    with pytest.raises(ValueError, match="k must match q"):
        global_pointer_scores(q, k[:1], sb, eb)
    with pytest.raises(ValueError, match=r"start_bias must be \(B, L, T\)"):
        global_pointer_scores(q, k, sb[:1], eb)
    with pytest.raises(ValueError, match="same number of types"):
        global_pointer_scores(q, k, sb, eb[..., :1])
    with pytest.raises(ValueError, match=r"mask must be \(B, L\)"):
        global_pointer_scores(q, k, sb, eb, mask[:, :5])
    with pytest.raises(ValueError, match=r"mask must be \(B, L\)"):
        global_pointer_loss(q, k, sb, eb, labels, mask[:1])
    with pytest.raises(ValueError, match="q must be"):
        global_pointer_scores(q[0], k[0], sb, eb)
    with pytest.raises(ValueError, match="even head size"):
        global_pointer_scores(q[..., :3], k[..., :3], sb, eb)
    with pytest.raises(ValueError, match="3 heads"):
        global_pointer_scores(torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4), sb, eb)
    with pytest.raises(ValueError, match="rope must be"):
        global_pointer_scores(q, k, sb, eb, rope="rotate")
    with pytest.raises(ValueError, match="reduction"):
        global_pointer_loss(q, k, sb, eb, labels, reduction="avg")
    with pytest.raises(TypeError, match="q must have dtype"):
        global_pointer_scores(q.long(), k.long(), sb, eb)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_length_zero_and_one(backend):
    with kexue.use_backend(backend):
        q = torch.randn(2, 0, 4, dtype=torch.float64, requires_grad=True)
        sb = torch.randn(2, 0, 3, dtype=torch.float64, requires_grad=True)
        loss = global_pointer_loss(q, q, sb, sb, torch.zeros(0, 4, dtype=torch.int64), reduction="none")
        assert loss.shape == (2, 3) and torch.equal(loss, torch.zeros(2, 3, dtype=torch.float64))
        loss.sum().backward()
        assert q.grad.shape == q.shape
        assert global_pointer_scores(q, q, sb, sb).shape == (2, 3, 0, 0)
        # one token: one span (0, 0) per type, scored q.k/sqrt(d) + biases
        q, k, sb, eb, mask, labels = make_problem(2, 1, 3, 4, seed=18, density=0.5)
        s = global_pointer_scores(q, k, sb, eb)
        assert rel_err(s[:, :, 0, 0], (q * k).sum(-1) / 2 + sb[:, 0] + eb[:, 0]) < 1e-13
        loss = global_pointer_loss(q, k, sb, eb, labels, reduction="none")
        y = labels[:, :, 0, 0]
        expected = torch.where(y, torch.log1p(torch.exp(-s[:, :, 0, 0])), torch.log1p(torch.exp(s[:, :, 0, 0])))
        assert rel_err(loss, expected) < 1e-13


def test_fully_padded_row_gives_zero_loss_and_grad():
    q, k, sb, eb, mask, _ = make_problem(2, 9, 2, 4, seed=19)
    mask[1] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
    for backend in CPU_BACKENDS:
        with kexue.use_backend(backend):
            loss = global_pointer_loss(*leaves, torch.zeros(0, 4, dtype=torch.int64), mask, reduction="none")
            grads = torch.autograd.grad(loss.sum(), leaves)
        assert torch.equal(loss[1], torch.zeros(2, dtype=torch.float64))
        assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_labels_are_errors_under_compile_and_in_the_raw_op(backend):
    """Issue 16: end = 12 with L = 9 used to wrap into span (2, 3) where the eager checks are
    skipped. The CSR is built inside the op, which checks the range there."""
    q, k, b, m = _issue16_problem()
    bad = torch.tensor([[0, 0, 1, 5], [0, 0, 2, 12]])
    q4, k4, s4, e4, m4, code, base = ops.canonical(q, k, b, b, m, True, 10000.0)
    torch._dynamo.reset()
    f = torch.compile(lambda *a: global_pointer_loss(*a, reduction="none"), fullgraph=True, backend="eager")
    with kexue.use_backend(backend):
        with pytest.raises(ValueError, match=r"label \[0, 0, 2, 12\]: end index out of range \[0, 9\)"):
            torch.ops.kexue.global_pointer_loss(q4, k4, s4, e4, m4, bad, code, base, True)
        with pytest.raises(ValueError, match="end index out of range"):
            f(q, k, b, b, bad, m)
        for row in ([0, 2, 1, 5], [1, 0, 1, 5], [0, 0, -1, 5]):
            with pytest.raises(ValueError, match="out of range"):
                torch.ops.kexue.global_pointer_loss(q4, k4, s4, e4, m4, torch.tensor([row]), code, base, True)


def test_nan_soft_labels_are_an_error_and_never_a_zero_loss():
    s = torch.randn(3, 5)
    t = torch.rand(3, 5)
    t[1, 2] = float("nan")
    with pytest.raises(ValueError, match="soft labels must lie in"):
        multilabel_crossentropy(s, t)
    torch._dynamo.reset()
    f = torch.compile(lambda s, t: multilabel_crossentropy(s, t, reduction="none"), fullgraph=True, backend="eager")
    out = f(s, t)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
