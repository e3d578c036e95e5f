"""Log-n attention: the forward's tiles per target family, head dim, dot mode and padding mask.

With chained dots Triton lays the warps along M, so BLOCK_M is 16 rows per warp on mma.sync
targets and 64 rows per warpgroup (4 warps) for wgmma on sm_90: no warp recomputes another's
scores. Each entry was checked with tests/gpu_compile.py (registers, stack, spills, shared memory).
"""

from __future__ import annotations

from typing import NamedTuple

from .logn_attention_rules import FP32_IEEE, TF32, block_d, tile_candidates, tile_mode


class Tiles(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# (family, padded head dim) -> tiles for 16-bit inputs. BLOCK_M equals
# 16 * num_warps (mma.sync) or 64 * num_warps / 4 (wgmma) or more, so no S tile is replicated.
# Shared memory: q (BLOCK_M x D) plus num_stages copies of the k and v tiles must fit the target
# (163 KB on sm_80, 99 KB on sm_86 / sm_89, 227 KB on sm_90); the tables were checked with
# tests/gpu_compile.py for registers, spills and shared memory.
_TILES_16 = {
    90: {
        16: Tiles(128, 128, 8, 3),
        32: Tiles(128, 128, 8, 3),
        64: Tiles(128, 128, 8, 3),
        128: Tiles(128, 64, 8, 3),
        256: Tiles(128, 64, 8, 2),
    },
    80: {
        16: Tiles(128, 64, 4, 3),
        32: Tiles(128, 64, 4, 3),
        64: Tiles(128, 64, 8, 3),
        128: Tiles(128, 32, 8, 3),
        256: Tiles(128, 16, 8, 2),
    },
    86: {
        16: Tiles(128, 64, 4, 2),
        32: Tiles(128, 64, 4, 2),
        64: Tiles(128, 64, 8, 2),
        128: Tiles(128, 32, 8, 2),
        256: Tiles(64, 32, 4, 1),
    },
}
# d=256 runs as two programs of 128 output columns each (value_block in logn_attention_rules.py):
# each holds a 128-column float32 accumulator, and q, k at all 256 columns for the scores. Checked
# clean in every switch form (triton 3.9): sm_90 128 x 64 on 8 warps in 2 stages (176..248
# registers, 161 KB), sm_80 128 x 16 on 8 warps in 2 stages (128..168 registers, 76 KB), sm_86 /
# sm_89 64 x 32 on 4 warps in 1 stage (168..241, 48 KB; 128 x 16 in 2 stages kept 8 bytes). One
# program holding all 256 columns kept 16..448 bytes of stack on every tile tried.
# A padding mask costs registers the sm_80 d=128 tile lacks (255 registers and an 8-byte stack
# with 32 keys): half the keys per step there.
_TILES_16_MASK = {(80, 128): Tiles(128, 16, 8, 3)}
# float32 without TF32: FMA dots, no tensor cores; the operands stay in registers, hence the
# small tiles (sized to compile without spills).
_TILES_IEEE = {
    16: Tiles(32, 32, 4, 2),
    32: Tiles(32, 32, 4, 2),
    64: Tiles(32, 32, 4, 2),
    128: Tiles(16, 32, 8, 2),
    256: Tiles(16, 16, 8, 2),
}


# float32 with allow_tf32: tensor-core dots on 4-byte operands, so each tile of q, k and v takes
# twice the registers and shared memory of its 16-bit counterpart. BLOCK_M keeps 16 rows a warp
# (64 a warpgroup on sm_90); the keys per step are cut until the heaviest form (causal + padding
# mask + gradmax) compiled without a stack (tests/gpu_compile.py, triton 3.9): sm_90 128x64 kept
# 56 bytes at d=64 and d=128 (two stages), so 32 keys there, and one stage at d=128 (234
# registers); sm_80 64x32 kept 32 bytes at d=64. At d=128 the sm_80 family takes 128 rows on 8
# warps: Triton lays the warps of chained dots along M only when the second dot's tile (BLOCK_M x
# BLOCK_D) is at least as tall as it is wide, so 64 x 16 on 4 warps went along the 16 keys (score
# tile replicated twice). 128 x 16 on 8 warps compiles clean on sm_80 and sm_86 (172..255
# registers, 80 KB); 128 x 32 kept 16..32 bytes on sm_80 for padded heads (72, 96).
_TILES_TF32 = {
    90: {16: Tiles(128, 32, 8, 2), 32: Tiles(128, 32, 8, 2), 64: Tiles(128, 32, 8, 2), 128: Tiles(128, 32, 8, 1)},
    80: {16: Tiles(64, 32, 4, 2), 32: Tiles(64, 32, 4, 2), 64: Tiles(64, 16, 4, 2), 128: Tiles(128, 16, 8, 2)},
}
_TILES_TF32[86] = _TILES_TF32[80]
_TILES_TF32_WIDE = Tiles(16, 16, 1, 1)  # d=256 TF32 (interpreter only: max_head_dim), as small as a dot goes


def tiles(family: int, head_dim: int, dot_mode: int, has_mask: bool = False) -> Tiles:
    """The forward tiles for a target family (see ``arch_family``), head size, dot mode and
    padding mask. d=256 runs on GPUs for 16-bit inputs only (``max_head_dim`` in
    logn_attention_rules.py); its other entries serve the interpreter."""
    d = block_d(head_dim)
    dot_mode = tile_mode(dot_mode)
    if dot_mode == FP32_IEEE:
        return _TILES_IEEE[d]
    if dot_mode == TF32:
        return _TILES_TF32[family].get(d, _TILES_TF32_WIDE)
    if has_mask and (family, d) in _TILES_16_MASK:
        return _TILES_16_MASK[family, d]
    if has_mask and family == 90 and d == 128 and head_dim != d:
        # a padded head (96, 80...) with a mask: the column masks tip 128x64 over (16 B of stack)
        return Tiles(128, 32, 8, 3)
    if family == 86 and d == 128 and head_dim != d:
        # a padded head on sm_86 / sm_89: 128x32 in two stages kept 16 B of stack (causal varlen)
        return Tiles(128, 16, 8, 2)
    return _TILES_16[family][d]


# Further clean 16-bit tiles the launcher times against the default (triton_kernels/_tile_tuner.py):
# 64 rows on 4 warps give twice the programs of the default's 128 (short sequences, few heads);
# 128 x 128 in one stage on sm_90 halves the key steps of 128 x 64 at d=128. Each is listed in
# AOT_CONFIGS and checked with tests/gpu_compile.py like the defaults. Left out because they kept a
# stack (triton 3.9): sm_80 64 x 64 on 4 warps at d=64 (8..40 B, either stage count), sm_80 64 x 32
# at d=128 (16 B), 64 x 128 on 4 warps at d=128 on sm_90 (24..72 B); and every d=128 alternate
# with a padding mask (24..72 B), so d=128 has alternates without a mask only.
_ALTERNATES_16 = {
    (90, 64): (Tiles(64, 128, 4, 3),),
    (86, 64): (Tiles(64, 64, 4, 2),),
    (90, 128): (Tiles(64, 64, 4, 2), Tiles(128, 128, 8, 1)),
    (86, 128): (Tiles(64, 32, 4, 2),),
}
_UNMASKED_ONLY = {(90, 128), (86, 128)}


def candidates(family: int, head_dim: int, dot_mode: int, has_mask: bool = False) -> tuple[Tiles, ...]:
    """The tiles the launcher may run for these arguments: :func:`tiles`' default first, then the
    alternates it is timed against. Only 16-bit inputs whose default is the plain table entry
    have alternates (the mask and padded-head special cases were each fitted to one tile)."""
    d = block_d(head_dim)
    alternates = () if has_mask and (family, d) in _UNMASKED_ONLY else _ALTERNATES_16.get((family, d), ())
    return tile_candidates(tiles(family, head_dim, dot_mode, has_mask), _TILES_16[family][d], alternates, dot_mode)
