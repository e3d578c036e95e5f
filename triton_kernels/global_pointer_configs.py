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
    # ptxas's own register budget is erratic on the 128-channel kernels: left to itself it capped
    # the 16 x 32 x 128 loss forward at 96 registers and spilled 8 bytes on sm_80 (the 32 x 32 x 128
    # columns pass over 8 warps: 128 registers and a 32-byte stack on sm_90). An explicit
    # ``.maxnreg`` lets it use what the tile needs; the 128-channel entries set it.
    maxnreg: int | None = None


MAX_HEAD_SIZE = 128  # the widest head block the kernels are written for
MAX_SERVED_HEAD = 128  # the widest head the launchers' tiles serve (every entry compiles clean)
# The compute capabilities the tables are checked for (tests/gpu_compile.py); :func:`tile_for`
# takes the caller's, None for CPU tensors (the interpreter).
GPU_ARCHS = (80, 86, 89, 90)
HOPPER = 90  # wgmma: its warpgroup covers 64 rows, so only tiles with BLOCK_M >= 64 use it


def _head_block(head_size: int) -> int:
    return 64 if head_size <= 64 else 128


# (head block, fp32 operands?) -> tile. Each entry is a candidate whose kernels (every pass; IEEE
# and TF32 dots for fp32) compiled with no stack frame and no spill in tests/gpu_compile.py (the
# JIT form: the launcher passes aligned pointers and rows padded to the head block, see
# global_pointer_aot; sm_80/86/89/90). One measured entry per case: ptxas's choice is erratic.
# fp32 LOSS (docs/global_pointer.md lists the candidates tried): with the dot kept out of the type
# loop (tile_dots) and the interleaved RoPE rotated in its full-width form, fp32 operands compile
# clean in the 16-bit tiles but for one pass: 32 x 32 x 64 over 4 warps kept a 40-104 byte stack
# in the TF32 rows pass with interleaved RoPE (sm_80/90), so 64-channel heads spread it over 8.
_LOSS_TILES = {
    (64, False): Tile(32, 32, 64, 4, maxnreg=255),  # without: a 16-byte stack on sm_86/89
    (64, True): Tile(32, 32, 64, 8, maxnreg=255),  # at most 202 registers (sm_80/90)
    (128, False): Tile(32, 32, 128, 8, maxnreg=255),  # 142-224 registers (sm_80/90)
    (128, True): Tile(32, 32, 128, 8, maxnreg=255),
}
_SCORES_TILES = {  # maxnreg everywhere: left to ptxas, 16x32x64 kept 8 bytes with RoPE on sm_80
    (64, False): Tile(16, 32, 64, 4, maxnreg=255),
    (64, True): Tile(32, 16, 64, 4, maxnreg=255),
    (128, False): Tile(32, 32, 128, 8, maxnreg=255),
    (128, True): Tile(32, 32, 128, 8, maxnreg=255),  # 4 warps: 464-592 byte stacks (fp32 IEEE)
}
# sm_90, 16-bit operands, 128-channel heads: 64 x 64 tiles, whose dots compile to wgmma (every
# pass of the loss and of the scores op, zero stack at 178-250 registers).
_HOPPER_TILES = {
    (128, False): Tile(64, 64, 128, 8, maxnreg=255),
}


def _key(head_size: int, dtype: torch.dtype, op: str) -> tuple[int, bool]:
    why = supports(head_size, dtype, op)
    if why is not None:
        raise ValueError(why)
    return _head_block(head_size), operand_dtype(dtype, torch.device("cuda")) == torch.float32


def tile_for(head_size: int, dtype: torch.dtype = torch.bfloat16, arch: int | None = None) -> Tile:
    """The loss kernels' configuration for a head of ``head_size`` channels (padded to a block of
    64 or 128) and inputs of ``dtype`` on a GPU of compute capability ``arch`` (e.g. 80; None:
    CPU tensors): score tiles, warps, one pipeline stage."""
    key = _key(head_size, dtype, "loss")
    return (_HOPPER_TILES if arch == HOPPER and key in _HOPPER_TILES else _LOSS_TILES)[key]


def scores_tile_for(head_size: int, dtype: torch.dtype = torch.bfloat16, arch: int | None = None) -> Tile:
    """The scores op's configuration, chosen as :func:`tile_for`'s."""
    key = _key(head_size, dtype, "scores")
    return (_HOPPER_TILES if arch == HOPPER and key in _HOPPER_TILES else _SCORES_TILES)[key]


def device_arch(device: torch.device) -> int | None:
    """The compute capability of a CUDA ``device`` as an int (80, 90, ...), None otherwise."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def supports(head_size: int, dtype: torch.dtype = torch.bfloat16, op: str = "loss") -> str | None:
    """Why the Triton ``op`` ("loss" or "scores") cannot serve a head of ``head_size`` channels in
    ``dtype``, or None. Only what compiles without a stack frame is served (see the tile tables)."""
    if head_size > MAX_SERVED_HEAD:
        return f"Triton GlobalPointer tiles hold heads up to {MAX_SERVED_HEAD} channels, got {head_size}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton GlobalPointer {op} serves fp16/bf16/fp32, not {dtype}"
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
