"""Sign optimizers, Triton side: the layout the kernels read.

The per-tensor table's columns and flags come from their one definition, kexue/_sign_table.py;
here they are again as constexpr globals that @triton.jit code can read, next to the launcher's
own address table (one row of tensor addresses per tensor), the tile sizes, the storage codes of
the dtype constexprs, and the int64-address-to-pointer conversion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The table layout comes from its one definition, kexue/_sign_table.py (loaded by path when this
# module is imported from the source tree without kexue, as tests/gpu_compile.py may).
def _load_table():
    try:
        from kexue import _sign_table
    except ImportError:
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[1] / "python" / "kexue" / "_sign_table.py"
        spec = importlib.util.spec_from_file_location("_kexue_sign_table", path)
        _sign_table = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_sign_table)
    return _sign_table


_T = _load_table()
LR, WD, C_M, C_G, M_M, M_G, GSCALE, SHRINK, CENTRE = (
    _T.LR,
    _T.WD,
    _T.C_M,
    _T.C_G,
    _T.M_M,
    _T.M_G,
    _T.GSCALE,
    _T.SHRINK,
    _T.CENTRE,
)
FLAGS, NAN_GROUP, ROW_LEN, MASK_K0, MASK_K1, MASK_THRESHOLD, ROUND_K0, ROUND_K1 = (
    _T.FLAGS,
    _T.NAN_GROUP,
    _T.ROW_LEN,
    _T.MASK_K0,
    _T.MASK_K1,
    _T.MASK_THRESHOLD,
    _T.ROUND_K0,
    _T.ROUND_K1,
)
NUM_FLOATS, NUM_INTS, NUM_DYN = _T.NUM_FLOATS, _T.NUM_INTS, _T.NUM_DYN
D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP = _T.D_LR, _T.D_M_M, _T.D_GSCALE, _T.D_UPDATE, _T.D_SKIP
D_MASK_K0, D_MASK_K1, D_ROUND_K0, D_ROUND_K1 = _T.D_MASK_K0, _T.D_MASK_K1, _T.D_ROUND_K0, _T.D_ROUND_K1
USE_NEW_MOMENTUM, UPDATE, RMS_TENSOR, RMS_ROW = _T.USE_NEW_MOMENTUM, _T.UPDATE, _T.RMS_TENSOR, _T.RMS_ROW
LAZY_ROWS, FREEZE_ABSENT, MASK_F, MASK_D = _T.LAZY_ROWS, _T.FREEZE_ABSENT, _T.MASK_F, _T.MASK_D
MASK_UPDATE, STOCHASTIC_ROUND, SHRINK_NOW, DYNAMIC = _T.MASK_UPDATE, _T.STOCHASTIC_ROUND, _T.SHRINK_NOW, _T.DYNAMIC
RMS_CARRIED, SSQ_OUT = _T.RMS_CARRIED, _T.SSQ_OUT

# The same flags and columns as constexpr globals, readable inside @triton.jit functions.
_K_NEW_MOMENTUM = tl.constexpr(USE_NEW_MOMENTUM)
_K_UPDATE = tl.constexpr(UPDATE)
_K_RMS_TENSOR = tl.constexpr(RMS_TENSOR)
_K_RMS_ROW = tl.constexpr(RMS_ROW)
_K_LAZY_ROWS = tl.constexpr(LAZY_ROWS)
_K_FREEZE_ABSENT = tl.constexpr(FREEZE_ABSENT)
_K_MASK_F = tl.constexpr(MASK_F)
_K_MASK_D = tl.constexpr(MASK_D)
_K_MASK_UPDATE = tl.constexpr(MASK_UPDATE)
_K_STOCHASTIC = tl.constexpr(STOCHASTIC_ROUND)
_K_SHRINK_NOW = tl.constexpr(SHRINK_NOW)
_K_DYNAMIC = tl.constexpr(DYNAMIC)
_K_RMS_CARRIED = tl.constexpr(RMS_CARRIED)
_K_SSQ_OUT = tl.constexpr(SSQ_OUT)
_NF = tl.constexpr(NUM_FLOATS)
_NI = tl.constexpr(NUM_INTS)
_ND = tl.constexpr(NUM_DYN)
_C_LR, _C_WD, _C_CM, _C_CG = tl.constexpr(LR), tl.constexpr(WD), tl.constexpr(C_M), tl.constexpr(C_G)
_C_MM, _C_MG, _C_GSCALE = tl.constexpr(M_M), tl.constexpr(M_G), tl.constexpr(GSCALE)
_C_SHRINK, _C_CENTRE = tl.constexpr(SHRINK), tl.constexpr(CENTRE)
_C_FLAGS, _C_NAN_GROUP, _C_ROW_LEN = tl.constexpr(FLAGS), tl.constexpr(NAN_GROUP), tl.constexpr(ROW_LEN)
_C_MASK_K0, _C_MASK_K1, _C_MASK_THR = tl.constexpr(MASK_K0), tl.constexpr(MASK_K1), tl.constexpr(MASK_THRESHOLD)
_C_ROUND_K0, _C_ROUND_K1 = tl.constexpr(ROUND_K0), tl.constexpr(ROUND_K1)
_D_LR, _D_MM, _D_GSCALE, _D_UPDATE, _D_SKIP = (tl.constexpr(c) for c in (D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP))
_D_MASK_K0, _D_MASK_K1 = tl.constexpr(D_MASK_K0), tl.constexpr(D_MASK_K1)
_D_ROUND_K0, _D_ROUND_K1 = tl.constexpr(D_ROUND_K0), tl.constexpr(D_ROUND_K1)

# Columns of the address table (the launcher's own, not part of the op's contract).
A_PARAM, A_GRAD, A_MOM, A_MASK, A_SEEN, A_SSQ = range(6)
NUM_ADDRS = 6
_A_PARAM, _A_GRAD, _A_MOM, _A_MASK, _A_SEEN, _A_SSQ = (
    tl.constexpr(c) for c in (A_PARAM, A_GRAD, A_MOM, A_MASK, A_SEEN, A_SSQ)
)
_NA = tl.constexpr(NUM_ADDRS)

CHUNK = 65536  # elements per work item (as ATen's multi_tensor_apply)
# Elements per tile of the element-wise sweeps. The vector form: Triton gives a thread at most
# BLOCK / (32 * warps) contiguous elements, so a 16-byte access of 16-bit data (8 elements) needs
# BLOCK >= 2048 with 8 warps. The scalar form keeps 512: at 2048, 8 scalar elements a thread,
# ptxas needed a stack for the bfloat16 step. A tensor's pre-pass and step use the same VEC, so
# its sums of squares are added over the same tiles in the same order in both.
BLOCK = 2048
SCALAR_BLOCK = 512
# Columns per tile of the row-wise sweeps (rows of any length: looped), and elements per row tile
# (ROW_TILE // ROW_COLS rows): 2048 took 155 registers a thread on sm_90, 1024 takes ~100-120.
ROW_COLS = 128
ROW_TILE = 1024
_ROW_TILE = tl.constexpr(ROW_TILE)
NUM_WARPS = 8


def block_for(vec: int) -> int:
    """The element tile of the form that serves vector width ``vec``."""
    return BLOCK if vec > 1 else SCALAR_BLOCK


ALIGN = 16  # bytes: the width of ld.global.v4.b32, the widest global access

# Storage codes of the constexpr dtype arguments.
_F32, _BF16, _F16 = 0, 1, 2
_CODES = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}
_TL_NAMES = {_F32: "fp32", _BF16: "bf16", _F16: "fp16"}
_SIZES = {_F32: 4, _BF16: 2, _F16: 2}


def vector_width(pcode: int, mcode: int) -> int:
    """Elements per 16-byte access of the narrowest storage a (param, momentum) pair reads: 4
    for float32 only, 8 when either is 16-bit (the float32 one then takes two 16-byte accesses)."""
    return ALIGN // min(_SIZES[pcode], _SIZES[mcode])


@triton.jit
def _float_ptr(addr, CODE: tl.constexpr, VEC: tl.constexpr):
    """An int64 address as a pointer to the storage type ``CODE``.

    A pointer made from an integer tells Triton nothing about its alignment, so without a hint
    every access is scalar. With ``VEC > 1`` the launcher has checked on the host that the address
    is a multiple of 16 bytes, and says so (``tl.multiple_of``); together with tile offsets that
    are multiples of VEC this lets the compiler emit 16-byte vector loads and stores.
    """
    if CODE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float16))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _byte_ptr(addr, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """An int64 address as a pointer to a byte-sized ``DTYPE`` (masks, row flags), aligned as
    :func:`_float_ptr` says."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _tile_offsets(start, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets of the tile that starts at element ``start``: a multiple of VEC in every tile the
    vector form visits (work items start at multiples of CHUNK, or of a row length that the host
    checked is a multiple of VEC, and full tiles step by BLOCK)."""
    offs = start + tl.arange(0, BLOCK)
    if VEC > 1:
        offs = tl.multiple_of(offs, VEC)
    return offs
