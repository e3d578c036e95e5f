"""BioHash hashing and Hamming search on the C++ CPU and torch backends against the reference:
bit for bit (inputs built to have ties), every input spelling, and the flyvec package's binarisation.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.biohash.helpers import CPU_BACKENDS, brute_pack, brute_topk_mask, random_batch, run, tied_synapses

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    "shape", [(400, 97, 32), (1, 5, 1), (7, 30, 7), (8, 12, 3), (9, 50, 4), (65, 40, 64), (64, 33, 1)]
)
def test_hash_bit_for_bit_with_ties(backend, dtype, shape):
    num_hidden, num_inputs, k = shape
    g = torch.Generator().manual_seed(num_hidden * 31 + num_inputs)
    W = tied_synapses(num_hidden, num_inputs, dtype, generator=g)
    ids, offsets, w = random_batch(23, num_inputs, generator=g, dtype=torch.float64)
    # quarter-valued weights keep every partial sum exact: ties stay ties in every dtype
    w = (torch.round(w * 4) / 4 + 0.25).to(ref.compute_dtype(dtype))
    boundary_ties = 0
    for weights in (None, w):
        act = ref.activations_sparse(ids, offsets, weights, W)
        expected_mask = brute_topk_mask(act.double(), k)
        if k < num_hidden:  # rows whose k-th and (k+1)-th activations tie: the tie rule decides
            top = act.sort(1, descending=True).values
            boundary_ties += int((top[:, k - 1] == top[:, k]).sum())
        for packed in (True, False):
            codes = run(backend, kexue.ops.biohash, ids, offsets, weights, W, k, packed=packed)
            expected = brute_pack(expected_mask) if packed else expected_mask.to(torch.uint8)
            assert codes.dtype == torch.uint8 and torch.equal(codes, expected), (packed, weights is None)
    assert boundary_ties > 0 or k == num_hidden, "the inputs should contain ties at the threshold"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_hash_random_synapses_bit_for_bit_with_reference(backend, dtype):
    """Random (untied) synapses: the kernel's float32 sums must round exactly like the reference's."""
    g = torch.Generator().manual_seed(11)
    W = kexue.ops.new_synapses(400, 300, dtype=dtype, generator=g)
    ids, offsets, w = random_batch(64, 300, generator=g, dtype=ref.compute_dtype(dtype))
    for weights in (None, w):
        expected = ref.biohash_sparse(ids, offsets, weights, W, 32, True)
        assert torch.equal(run(backend, kexue.ops.biohash, ids, offsets, weights, W, 32), expected)
        act = run(backend, kexue.ops.biohash_activations, ids, offsets, weights, W)
        assert act.dtype == ref.compute_dtype(dtype)
        assert torch.equal(act, ref.activations_sparse(ids, offsets, weights, W))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_hidden", [63, 64, 129, 512, 600, 1031])
def test_hash_unit_blocks_and_packing_chunks(backend, num_hidden):
    """float32 rows are summed 64 units at a time with a scalar tail, and packed 512 flags at a
    time: sizes around those edges, packed and not, weighted and not, equal the reference."""
    g = torch.Generator().manual_seed(num_hidden)
    W = kexue.ops.new_synapses(num_hidden, 90, generator=g)
    ids, offsets, w = random_batch(37, 90, generator=g, dtype=torch.float32)
    k = max(1, num_hidden // 13)
    for weights in (None, w):
        act = run(backend, kexue.ops.biohash_activations, ids, offsets, weights, W)
        assert torch.equal(act, ref.activations_sparse(ids, offsets, weights, W))
        for packed in (True, False):
            codes = run(backend, kexue.ops.biohash, ids, offsets, weights, W, k, packed=packed)
            assert torch.equal(codes, ref.biohash_sparse(ids, offsets, weights, W, k, packed)), (
                packed,
                weights is None,
            )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_and_csr_spellings_agree(backend):
    g = torch.Generator().manual_seed(12)
    W = kexue.ops.new_synapses(50, 40, generator=g)
    ids = torch.randint(0, 40, (6, 5), generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    w = torch.rand(6, 5, generator=g)
    lengths = mask.sum(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    a = run(backend, kexue.ops.biohash, ids, mask, w, W, 5)
    b = run(backend, kexue.ops.biohash, ids[mask], offsets, w[mask], W, 5)
    assert torch.equal(a, b)
    full = run(backend, kexue.ops.biohash, ids.to(torch.int32), None, None, W, 5)
    csr = run(backend, kexue.ops.biohash, ids.flatten(), torch.arange(0, 31, 5), None, W, 5)
    assert torch.equal(full, csr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dense_input_form(backend, dtype):
    g = torch.Generator().manual_seed(13)
    W = tied_synapses(37, 20, dtype, generator=g)
    x = torch.randint(0, 3, (11, 20), generator=g).to(dtype)
    act = x.double() @ W.double().t()
    expected = brute_pack(brute_topk_mask(act, 6))
    assert torch.equal(run(backend, kexue.ops.biohash, x, None, None, W, 6), expected)
    assert torch.equal(
        run(backend, kexue.ops.biohash_dense, x, W, 6, packed=False), ref.unpack_bits(expected, 37).to(torch.uint8)
    )
    # the sparse form of the same inputs gives the same codes
    nz = x.nonzero()  # row-major order, as CSR
    ids, vals = nz[:, 1], x[nz[:, 0], nz[:, 1]].to(ref.compute_dtype(dtype))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), (x != 0).sum(1).cumsum(0)])
    assert torch.equal(run(backend, kexue.ops.biohash, ids, offsets, vals, W, 6), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_of_activations_with_nan_and_signed_zero(backend):
    act = torch.tensor([[0.0, -0.0, 1.0, float("nan"), -1.0, 1.0, 0.0, 0.0, 0.0]])
    for dtype in (torch.float32, torch.float64):
        codes = run(backend, kexue.ops.biohash_topk, act.to(dtype), 4, packed=False)
        assert codes.tolist() == [[1, 0, 1, 1, 0, 1, 0, 0, 0]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_rows_of_very_different_scales(backend):
    """The C++ search for a row's threshold starts from the previous row's: rows far apart in
    scale and sign, with ties, NaN and infinities, one after the other, still give exact codes."""
    g = torch.Generator().manual_seed(14)
    rows = [torch.randn(70, generator=g) * scale for scale in (1e-30, 1e30, 1.0, -1e-3, 3e4, 1e-38)]
    rows += [
        torch.full((70,), 2.5),
        torch.arange(70.0) // 7,
        -torch.arange(70.0),
        torch.tensor([float("inf"), float("-inf"), float("nan")] * 23 + [0.0]),
    ]
    act = torch.stack(rows)
    for order in (torch.arange(len(rows)), torch.randperm(len(rows), generator=g), torch.arange(len(rows)).flip(0)):
        a = act[order]
        for k in (1, 9, 35, 69, 70):
            expected = ref.codes_from_activations(a, k, True)  # NaN ranks first, as in the reference
            finite = ~a.isnan().any(1)  # Python's sort cannot rank NaN: the brute force checks the rest
            assert torch.equal(expected[finite], brute_pack(brute_topk_mask(a[finite].double(), k)))
            assert torch.equal(run(backend, kexue.ops.biohash_topk, a, k), expected), (order.tolist(), k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    W = kexue.ops.new_synapses(20, 10)
    ids, offsets = torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    assert run(backend, kexue.ops.biohash, ids, offsets, None, W, 3).shape == (0, 3)
    assert run(backend, kexue.ops.biohash, ids, offsets, None, W, 3, packed=False).shape == (0, 20)
    assert run(backend, kexue.ops.biohash_activations, ids, offsets, None, W).shape == (0, 20)
    before = W.clone()
    winners, s_win = run(backend, kexue.ops.biohash_update, ids, offsets, None, W, 0.1)
    assert winners.shape == (0,) and s_win.shape == (0,) and torch.equal(W, before)
    d, i = run(
        backend, kexue.ops.hamming_topk, torch.zeros(0, 3, dtype=torch.uint8), torch.zeros(5, 3, dtype=torch.uint8), 2
    )
    assert d.shape == (0, 2) and i.shape == (0, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(7, 50, 13, 5), (1, 1, 1, 1), (3, 20, 9, 20), (4, 33, 50, 0), (2, 10, 400, 3)])
def test_hamming_topk_against_brute_force(backend, shape):
    Q, D, K, n = shape
    g = torch.Generator().manual_seed(Q * D + K)
    act = torch.randint(0, 4, (Q + D, K), generator=g).double()
    codes = ref.codes_from_activations(act, max(1, K // 4), packed=True)
    q, db = codes[:Q], codes[Q:]
    if D > 3:
        db[3] = db[1]  # duplicate codes: ties
    d, i = run(backend, kexue.ops.hamming_topk, q, db, n)
    dist = ref.hamming_distances(q, db)
    for r in range(Q):
        expected = sorted(range(D), key=lambda j: (dist[r, j].item(), j))[:n]
        assert i[r].tolist() == expected
        assert d[r].tolist() == [dist[r, j].item() for j in expected]


def test_cosine_option():
    g = torch.Generator().manual_seed(31)
    x, y = torch.randn(3, 8, generator=g), torch.randn(12, 8, generator=g)
    y[5] = 0
    s, i = kexue.ops.hamming_topk(x, y, 12, metric="cosine")
    cos = torch.nn.functional.cosine_similarity(x.double()[:, None], y.double()[None], dim=-1)
    assert torch.equal(i, torch.sort(cos, dim=1, descending=True, stable=True).indices)
    torch.testing.assert_close(s.double(), cos.gather(1, i), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_static_hashes_equal_the_flyvec_packages(backend):
    core = pytest.importorskip("flyvec.core")

    class Synapses(core.FlyVec):
        """The package's own get_sparse_embedding on a given matrix (no model files)."""

        def __init__(self, W):
            self._W = W

        def is_unknown_token(self, token):
            return False

        def get_dense_embedding(self, token_id):
            return {"token": None, "id": token_id, "embedding": self._W[:, V + token_id]}

    g = torch.Generator().manual_seed(51)
    V, K, k = 60, 100, 12
    W = kexue.ops.new_synapses(K, 2 * V, generator=g)
    theirs = Synapses(W.double().numpy())
    expected = torch.stack(
        [torch.from_numpy(theirs.get_sparse_embedding(t, hash_length=k)["embedding"]) for t in range(V)]
    ).to(torch.uint8)
    ours = run(backend, kexue.ops.biohash, torch.arange(V, 2 * V), torch.arange(V + 1), None, W, k, packed=False)
    assert torch.equal(ours, expected)
