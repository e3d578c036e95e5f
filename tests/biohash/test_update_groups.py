"""The Triton learning step's ds passes: each (input, unit) run of contributions summed once,
then placed in its lane without a loop over the input's bucket.

A frequent input (in every window of a large batch) has a bucket of hundreds of contributions and
more distinct units than one histogram trip marks (CHUNK, set to 8 here so that a small batch
needs several trips); rows at block edges of the units (a small MAX_DS_BLOCK) split its runs
between programs. Results must equal the float64 reference
within rounding and the C++ CPU kernel to a few ulps, as tests/biohash/test_triton.py demands.
Under the interpreter a spy counts the ds passes' loads of the runs: each run's unit and sum is
read once per pass, and the trips per program are ceil(runs / CHUNK), not the bucket's length.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import kexue
from kexue.reference import biohash as ref
from tests.biohash.helpers import random_batch
from tests.biohash.test_triton import check_step, step_all
from tests.conftest import triton_unavailable_reason

pytest.importorskip("triton")
from kexue.triton_kernels import biohash_update as U  # noqa: E402  (after the skip)

pytestmark = pytest.mark.usefixtures("nan_empty")


def frequent_batch(rows: int, num_inputs: int, generator):
    """Random windows, each holding input 0 once (twice in every fifth window)."""
    ids, offsets, w = random_batch(rows, num_inputs, min_len=2, max_len=6, generator=generator, dtype=torch.float32)
    ids[offsets[:-1]] = 0
    ids[offsets[:-1][::5] + 1] = 0
    return ids, offsets, w


@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(64, 30, 150), (65, 12, 120), (130, 20, 90)])
def test_frequent_input_many_runs(triton_backend, monkeypatch, shape, delta):
    num_hidden, num_inputs, rows = shape
    monkeypatch.setattr(U, "MAX_DS_BLOCK", 64)  # runs of one input split over unit blocks
    monkeypatch.setattr(U, "ds_chunk", lambda block: 8)
    g = torch.Generator().manual_seed(num_hidden + rows)
    W = kexue.ops.new_synapses(num_hidden, num_inputs, generator=g, std=0.1)
    ids, offsets, w = frequent_batch(rows, num_inputs, g)
    rank = 2
    winners, _ = ref.biohash_update_(ids, offsets, None, W.double().t().contiguous().t().clone(), 0.01, rank=rank)
    # every window holds input 0: its runs in the first block of units are the distinct winners there
    assert len({u for u in winners.tolist() if u < 64}) > U.ds_chunk(64), "input 0's runs fit one trip"
    for weights in (w, None):
        check_step(W, step_all(ids, offsets, weights, W, triton_backend, delta=delta, rank=rank))


# ---------------------------------------------------------------------------------------------
# The structure, counted in the interpreter.


@contextlib.contextmanager
def log_loads():
    """Yield a list that collects the live addresses of every load the interpreter runs."""
    from triton.runtime import interpreter

    log: list[np.ndarray] = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args):
        addresses = ptrs.data.reshape(-1).astype(np.int64)
        live = mask.data.reshape(-1).astype(bool) if mask is not None else np.ones(addresses.shape, bool)
        log.append(addresses[live])
        return original(self, ptrs, mask, other, *args)

    interpreter.InterpreterBuilder.create_masked_load = spy
    try:
        yield log
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


class Launches:
    """Stands in for a kernel: records each launch's grid and arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def reads_of(log, tensor):
    """(load calls that touch ``tensor``, reads of each of its elements)."""
    lo, size = tensor.data_ptr(), tensor.element_size()
    hi = lo + tensor.numel() * size
    reads = np.zeros(tensor.numel(), dtype=np.int64)
    calls = 0
    for addresses in log:
        hit = addresses[(addresses >= lo) & (addresses < hi)]
        if hit.size:
            calls += 1
            np.add.at(reads, (hit - lo) // size, 1)
    return calls, reads


@pytest.mark.skipif(
    triton_unavailable_reason() is not None or torch.cuda.is_available(),
    reason="counts loads in the Triton interpreter (CPU tensors)",
)
def test_ds_reads_each_run_once_per_pass(use_backend, monkeypatch):
    use_backend("triton")
    monkeypatch.setattr(U, "MAX_DS_BLOCK", 64)
    monkeypatch.setattr(U, "ds_chunk", lambda block: 8)
    ds = Launches(U._update_ds_kernel)
    monkeypatch.setattr(U, "_update_ds_kernel", ds)
    g = torch.Generator().manual_seed(8)
    num_hidden, num_inputs = 130, 20
    W = kexue.ops.new_synapses(num_hidden, num_inputs, generator=g, std=0.1).t().contiguous()
    ids, offsets, w = frequent_batch(120, num_inputs, g)
    with log_loads() as log:
        kexue.ops.biohash_update(ids, offsets, w, W.t(), 0.01, delta=0.3)
    assert len(ds.calls) == 2  # the max pass and the apply pass
    grid, args, kwargs = ds.calls[0]
    bounds, group_units, sums = args[2], args[3], args[4]
    contributions = 2 * ids.shape[0]  # winner and ranked unit of every token
    runs = group_units.shape[0]
    bucket_of_0 = 2 * int((ids == 0).sum())
    runs_of_0 = int(bounds[grid[1]] - bounds[0])
    assert runs < contributions and runs_of_0 < bucket_of_0 / 2, (runs, runs_of_0, bucket_of_0)
    chunk = kwargs["CHUNK"]
    per_program = (bounds[1:] - bounds[:-1]).numpy()
    assert per_program.max() > chunk  # some program marks its runs in several trips
    calls, reads = reads_of(log, group_units)
    assert calls == 2 * int(np.sum(-(-per_program // chunk))), "one load of run units per trip and pass"
    assert (reads == 2).all(), "each run's unit read once per pass"
    _, sum_reads = reads_of(log, sums)
    assert (sum_reads == 2).all(), "each run's sum read once per pass"
