"""Packed variable-length log-n attention (cu_seqlens) forward: the reference equals padded dense
attention, every backend matches it over length mixes, key offsets, positions and scale rules.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from tests.helpers import DTYPES, assert_close
from tests.logn_attention.helpers import CPU_BACKENDS, _offsets, _packed, attn, ref

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


def _dense(t, start, end):
    """Rows start .. end of a packed (T, H, D) tensor as (1, H, L, D)."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _grad_probes(tq, hq, d, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tq, hq, d, generator=gen).to(dtype), torch.randn(hq, tq, generator=gen)


def _run(backend, q, k, v, cu_q, cu_k, causal, **kw):
    """Packed forward with lse and the gradients of a random projection of both."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    go, gl = _grad_probes(q.shape[0], q.shape[1], q.shape[2], q.dtype)
    cu_k = None if cu_k is cu_q else cu_k
    with kexue.use_backend(backend):
        out, lse = attn(q, k, v, causal=causal, cu_seqlens=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
        loss = (out.float() * go.float()).sum() + (lse * gl.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads, go, gl


def _reference(q, k, v, cu_q, cu_k, causal, go, gl, **kw):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = ref.logn_attention_varlen(q, k, v, cu_q, cu_seqlens_k=cu_k, causal=causal, return_lse=True, **kw)
    grads = torch.autograd.grad((out * go.double()).sum() + (lse * gl.double()).sum(), (q, k, v))
    return out, lse, grads


# Length mixes: a single position, empty sequences (first, middle, last), the C++ query block
# (128) and key block (512) edges +- 1, and mixes of short and long.
LENGTHS = [
    [1],
    [0, 3, 0, 1, 5, 0],
    [127, 1, 128, 129],
    [7, 511, 2],
    [513, 0, 40],
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[5, 1, 0, 9], [3, 8]])
def test_reference_equals_padded_dense_with_mask(causal, lengths):
    # Independent of the packing code: the dense reference on a right-padded batch with a key
    # mask sees the same keys, and counts the same n, for every real row (causal: position + 1).
    q, k, v, cu, _ = _packed(lengths, seed=len(lengths))
    out, lse = ref.logn_attention_varlen(q, k, v, cu, causal=causal, return_lse=True, train_len=8)
    b, lmax = len(lengths), max(lengths)
    qp = torch.zeros(b, q.shape[1], lmax, q.shape[2], dtype=q.dtype)
    kp, vp = (torch.zeros(b, k.shape[1], lmax, k.shape[2], dtype=k.dtype) for _ in range(2))
    mask = torch.ones(b, lmax, dtype=torch.bool)
    for s, n in enumerate(lengths):
        qp[s, :, :n], kp[s, :, :n], vp[s, :, :n] = (_dense(t, cu[s], cu[s + 1])[0] for t in (q, k, v))
        mask[s, :n] = False
    want_out, want_lse = ref.logn_attention(
        qp, kp, vp, causal=causal, key_padding_mask=mask, return_lse=True, train_len=8
    )
    for s, n in enumerate(lengths):
        assert_close(_dense(out, cu[s], cu[s + 1])[0], want_out[s, :, :n], torch.float64, "out")
        assert_close(lse[:, cu[s] : cu[s + 1]], want_lse[s, :, :n], torch.float64, "lse")


@pytest.mark.parametrize(
    "backend,dtype",
    [(b, dt) for b in CPU_BACKENDS for dt in (DTYPES + (torch.float64,) if b == "cpu" else (torch.float32,))],
)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference(backend, dtype, lengths, causal):
    hq, hkv = (4, 2) if sum(lengths) < 600 else (2, 1)  # grouped heads; fewer on the long mix
    q, k, v, cu, _ = _packed(lengths, hq=hq, hkv=hkv, dtype=dtype, seed=sum(lengths))
    out, lse, grads, go, gl = _run(backend, q, k, v, cu, cu, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (hq, q.shape[0]) and lse.dtype == ref.compute_dtype(dtype)
    r_out, r_lse, r_grads = _reference(q, k, v, cu, cu, causal, go, gl)
    low = dtype in (torch.float16, torch.bfloat16)
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, torch.float32 if dtype != torch.float64 else dtype, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=False):
        assert g.dtype == dtype
        assert_close(g, w, dtype, f"grad {name}", factor=2.0 if low else 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_length_mixes(seed):
    # Random numbers of sequences and lengths (zeros included), random separate key lengths on
    # odd seeds, random causal flag: the default backend against the reference.
    gen = torch.Generator().manual_seed(seed)
    nseq = int(torch.randint(1, 9, (1,), generator=gen))
    lengths_q = torch.randint(0, 150, (nseq,), generator=gen)
    lengths_q[torch.rand(nseq, generator=gen) < 0.2] = 0
    lengths_k = torch.randint(0, 150, (nseq,), generator=gen) if seed % 2 else lengths_q
    causal = bool(torch.rand(1, generator=gen) < 0.5)
    q, k, v, cu_q, cu_k = _packed(lengths_q.tolist(), lengths_k.tolist(), dtype=torch.float32, seed=seed)
    out, lse, grads, go, gl = _run(CPU_BACKENDS[0], q, k, v, cu_q, cu_k, causal)
    r_out, r_lse, r_grads = _reference(q, k, v, cu_q, cu_k, causal, go, gl)
    assert_close(out, r_out, torch.float32, f"out {lengths_q.tolist()} {lengths_k.tolist()}")
    assert_close(lse, r_lse, torch.float32, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=False):
        assert_close(g, w, torch.float32, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_one_sequence_one_head(dtype, causal):
    # Fewer (sequence, head) pairs than threads: the C++ backward splits the pair by query blocks
    # with per-thread dK / dV partial sums; with one thread it runs whole. Both against the reference.
    q, k, v, cu, _ = _packed([300], hq=1, hkv=1, d=16, dtype=dtype, seed=11)
    backend = CPU_BACKENDS[0]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in sorted({1, max(2, threads)}):
            torch.set_num_threads(n)
            results.append(_run(backend, q, k, v, cu, cu, causal))
    finally:
        torch.set_num_threads(threads)
    for out, lse, grads, go, gl in results:
        r_out, r_lse, r_grads = _reference(q, k, v, cu, cu, causal, go, gl)
        assert_close(out, r_out, dtype, "out")
        assert_close(lse, r_lse, dtype, "lse")
        for g, w, name in zip(grads, r_grads, "qkv", strict=False):
            assert_close(g, w, dtype, f"grad {name}", factor=2.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_dense_op_per_sequence(causal):
    # The packed call and one dense call per sequence, both through the C++ (or torch) backend.
    lengths = [130, 1, 0, 64]
    q, k, v, cu, _ = _packed(lengths, dtype=torch.float32, seed=3)
    out, lse = attn(q, k, v, cu_seqlens=cu, causal=causal, return_lse=True)
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        want, want_lse = attn(_dense(q, a, b), _dense(k, a, b), _dense(v, a, b), causal=causal, return_lse=True)
        assert_close(_dense(out, a, b), want, torch.float32, f"out of sequence {s}")
        assert_close(lse[:, a:b], want_lse[0], torch.float32, f"lse of sequence {s}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_separate_key_offsets(backend, causal):
    # cu_seqlens_k: per-sequence KV caches longer than the queries, shorter (causal: the first
    # queries see nothing), and empty (no key: zeros, lse 0).
    lengths_q, lengths_k = [3, 9, 4, 1, 0], [10, 2, 0, 1, 6]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, dtype=torch.float32, seed=5)
    out, lse, grads, go, gl = _run(backend, q, k, v, cu_q, cu_k, causal, train_len=16)
    r_out, r_lse, r_grads = _reference(q, k, v, cu_q, cu_k, causal, go, gl, train_len=16)
    assert_close(out, r_out, torch.float32, "out")
    assert_close(lse, r_lse, torch.float32, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=False):
        assert_close(g, w, torch.float32, f"grad {name}")
    # sequence 2 has no key: zero output and lse, no gradient
    rows = slice(int(cu_q[2]), int(cu_q[3]))
    assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.equal(
        lse[:, rows], torch.zeros_like(lse[:, rows])
    )
    assert torch.equal(grads[0][rows], torch.zeros_like(grads[0][rows]))
    # the keys of sequence 4 have no query: no gradient
    keys = slice(int(cu_k[4]), int(cu_k[5]))
    assert torch.equal(grads[1][keys], torch.zeros_like(grads[1][keys]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_n_counts_within_each_sequence(backend):
    # Two sequences of 1 and 64 equal keys: the lse of the 64-key sequence's queries is
    # log(64) + its scaled logit, with the scale from n = 64 (not the packed total 65).
    d, train_len = 8, 16
    k = torch.ones(65, 1, d)
    q = torch.ones(65, 1, d) * 0.5
    with kexue.use_backend(backend):
        _, lse = attn(q, k, k.clone(), cu_seqlens=_offsets([1, 64]), train_len=train_len, return_lse=True)
    logit = 0.5 * d / d**0.5
    scale64 = torch.log(torch.tensor(64.0)) / torch.log(torch.tensor(float(train_len)))
    assert torch.allclose(lse[0, 1:], torch.log(torch.tensor(64.0)) + scale64 * logit)
    assert torch.allclose(lse[0, :1], torch.zeros(1))  # n = 1: ln 1 = 0, a zero scale, one key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kw", [dict(scale="gradmax"), dict(clip=True, train_len=16, min_n=4), dict(logn=False)])
def test_scale_rules(backend, kw):
    q, k, v, cu, _ = _packed([9, 1, 30], dtype=torch.float32, seed=7)
    for causal in (False, True):
        out, lse, grads, go, gl = _run(backend, q, k, v, cu, cu, causal, **kw)
        r_out, r_lse, r_grads = _reference(q, k, v, cu, cu, causal, go, gl, **kw)
        assert_close(out, r_out, torch.float32, f"out {kw}")
        for g, w in zip(grads, r_grads, strict=False):
            assert_close(g, w, torch.float32, f"grads {kw}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_sequences_empty(backend):
    q, k, v, cu, _ = _packed([0, 0], dtype=torch.float32)
    q.requires_grad_()
    with kexue.use_backend(backend):
        out, lse = attn(q, k, v, cu_seqlens=cu, return_lse=True)
        (g,) = torch.autograd.grad(out.sum(), q)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0) and g.shape == q.shape


def test_int64_offsets_and_max_seqlen():
    q, k, v, cu, _ = _packed([4, 7], dtype=torch.float32)
    want = attn(q, k, v, cu_seqlens=cu, causal=True)
    assert_close(attn(q, k, v, cu_seqlens=cu.long(), causal=True, max_seqlen=9), want, torch.float32)
