"""Which GlobalPointer Triton configuration serves which call: the tile tables (per head block and
operand dtype), the rule of what the Triton kernels serve (:func:`supports`), and the dtype and
precision the dots read (:func:`operand_dtype`, :func:`dot_precision`). Every table entry is
compiled for every GPU target by :mod:`global_pointer_aot` and tests/gpu_compile.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_h: int
    num_warps: int
    num_stages: int = 1  # no software pipelining: with 2-3 stages the backward kernels spill


MAX_HEAD_SIZE = 128  # the widest head block the kernels are written for (see MAX_SERVED_HEAD)


def _head_block(head_size: int) -> int:
    return 64 if head_size <= 64 else 128


# (head block, fp32 operands?) -> tile. Each entry is a candidate whose kernels (every pass; IEEE
# and TF32 dots for fp32) compiled with no stack frame and no spill in tests/gpu_compile.py (JIT
# and unspecialized forms, sm_80/86/89/90). ptxas's choice is erratic (the fp32 loss columns pass
# used a 24-byte stack at 32 x 32 x 64 over 4 warps on sm_90), hence one measured entry per case.
#
# 128-channel heads: the kernels are written for them (BLOCK_H = 128) and pass the interpreter
# tests, but no tile tried compiled without a stack everywhere (16-bit loss: 32x32 w4 kept 24-120
# bytes in the unspecialized form, 32x32 w8 40 bytes on sm_90, 16x32 / 32x16 w8 8 bytes on sm_80;
# the scores forward at 32x32 w8 8 bytes on sm_86/89; fp32: every 16/32 x 16/32 tile at 4-16
# warps). Until one does, MAX_SERVED_HEAD is 64 and wider heads go to the CUDA C++ kernels.
# fp32 LOSS: with fp32 operands (IEEE or TF32 dots) every loss tile tried kept an 8-48 byte stack
# in the unspecialized form on sm_80 or sm_90 (32x32 w4, 32x16 w2/w4/w8, 16x32 w4/w8, 16x16
# w2/w4/w8), so the loss serves fp16/bf16 only and fp32 goes to the CUDA C++ kernels; the fp32
# scores op has a clean tile.
MAX_SERVED_HEAD = 64
_LOSS_TILES = {
    (64, False): Tile(32, 32, 64, 4),
}
_SCORES_TILES = {
    (64, False): Tile(16, 32, 64, 4),
    (64, True): Tile(32, 16, 64, 4),
}


def _key(head_size: int, dtype: torch.dtype, op: str) -> tuple[int, bool]:
    why = supports(head_size, dtype, op)
    if why is not None:
        raise ValueError(why)
    return _head_block(head_size), operand_dtype(dtype, torch.device("cuda")) == torch.float32


def tile_for(head_size: int, dtype: torch.dtype = torch.bfloat16) -> Tile:
    """The loss kernels' configuration for a head of ``head_size`` channels (padded to a block of
    64, masked loads) and inputs of ``dtype``: score tiles, warps, one pipeline stage."""
    return _LOSS_TILES[_key(head_size, dtype, "loss")]


def scores_tile_for(head_size: int, dtype: torch.dtype = torch.bfloat16) -> Tile:
    """The scores op's configuration, chosen as :func:`tile_for`'s."""
    return _SCORES_TILES[_key(head_size, dtype, "scores")]


def supports(head_size: int, dtype: torch.dtype = torch.bfloat16, op: str = "loss") -> str | None:
    """Why the Triton ``op`` ("loss" or "scores") cannot serve a head of ``head_size`` channels in
    ``dtype``, or None. Only what compiles without a stack frame is served (see the tile tables)."""
    if head_size > MAX_SERVED_HEAD:
        return (
            f"Triton GlobalPointer tiles hold heads up to {MAX_SERVED_HEAD} channels (128-channel tiles "
            f"still use a stack frame), got {head_size}"
        )
    if op == "loss" and dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton GlobalPointer loss serves fp16/bf16 (fp32 loss tiles still use a stack frame), not {dtype}"
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in IEEE, or TF32 when the user opted in as for torch.matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def operand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the rows the dots read: the input's for fp16/bf16 (tensor cores), else fp32.
    bf16 on CPU tensors (the Triton interpreter) is read as fp32: the interpreter multiplies
    bf16 tiles as raw integers (triton 3.x)."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and device.type != "cpu"):
        return dtype
    return torch.float32
