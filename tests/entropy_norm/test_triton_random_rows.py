"""The Triton kernels of entropy normalization on random rows against the float64 reference
(TRITON_INTERPRET=1 on CPU): every single-tile configuration at block edges, 32- and 16-bit, and
the streamed layout for long rows, as the launchers pick it and forced with small chunks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kexue.triton_kernels import entropy_norm as K  # noqa: E402  (after the skip)

from tests.entropy_norm.triton_helpers import Tile, check, random_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN
SHAPES = [
    (67, 1),
    (5, 2),
    (9, 15),
    (8, 16),
    (7, 17),
    (5, 40),
    (3, 127),
    (3, 128),
    (9, 129),
    (3, 300),
    (2, 1000),
    (1, 1024),
    (2, 1025),
    (1, 3000),
]


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("rows,n", SHAPES)
def test_random_rows_float32(triton_device, rows, n, logits):
    g = torch.Generator().manual_seed(1000 * rows + n)
    x, target = random_rows(rows, n, torch.float32, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows,n", [(9, 15), (3, 129)])
def test_random_rows_16bit(triton_device, rows, n, dtype, logits):
    g = torch.Generator().manual_seed(7 * rows + n)
    x, target = random_rows(rows, n, dtype, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("n", [K.MAX_SINGLE_TILE_BACKWARD + 3, K.MAX_SINGLE_TILE_FORWARD + 2 * K._STREAM.block_n + 5])
def test_long_rows(triton_device, n, logits):
    assert not K.backward_tile(n).single_tile
    g = torch.Generator().manual_seed(n)
    x, target = random_rows(2, n, torch.float32, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, generator=g)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,n", [(3, 1), (3, 16), (5, 17), (3, 50)])
def test_forced_small_chunks(triton_device, rows, n, dtype, logits):
    g = torch.Generator().manual_seed(31 * rows + n)
    x, target = random_rows(rows, n, dtype, logits, g)
    check(x.to(triton_device), target.to(triton_device), logits, tile=Tile(1, 16, False, 4), generator=g)
