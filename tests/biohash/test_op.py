"""BioHash / FlyVec ops on the C++ CPU and torch backends.

The float64 reference (kexue.reference.biohash) is checked first against independent formulas
(dense matmuls, brute-force sorting, Python popcounts); every backend is then checked against it:
hashes bit for bit (inputs built to have ties), the learning step in float64 and float32, Hamming
search against brute force. The Triton kernels are in tests/biohash/test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import biohash as ref

NATIVE = kexue.backends()["cpu"]["available"]
CPU_BACKENDS = ["cpu", "torch"] if NATIVE else ["torch"]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Inputs.


def random_batch(
    rows: int,
    num_inputs: int,
    min_len: int = 1,
    max_len: int = 12,
    generator=None,
    weighted: bool = True,
    dtype=torch.float64,
):
    """CSR rows of random ids (repeats allowed) with positive weights."""
    g = generator or torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    nnz = int(offsets[-1])
    ids = torch.randint(0, num_inputs, (nnz,), generator=g)
    w = (0.1 + torch.rand(nnz, generator=g, dtype=torch.float64)).to(dtype) if weighted else None
    return ids, offsets, w


def tied_synapses(num_hidden: int, num_inputs: int, dtype, generator=None) -> torch.Tensor:
    """Synapses with few distinct values (multiples of 1/4 in [-1, 1]): activations tie often, and
    every sum of a few of them is exact in every dtype, so ties are real ties everywhere."""
    g = generator or torch.Generator().manual_seed(1)
    values = torch.randint(-4, 5, (num_inputs, num_hidden), generator=g).to(torch.float64) / 4
    return values.to(dtype).t()  # input-major (K, N)


def dense_counts(ids, offsets, weights, num_inputs) -> torch.Tensor:
    """The (B, N) input vectors the sparse rows stand for (float64; repeats add up)."""
    rows = offsets.shape[0] - 1
    v = torch.zeros(rows, num_inputs, dtype=torch.float64)
    row_of = torch.repeat_interleave(torch.arange(rows), offsets[1:] - offsets[:-1])
    w = torch.ones(ids.shape[0], dtype=torch.float64) if weights is None else weights.double()
    v.index_put_((row_of, ids), w, accumulate=True)
    return v


def brute_topk_mask(act: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k winners per row by sorting (-activation, index) pairs in Python."""
    mask = torch.zeros(act.shape, dtype=torch.bool)
    for b, row in enumerate(act.tolist()):
        order = sorted(range(len(row)), key=lambda mu: (-row[mu], mu))
        mask[b, order[:k]] = True
    return mask


