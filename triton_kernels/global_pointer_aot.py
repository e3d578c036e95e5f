"""Every configuration the GlobalPointer Triton launchers can pick (each kernel, tile, dtype and
dot precision), as ``AOT_CONFIGS`` for tests/gpu_compile.py's ahead-of-time check."""

from __future__ import annotations

import torch

from .global_pointer_configs import GPU_ARCHS, HOPPER, MAX_SERVED_HEAD, Tile, scores_tile_for, tile_for
from .global_pointer_loss_kernels import _gp_loss_bwd_cols_kernel, _gp_loss_bwd_rows_kernel, _gp_loss_fwd_kernel
from .global_pointer_score_kernels import (
    _gp_scores_bwd_cols_kernel,
    _gp_scores_bwd_rows_kernel,
    _gp_scores_fwd_kernel,
)

_ROPE_TAGS = {0: "no-rope", 1: "rope-interleaved", 2: "rope-half"}  # ROPE: RoPE in the prologue
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _served(dtype: torch.dtype) -> range:
    return range(1, MAX_SERVED_HEAD + 1)


def _by_arch(choose, dtype: torch.dtype) -> list[tuple[Tile, tuple[int, ...]]]:
    """``(tile, the targets it is picked on)`` for every tile ``choose(d, dtype, arch)`` picks."""
    found: dict[Tile, list[int]] = {}
    for arch in GPU_ARCHS:
        for tile in {choose(d, dtype, arch) for d in _served(dtype)}:
            found.setdefault(tile, []).append(arch)
    return sorted((tile, tuple(archs)) for tile, archs in found.items())


def all_tiles(dtype: torch.dtype) -> list[tuple[Tile, tuple[int, ...]]]:
    return _by_arch(tile_for, dtype)


def all_scores_tiles(dtype: torch.dtype) -> list[tuple[Tile, tuple[int, ...]]]:
    return _by_arch(scores_tile_for, dtype)


def _expect(tile: Tile, dtype: torch.dtype, prec: str, archs) -> list[str]:
    """Tensor-core dots for 16-bit operands and TF32 (whose operands must then be read as TF32);
    wgmma where the tile is picked on sm_90 and is tall enough for a warpgroup (64 rows)."""
    expect = ["tensor_cores"] if dtype != torch.float32 or prec == "tf32" else []
    if prec == "tf32":
        expect.append("tf32")
    if expect and HOPPER in archs and tile.block_m >= 64:
        expect.append("wgmma")
    return expect


def _config(name, kernel, sig, tile, dtype, prec, archs=GPU_ARCHS, rope=0) -> dict:
    consts = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, DOT_PREC=prec, ROPE=rope)
    tag = f"{str(dtype).removeprefix('torch.')} {tile.block_m}x{tile.block_n}x{tile.block_h} w{tile.num_warps}"
    if dtype == torch.float32:
        tag += f" {prec}"
    tag += f" {_ROPE_TAGS[rope]}"
    if tuple(archs) != GPU_ARCHS:
        tag += " sm_" + "/".join(map(str, archs))
    ints = dict(H="i32", T="i32", L="i32", D="i32", TRIL="i32")
    floats = dict(SCALE="fp32")
    # The launcher passes 16-byte aligned pointers only (copies of unaligned inputs, rows padded to
    # BLOCK_H channels); its integers are whatever the call has: none is assumed a multiple of 16.
    config = dict(
        name=f"global_pointer_{name} {tag}",
        kernel=kernel,
        signature=dict(**sig, **ints, **floats, **dict.fromkeys(consts, "constexpr")),
        constexprs=consts,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        archs=tuple(archs),
        aligned_only=True,
        unaligned_ints=list(ints),
        expect=_expect(tile, dtype, prec, archs),
    )
    if tile.maxnreg is not None:
        config["maxnreg"] = tile.maxnreg
    return config


def kernel_table(dtype: torch.dtype) -> list[tuple[str, object, dict]]:
    """``(name, kernel, pointer signature)`` of the loss kernels then the scores kernels for
    operands of ``dtype``."""
    ptr = _PTR[dtype]
    csr = dict(row_ptr="*i64", cols_ptr="*i64")
    inputs = dict(q_ptr=ptr, k_ptr=ptr, sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", rope_ptr="*fp32", **csr)
    return [
        ("fwd", _gp_loss_fwd_kernel, dict(**inputs, state_ptr="*fp32")),
        (
            "bwd_rows",
            _gp_loss_bwd_rows_kernel,
            dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dq_ptr="*fp32", dsb_ptr="*fp32"),
        ),
        (
            "bwd_cols",
            _gp_loss_bwd_cols_kernel,
            dict(**inputs, grad_ptr="*fp32", lse_ptr="*fp32", dk_ptr="*fp32", deb_ptr="*fp32"),
        ),
        (
            "scores_fwd",
            _gp_scores_fwd_kernel,
            dict(q_ptr=ptr, k_ptr=ptr, sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", rope_ptr="*fp32", out_ptr=ptr),
        ),
        (
            "scores_bwd_rows",
            _gp_scores_bwd_rows_kernel,
            dict(k_ptr=ptr, mask_ptr="*u8", rope_ptr="*fp32", grad_ptr=ptr, dq_ptr="*fp32", dsb_ptr="*fp32"),
        ),
        (
            "scores_bwd_cols",
            _gp_scores_bwd_cols_kernel,
            dict(q_ptr=ptr, mask_ptr="*u8", rope_ptr="*fp32", grad_ptr=ptr, dk_ptr="*fp32", deb_ptr="*fp32"),
        ),
    ]


def _aot_configs() -> list[dict]:
    configs = []
    for dtype in _PTR:
        table = kernel_table(dtype)
        loss, scores = table[:3], table[3:]
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for tiles, kernels in ((all_tiles(dtype), loss), (all_scores_tiles(dtype), scores)):
            for tile, archs in tiles:
                configs += [
                    _config(name, kernel, sig, tile, dtype, prec, archs, rope)
                    for name, kernel, sig in kernels
                    for prec in precs
                    for rope in _ROPE_TAGS
                ]
    return configs


AOT_CONFIGS = _aot_configs()
