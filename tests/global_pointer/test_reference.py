"""The float64 GlobalPointer reference against independent formulas: RoPE as a complex rotation,
scores from a loop, the original multilabel cross-entropy and its gradient, sparse equal to dense.
"""

from __future__ import annotations

import math

import pytest
import torch

from kexue.reference import global_pointer as ref
from tests.global_pointer.helpers import canonical64, make_problem
from tests.helpers import rel_err


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