def brute_pack(mask: torch.Tensor) -> torch.Tensor:
    nb = (mask.shape[1] + 7) // 8
    out = torch.zeros(mask.shape[0], nb, dtype=torch.uint8)
    for b in range(mask.shape[0]):
        for mu in range(mask.shape[1]):
            if mask[b, mu]:
                out[b, mu // 8] += 1 << (mu % 8)
    return out


def run(backend, fn, *args, **kwargs):
    with kexue.use_backend(backend):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The reference against independent formulas.


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


# ---------------------------------------------------------------------------------------------
# Backends against the reference.


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


# ---------------------------------------------------------------------------------------------
# The learning step.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(400, 200, 64), (1, 10, 3), (9, 17, 40), (33, 65, 1)])
def test_update_float64_equals_reference(backend, delta, shape):
    num_hidden, num_inputs, rows = shape
    g = torch.Generator().manual_seed(num_hidden + rows)
    W = kexue.ops.new_synapses(num_hidden, num_inputs, dtype=torch.float64, generator=g, std=0.1)
    ids, offsets, w = random_batch(rows, num_inputs, generator=g)
    rank = min(2, num_hidden)
    expected = W.clone()
    win_r, s_r = ref.biohash_update_(ids, offsets, w, expected, 0.01, delta=delta, rank=rank)
    got = W.clone()
    win, s = run(backend, kexue.ops.biohash_update, ids, offsets, w, got, 0.01, delta=delta, rank=rank)
    assert torch.equal(win, win_r)
    torch.testing.assert_close(s, s_r, rtol=1e-14, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-16)
    assert not torch.equal(got, W)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_float32_within_rounding(backend):
    g = torch.Generator().manual_seed(21)
    W64 = kexue.ops.new_synapses(400, 300, dtype=torch.float64, generator=g)
    ids, offsets, w = random_batch(200, 300, generator=g)
    W32 = W64.float().t().contiguous().t()
    expected = W32.double()
    win_r, _ = ref.biohash_update_(ids, offsets, w, expected, 0.002)
    got = W32.clone().t().contiguous().t()
    win, _ = run(backend, kexue.ops.biohash_update, ids, offsets, w.float(), got, 0.002)
    assert torch.equal(win, win_r)  # float32 sums of a few terms pick the same winners here
    change = expected - W32.double()
    err = (got.double() - expected).norm() / change.norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_row_major_synapses_are_updated_in_place(backend):
    g = torch.Generator().manual_seed(22)
    W = torch.randn(10, 30, dtype=torch.float64, generator=g)  # row-major: goes through a copy
    ids, offsets, w = random_batch(8, 30, generator=g)
    expected = W.clone()
    ref.biohash_update_(ids, offsets, w, expected, 0.05)
    run(backend, kexue.ops.biohash_update, ids, offsets, w, W, 0.05)
    torch.testing.assert_close(W, expected, rtol=1e-14, atol=1e-16)


def toy_corpus(generator, vocab=30, topics=3, sentences=120, length=12):
    """Sentences drawn from a few topics, each topic a distinct slice of the vocabulary."""
    per = vocab // topics
    out = []
    for _ in range(sentences):
        t = int(torch.randint(0, topics, (1,), generator=generator))
        out.append(torch.randint(t * per, (t + 1) * per, (length,), generator=generator))
    return out


def windows(sentences, vocab, size=5):
    """FlyVec inputs: context ids in [0, V), the centre word shifted to [V, 2V)."""
    rows = []
    for s in sentences:
        for i in range(len(s) - size + 1):
            win = s[i : i + size].clone()
            win[size // 2] += vocab
            rows.append(win)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_lowers_the_energy(backend):
    g = torch.Generator().manual_seed(23)
    vocab = 30
    x = windows(toy_corpus(g, vocab), vocab)
    counts = torch.bincount(x.remainder(vocab).flatten(), minlength=vocab).double()
    invf = (1.0 / counts)[x.remainder(vocab)]
    W = kexue.ops.new_synapses(16, 2 * vocab, dtype=torch.float64, generator=g)
    energies = [float(kexue.ops.biohash_energy(x, None, invf, W))]
    epochs = 8
    for epoch in range(epochs):
        lr, _ = kexue.ops.biohash_schedule(epoch, epochs, lr0=0.05)
        perm = torch.randperm(x.shape[0], generator=g)
        won = set()
        for batch in perm.split(64):
            winners, _ = run(backend, kexue.ops.biohash_update, x[batch], None, invf[batch], W, lr)
            won.update(winners.tolist())
        energies.append(float(kexue.ops.biohash_energy(x, None, invf, W)))
    drops = [a - b for a, b in zip(energies, energies[1:], strict=False)]
    assert energies[-1] < energies[0] - 0.5 * abs(energies[0])
    assert sum(d > 0 for d in drops) >= 0.75 * len(drops), energies  # lower on average, epoch after epoch
    # the units that keep winning converge to unit norm (the Oja term); the others keep their init
    norms = torch.linalg.vector_norm(W, dim=1)
    won = sorted(won)
    assert len(won) >= 3  # at least one unit per topic
    assert ((norms[won] - 1).abs() < 0.05).all(), norms


# ---------------------------------------------------------------------------------------------
# Hamming search.


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


# ---------------------------------------------------------------------------------------------
# PyTorch conventions: compile, opcheck, errors.


def test_torch_compile_no_graph_break():
    g = torch.Generator().manual_seed(41)
    W = kexue.ops.new_synapses(40, 30, generator=g)
    ids, offsets, w = random_batch(6, 30, generator=g, dtype=torch.float32)

    def f(ids, offsets, w, W):
        codes = kexue.ops.biohash(ids, offsets, w, W * 1.0, 4)
        return kexue.ops.hamming_topk(codes, codes, 2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(ids, offsets, w, W), f(ids, offsets, w, W), strict=False):
        assert torch.equal(a, b)

    def step(ids, offsets, w, W):
        return kexue.ops.biohash_update(ids, offsets, w, W, 0.01)

    W2 = W.clone().t().contiguous().t()
    torch.compile(step, fullgraph=True, backend="aot_eager")(ids, offsets, w, W2)
    W3 = W.clone().t().contiguous().t()
    step(ids, offsets, w, W3)
    assert torch.equal(W2, W3) and not torch.equal(W2, W)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(42)
    W = kexue.ops.new_synapses(20, 30, generator=g)
    wt = W.t()
    ids, offsets, w = random_batch(5, 30, generator=g, dtype=torch.float32)
    with kexue.use_backend(backend):
        torch.library.opcheck(torch.ops.kexue.biohash_sparse.default, (ids, offsets, w, wt, 3, True))
        torch.library.opcheck(torch.ops.kexue.biohash_sparse.default, (ids, offsets, None, wt, 3, False))
        torch.library.opcheck(torch.ops.kexue.biohash_activations.default, (ids, offsets, w, wt))
        torch.library.opcheck(torch.ops.kexue.biohash_topk.default, (torch.randn(4, 9, generator=g), 2, True))
        torch.library.opcheck(
            torch.ops.kexue.biohash_update.default, (ids, offsets, w, wt.clone(), 0.01, 0.0, 2, 1e-30, 1e-10)
        )
        codes = torch.randint(0, 256, (6, 3), generator=g, dtype=torch.int64).to(torch.uint8)
        torch.library.opcheck(torch.ops.kexue.hamming_topk.default, (codes, codes, 4))


def _csr1():
    return torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])


