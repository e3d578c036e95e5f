"""Every configuration the GlobalPointer Triton launchers can pick (each kernel, tile, dtype and
dot precision), as ``AOT_CONFIGS`` for tests/gpu_compile.py's ahead-of-time check."""

from __future__ import annotations

import torch

from .global_pointer_configs import MAX_SERVED_HEAD, Tile, scores_tile_for, supports, tile_for
from .global_pointer_loss_kernels import _gp_loss_bwd_cols_kernel, _gp_loss_bwd_rows_kernel, _gp_loss_fwd_kernel
from .global_pointer_score_kernels import (
    _gp_scores_bwd_cols_kernel,
    _gp_scores_bwd_rows_kernel,
    _gp_scores_fwd_kernel,
)

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _served(dtype: torch.dtype) -> range:
    return range(1, MAX_SERVED_HEAD + 1)


def all_tiles(dtype: torch.dtype) -> list[Tile]:
    if supports(1, dtype, "loss") is not None:
        return []
    return sorted({tile_for(d, dtype) for d in _served(dtype)})


def all_scores_tiles(dtype: torch.dtype) -> list[Tile]:
    return sorted({scores_tile_for(d, dtype) for d in _served(dtype)})


def _config(name, kernel, sig, tile, dtype, prec) -> dict:
    consts = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_H=tile.block_h, DOT_PREC=prec)
    tag = f"{str(dtype).removeprefix('torch.')} {tile.block_m}x{tile.block_n}x{tile.block_h} w{tile.num_warps}"
    if dtype == torch.float32:
        tag += f" {prec}"
    ints = dict(H="i32", T="i32", L="i32", D="i32", TRIL="i32")
    return dict(
        name=f"global_pointer_{name} {tag}",
        kernel=kernel,
        signature=dict(**sig, **ints, **dict.fromkeys(consts, "constexpr")),
        constexprs=consts,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, ptr in _PTR.items():
        csr = dict(row_ptr="*i64", cols_ptr="*i64")
        inputs = dict(q_ptr=ptr, k_ptr=ptr, sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", **csr)
        loss = [
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
        ]
        scores = [
            (
                "scores_fwd",
                _gp_scores_fwd_kernel,
                dict(q_ptr=ptr, k_ptr=ptr, sb_ptr=ptr, eb_ptr=ptr, mask_ptr="*u8", out_ptr=ptr),
            ),
            (
                "scores_bwd_rows",
                _gp_scores_bwd_rows_kernel,
                dict(k_ptr=ptr, mask_ptr="*u8", grad_ptr=ptr, dq_ptr="*fp32", dsb_ptr="*fp32"),
            ),
            (
                "scores_bwd_cols",
                _gp_scores_bwd_cols_kernel,
                dict(q_ptr=ptr, mask_ptr="*u8", grad_ptr=ptr, dk_ptr="*fp32", deb_ptr="*fp32"),
            ),
        ]
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for tiles, kernels in ((all_tiles(dtype), loss), (all_scores_tiles(dtype), scores)):
            for tile in tiles:
                configs += [
                    _config(name, kernel, sig, tile, dtype, prec) for name, kernel, sig in kernels for prec in precs
                ]
    return configs


AOT_CONFIGS = _aot_configs()
