"""The float64 BioHash reference (kexue.reference.biohash) against independent formulas: dense
matmuls, brute-force sorting and packing, Python popcounts.
"""

from __future__ import annotations

import pytest
import torch

from kexue.reference import biohash as ref
from tests.biohash.helpers import brute_pack, brute_topk_mask, random_batch


def dense_counts(ids, offsets, weights, num_inputs) -> torch.Tensor:
    """The (B, N) input vectors the sparse rows stand for (float64; repeats add up)."""
    rows = offsets.shape[0] - 1
    v = torch.zeros(rows, num_inputs, dtype=torch.float64)
    row_of = torch.repeat_interleave(torch.arange(rows), offsets[1:] - offsets[:-1])
    w = torch.ones(ids.shape[0], dtype=torch.float64) if weights is None else weights.double()
    v.index_put_((row_of, ids), w, accumulate=True)
    return v


def test_reference_activations_are_the_dense_product():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(13, 40, dtype=torch.float64, generator=g)
    ids, offsets, w = random_batch(9, 40, generator=g)
    v = dense_counts(ids, offsets, w, 40)
    torch.testing.assert_close(ref.activations_sparse(ids, offsets, w, W), v @ W.t(), rtol=1e-13, atol=1e-13)
    v1 = dense_counts(ids, offsets, None, 40)
    torch.testing.assert_close(ref.activations_sparse(ids, offsets, None, W), v1 @ W.t(), rtol=1e-13, atol=1e-13)


def test_reference_topk_and_packing_against_brute_force():
    g = torch.Generator().manual_seed(3)
    act = torch.randint(-3, 4, (20, 19), generator=g).double()  # many ties
    act[0, 5] = float("nan")  # NaN ranks first
    act[1, :] = 0.0
    act[1, 3] = -0.0  # -0.0 ties with +0.0
    for k in (1, 4, 18, 19):
        mask = ref.topk_mask(act, k)
        expected = brute_topk_mask(torch.nan_to_num(act, nan=float("inf")), k)
        assert torch.equal(mask, expected), k
        assert torch.equal(mask.sum(1), torch.full((20,), k))
        packed = ref.codes_from_activations(act, k, packed=True)
        assert torch.equal(packed, brute_pack(expected))
        assert torch.equal(ref.unpack_bits(packed, 19), expected)
    assert torch.equal(ref.topk_mask(act[1:2], 2)[0].nonzero().flatten(), torch.tensor([0, 1]))


def test_midpoint_rule_agrees_without_ties_and_sets_fewer_bits_with_them():
    g = torch.Generator().manual_seed(4)
    act = torch.randn(30, 50, dtype=torch.float64, generator=g)
    assert torch.equal(ref.midpoint_hash(act, 7), ref.topk_mask(act, 7))
    tied = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert int(ref.midpoint_hash(tied, 2).sum()) == 1  # the flyvec package's rule loses the tie
    assert torch.equal(ref.topk_mask(tied, 2), torch.tensor([[True, False, True, False, False]]))


def independent_update(W, ids, offsets, weights, lr, delta=0.0, rank=2, tiny=0.0):
    """The FlyVec step written from the spec with dense vectors (float64)."""
    N = W.shape[1]
    v = dense_counts(ids, offsets, None, N)  # raw input
    vp = dense_counts(ids, offsets, weights, N)  # v / p
    raw, scaled = v @ W.t(), vp @ W.t()
    ds = torch.zeros_like(W)
    xx = torch.zeros(W.shape[0], dtype=torch.float64)
    winners = []
    for b in range(v.shape[0]):
        order = sorted(range(W.shape[0]), key=lambda mu: (-raw[b, mu].item(), mu))
        mu, m = order[0], order[rank - 1]
        winners.append(mu)
        xx[mu] += scaled[b, mu]
        ds[mu] += vp[b]
        if delta != 0.0:
            xx[m] -= delta * scaled[b, m]
            ds[m] -= delta * vp[b]
    ds = torch.where((xx != 0)[:, None], ds - xx[:, None] * W, 0.0)
    change = lr / ds.abs().max() * ds
    return torch.where(change.abs() > tiny, W + change, W), torch.tensor(winners)


@pytest.mark.parametrize("delta", [0.0, 0.4])
def test_reference_update_is_the_spec_rule(delta):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(11, 30, dtype=torch.float64, generator=g) * 0.1
    ids, offsets, w = random_batch(25, 30, generator=g)
    expected, winners = independent_update(W, ids, offsets, w, 0.01, delta=delta, rank=3)
    got = W.clone()
    win, s_win = ref.biohash_update_(ids, offsets, w, got, 0.01, delta=delta, rank=3, tiny=0.0)
    assert torch.equal(win, winners)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert abs(float((got - W).abs().max()) - 0.01) < 1e-12  # the largest change is exactly lr
    scaled = ref.activations_sparse(ids, offsets, w, W)
    torch.testing.assert_close(s_win, scaled[torch.arange(25), win])


def test_reference_energy_formula():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(7, 20, dtype=torch.float64, generator=g)
    ids, offsets, w = random_batch(10, 20, generator=g)
    v, vp = dense_counts(ids, offsets, None, 20), dense_counts(ids, offsets, w, 20)
    mu = (v @ W.t()).argmax(1)
    expected = -sum(float(vp[b] @ W[mu[b]] / W[mu[b]].norm()) for b in range(10))
    assert abs(float(ref.biohash_energy(ids, offsets, w, W)) - expected) < 1e-10


def test_reference_hamming_and_cosine_against_brute_force():
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 256, (5, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    db = torch.randint(0, 256, (17, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    db[4] = db[2]  # a tie: the lower index comes first
    dist = torch.tensor(
        [[sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(qq, dd, strict=False)) for dd in db] for qq in q]
    )
    assert torch.equal(ref.hamming_distances(q, db), dist)
    d, i = ref.hamming_topk(q, db, 17)
    for r in range(5):
        expected = sorted(range(17), key=lambda j: (dist[r, j].item(), j))
        assert i[r].tolist() == expected
        assert d[r].tolist() == [dist[r, j].item() for j in expected]
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    s, j = ref.cosine_topk(x, y, 3)
    cos = torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1)
    torch.testing.assert_close(s, cos.sort(1, descending=True).values[:, :3])
