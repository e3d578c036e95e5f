"""The RoPE prologue of the GlobalPointer Triton kernels (``load_rotated``), bit for bit under the
interpreter (TRITON_INTERPRET=1): the interleaved layout reads each row once and swaps the pairs in
registers, and must give exactly what the element-wise rotation with the neighbour read by a
second load gave: ``(x_c cos + x_{c^1} sin sign_c) * scale``, each operation rounded in float32.
"""

from __future__ import annotations

import pytest
import torch

from kexue._rope import rope_angles

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kexue.triton_kernels import global_pointer as K  # noqa: E402  (after the skip)
from kexue.triton_kernels.global_pointer_rope import load_rotated, store_unrotated  # noqa: E402


@triton.jit
def _rotated_rows_kernel(x_ptr, rope_ptr, out_ptr, L, scale, M: tl.constexpr, WIDTH: tl.constexpr, ROPE: tl.constexpr):
    pos = tl.program_id(0) * M + tl.arange(0, M)
    ok = pos < L
    tile = load_rotated(x_ptr, 0, pos, ok, rope_ptr, scale, WIDTH, ROPE)
    c = tl.arange(0, WIDTH)
    tl.store(out_ptr + pos[:, None] * WIDTH + c[None, :], tile, mask=ok[:, None])


@triton.jit
def _unrotated_rows_kernel(
    g_ptr, rope_ptr, out_ptr, L, scale, M: tl.constexpr, WIDTH: tl.constexpr, ROPE: tl.constexpr
):
    pos = tl.program_id(0) * M + tl.arange(0, M)
    ok = pos < L
    c = tl.arange(0, WIDTH)
    value = tl.load(g_ptr + pos[:, None] * WIDTH + c[None, :], mask=ok[:, None], other=0.0)
    store_unrotated(out_ptr, 0, pos, ok, rope_ptr, scale, value, WIDTH, ROPE)


def _angles(length, d, width):
    """float32 cos and sin per pair, from the float64 angles (1 and 0 on the padded pairs)."""
    ang = rope_angles(length, d, 1e4)
    cos = torch.ones(length, width // 2, dtype=torch.float64)
    sin = torch.zeros(length, width // 2, dtype=torch.float64)
    cos[:, : d // 2], sin[:, : d // 2] = torch.cos(ang), torch.sin(ang)
    return cos.float(), sin.float()


def _expected(x, d, rope, scale):
    """The rotated rows in pair order, element by element as the kernels' old prologue did: the
    angles' cos and sin rounded once to float32 (1 and 0 on the padded pairs), then each product
    and sum rounded in float32."""
    length, width = x.shape
    half = width // 2
    cos, sin = _angles(length, d, width)
    x = x.float()
    c = torch.arange(width)
    if rope == 1:
        sign = torch.where(c % 2 == 0, -1.0, 1.0)
        return (x * cos[:, c // 2] + x[:, c ^ 1] * sin[:, c // 2] * sign) * scale
    a, b = x[:, :half], x[:, half:]
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
    expected = _expected(rows, d, rope, scale).to(rows.dtype)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rope", [1, 2])
@pytest.mark.parametrize(("d", "width"), [(64, 64), (40, 64), (128, 128)])
def test_store_unrotated_is_the_pairwise_inverse_rotation_bit_for_bit(rope, d, width):
    """dq/dk tiles (float32, pair order) rotated back as the kernels' old epilogue did: pair p's
    gradients (g_a, g_b) become ``(g_a cos + g_b sin) * scale`` and ``(g_b cos - g_a sin) * scale``."""
    length, block = 37, 16
    g = torch.randn(length, width, generator=torch.Generator().manual_seed(d + rope), dtype=torch.float64).float()
    table = K._rope_table(length, d, width, 1e4, rope, g.device)
    out = torch.full((length, width), float("nan"))
    scale = 1.0 / d**0.5
    _unrotated_rows_kernel[(triton.cdiv(length, block),)](g, table, out, length, scale, block, width, rope)
    cos, sin = _angles(length, d, width)
    ga, gb = g[:, 0::2], g[:, 1::2]
    da, db = (ga * cos + gb * sin) * scale, (gb * cos - ga * sin) * scale
    expected = torch.empty_like(g)
    if rope == 1:
        expected[:, 0::2], expected[:, 1::2] = da, db
    else:
        expected[:, : width // 2], expected[:, width // 2 :] = da, db
    assert torch.equal(out, expected)