W0 = kexue.ops.new_synapses(8, 10)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: kexue.ops.biohash(torch.tensor([1, 10]), torch.tensor([0, 2]), None, W0, 2),
            ValueError,
            r"indices must lie in \[0, N\) = \[0, 10\).*found 10",
        ),
        (lambda: kexue.ops.biohash(torch.tensor([-1, 2]), torch.tensor([0, 2]), None, W0, 2), ValueError, "found -1"),
        (lambda: kexue.ops.biohash(*_csr1(), None, W0, 0), ValueError, r"k must lie in \[1, 8\]"),
        (lambda: kexue.ops.biohash(*_csr1(), None, W0, 9), ValueError, r"k must lie in \[1, 8\], got 9"),
        (lambda: kexue.ops.biohash(*_csr1(), None, W0, 2.0), TypeError, "k must be an int"),
        (
            lambda: kexue.ops.biohash(torch.tensor([1, 2]), torch.tensor([0, 0, 2]), None, W0, 2),
            ValueError,
            "row 0 .* empty window",
        ),
        (
            lambda: kexue.ops.biohash(
                torch.tensor([[1, 2], [3, 4]]), torch.tensor([[True, True], [False, False]]), None, W0, 2
            ),
            ValueError,
            "row 1 .* empty window",
        ),
        (
            lambda: kexue.ops.biohash(torch.tensor([1, 2]), torch.tensor([0, 1, 3]), None, W0, 2),
            ValueError,
            "offsets must start at 0",
        ),
        (lambda: kexue.ops.biohash(torch.tensor([1.5, 2]), torch.tensor([0, 2]), None, W0, 2), ValueError, "dense"),
        (
            lambda: kexue.ops.biohash(torch.tensor([1, 2], dtype=torch.int16), torch.tensor([0, 2]), None, W0, 2),
            TypeError,
            "indices must have dtype",
        ),
        (lambda: kexue.ops.biohash(*_csr1(), torch.ones(2), W0, 2), ValueError, "weights must have the shape"),
        (
            lambda: kexue.ops.biohash(*_csr1(), torch.ones(3, dtype=torch.int64), W0, 2),
            TypeError,
            "weights must be a floating",
        ),
        (lambda: kexue.ops.biohash(*_csr1(), None, W0.long(), 2), TypeError, "synapses must have dtype"),
        (lambda: kexue.ops.biohash(*_csr1(), None, torch.rand(10), 2), ValueError, r"synapses must be a \(K, N\)"),
        (lambda: kexue.ops.biohash(torch.tensor([1, 2]), None, None, W0, 2), TypeError, "CSR offsets"),
        (
            lambda: kexue.ops.biohash(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), None, W0, 2),
            TypeError,
            "bool mask",
        ),
        (lambda: kexue.ops.biohash_dense(torch.rand(3, 11), W0, 2), ValueError, r"x must be \(B, N\) with N = 10"),
        (lambda: kexue.ops.biohash_update(*_csr1(), None, W0.half(), 0.1), TypeError, "float32, float64"),
        (lambda: kexue.ops.biohash_update(*_csr1(), None, W0, -0.1), ValueError, "lr must be"),
        (lambda: kexue.ops.biohash_update(*_csr1(), None, W0, 0.1, rank=9), ValueError, "rank must lie"),
        (
            lambda: kexue.ops.hamming_topk(
                torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), 1
            ),
            ValueError,
            "same width",
        ),
        (
            lambda: kexue.ops.hamming_topk(
                torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8), 5
            ),
            ValueError,
            r"n must lie in \[0, 4\]",
        ),
        (lambda: kexue.ops.hamming_topk(torch.zeros(2, 3), torch.zeros(4, 3), 1), TypeError, "packed uint8"),
        (
            lambda: kexue.ops.hamming_topk(torch.zeros(2, 3), torch.zeros(4, 3), 1, metric="l2"),
            ValueError,
            "metric must be",
        ),
        (lambda: kexue.ops.biohash_schedule(16, 15), ValueError, "epoch must lie"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_schedule_is_linear_to_zero():
    assert kexue.ops.biohash_schedule(0, 15) == (0.002, 0.0)
    lr, _ = kexue.ops.biohash_schedule(5, 10, lr0=0.02)
    assert abs(lr - 0.01) < 1e-15
    assert kexue.ops.biohash_schedule(10, 10, lr0=0.02)[0] == 0.0
    _, d = kexue.ops.biohash_schedule(0, 80, delta0=0.4)
    assert abs(d - 0.4 * 0.5 * (1 + torch.tanh(torch.tensor(-1.0, dtype=torch.float64)).item())) < 1e-12


# ---------------------------------------------------------------------------------------------
# The flyvec package (optional peer): its binarisation of the same synapses.


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


def test_module():
    g = torch.Generator().manual_seed(61)
    m = kexue.nn.BioHash(30, 40, k=5, generator=g)
    assert "num_inputs=30, num_hidden=40, k=5" in repr(m) and "synapses" in dict(m.named_buffers())
    ids, offsets, w = random_batch(7, 30, generator=g, dtype=torch.float32)
    codes = m(ids, offsets, w)
    assert torch.equal(codes, ref.biohash_sparse(ids, offsets, w, m.synapses, 5, True))
    before = m.synapses.clone()
    winners = m.learn(ids, offsets, w, lr=0.01)
    expected = before.clone()
    win_r, _ = ref.biohash_update_(ids, offsets, w, expected, 0.01)
    assert torch.equal(winners, win_r)
    torch.testing.assert_close(m.synapses, expected)
    assert m.synapses.t().is_contiguous()
    state = m.state_dict()
    m2 = kexue.nn.BioHash(30, 40, k=5)
    m2.load_state_dict(state)
    assert torch.equal(m2(ids, offsets, w), m(ids, offsets, w))
    with pytest.raises(ValueError, match="k must lie"):
        kexue.nn.BioHash(30, 40, k=41)


def test_cuda_hash_prefers_the_cuda_kernel_over_triton():
    """Hashing on CUDA tensors tries the CUDA C++ kernel first (measured 7x faster than Triton on an
    H200); the other BioHash ops keep the default order, and CPU tensors are unaffected."""
    from kexue import _backend

    assert _backend.preference("biohash_sparse", "cuda")[:2] == ("cuda", "triton")
    assert _backend.preference("biohash_sparse", "cuda")[-1] == "torch"
    assert _backend.preference("biohash_update", "cuda") == _backend.preference("no such op", "cuda")
    assert _backend.preference("biohash_update", "cuda")[0] == "triton"
    assert _backend.preference("biohash_sparse", "cpu") == ("cpu", "torch")
