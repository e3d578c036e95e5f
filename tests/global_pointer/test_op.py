"""GlobalPointer: the reference against independent formulas, the C++ CPU kernels against the
float64 reference, labels dense and sparse, bad input, torch.compile and opcheck.

The Triton kernels are covered in tests/global_pointer/test_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.ops import _global_pointer_inputs as ops
from kexue.ops import global_pointer as gp_ops
from kexue.ops import global_pointer_decode, global_pointer_loss, global_pointer_scores, multilabel_crossentropy
from kexue.reference import global_pointer as ref
from tests.helpers import assert_close, rel_err

NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_problem(
    batch, length, types, d, *, shared=True, dtype=torch.float64, pad=True, tril=True, density=0.05, seed=0
):
    """Public-layout inputs (float64 values rounded to dtype) and dense labels on candidate spans."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, length, d) if shared else (batch, length, types, d)
    q = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    sb = torch.randn(batch, length, types, generator=g, dtype=torch.float64)
    eb = torch.randn(batch, length, types, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad and length > 1:
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        lengths[:1] = length  # one full row
        mask = torch.arange(length)[None, :] < lengths[:, None]
    ok = ref.span_mask(mask, batch, length, tril, "cpu").expand(batch, types, length, length)
    labels = (torch.rand(batch, types, length, length, generator=g) < density) & ok
    q, k, sb, eb = (t.to(dtype) for t in (q, k, sb, eb))
    return q, k, sb, eb, mask, labels


def canonical64(q, k, sb, eb):
    q4 = q.unsqueeze(1) if q.dim() == 3 else q.transpose(1, 2)
    k4 = k.unsqueeze(1) if k.dim() == 3 else k.transpose(1, 2)
    return q4.double(), k4.double(), sb.double().transpose(1, 2), eb.double().transpose(1, 2)


def oracle_loss(q, k, sb, eb, mask, labels, rope="interleaved", tril=True):
    """(B, T) float64 losses and (B, T, L, L) scores from the reference on the same values."""
    q4, k4, s4, e4 = canonical64(q, k, sb, eb)
    loss, _ = ref.global_pointer_loss_forward(q4, k4, s4, e4, mask, labels, rope, 10000.0, tril)
    return loss


# ---------------------------------------------------------------------------------------------
# The reference against independent formulas.


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_is_a_complex_rotation(layout):
    g = torch.Generator().manual_seed(0)
    length, d = 11, 8
    x = torch.randn(2, length, d, generator=g, dtype=torch.float64)
    if layout == "interleaved":
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    theta = torch.tensor([10000.0 ** (-2 * c / d) for c in range(d // 2)], dtype=torch.float64)
    rot = z * torch.polar(torch.ones(length, d // 2, dtype=torch.float64), torch.arange(length)[:, None] * theta)
    if layout == "interleaved":
        expected = torch.stack((rot.real, rot.imag), -1).flatten(-2)
    else:
        expected = torch.cat((rot.real, rot.imag), -1)
    assert rel_err(ref.apply_rope(x, layout), expected) < 1e-14
    # position 0 is untouched; the rotation keeps norms
    assert torch.equal(ref.apply_rope(x, layout)[:, 0], x[:, 0])
    assert torch.allclose(ref.apply_rope(x, layout).norm(dim=-1), x.norm(dim=-1), rtol=1e-13)


def test_rope_scores_depend_on_relative_position_only():
    # <R_i q, R_j k> = q^T R_{j-i} k: the same vectors placed at (i, j) and (i+3, j+3) score alike.
    g = torch.Generator().manual_seed(1)
    d, length = 16, 12
    qv, kv = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    q = torch.zeros(1, 1, length, d, dtype=torch.float64)
    k = torch.zeros_like(q)
    q[0, 0, 2], k[0, 0, 5], q[0, 0, 5], k[0, 0, 8] = qv, kv, qv, kv
    zero = torch.zeros(1, 1, length, dtype=torch.float64)
    s = ref.global_pointer_scores(q, k, zero, zero, None, "interleaved", False)
    assert math.isclose(s[0, 0, 2, 5], s[0, 0, 5, 8], rel_tol=1e-12)
    assert not math.isclose(s[0, 0, 2, 5], s[0, 0, 2, 8], rel_tol=1e-3)


def test_reference_scores_match_a_loop():
    q, k, sb, eb, mask, _ = make_problem(2, 7, 3, 4, shared=True, seed=2)
    q4, k4, s4, e4 = canonical64(q, k, sb, eb)
    s = ref.global_pointer_scores(q4, k4, s4, e4, mask, "interleaved", True)
    qr, kr = ref.apply_rope(q4, "interleaved"), ref.apply_rope(k4, "interleaved")
    for b in range(2):
        for t in range(3):
            for i in range(7):
                for j in range(7):
                    if not (mask[b, i] and mask[b, j] and i <= j):
                        assert s[b, t, i, j] == -math.inf
                        continue
                    v = float(qr[b, 0, i] @ kr[b, 0, j]) / 2.0 + float(sb[b, i, t]) + float(eb[b, j, t])
                    assert math.isclose(float(s[b, t, i, j]), v, rel_tol=1e-12, abs_tol=1e-12)


def original_mlce(y_pred, y_true):
    """The original implementation from kexue.fm/archives/7359, 1e12 tricks included."""
    y_pred = (1 - 2 * y_true) * y_pred
    y_neg = y_pred - y_true * 1e12
    y_pos = y_pred - (1 - y_true) * 1e12
    zeros = torch.zeros_like(y_pred[..., :1])
    return torch.logsumexp(torch.cat([y_neg, zeros], -1), -1) + torch.logsumexp(torch.cat([y_pos, zeros], -1), -1)


def test_dense_mlce_matches_the_original_formula_and_its_gradient():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.rand(6, 40, generator=g) < 0.2
    y[0] = False  # all negative
    y[1] = True  # all positive
    loss = ref.multilabel_crossentropy(s, y)
    assert rel_err(loss, original_mlce(s, y.double())) < 1e-12
    (grad,) = torch.autograd.grad(loss.sum(), s)
    e = torch.exp(s.detach())
    neg = torch.where(y, 0.0, e) / (1 + torch.where(y, 0.0, e).sum(-1, keepdim=True))
    pos = torch.where(y, 1 / e, 0.0) / (1 + torch.where(y, 1 / e, 0.0).sum(-1, keepdim=True))
    assert rel_err(grad, neg - pos) < 1e-12  # the spec's dL/ds


def test_sparse_reference_equals_dense():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 30, generator=g, dtype=torch.float64) * 2
    pos = torch.stack([torch.randperm(29, generator=g)[:4] + 1 for _ in range(5)])  # distinct, never 0
    y = torch.zeros(5, 30, dtype=torch.bool).scatter_(-1, pos, True)
    dense = ref.multilabel_crossentropy(s, y)
    assert rel_err(ref.sparse_multilabel_crossentropy(s, pos), dense) < 1e-12
    # mask_zero: index 0 is padding, and class 0 is reserved (left out of every sum)
    padded = torch.cat((pos, torch.zeros(5, 2, dtype=torch.int64)), -1)
    without_0 = ref.multilabel_crossentropy(torch.cat((torch.full((5, 1), -math.inf), s[:, 1:]), -1), y)
    assert rel_err(ref.sparse_multilabel_crossentropy(s, padded, mask_zero=True), without_0) < 1e-12


# ---------------------------------------------------------------------------------------------
# Kernels against the oracle.

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


# ---------------------------------------------------------------------------------------------
# Reductions, decoding, standalone multilabel CE.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 10, 3, 4, seed=13)
    with kexue.use_backend(backend):
        none = global_pointer_loss(q, k, sb, eb, labels, mask, reduction="none")
        assert math.isclose(global_pointer_loss(q, k, sb, eb, labels, mask), none.mean().item(), rel_tol=1e-12)
        assert math.isclose(
            global_pointer_loss(q, k, sb, eb, labels, mask, reduction="sum"), none.sum().item(), rel_tol=1e-12
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_matches_dense_scores(backend):
    q, k, sb, eb, mask, _ = make_problem(3, 50, 3, 8, seed=14)
    with kexue.use_backend(backend):
        s = global_pointer_scores(q, k, sb, eb, mask)
    index, score = global_pointer_decode(q, k, sb, eb, mask, threshold=0.5, chunk=7)
    dense_index, dense_score = gp_ops.decode(s, threshold=0.5)
    assert len(index) > 0 and torch.equal(index, dense_index)
    assert rel_err(score, dense_score) < 1e-12
    assert (score > 0.5).all()


def test_multilabel_crossentropy_forms():
    g = torch.Generator().manual_seed(15)
    s = torch.randn(4, 3, 25, generator=g, dtype=torch.float64) * 2
    s[0, 0, :5] = -math.inf  # excluded entries
    pos = torch.randint(5, 25, (4, 3, 6), generator=g)  # with duplicates
    dense = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, pos, True)
    a = multilabel_crossentropy(s, dense, reduction="none")
    assert rel_err(a, ref.multilabel_crossentropy(s, dense)) < 1e-13
    assert rel_err(multilabel_crossentropy(s, pos, reduction="none"), a) < 1e-13
    padded = torch.cat((pos, torch.zeros(4, 3, 2, dtype=torch.int64)), -1)
    s0 = s.clone()
    s0[..., 0] = -math.inf  # mask_zero reserves class 0
    assert (
        rel_err(
            multilabel_crossentropy(s, padded, mask_zero=True, reduction="none"), ref.multilabel_crossentropy(s0, dense)
        )
        < 1e-13
    )
    assert math.isclose(multilabel_crossentropy(s, dense), a.mean().item(), rel_tol=1e-13)
    # soft labels (kexue.fm/archives/9064): log(1 + sum t e^-s) + log(1 + sum (1-t) e^s)
    t = torch.rand(4, 3, 25, generator=g, dtype=torch.float64)
    keep = torch.isfinite(s)
    expected = torch.log1p(torch.where(keep, t * torch.exp(-s), 0.0).sum(-1)) + torch.log1p(
        torch.where(keep, (1 - t) * torch.exp(s), 0.0).sum(-1)
    )
    assert rel_err(multilabel_crossentropy(s, t, reduction="none"), expected) < 1e-13
    # matches bert4keras' sparse form (distinct positives, no padding)
    distinct = torch.stack([torch.randperm(20, generator=g)[:4] + 5 for _ in range(12)]).view(4, 3, 4)
    assert (
        rel_err(multilabel_crossentropy(s, distinct, reduction="none"), ref.sparse_multilabel_crossentropy(s, distinct))
        < 1e-12
    )
    distinct_padded = torch.cat((distinct, torch.zeros(4, 3, 2, dtype=torch.int64)), -1)
    assert (
        rel_err(
            multilabel_crossentropy(s, distinct_padded, mask_zero=True, reduction="none"),
            ref.sparse_multilabel_crossentropy(s, distinct_padded, mask_zero=True),
        )
        < 1e-12
    )
    # low precision: float32 accumulation, output in the input dtype
    out = multilabel_crossentropy(s.to(torch.bfloat16), dense, reduction="none")
    assert out.dtype == torch.bfloat16
    assert_close(out, ref.multilabel_crossentropy(s.to(torch.bfloat16).double(), dense), torch.bfloat16)


def test_multilabel_crossentropy_bad_input():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="class indices"):
        multilabel_crossentropy(s, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="shape of scores"):
        multilabel_crossentropy(s, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multilabel_crossentropy(s, torch.full((2, 5), 1.5))
    with pytest.raises(ValueError, match="mask_zero"):
        multilabel_crossentropy(s, torch.zeros(2, 5, dtype=torch.bool), mask_zero=True)
    with pytest.raises(TypeError, match="scores"):
        multilabel_crossentropy(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, or defined results.


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


# ---------------------------------------------------------------------------------------------
# torch.compile and opcheck.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 12, 2, 4, dtype=torch.float32, seed=20)
    idx = labels.nonzero()

    def step(q, k, sb, eb, labels, mask):
        return global_pointer_loss(q, k, sb, eb, labels, mask) + global_pointer_scores(q, k, sb, eb, mask).amax()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with kexue.use_backend(backend):
        for lab in (labels, idx):
            leaves = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
            out = compiled(*leaves, lab, mask)
            grads = torch.autograd.grad(out, leaves)
            leaves2 = [t.clone().requires_grad_() for t in (q, k, sb, eb)]
            expected = step(*leaves2, lab, mask)
            grads2 = torch.autograd.grad(expected, leaves2)
            assert rel_err(out, expected) < 1e-6
            for a, b in zip(grads, grads2, strict=False):
                assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, sb, eb, mask, labels = make_problem(2, 10, 3, 4, dtype=torch.float32, seed=21)
    q4, k4, s4, e4, m, code, base = ops.canonical(q, k, sb, eb, mask, True, 10000.0)
    leaves = [t.requires_grad_() for t in (q4, k4, s4, e4)]
    with kexue.use_backend(backend):
        for lab in (labels, labels.nonzero()):
            torch.library.opcheck(torch.ops.kexue.global_pointer_loss, (*leaves, m, lab, code, base, True))
        torch.library.opcheck(torch.ops.kexue.global_pointer_scores, (*leaves, m, code, base, True))
        torch.library.opcheck(torch.ops.kexue.global_pointer_scores, (*leaves, m, 0, base, False))


def test_backends_declare_the_heads_they_serve(monkeypatch):
    """The dispatcher asks each backend once per call whether it serves it: a head beyond the CUDA
    C++ kernels and the Triton tiles is declined by both with a reason, and forcing one of them
    names every backend's reason. (Every backend is made "present" and a stand-in CUDA entry is
    registered if this build has none: the CUDA kernels cannot run here; meta tensors carry the
    shapes.)"""
    from kexue import _backend
    from kexue.ops import _global_pointer_backends as gpb

    monkeypatch.setattr(_backend, "_device_reason", lambda name, device: None)
    if "cuda" not in _backend._REGISTRY[gpb.OP_LOSS]:
        monkeypatch.setitem(
            _backend._REGISTRY[gpb.OP_LOSS],
            "cuda",
            _backend.Impl(lambda *a: "cuda", gpb.ALL_FLOATS, gpb._cuda_supports),
        )
    narrow = torch.empty(1, 1, 4, 64, device="meta", dtype=torch.bfloat16)
    wide = torch.empty(1, 1, 4, gpb.CUDA_MAX_HEAD_SIZE + 2, device="meta")
    why = _backend.reasons(gpb.OP_LOSS, wide)
    assert "heads up to" in why["cuda"] and "heads up to" in why["triton"]
    assert why["torch"] is None
    assert _backend.reasons(gpb.OP_LOSS, narrow)["cuda"] is None
    assert _backend.reasons(gpb.OP_LOSS, narrow)["triton"] is None
    with kexue.use_backend("cuda"):
        with pytest.raises(_backend.BackendUnavailableError) as err:
            _backend.select(gpb.OP_LOSS, wide)
        assert _backend.select(gpb.OP_LOSS, narrow)[0] == "cuda"
    assert all(f"{name}:" in str(err.value) for name in _backend.NAMES)


def test_128_channel_heads_pick_triton(monkeypatch):
    """Heads of 65..128 channels are served by the Triton tiles (loss: fp16/bf16; scores: every
    float dtype), so the automatic choice on a GPU picks Triton for them; 129 channels and the fp32
    loss go to the next backend. (Meta tensors stand for CUDA ones, ordered as on a GPU; a
    stand-in CUDA entry is registered if this build has none.)"""
    from kexue import _backend
    from kexue.ops import _global_pointer_backends as gpb

    monkeypatch.setattr(_backend, "_device_reason", lambda name, device: None)
    on_gpu = _backend.preference
    monkeypatch.setattr(_backend, "preference", lambda op, device_type: on_gpu(op, "cuda"))
    for op in (gpb.OP_LOSS, gpb.OP_SCORES):
        if "cuda" not in _backend._REGISTRY[op]:
            monkeypatch.setitem(
                _backend._REGISTRY[op], "cuda", _backend.Impl(lambda *a: "cuda", gpb.ALL_FLOATS, gpb._cuda_supports)
            )
    for d in (65, 96, 128):
        for dtype in (torch.float16, torch.bfloat16):
            head = torch.empty(2, 1, 8, d, device="meta", dtype=dtype)
            assert _backend.select(gpb.OP_LOSS, head)[0] == "triton", (d, dtype)
            assert _backend.select(gpb.OP_SCORES, head)[0] == "triton", (d, dtype)
        fp32 = torch.empty(2, 1, 8, d, device="meta")
        assert _backend.select(gpb.OP_SCORES, fp32)[0] == "triton"
        assert _backend.select(gpb.OP_LOSS, fp32)[0] == "cuda"  # the fp32 loss tiles keep a stack
    wider = torch.empty(2, 1, 8, 129, device="meta", dtype=torch.bfloat16)
    assert "heads up to 128" in _backend.reasons(gpb.OP_LOSS, wider)["triton"]
    assert _backend.select(gpb.OP_LOSS, wider)[0] == "torch"  # beyond the CUDA C++ rows as well


# ---------------------------------------------------------------------------------------------
# Issue 16: masked positions never matter; out-of-range labels are errors also under compile and
# through the raw op; NaN soft labels are errors.


def _issue16_problem():
    g = torch.Generator().manual_seed(0)
    q, k, b = torch.randn(1, 9, 8, generator=g), torch.randn(1, 9, 8, generator=g), torch.randn(1, 9, 2, generator=g)
    m = torch.ones(1, 9, dtype=torch.bool)
    m[0, 7:] = False
    return q, k, b, m


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
