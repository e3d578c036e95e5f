"""The Triton hash kernel's gather: TOKENS rows of the synapses a step, added in row order.

Rows whose lengths sit at the step edges (0, 1, TOKENS - 1, TOKENS, TOKENS + 1, ...), repeated ids,
rows with no token and a batch with no token at all must give the reference's codes bit for bit;
a row whose sum depends on the order of its adds (1e8 + 1 - 1e8) across a step edge shows that the
step keeps the row order. Under the interpreter a spy counts the loads that touch the synapses:
one load per step, ceil(len / TOKENS) per row, each element of a row read once per occurrence of
its id (not once per token and lane, as a loop of dependent single-row loads would).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.biohash.helpers import brute_pack, brute_topk_mask
from tests.conftest import triton_unavailable_reason

pytest.importorskip("triton")
from kexue.triton_kernels import biohash as T  # noqa: E402  (after the skip)

pytestmark = pytest.mark.usefixtures("nan_empty")


def steps_of(num_hidden: int, itemsize: int, packed: bool) -> int:
    """TOKENS, as the launcher picks it."""
    block = T.block_k(num_hidden)
    return T.tokens_per_step(block, T.num_warps_for(block, itemsize, packed))


def edge_rows(tokens: int, num_inputs: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows of every length around the step edges, with repeated ids."""
    lengths = [1, tokens - 1, tokens, tokens + 1, 2 * tokens, 2 * tokens + 1, 3 * tokens - 1]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    ids = torch.randint(0, num_inputs, (int(offsets[-1]),), generator=generator)
    ids[offsets[3] : offsets[3] + 3] = ids[offsets[3]]  # one id three times in a row
    return ids, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_hidden", [64, 65, 130])
def test_rows_at_step_edges_bit_for_bit(triton_backend, dtype, num_hidden):
    g = torch.Generator().manual_seed(num_hidden)
    W = kexue.ops.new_synapses(num_hidden, 9, dtype=dtype, generator=g)  # few inputs: many repeats
    for packed in (True, False):
        tokens = steps_of(num_hidden, W.element_size(), packed)
        assert tokens > 1, "one token a step: the edges below would test nothing"
        ids, offsets = edge_rows(tokens, 9, g)
        w = torch.rand(ids.shape[0], generator=g) + 0.5
        for weights in (None, w):
            expected = ref.biohash_sparse(ids, offsets, weights, W, 7, packed)
            got = kexue.ops.biohash(
                ids.to(triton_backend),
                offsets.to(triton_backend),
                None if weights is None else weights.to(triton_backend),
                W.to(triton_backend),
                7,
                packed=packed,
            )
            assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("at", [0, 1, 2, 3])
def test_adds_keep_row_order_across_a_step(triton_backend, at):
    """Unit 0 sums 1e8, 1, -1e8: 0 in row order (1e8 + 1 rounds to 1e8), 1 in any order that adds
    the two large ones first. Filler tokens give unit 1 a sum in (0, 1), so k = 1 picks unit 1
    only in row order. The three tokens start at ``tokens - at``: inside one step or straddling
    the edge."""
    tokens = steps_of(2, 4, True)
    wt = torch.zeros(4, 64)  # (N, K), input-major; K = 64 units
    wt[0, 0], wt[1, 0], wt[2, 0] = 1e8, 1.0, -1e8
    wt[3, 1] = 0.0625  # the filler token carries unit 1
    first = tokens - at
    assert 1 <= first <= 8
    ids = torch.tensor([3] * first + [0, 1, 2])
    offsets = torch.tensor([0, ids.shape[0]])
    act = ref.activations_sparse(ids, offsets, None, wt.t())
    assert float(act[0, 0]) == 0.0 and float(act[0, 1]) == 0.0625 * first
    expected = ref.biohash_sparse(ids, offsets, None, wt.t(), 1, False)
    got = kexue.ops.biohash(
        ids.to(triton_backend), offsets.to(triton_backend), None, wt.t().to(triton_backend), 1, packed=False
    )
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(got.cpu(), brute_topk_mask(act.double(), 1).to(torch.uint8))


def test_kernel_rows_without_tokens(triton_backend):
    """The op refuses empty windows; the kernel itself serves them (its loop runs no step): every
    activation is 0, all tie, the k lowest units win. A batch with no token at all, too."""
    W = kexue.ops.new_synapses(70, 5).t().contiguous().to(triton_backend)  # (N, K)
    for ids, offsets in (
        (torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)),
        (torch.tensor([2, 2]), torch.tensor([0, 0, 2, 2])),
    ):
        for packed in (True, False):
            got = T.biohash_sparse(ids.to(triton_backend), offsets.to(triton_backend), None, W, 3, packed).cpu()
            mask = torch.zeros(3, 70, dtype=torch.bool)
            mask[:, :3] = True
            if ids.numel():
                act = ref.activations_sparse(ids[:2], torch.tensor([0, 2]), None, W.cpu().t())
                mask[1] = brute_topk_mask(act.double(), 3)[0]
            assert torch.equal(got, brute_pack(mask) if packed else mask.to(torch.uint8))


# ---------------------------------------------------------------------------------------------
# The loop's structure, counted in the interpreter.


@contextlib.contextmanager
def count_synapse_loads(wt: torch.Tensor):
    """Yield ``(calls, reads)``: the load calls that touch ``wt`` (appended as they run) and how
    many times each element of ``wt`` was read by them."""
    from triton.runtime import interpreter

    lo, size = wt.data_ptr(), wt.element_size()
    hi = lo + wt.numel() * size
    calls: list[int] = []
    reads = np.zeros(wt.numel(), dtype=np.int64)
    original = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args):
        addresses = ptrs.data.reshape(-1).astype(np.int64)
        live = mask.data.reshape(-1).astype(bool) if mask is not None else np.ones(addresses.shape, bool)
        hit = live & (addresses >= lo) & (addresses < hi)
        if hit.any():
            calls.append(int(hit.sum()))
            np.add.at(reads, (addresses[hit] - lo) // size, 1)
        return original(self, ptrs, mask, other, *args)

    interpreter.InterpreterBuilder.create_masked_load = spy
    try:
        yield calls, reads
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


@pytest.mark.skipif(
    triton_unavailable_reason() is not None or torch.cuda.is_available(),
    reason="counts loads in the Triton interpreter (CPU tensors)",
)
def test_one_load_per_step_of_tokens(use_backend):
    use_backend("triton")
    num_hidden, num_inputs = 100, 11
    g = torch.Generator().manual_seed(3)
    wt = torch.randn(num_inputs, num_hidden, generator=g)  # (N, K), what the kernel reads
    tokens = steps_of(num_hidden, 4, True)
    ids, offsets = edge_rows(tokens, num_inputs, g)
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    with count_synapse_loads(wt) as (calls, reads):
        codes = kexue.ops.biohash(ids, offsets, None, wt.t(), 5)
    assert torch.equal(codes, ref.biohash_sparse(ids, offsets, None, wt.t(), 5, True))
    steps = sum(-(-n // tokens) for n in lengths)
    assert len(calls) == steps, f"{len(calls)} loads of the synapses for {steps} steps of {tokens} tokens"
    assert len(calls) < ids.shape[0] / 2  # one load per token would be ids.shape[0]
    # every live lane of a load is a real token's unit: nothing read twice, nothing past K
    assert sum(calls) == ids.shape[0] * num_hidden
    uses = torch.bincount(ids, minlength=num_inputs).repeat_interleave(num_hidden).numpy()
    assert np.array_equal(reads, uses)
