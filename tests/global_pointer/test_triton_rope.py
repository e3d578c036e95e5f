"""The RoPE prologue of the GlobalPointer Triton kernels (``load_rotated``), bit for bit under the
interpreter (TRITON_INTERPRET=1): the interleaved layout reads each row once and swaps the pairs in
registers, and must give exactly what the element-wise rotation with the neighbour read by a
second load gave: ``(x_c cos + x_{c^1} sin sign_c) * scale``, each operation rounded in float32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)
from kexue.triton_kernels.global_pointer_rope import load_rotated  # noqa: E402


@triton.jit
def _rotated_rows_kernel(x_ptr, rope_ptr, out_ptr, L, scale, M: tl.constexpr, WIDTH: tl.constexpr, ROPE: tl.constexpr):
    pos = tl.program_id(0) * M + tl.arange(0, M)
    ok = pos < L
    tile = load_rotated(x_ptr, 0, pos, ok, rope_ptr, scale, WIDTH, ROPE)
    c = tl.arange(0, WIDTH)
    tl.store(out_ptr + pos[:, None] * WIDTH + c[None, :], tile, mask=ok[:, None])


def _expected(x, table, rope, scale):
    """The rotated rows in pair order, element by element as the kernels' old prologue did."""
    length, width = x.shape
    x = x.float()
    c = torch.arange(width)
    if rope == 1:
        cos, sin = table[:length, 0][:, c // 2], table[:length, 1][:, c // 2]
        sign = torch.where(c % 2 == 0, -1.0, 1.0)
        return (x * cos + x[:, c ^ 1] * sin * sign) * scale
    half = width // 2
    a, b = x[:, :half], x[:, half:]
    cos, sin = table[:length, 0], table[:length, 1]
    out = torch.empty_like(x)
    out[:, 0::2] = (a * cos - b * sin) * scale
    out[:, 1::2] = (b * cos + a * sin) * scale
    return out


@pytest.mark.parametrize("rope", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d", "width"), [(64, 64), (40, 64), (128, 128)])
def test_load_rotated_is_the_elementwise_rotation_bit_for_bit(rope, dtype, d, width):
    length, block = 37, 16  # the last block is partly out of range
    g = torch.Generator().manual_seed(d + rope)
    x = (torch.randn(length, d, generator=g, dtype=torch.float64) * 3).to(dtype)
    rows = K._rows(x, rope, width)  # zero-padded to the head block as the launcher does
    table = K._rope_table(length, d, width, 1e4, rope, x.device)
    out = torch.full((length, width), float("nan"), dtype=rows.dtype)
    scale = 1.0 / d**0.5
    _rotated_rows_kernel[(triton.cdiv(length, block),)](rows, table, out, length, scale, block, width, rope)
    expected = _expected(rows, table, rope, scale).to(rows.dtype)
    assert torch.equal(out, expected)
