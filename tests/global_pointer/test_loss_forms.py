"""GlobalPointer reductions, decoding against dense scores, and the standalone multilabel
cross-entropy in its dense and sparse forms.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.ops import global_pointer as gp_ops
from kexue.ops import global_pointer_decode, global_pointer_loss, global_pointer_scores, multilabel_crossentropy
from kexue.reference import global_pointer as ref
from tests.global_pointer.helpers import CPU_BACKENDS, make_problem
from tests.helpers import assert_close, rel_err


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
