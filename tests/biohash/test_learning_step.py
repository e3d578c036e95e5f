"""The BioHash learning step on the C++ CPU and torch backends: float64 equal to the reference,
float32 within rounding, in-place updates, the learning-rate schedule, and training on a toy corpus.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.biohash.helpers import CPU_BACKENDS, random_batch, run, toy_corpus, windows


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


def test_schedule_is_linear_to_zero():
    assert kexue.ops.biohash_schedule(0, 15) == (0.002, 0.0)
    lr, _ = kexue.ops.biohash_schedule(5, 10, lr0=0.02)
    assert abs(lr - 0.01) < 1e-15
    assert kexue.ops.biohash_schedule(10, 10, lr0=0.02)[0] == 0.0
    _, d = kexue.ops.biohash_schedule(0, 80, delta0=0.4)
    assert abs(d - 0.4 * 0.5 * (1 + torch.tanh(torch.tensor(-1.0, dtype=torch.float64)).item())) < 1e-12
