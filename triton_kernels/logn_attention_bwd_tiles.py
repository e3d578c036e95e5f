"""Log-n attention backward: the tile table and the AOT configurations of its two dot kernels.

The backward is FlashAttention-2's split into three kernels, one module each, plus the launcher:

* :mod:`.logn_attention_bwd_prep`: per query row, ``delta = rowsum(o * dO) - dlse`` and the row's
  softmax scale, both float32, in the layout of ``lse``. The scale rule (30 Newton steps under
  gradmax) thus runs once per (row, head), not once per (key block x query block) in the others.
* :mod:`.logn_attention_bwd_dkdv`: one program per (batch or sequence x key/value head, block of
  keys); it walks every (query head of its group, query block) that sees its keys in one flat
  loop, accumulates dK and dV in float32 registers and writes them once, in the input dtype (no
  per-query-head slabs, no reduction afterwards, no atomics). Causal programs skip the query
  blocks before their keys and mask only the blocks that straddle the diagonal.
* :mod:`.logn_attention_bwd_dq`: one program per (batch or sequence x query head, block of
  queries), two-stage like the forward.
* :mod:`.logn_attention_bwd_launch`: the three launches.

Tiles: the dK/dV dots have the key block as M, the dQ dots the query block, so each is 64 rows a
warpgroup (wgmma on sm_90) or 16 rows a warp (mma.sync), as in the forward. This module holds
what the kernel modules and the launcher share: :func:`tiles`, the tile :func:`candidates` the
launcher times per kernel (triton_kernels/_tile_tuner.py) and :func:`attention_configs`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .logn_attention_rules import (
    FP32_IEEE,
    NATIVE,
    RUNTIME_INTS,
    TF32,
    aot_head_dims,
    block_d,
    gpu_targets,
    tile_candidates,
    tile_mode,
    value_block,
)


class Tiles(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


class BwdTiles(NamedTuple):
    dkdv: Tiles  # block_n: keys per program (the dots' M), block_m: queries per step
    dq: Tiles  # block_m: queries per program (the dots' M), block_n: keys per step


# family -> padded head dim -> tiles for 16-bit inputs. dK/dV: the key block is the dots' M, so
# 16 rows a warp (mma.sync) or 64 a warpgroup (wgmma on sm_90); 16 query rows a step keep the
# score tile (keys x 16 fp32) small next to the dK and dV accumulators (keys x d fp32 each).
# Which warp layout Triton gives the dots decides replication, not the tile alone: the four dots
# are chained (scores feed the dK / dV products), and for chained mma.sync dots Triton (3.9) puts
# every warp along M when M >= N, along N otherwise, where N is the head dim of the dK / dV
# products. So at d=128, 64 keys on 4 warps lay the warps along the 16 query columns of the score
# tile (64 x 16 on [1, 4] warps: replicated, 246..255 registers, no stack), and 32 keys on 8 warps
# likewise (the table's tile until then); 128 keys on 8 warps are 128 x 128 (warps along the
# keys, 16 rows each: unreplicated), as on sm_90. That holds up to d=128 since the loop over
# (query head, query block) is flat and the store offsets are recomputed after it (see the
# kernel).
_T = Tiles
_TILES_16 = {
    90: {d: BwdTiles(_T(16, 128, 8, 2), _T(128, 64, 8, 2)) for d in (16, 32, 64, 128)},
    80: {
        16: BwdTiles(_T(16, 64, 4, 2), _T(64, 32, 4, 1)),
        32: BwdTiles(_T(16, 64, 4, 1), _T(64, 32, 4, 1)),
        64: BwdTiles(_T(16, 64, 4, 3), _T(64, 32, 4, 2)),
        # 242..255 registers, no stack, with 1, 2 or 3 stages (72 KB with 2) on sm_80 / 86 / 89
        128: BwdTiles(_T(16, 128, 8, 2), _T(64, 32, 4, 2)),
    },
}
# d=256: dK/dV and dQ as two programs of 128 output columns each (value_block in
# logn_attention_rules.py), scores over all 256 columns in each. Clean in every switch form
# (triton 3.9): sm_90 dK/dV 16 x 128 on 8 warps in 2 stages (211..240 registers, 177 KB), dQ
# 128 x 32 on 8 warps in 2 stages (158..201, 209 KB); sm_80 dK/dV 16 x 128 on 8 warps in 2 stages
# (223..246, 152 KB), dQ 128 x 16 on 8 warps in 1 stage (232..252, 132 KB). sm_86 / sm_89 (99 KB):
# 16 x 128 dK/dV needs 152 KB and 16 x 32 on 2 warps kept 8..200 bytes of stack with 128-column
# slices, so dK/dV there takes 64-column slices (four programs a key block, see value_width):
# 16 x 64 on 4 warps in 2 stages (128 registers, 84 KB; in 1 stage it kept 8..56 bytes); dQ 64 x 32
# on 4 warps in 1 stage (218..254, 80 KB).
_TILES_16[90][256] = BwdTiles(_T(16, 128, 8, 2), _T(128, 32, 8, 2))
_TILES_16[80][256] = BwdTiles(_T(16, 128, 8, 2), _T(128, 16, 8, 1))
_TILES_16[86] = {**_TILES_16[80], 256: BwdTiles(_T(16, 64, 4, 2), _T(64, 32, 4, 1))}
# float32 without TF32 (FMA dots): small tiles, sized to compile without spills
_TILES_IEEE = {
    16: BwdTiles(_T(16, 32, 2, 2), _T(16, 32, 2, 2)),
    32: BwdTiles(_T(16, 32, 2, 2), _T(16, 32, 2, 2)),
    64: BwdTiles(_T(16, 32, 4, 2), _T(16, 32, 4, 2)),
    128: BwdTiles(_T(16, 32, 8, 2), _T(16, 32, 4, 2)),
    256: BwdTiles(_T(16, 16, 8, 1), _T(16, 16, 4, 1)),
}


# float32 with allow_tf32 (tensor cores, 4-byte operands): the dots' M as in the 16-bit table
# (16 rows a warp, 64 a warpgroup on sm_90). At d=128 the fp32 dK and dV accumulators take 128
# registers a thread at 16 keys a warp (64 a warpgroup); k and v stay in shared memory (wgmma reads
# them there; mma.sync loads them per step), so what decides is everything else held across the
# loop: the kernel recomputes its store offsets after the loop for that reason (held, they kept
# 56..176 bytes of stack). sm_90 d=128: 128 keys on 8 warps (wgmma, 231..254 registers, 161 KB);
# 64 keys on 4 warps kept 16..56 bytes. sm_86 / sm_89 d=128: 32 keys on 2 warps, two stages
# (clean; the warps split the head dim, see the 16-bit table). sm_80 d=128: 32 keys x 32 query
# rows on 4 warps, two stages (220..250 registers, 80 KB): the warps split the 32 query columns
# of the score tile and the head dim of dK / dV, 8 and 32 columns each, so no warp repeats
# another's products and each holds a quarter of the accumulators (64 registers). Rejected there
# (bytes of stack over the 9 switch x head-dim forms, all at 255 registers): 32 keys on 2 warps
# (32 in the packed form with 2 stages, 8..32 with 1 or 3); 128 keys on 8 warps (64..208 with 1
# stage, 160..256 with 2); 64 keys x 32 rows on 4 warps (8..104 with 1 stage, 0..128 with 2);
# 16 keys on 1 warp (112..264). The old 16 x 32 tile on 4 warps was clean but replicated.
_TILES_TF32 = {
    90: {
        16: BwdTiles(_T(16, 128, 8, 2), _T(128, 32, 8, 2)),
        32: BwdTiles(_T(16, 128, 8, 2), _T(128, 32, 8, 2)),
        64: BwdTiles(_T(16, 64, 4, 2), _T(64, 32, 4, 2)),
        128: BwdTiles(_T(16, 128, 8, 2), _T(64, 16, 4, 1)),
    },
    80: {
        16: BwdTiles(_T(16, 64, 4, 2), _T(64, 32, 4, 2)),
        32: BwdTiles(_T(16, 64, 4, 4), _T(64, 32, 4, 2)),
        64: BwdTiles(_T(16, 32, 2, 2), _T(32, 32, 2, 1)),
        128: BwdTiles(_T(32, 32, 4, 2), _T(32, 16, 2, 1)),
    },
}
# sm_80 family d=32 / d=64: the dK/dV stage counts without the 8..16-byte stacks ptxas kept at
# 128 registers on sm_86 with 16 x 64 on 4 warps, 1 or 2 stages
_TILES_TF32[86] = {**_TILES_TF32[80], 128: BwdTiles(_T(16, 32, 2, 2), _T(32, 16, 2, 1))}


def value_width(kernel: str, family: int, head_dim: int) -> int:
    """BLOCK_DV of the dK/dV (``kernel="dkdv"``) or dQ (``"dq"``) kernel: the output columns one
    program owns. 128-column slices (value_block), but 64 for dK/dV at d=256 on the sm_86 family,
    whose 99 KB of shared memory fit no clean tile with 128."""
    if kernel == "dkdv" and family == 86 and block_d(head_dim) > 128:
        return value_block(head_dim, 64)
    return value_block(head_dim)


def tiles(family: int, head_dim: int, dot_mode: int) -> BwdTiles:
    d = block_d(head_dim)
    dot_mode = tile_mode(dot_mode)
    if dot_mode == FP32_IEEE:
        return _TILES_IEEE[d]
    if dot_mode == TF32:
        return _TILES_TF32[family].get(d, _TILES_IEEE[d])  # d=256: interpreter only (max_head_dim)
    return _TILES_16[family][d]


# Further clean 16-bit tiles the launcher times against the default (triton_kernels/_tile_tuner.py),
# per kernel and (family, head dim), for heads that fill their BLOCK_D (64, 128; a padded head runs
# its default). Each is in AOT_CONFIGS in every switch form listed and checked by
# tests/gpu_compile.py like the defaults (tensor cores, wgmma on sm_90, no replicated tile, no stack
# or spills, shared memory). dK/dV: half the keys a program (twice the programs: short sequences,
# few heads) or twice the query rows a step (half the steps). dQ: half or twice the query rows a
# program. What was tried and left out, and why: docs/logn_attention.md.
_ALTERNATES_16: dict[str, dict[tuple[int, int], tuple[Tiles, ...]]] = {
    "dkdv": {
        (90, 64): (_T(16, 64, 4, 2), _T(32, 128, 8, 2)),
        (90, 128): (_T(16, 64, 4, 2), _T(32, 128, 8, 1)),
        **{(f, 64): (_T(32, 64, 4, 2), _T(16, 128, 8, 2)) for f in (80, 86)},
        # at d=128 only the default's shape compiled clean (see the table): its other stage counts
        **{(f, 128): (_T(16, 128, 8, 1), _T(16, 128, 8, 3)) for f in (80, 86)},
    },
    "dq": {
        (90, 64): (_T(64, 64, 4, 2),),
        (90, 128): (_T(64, 64, 4, 2), _T(128, 32, 8, 2)),
        **{(f, 64): (_T(128, 32, 8, 2),) for f in (80, 86)},
        **{(f, 128): (_T(128, 16, 8, 2),) for f in (80, 86)},
    },
}


def candidates(kernel: str, family: int, head_dim: int, dot_mode: int) -> tuple[Tiles, ...]:
    """The tiles the launcher may run for the dK/dV (``kernel="dkdv"``) or dQ (``"dq"``) kernel:
    :func:`tiles`' default first, then the alternates it is timed against."""
    default = getattr(tiles(family, head_dim, dot_mode), kernel)
    plain = getattr(_TILES_16[family][block_d(head_dim)], kernel)
    return tile_candidates(default, plain, _ALTERNATES_16[kernel].get((family, head_dim), ()), dot_mode)


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for tests/gpu_compile.py (see the forward's list).

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SWITCHES = ((False, False, False), (True, True, False), (True, False, True))  # causal, mask, varlen
# (dtype, dot mode) pairs listed: 16-bit, float32 IEEE (interpreter only), float32 with allow_tf32
MODES = ((torch.float16, NATIVE), (torch.bfloat16, NATIVE), (torch.float32, FP32_IEEE), (torch.float32, TF32))
_ARCHS = {80: (80,), 86: (86, 89), 90: (90,)}
_INTS = (
    "Hq",
    "Hkv",
    "Lq",
    "Lk",
    "D",
    "stride_qb",
    "stride_qh",
    "stride_qm",
    "stride_kb",
    "stride_kh",
    "stride_kn",
    "stride_lb",
    "stride_lh",
)


def _expect(family: int, mode: int) -> tuple:
    """What the static check demands: tensor cores for 16-bit and TF32 inputs (TF32 operands for
    the latter), no dot tile replicated across warps on any target, and wgmma on sm_90, for every
    dtype and head dim (demanded, not derived from the tile: a table change that loses them fails
    the check)."""
    if mode == FP32_IEEE:
        return ()
    kind = ("tensor_cores", "tf32") if mode == TF32 else ("tensor_cores",)
    return ("wgmma", "no_replication", *kind) if family == 90 else ("no_replication", *kind)


def config(
    name: str, kernel, outs: tuple[str, ...], family: int, dtype, mode: int, d: int, tile: Tiles, switches
) -> dict:
    """One AOT entry of the dK/dV (``name="dkdv"``) or dQ (``"dq"``) kernel: ``tile`` for that
    kernel at head dim ``d`` (padded rows: 96 is not a BLOCK_D), ``switches`` (causal, mask, varlen)."""
    causal, has_mask, varlen = switches
    bd = block_d(d)
    kind = str(dtype)[6:] + (" tf32" if mode == TF32 else "")
    form = ("causal" if causal else "full") + (" mask" if has_mask else "") + (" varlen" if varlen else "")
    consts = dict(
        CAUSAL=causal,
        HAS_MASK=has_mask,
        IEEE=mode,
        VARLEN=varlen,
        EVEN_D=d == bd,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_D=bd,
        BLOCK_DV=value_width(name, family, d),
    )
    ptr = PTR[dtype]
    sig = dict(
        q_ptr=ptr,
        k_ptr=ptr,
        v_ptr=ptr,
        do_ptr=ptr,
        lse_ptr="*fp32",
        delta_ptr="*fp32",
        sc_ptr="*fp32",
        mask_ptr="*u8",
        **dict.fromkeys(outs, ptr),
        cu_q_ptr="*i32",
        cu_k_ptr="*i32",
        **dict.fromkeys(_INTS, "i32"),
        **dict.fromkeys(consts, "constexpr"),
    )
    return dict(
        name=(
            f"logn_bwd_{name} {'any-sm' if mode == FP32_IEEE else f'sm{family}'} {kind} d{d} "
            f"{form} {tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"
        ),
        kernel=kernel,
        signature=sig,
        constexprs=consts,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        archs=_ARCHS[family] if mode != FP32_IEEE else (80, 86, 89, 90),
        unaligned_ints=RUNTIME_INTS,
        # the launcher aligns every pointer (triton_kernels/_aligned.py): no plain form
        aligned_only=True,
        expect=_expect(family, mode),
    )


def attention_configs(name: str, kernel, outs: tuple[str, ...]) -> list[dict]:
    """The AOT list of the dK/dV (``name="dkdv"``) or dQ (``"dq"``) kernel: every family, dtype,
    head-dim class and switch combination, with ``outs`` the kernel's output pointers. The two
    kernels take the same arguments but their outputs, so one builder serves both."""
    configs = []
    for family in _ARCHS:
        for dtype, mode in MODES:
            if mode == FP32_IEEE and family != 80:
                continue
            for d in aot_head_dims(mode):
                for switches in _SWITCHES:
                    for tile in candidates(name, family, d, mode):
                        configs.append(config(name, kernel, outs, family, dtype, mode, d, tile, switches))
    # make test compiles each kernel's first and last entry (tests/gpu_compile.py, sample()): the
    # lightest 16-bit one (sm_80 d=16) first, the heaviest (sm_90 d=128 causal varlen) last, and the
    # interpreter-only float32 entries, which no target compiles, between them
    wide = [c for c in configs if c["constexprs"]["IEEE"] == FP32_IEEE]
    narrow = [c for c in configs if c["constexprs"]["IEEE"] != FP32_IEEE]
    return gpu_targets(narrow[:1] + wide + narrow[1:])
