"""How many times the Triton kernels read each element of a long row, counted in the interpreter.

Every load the interpreter executes goes through ``InterpreterBuilder.create_masked_load`` with the
addresses of its lanes; the spy below counts, per element of a watched tensor, the unmasked loads
that touch it. A row longer than one tile must be read exactly three times by the forward (scan
with sampled moments, one sweep, write) and by the backward (means, centred sums, write), whatever
the row length, where one pass per Newton iteration used to be spent.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from kexue.reference import entropy_norm as ref
from tests.conftest import triton_unavailable_reason
from tests.helpers import assert_close, fresh_probs

if triton_unavailable_reason() is not None or torch.cuda.is_available():
    pytest.skip("counts loads in the Triton interpreter (CPU tensors)", allow_module_level=True)

from kexue.triton_kernels import entropy_norm as K  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

TOL = ref.default_tol(torch.float32)


@contextlib.contextmanager
def count_loads(*tensors):
    """Yield one int64 array per tensor, counting the loads of each of its elements."""
    counts = [np.zeros(t.numel(), dtype=np.int64) for t in tensors]
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), t.element_size()) for t in tensors]
    original = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args):
        addresses = ptrs.data.reshape(-1).astype(np.int64)
        live = mask.data.reshape(-1).astype(bool) if mask is not None else np.ones(addresses.shape, bool)
        for count, (lo, hi, size) in zip(counts, spans, strict=True):
            hit = live & (addresses >= lo) & (addresses < hi)
            np.add.at(count, (addresses[hit] - lo) // size, 1)
        return original(self, ptrs, mask, other, *args)

    interpreter.InterpreterBuilder.create_masked_load = spy
    try:
        yield counts
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


def long_rows(rows, n, logits, seed):
    g = torch.Generator().manual_seed(seed)
    p = fresh_probs(rows, n, generator=g)
    x = (torch.log(p) if logits else p).float()
    target = (0.2 + 0.6 * torch.rand(rows, generator=g, dtype=torch.float64)) * math.log(n)
    return x, target.float()


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
def test_long_row_forward_and_backward_read_x_three_times(logits):
    n = K.MAX_SINGLE_TILE_FORWARD + 3 * K._STREAM.block_n + 7
    x, target = long_rows(2, n, logits, seed=n)
    assert not K.forward_tile(n).single_tile and not K.backward_tile(n).single_tile
    with count_loads(x) as (loads,):
        y, gamma, stats = K.forward(x, target, logits, 20, TOL)
    assert (loads == 3).all(), f"forward reads of x: {np.unique(loads)}"
    y_r, gamma_r, _ = ref.entropy_normalize_forward(x.double(), target.double(), logits, 20, TOL)
    assert_close(y, y_r, torch.float32, "y")
    assert_close(gamma, gamma_r, torch.float32, "gamma")

    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with count_loads(x, grad_y) as (x_loads, g_loads):
        K.backward(grad_y, torch.zeros(2), x, gamma, stats, logits)
    assert (x_loads == 3).all(), f"backward reads of x: {np.unique(x_loads)}"
    assert (g_loads == 3).all(), f"backward reads of grad_y: {np.unique(g_loads)}"


def test_llm_vocabulary_row_of_256k_reads_x_three_times():
    n = 2**18
    x, target = long_rows(1, n, True, seed=3)
    with count_loads(x) as (loads,):
        y, gamma, _ = K.forward(x, target, True, 20, TOL)
    assert (loads == 3).all(), f"forward reads of x: {np.unique(loads)}"
    _, gamma_r, _ = ref.entropy_normalize_forward(x.double(), target.double(), True, 20, TOL)
    assert_close(gamma, gamma_r, torch.float32, "gamma")


def test_row_in_one_tile_is_read_once():
    x, target = long_rows(3, 1000, True, seed=4)
    with count_loads(x) as (loads,):
        K.forward(x, target, True, 20, TOL)
    assert (loads == 1).all()


def test_extra_sweeps_are_capped_by_max_iter():
    """A root above the scan's largest sampled gamma (8) needs further sweeps, each one more read
    of the row: never more than max_iter of them, and the result stays a distribution."""
    n = K.MAX_SINGLE_TILE_FORWARD + 5
    z = torch.randn(1, n, generator=torch.Generator().manual_seed(5)) * 0.2  # flat row, low target
    target = torch.tensor([0.05 * math.log(n)])
    _, gamma_r, _ = ref.entropy_normalize_forward(z.double(), target.double(), True, 20, TOL)
    assert gamma_r[0] > 8
    with count_loads(z) as (loads,):
        y, gamma, _ = K.forward(z, target, True, 20, TOL)
    assert 3 < loads.max() <= 2 + 20 and (loads == loads[0]).all()
    assert_close(gamma, gamma_r, torch.float32, "gamma")
    with count_loads(z) as (loads,):
        y, gamma, _ = K.forward(z, target, True, 1, TOL)
    assert (loads == 3).all()
    assert torch.isfinite(gamma).all() and abs(float(y.double().sum()) - 1) < 1e-5
