"""Property-based tests of BioHash hashing and Hamming search on every available backend.

Hypothesis draws shapes (block edges included), synapse dtypes and layouts (input-major or a
row-major copy), NaN/inf synapses at random positions, weights or none, empty batches, the CSR
and the padded spelling (masked positions holding ids far out of range, which must be ignored),
and now and then an out-of-range id. Every backend must give the reference's codes bit for bit,
or raise the exception the torch backend (the reference behind the public checks) raises.
Small and seeded by default; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import kexue
from kexue.reference import biohash as ref
from tests.conftest import triton_unavailable_reason

# Backends that serve CPU tensors here (Triton under the interpreter when there is no GPU).
BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FAST = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def hash_problems(draw):
    num_hidden = draw(st.sampled_from([1, 7, 8, 9, 63, 64, 65, 130]))
    num_inputs = draw(st.integers(1, 40))
    rows = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    wt = torch.randint(-4, 5, (num_inputs, num_hidden), generator=g).double() / 4 + torch.randn(
        num_inputs, num_hidden, generator=g, dtype=torch.float64
    ) * draw(st.sampled_from([0.0, 1.0]))
    for value in draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=2)):
        wt.view(-1)[int(torch.randint(0, wt.numel(), (1,), generator=g))] = value
    synapses = wt.to(dtype).t()
    if draw(st.booleans()):
        synapses = synapses.contiguous()  # row-major (K, N): the ops copy it
    lengths = torch.randint(1, 6, (rows,), generator=g)
    width = int(lengths.max()) if rows else 1
    ids = torch.randint(0, num_inputs, (rows, width), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids[~mask] = 10**9  # padding: never read
    if draw(st.integers(0, 9)) == 7 and rows:  # now and then an out-of-range id (7, not the minimal 0)
        ids[0, 0] = draw(st.sampled_from([-1, num_inputs, 10**6]))
    weights = None
    if draw(st.booleans()):
        weights = (0.1 + torch.rand(rows, width, generator=g, dtype=torch.float64)).to(dtype)
        weights[~mask] = float("nan")  # padding: never read
    k = draw(st.integers(1, num_hidden))
    packed = draw(st.booleans())
    padded = draw(st.booleans())
    if padded:
        return (ids, mask, weights, synapses, k, packed)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return (ids[mask], offsets, None if weights is None else weights[mask], synapses, k, packed)


def _outcome(backend, args):
    try:
        with kexue.use_backend(backend):
            return kexue.ops.biohash(*args)
    except kexue.BackendUnavailableError:
        return None
    except Exception as e:  # compared by type with the torch backend's
        return type(e)


def _check_hash(args):
    expected = _outcome("torch", args)
    if isinstance(expected, torch.Tensor):  # then the reference on the CSR form agrees too
        ids, offsets, weights, synapses, k, packed = args
        if ids.dim() == 2:
            offsets_csr = torch.zeros(ids.shape[0] + 1, dtype=torch.int64)
            offsets_csr[1:] = torch.cumsum(offsets.sum(1), 0)
            ids, weights = ids[offsets], None if weights is None else weights[offsets]
            offsets = offsets_csr
        ct = ref.compute_dtype(synapses.dtype)
        want = ref.biohash_sparse(ids, offsets, None if weights is None else weights.to(ct), synapses, k, packed)
        assert torch.equal(expected, want)
    for backend in BACKENDS:
        got = _outcome(backend, args)
        if got is None:  # this backend does not serve the dtype
            continue
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor), f"{backend} raised {got}"
            assert torch.equal(got, expected), backend
        else:
            assert got is expected, f"{backend}: {got} where the reference raises {expected}"


@seed(15)
@FAST
@given(hash_problems())
def test_hash_every_backend_equals_reference(args):
    _check_hash(args)


@pytest.mark.slow
@SLOW
@given(hash_problems())
def test_hash_every_backend_equals_reference_long(args):
    _check_hash(args)


@st.composite
def hamming_problems(draw):
    nb = draw(st.integers(1, 9))
    num_queries, num_codes = draw(st.integers(0, 6)), draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    alphabet = draw(st.sampled_from([2, 256]))  # 2: codes of 0/1 bytes, with many exact ties
    queries = torch.randint(0, alphabet, (num_queries, nb), dtype=torch.uint8, generator=g)
    database = torch.randint(0, alphabet, (num_codes, nb), dtype=torch.uint8, generator=g)
    if draw(st.booleans()):  # non-contiguous: every other row of a larger tensor
        database = torch.randint(0, alphabet, (2 * num_codes, nb), dtype=torch.uint8, generator=g)[::2]
    return queries, database, draw(st.integers(0, num_codes))


@seed(16)
@FAST
@given(hamming_problems())
def test_hamming_every_backend_equals_reference(problem):
    queries, database, n = problem
    want_d, want_i = ref.hamming_topk(queries, database.contiguous(), n)
    for backend in BACKENDS:
        with kexue.use_backend(backend):
            dist, idx = kexue.ops.hamming_topk(queries, database, n)
        assert torch.equal(dist, want_d) and torch.equal(idx, want_i), backend
