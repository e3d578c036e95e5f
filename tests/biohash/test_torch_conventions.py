"""The BioHash ops as PyTorch ops: torch.compile without graph breaks, opcheck, clear errors on bad
input, the nn module, and the choice of the CUDA kernel over Triton.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.biohash.helpers import CPU_BACKENDS, random_batch


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
