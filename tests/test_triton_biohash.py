"""The Triton BioHash kernels (hash, Hamming search) against the reference, bit for bit.

Without a GPU they run in the Triton interpreter (tests/conftest.py), on small shapes that cover
the block edges: K below, at and just above a power of two, a single unit, k = 1 and k = K,
codes that are not whole 32-bit words, and an empty batch. Outputs come from torch.empty, which
deterministic mode fills with NaN-like garbage (0xFF bytes for uint8): an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.test_biohash import brute_pack, brute_topk_mask, random_batch, tied_synapses

pytest.importorskip("triton")
from kexue.triton_kernels import biohash as T  # noqa: E402  (after the skip)


pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 20, 7), (1, 5, 1), (65, 30, 65), (9, 12, 3), (130, 40, 16)])
def test_hash_with_ties_bit_for_bit(triton_backend, dtype, shape):
    num_hidden, num_inputs, k = shape
    g = torch.Generator().manual_seed(num_hidden + 7 * num_inputs)
    W = tied_synapses(num_hidden, num_inputs, dtype, generator=g).to(triton_backend)
    ids, offsets, w = random_batch(6, num_inputs, generator=g, dtype=torch.float64)
    w = (torch.round(w * 4) / 4 + 0.25).float()
    ids, offsets, w = ids.to(triton_backend), offsets.to(triton_backend), w.to(triton_backend)
    for weights in (None, w):
        act = ref.activations_sparse(ids.cpu(), offsets.cpu(), None if weights is None else weights.cpu(), W.cpu())
        mask = brute_topk_mask(act.double(), k)
        for packed in (True, False):
            codes = kexue.ops.biohash(ids, offsets, weights, W, k, packed=packed).cpu()
            assert torch.equal(codes, brute_pack(mask) if packed else mask.to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_random_synapses_matches_reference(triton_backend, dtype):
    """Untied random synapses with weights: float32 sums must round like the reference's."""
    g = torch.Generator().manual_seed(5)
    W = kexue.ops.new_synapses(100, 50, dtype=dtype, generator=g)
    ids, offsets, w = random_batch(8, 50, generator=g, dtype=torch.float32)
    expected = ref.biohash_sparse(ids, offsets, w, W, 10, True)
    got = kexue.ops.biohash(ids.to(triton_backend), offsets.to(triton_backend), w.to(triton_backend),
                            W.to(triton_backend), 10)
    assert torch.equal(got.cpu(), expected)


def test_order_key_nan_and_signed_zero(triton_backend):
    # one input per unit: activation of unit mu = W[mu, 0]; NaN first, -0.0 ties with +0.0
    vals = torch.tensor([0.0, -0.0, 1.0, float("nan"), -1.0, 1.0, 0.0, 0.0, float("-inf"), float("inf")])
    W = vals[:, None].contiguous().t().contiguous().t()  # (K=10, N=1), input-major
    codes = kexue.ops.biohash(torch.tensor([0]).to(triton_backend), torch.tensor([0, 1]).to(triton_backend), None,
                              W.to(triton_backend), 5, packed=False)
    assert codes.cpu().tolist() == [[1, 0, 1, 1, 0, 1, 0, 0, 0, 1]]


def test_empty_batch(triton_backend):
    W = kexue.ops.new_synapses(20, 10).to(triton_backend)
    z = torch.zeros(0, dtype=torch.int64, device=triton_backend)
    assert kexue.ops.biohash(z, torch.zeros(1, dtype=torch.int64, device=triton_backend), None, W, 3).shape == (0, 3)
    codes = torch.zeros(0, 3, dtype=torch.uint8, device=triton_backend)
    d, i = kexue.ops.hamming_topk(codes, torch.zeros(4, 3, dtype=torch.uint8, device=triton_backend), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


@pytest.mark.parametrize("shape", [(3, 70, 5, 10), (1, 1, 1, 1), (17, 65, 8, 65), (2, 9, 13, 0)])
def test_hamming_topk_against_brute_force(triton_backend, shape):
    Q, D, nb, n = shape
    g = torch.Generator().manual_seed(Q + D + nb)
    q = torch.randint(0, 256, (Q, nb), generator=g, dtype=torch.int64).to(torch.uint8)
    db = torch.randint(0, 256, (D, nb), generator=g, dtype=torch.int64).to(torch.uint8)
    if D > 5:
        db[5] = db[2]  # equal distances: the lower index first
        q[0] = db[4]  # distance 0
    d, i = kexue.ops.hamming_topk(q.to(triton_backend), db.to(triton_backend), n)
    ed, ei = ref.hamming_topk(q, db, n)
    assert torch.equal(d.cpu(), ed) and torch.equal(i.cpu(), ei)


def test_configs_cover_the_launcher_choices():
    blocks = {c["constexprs"]["BLOCK_K"] for c in T.AOT_CONFIGS if "BLOCK_K" in c["constexprs"]}
    for num_hidden in (1, 63, 64, 65, 400, 1000, T.MAX_HIDDEN):
        assert T.block_k(num_hidden) in blocks
    with pytest.raises(ValueError, match="K <= 4096"):
        T.biohash_sparse(torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), None,
                         torch.zeros(1, T.MAX_HIDDEN + 1), 1, True)
