"""The Triton BioHash kernels (hash, Hamming search, learning step) against the reference.

Hashes and Hamming search must match bit for bit. The learning step must equal the float64
reference within float32 rounding and the C++ CPU kernel to a few ulps (the two differ only in the
order in which the per-unit sum xx adds up the batch); its winners must be the reference's.

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
from tests.biohash.helpers import NATIVE, brute_pack, brute_topk_mask, random_batch, tied_synapses, toy_corpus, windows

pytest.importorskip("triton")
from kexue.triton_kernels import biohash as T  # noqa: E402  (after the skip)
from kexue.triton_kernels import biohash_update as U  # noqa: E402
from kexue.triton_kernels import biohash_update_aot as UA  # noqa: E402
from kexue.triton_kernels import hamming as H  # noqa: E402

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
    got = kexue.ops.biohash(
        ids.to(triton_backend), offsets.to(triton_backend), w.to(triton_backend), W.to(triton_backend), 10
    )
    assert torch.equal(got.cpu(), expected)


def test_order_key_nan_and_signed_zero(triton_backend):
    # one input per unit: activation of unit mu = W[mu, 0]; NaN first, -0.0 ties with +0.0
    vals = torch.tensor([0.0, -0.0, 1.0, float("nan"), -1.0, 1.0, 0.0, 0.0, float("-inf"), float("inf")])
    W = vals[:, None].contiguous().t().contiguous().t()  # (K=10, N=1), input-major
    codes = kexue.ops.biohash(
        torch.tensor([0]).to(triton_backend),
        torch.tensor([0, 1]).to(triton_backend),
        None,
        W.to(triton_backend),
        5,
        packed=False,
    )
    assert codes.cpu().tolist() == [[1, 0, 1, 1, 0, 1, 0, 0, 0, 1]]


@pytest.mark.parametrize("k", [1, 2, 7, 31, 32, 33, 63, 64])
def test_radix_select_keys_sharing_high_bytes_with_ties(triton_backend, k):
    """The k-th largest is found one key byte at a time: activations one ulp apart share their top
    three key bytes (and carry over a byte boundary), with ties, NaN, +-0.0 and +-inf among them.
    Row j reads input j, so each row ranks its own column of W; every k is checked against sorting."""
    g = torch.Generator().manual_seed(k)
    base = torch.tensor(1.0).view(torch.int32)
    near_one = (base + torch.randint(-300, 300, (64,), generator=g, dtype=torch.int32)).view(torch.float32)
    columns = [near_one, near_one.clone(), -near_one, torch.randn(64, generator=g)]
    columns[1][::3] = columns[1][5]  # ties across the row
    columns[3][[0, 9, 40]] = torch.tensor([float("nan"), -0.0, float("inf")])
    columns[3][[1, 10, 41]] = torch.tensor([0.0, float("-inf"), float("nan")])
    W = torch.stack(columns, 1).contiguous()  # (K=64, N=4)
    ids, offsets = torch.arange(4), torch.arange(5)
    act = ref.activations_sparse(ids, offsets, None, W)
    expected = brute_topk_mask(act[:3].double(), k)  # Python's sort cannot rank the NaN row
    codes = kexue.ops.biohash(
        ids.to(triton_backend), offsets.to(triton_backend), None, W.to(triton_backend), k, packed=False
    ).cpu()
    assert torch.equal(codes[:3], expected.to(torch.uint8))
    assert torch.equal(codes, ref.biohash_sparse(ids, offsets, None, W, k, False))
    assert (codes.sum(1) == k).all()


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


def test_hamming_topk_streams_tiles_smaller_than_the_database(triton_backend, monkeypatch):
    from kexue.ops import _hamming_tiles

    # a few KB per tile: one block of codes per tile, so the running top-n is merged across
    # many tiles, with ties that span tile edges (many equal codes)
    monkeypatch.setattr(_hamming_tiles, "TILE_BYTES", 1)
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 2, (5, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    db = torch.randint(0, 2, (5000, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    d, i = H.hamming_topk(q.to(triton_backend), db.to(triton_backend), 40)
    ed, ei = ref.hamming_topk(q, db, 40)
    assert torch.equal(d.cpu(), ed) and torch.equal(i.cpu(), ei)


def test_configs_cover_the_launcher_choices():
    blocks = {c["constexprs"]["BLOCK_K"] for c in T.AOT_CONFIGS if "BLOCK_K" in c["constexprs"]}
    for num_hidden in (1, 63, 64, 65, 400, 1000, T.MAX_HIDDEN):
        assert T.block_k(num_hidden) in blocks
    with pytest.raises(ValueError, match="K <= 4096"):
        T.biohash_sparse(
            torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), None, torch.zeros(1, T.MAX_HIDDEN + 1), 1, True
        )


# ---------------------------------------------------------------------------------------------
# The learning step.


def input_major(W: torch.Tensor) -> torch.Tensor:
    """A copy of ``W (K, N)`` stored input-major, the layout the kernels update in place."""
    return W.detach().t().contiguous().clone().t()


def step_all(ids, offsets, weights, W, device, lr=0.01, **kw):
    """One step from the same synapses by the float64 reference, the CPU kernel (None without
    the native module) and the Triton kernel. Returns ``(ref, cpu, triton)`` as
    ``(W after, winners, s_win)`` triples, on the CPU."""
    expected = input_major(W.double())
    w64 = None if weights is None else weights.double()
    win_r, s_r = ref.biohash_update_(ids, offsets, w64, expected, lr, **kw)
    cpu = None
    if NATIVE:
        got_cpu = input_major(W)
        with kexue.use_backend("cpu"):
            win_c, s_c = kexue.ops.biohash_update(ids, offsets, weights, got_cpu, lr, **kw)
        cpu = (got_cpu, win_c, s_c)
    got = input_major(W).to(device)
    dev = [None if t is None else t.to(device) for t in (ids, offsets, weights)]
    win_t, s_t = kexue.ops.biohash_update(*dev, got, lr, **kw)
    return (expected, win_r, s_r), cpu, (got.cpu(), win_t.cpu(), s_t.cpu())


def check_step(W, results, ulps_vs_cpu=4.0):
    (expected, win_r, s_r), cpu, (got, win, s) = results
    assert torch.equal(win, win_r), "winners differ from the reference"
    assert not torch.isnan(got).any() and not torch.isnan(s).any()
    torch.testing.assert_close(s.double(), s_r, rtol=2e-6, atol=1e-7)
    change = expected - W.double()
    assert change.abs().max() > 0, "the step moved nothing: the test would prove nothing"
    err = float((got.double() - expected).norm() / change.norm())
    assert err < 1e-5, f"update differs from the float64 reference by {err:.3g} of the change"
    # the largest change of a step is lr (the global max-|ds| normalisation)
    assert abs(float((got.double() - W.double()).abs().max()) - float(change.abs().max())) < 1e-6
    if cpu is not None:
        got_cpu, win_c, s_c = cpu
        assert torch.equal(win, win_c) and torch.equal(s, s_c)
        diff = (got - got_cpu).abs()
        assert float(diff.max()) <= ulps_vs_cpu * float(torch.finfo(torch.float32).eps) * float(got_cpu.abs().max())


@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(20, 30, 7), (64, 50, 9), (65, 40, 6), (1, 5, 3), (130, 70, 12)])
def test_update_matches_reference_and_cpu(triton_backend, monkeypatch, shape, delta):
    num_hidden, num_inputs, rows = shape
    monkeypatch.setattr(U, "UPDATE_ROWS_PER_SPLIT", 4)  # xx over 1 to 3 slices of the batch
    g = torch.Generator().manual_seed(num_hidden + num_inputs + rows)
    W = kexue.ops.new_synapses(num_hidden, num_inputs, generator=g, std=0.1)
    ids, offsets, w = random_batch(rows, num_inputs, generator=g, dtype=torch.float32)
    rank = min(2 if num_hidden < 100 else 3, num_hidden)
    for weights in (w, None):
        check_step(W, step_all(ids, offsets, weights, W, triton_backend, delta=delta, rank=rank))


def test_update_single_tokens_duplicates_and_ties(triton_backend):
    """Rows of one token, a row repeating an id (it counts twice), raw activations tied across
    units (the lowest index wins; tied_synapses makes every sum exact), the anti-Hebbian unit
    ranked first (the winner itself) and last, several K blocks in the ds passes (a small
    MAX_DS_BLOCK), and a tiny that drops part of the step."""
    g = torch.Generator().manual_seed(11)
    W = tied_synapses(150, 24, torch.float32, generator=g)
    ids = torch.tensor([3, 7, 7, 7, 1, 3, 3, 20, 5, 5, 23, 0])
    offsets = torch.tensor([0, 1, 4, 7, 8, 11, 12])
    weights = torch.linspace(0.2, 1.3, ids.shape[0])
    raw = ref.activations_sparse(ids, offsets, None, W.double())
    assert any(int((row == row.max()).sum()) > 1 for row in raw), "no tie at the top: tied_synapses changed?"
    block = U.MAX_DS_BLOCK
    try:
        U.MAX_DS_BLOCK = 64  # three programs per synapse row
        assert U.ds_block(150) == 64
        for delta, tiny, rank in ((0.0, 1e-10, 2), (0.4, 1e-10, 2), (0.4, 1e-10, 1), (0.4, 1e-10, 150), (0.0, 2e-3, 2)):
            check_step(
                W, step_all(ids, offsets, weights, W, triton_backend, lr=0.01, delta=delta, tiny=tiny, rank=rank)
            )
    finally:
        U.MAX_DS_BLOCK = block


def test_update_empty_batch_changes_nothing(triton_backend):
    W = kexue.ops.new_synapses(20, 10).to(triton_backend)
    before = W.clone()
    z = torch.zeros(0, dtype=torch.int64, device=triton_backend)
    winners, s_win = kexue.ops.biohash_update(z, torch.zeros(1, dtype=torch.int64, device=triton_backend), None, W, 0.1)
    assert winners.shape == (0,) and winners.dtype == torch.int64 and s_win.shape == (0,)
    assert torch.equal(W, before)


def test_update_serves_float32_only(triton_backend):
    W = kexue.ops.new_synapses(8, 10, dtype=torch.float64).to(triton_backend)
    ids, offsets = torch.tensor([1, 2, 3]).to(triton_backend), torch.tensor([0, 2, 3]).to(triton_backend)
    with pytest.raises(kexue.BackendUnavailableError, match="triton"):
        kexue.ops.biohash_update(ids, offsets, None, W, 0.1)
    with pytest.raises(TypeError, match="float32"):
        U.biohash_update(ids, offsets, None, W.t().contiguous(), 0.1, 0.0, 2, 1e-30, 1e-10)


def test_update_opcheck(triton_backend):
    g = torch.Generator().manual_seed(42)
    wt = kexue.ops.new_synapses(20, 30, generator=g).t().contiguous().to(triton_backend)
    ids, offsets, w = (t.to(triton_backend) for t in random_batch(4, 30, generator=g, dtype=torch.float32))
    torch.library.opcheck(torch.ops.kexue.biohash_update.default, (ids, offsets, w, wt, 0.01, 0.2, 2, 1e-30, 1e-10))


def test_training_run_matches_the_cpu_kernel(triton_backend):
    """A few epochs on a toy corpus: the Triton kernel picks the CPU kernel's winners at every step
    and ends at the same synapses (up to float32 rounding), and the energy falls."""
    g = torch.Generator().manual_seed(23)
    vocab = 24
    x = windows(toy_corpus(g, vocab, sentences=24, length=9), vocab)
    counts = torch.bincount(x.remainder(vocab).flatten(), minlength=vocab).float()
    invf = (1.0 / counts)[x.remainder(vocab)]
    W0 = kexue.ops.new_synapses(16, 2 * vocab, generator=g)
    W_ref, W_tri = input_major(W0), input_major(W0).to(triton_backend)
    epochs = 3
    for epoch in range(epochs):
        lr, _ = kexue.ops.biohash_schedule(epoch, epochs, lr0=0.05)
        for batch in torch.randperm(x.shape[0], generator=g).split(40):
            with kexue.use_backend("cpu" if NATIVE else "torch"):
                win_ref, _ = kexue.ops.biohash_update(x[batch], None, invf[batch], W_ref, lr)
            win, _ = kexue.ops.biohash_update(
                x[batch].to(triton_backend), None, invf[batch].to(triton_backend), W_tri, lr
            )
            assert torch.equal(win.cpu(), win_ref)
    torch.testing.assert_close(W_tri.cpu(), W_ref, rtol=0, atol=1e-6)
    assert not torch.allclose(W_ref, W0)
    energy = [float(kexue.ops.biohash_energy(x, None, invf, W)) for W in (W0, W_tri.cpu())]
    assert energy[1] < energy[0]


def test_update_configs_cover_the_launcher_choices():
    rows = {c["constexprs"]["BLOCK_K"] for c in UA.AOT_CONFIGS if c["kernel"] is U._update_rows_kernel}
    ds = {c["constexprs"]["BLOCK_K"] for c in UA.AOT_CONFIGS if c["kernel"] is U._update_ds_kernel}
    for num_hidden in (1, 63, 64, 65, 400, 1000, 1025, T.MAX_HIDDEN):
        assert T.block_k(num_hidden) in rows and U.ds_block(num_hidden) in ds
    assert any(c["kernel"] is U._update_xx_kernel for c in UA.AOT_CONFIGS)
    assert any(c["kernel"] is U._update_nx_kernel for c in UA.AOT_CONFIGS)


CUDA_NATIVE = kexue.backends()["cuda"]["available"] and hasattr(kexue._backend.native(), "biohash_update_cuda")


@pytest.mark.skipif(not CUDA_NATIVE, reason="the CUDA C++ kernels need a GPU and a CUDA build of kexue._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(20, 30, 7), (65, 40, 300), (400, 1000, 513), (1, 5, 3)])
def test_cuda_update_equals_the_cpu_kernel(use_backend, shape, delta, dtype):
    """The CUDA C++ step sums in the CPU kernel's order with the same roundings: equal bit for bit
    (float32 and float64), and within rounding of the float64 reference."""
    num_hidden, num_inputs, rows = shape
    g = torch.Generator().manual_seed(num_hidden + rows)
    W = kexue.ops.new_synapses(num_hidden, num_inputs, generator=g, std=0.1, dtype=dtype)
    ids, offsets, w = random_batch(rows, num_inputs, generator=g, dtype=dtype)
    use_backend("cuda")
    rank = min(2, num_hidden)
    for weights in (w, None):
        results = step_all(ids, offsets, weights, W, torch.device("cuda"), delta=delta, rank=rank)
        (expected, win_r, _), (got_cpu, win_c, s_c), (got, win, s) = results
        assert torch.equal(win, win_c) and torch.equal(s, s_c) and torch.equal(got, got_cpu)
        if dtype == torch.float32:
            check_step(W, results)
        else:
            assert torch.equal(win, win_r)
            torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# FlyVec's production size on a GPU: K = 400 hidden units over a 20k vocabulary (plus the 20k
# target half), windows of 30 tokens.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="production-size run needs a GPU")
def test_flyvec_size_k400_on_gpu():
    num_hidden, num_inputs, rows = 400, 40_000, 8192
    g = torch.Generator().manual_seed(400)
    W = kexue.ops.new_synapses(num_hidden, num_inputs, generator=g, std=0.1)
    ids, offsets, w = random_batch(rows, num_inputs, min_len=30, max_len=30, generator=g, dtype=torch.float32)
    cuda = torch.device("cuda")
    with kexue.use_backend("triton"):
        codes = kexue.ops.biohash(ids.to(cuda), offsets.to(cuda), w.to(cuda), W.to(cuda), 32)
    assert torch.equal(codes.cpu(), ref.biohash_sparse(ids, offsets, w, W, 32, True))
    # one learning step against the float64 reference on a slice of the batch (the reference is slow)
    ids_s, offsets_s = ids[: int(offsets[512])], offsets[:513]
    with kexue.use_backend("triton"):
        results = step_all(ids_s, offsets_s, w[: ids_s.shape[0]], W, cuda)
    check_step(W, results)
