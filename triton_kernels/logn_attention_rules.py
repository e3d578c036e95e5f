"""Log-n attention: the pieces every Triton kernel of the family shares.

Which keys a query row sees and how many (:func:`visible`, :func:`allowed`), the per-row softmax
scale that count gives (:func:`row_scale`, the rule of csrc/include/kexue/logn_attention.h), the
dot in each precision mode (:func:`dot`), the row range of a packed sequence, and the target
family the tile tables are keyed by (:func:`arch_family`). No kernel lives here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _tile_tuner

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def block_d(head_dim: int) -> int:
    """head_dim padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(head_dim))


# The widest slice of value / output columns one program accumulates. A wider head (256) is cut
# into slices, one program each along the grid's third axis: every slice computes the block's full
# scores (q.k over all columns), and keeps float32 accumulators for its slice only. At d=256 that
# costs one more q.k per key tile (forward 1.5x the flops of one program, dK/dV likewise), and it
# is what fits: one program holding 256 accumulator columns kept 16..448 bytes of stack on every
# tile tried (sm_80 to sm_90, triton 3.9), the split compiles clean (tests/gpu_compile.py).
MAX_VALUE_BLOCK = 128


# The widest head a GPU runs here. 256 for 16-bit inputs, whose d=256 tiles (output columns split
# into slices, see MAX_VALUE_BLOCK) compile clean on every target family. 128 for float32 with
# TF32: no d=256 tile was fitted for it. The dispatcher (python/kexue/ops/_logn_attention_backends.py)
# sends wider heads on a GPU elsewhere; the interpreter runs every width.
WIDE_HEAD_DIM = 256
NARROW_HEAD_DIM = 128


def max_head_dim(mode: int) -> int:
    """The widest head the kernels serve on a GPU in dot ``mode`` (an interpreter mode counts as
    the GPU mode it stands for, see :func:`tile_mode`); the same on every target family."""
    return WIDE_HEAD_DIM if tile_mode(mode) == NATIVE else NARROW_HEAD_DIM


# The head sizes the forward and backward AOT lists compile, one per class of padded width and
# EVEN_D: 96 runs in a 128-column BLOCK_D (EVEN_D off); 40 and 72 are not multiples of 16 (D
# unaligned, rows padded to 48 / 80 by the launchers).
AOT_HEAD_DIMS = (16, 32, 40, 64, 72, 96, 128)


def aot_head_dims(mode: int) -> tuple:
    """:data:`AOT_HEAD_DIMS`, and 256 where :func:`max_head_dim` allows it in ``mode``."""
    return AOT_HEAD_DIMS + ((WIDE_HEAD_DIM,) if max_head_dim(mode) >= WIDE_HEAD_DIM else ())


def value_block(head_dim: int, widest: int = MAX_VALUE_BLOCK) -> int:
    """BLOCK_DV: the output columns a program owns (``block_d`` up to ``widest``; a kernel whose
    tiles need narrower slices on some target passes its own, see the dK/dV tiles)."""
    return min(block_d(head_dim), widest)


def value_slices(head_dim: int, block_dv: int | None = None) -> int:
    """How many programs share a row block's output columns (the grid's third axis)."""
    return block_d(head_dim) // (block_dv or value_block(head_dim))


def row_length(head_dim: int) -> int:
    """The row length (elements) the kernels see: ``head_dim`` rounded up to a multiple of 16.

    The JIT compiles 16-byte vector loads only for row strides, and column masks (``col < D``),
    that it knows to be multiples of 16; with a head dim like 40 or 72 it compiled scalar loads
    whose addresses took the registers, and every forward tile tried kept a stack (16..800 bytes,
    sm_80 to sm_90, triton 3.9). The launchers in :mod:`.logn_attention` therefore copy such
    inputs into zero-padded rows of this length and launch with ``D = row_length(head_dim)``: the
    zero columns add nothing to q.k, give zero output / gradient columns, and are sliced away.
    The softmax scale still uses the true head dim (it is passed as a scalar)."""
    return -(-head_dim // 16) * 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def arch_family(device: torch.device) -> int:
    """The tile table a device uses: 90 (Hopper and newer datacentre parts: wgmma, 227 KB of
    shared memory a block), 80 (A100: mma.sync, 163 KB), 86 (the other Ampere / Ada parts, 99 KB).
    The interpreter runs the sm_80 tiles, so the tests exercise a shipped configuration."""
    if device.type != "cuda" or interpreting():
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9 or major == 10:
        return 90
    if (major, minor) == (8, 0):
        return 80
    return 86


# The dot modes (the kernels' ``IEEE`` constexpr): how tl.dot treats its operands.
NATIVE = 0  # fp16 / bf16 on tensor cores
FP32_IEEE = 1  # float32 without TF32: FMA units, full float32 products
BF16_INTERPRETED = 2  # bfloat16 under the interpreter (operands widened, see dot)
TF32 = 3  # float32 with allow_tf32: tensor cores, operands read as TF32 (10 mantissa bits)
TF32_INTERPRETED = 4  # allow_tf32 under the interpreter: the operands truncated to TF32 in the kernel


def dot_mode(dtype: torch.dtype, allow_tf32: bool = False) -> int:
    """The dot mode of ``dtype`` inputs; ``allow_tf32`` only changes float32."""
    if dtype == torch.float32:
        if not allow_tf32:
            return FP32_IEEE
        return TF32_INTERPRETED if interpreting() else TF32
    if dtype == torch.bfloat16 and interpreting():
        return BF16_INTERPRETED
    return NATIVE


def tile_mode(mode: int) -> int:
    """The dot mode whose tile table a mode uses: the interpreter's stand-ins run the tiles of the
    mode they stand for, so the tests exercise shipped configurations."""
    return {BF16_INTERPRETED: NATIVE, TF32_INTERPRETED: TF32}.get(mode, mode)


def tile_candidates(default, table_entry, alternates: tuple, mode: int) -> tuple:
    """The tiles a launcher may time for one kernel (triton_kernels/_tile_tuner.py): ``default``
    first, then ``alternates``. Only 16-bit inputs whose default is the plain table entry
    ``table_entry`` have alternates: the float32 tiles and the special cases (padding masks, padded
    heads) were each fitted to one tile, and the alternates were checked only in the plain forms."""
    if tile_mode(mode) != NATIVE or default != table_entry:
        return (default,)
    return (default, *alternates)


def tuning_key(kernel: str, family: int, d: int, dtype: torch.dtype, flags: dict, max_len: int) -> tuple:
    """The tuner's key of one launch: the kernel, target family, padded head dim, dtype, the
    kernel's switches (its constexpr flags) and the length bucket of the longest sequence."""
    return (kernel, family, d, dtype, tuple(sorted(flags.items())), _tile_tuner.length_bucket(max_len))


@triton.jit
def _tf32(x):
    """float32 ``x`` with the 13 low mantissa bits cleared: what a TF32 tensor-core dot reads of an
    operand that Triton hands it unrounded (its tf32 dots insert no cvt.rna), i.e. truncation."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # IEEE == 2: the interpreter with bfloat16 operands, whose tl.dot returns garbage in triton 3.9
    # (seen here: errors of 1e10 on a 16x16 product); the operands go to float32 first.
    # IEEE == 4: the interpreter ignores input_precision (numpy float32 products), so the TF32
    # operand rounding is applied here, and the tests see the error a GPU would give.
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    if IEEE == 3:
        return tl.dot(a, b, input_precision="tf32")
    if IEEE == 4:
        return tl.dot(_tf32(a), _tf32(b), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def value_columns(dcol, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The output columns of this program: all of ``dcol`` or its ``program_id(2)``-th slice of
    BLOCK_DV (see :data:`MAX_VALUE_BLOCK`)."""
    if BLOCK_DV < BLOCK_D:
        cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    else:
        cols = dcol
    return cols


@triton.jit
def sequence_start(cu_ptr, b):
    """Row ``cu[b]`` and length ``cu[b + 1] - cu[b]`` of packed sequence ``b``, both int64: the
    row loops then count in int64, and ``row * (heads * D)`` cannot overflow in a long sequence."""
    start = tl.load(cu_ptr + b).to(tl.int64)
    return start, tl.load(cu_ptr + b + 1).to(tl.int64) - start


@triton.jit
def visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Number of keys each of ``rows`` may see (int32)."""
    if CAUSAL:
        last = tl.minimum(tl.maximum(rows + (Lk - Lq) + 1, 0), Lk)
    else:
        last = tl.zeros_like(rows) + Lk
    if HAS_MASK:
        return tl.load(prefix_ptr + b * (Lk + 1) + last).to(tl.int32)
    return last.to(tl.int32)


@triton.jit
def row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN: tl.constexpr, CLIP: tl.constexpr, GRADMAX: tl.constexpr):
    """The softmax scale (fp32) of rows that see ``n`` keys; see kexue/logn_attention.h. Called
    once per row block by each kernel (never per key tile): under GRADMAX it is 30 Newton steps."""
    nf = tl.maximum(n.to(tl.float32), min_n)
    if GRADMAX:
        log_n = tl.log(nf)
        x = tl.zeros_like(nf)
        for _ in tl.static_range(30):
            f = x + tl.log(1.0 + 2.0 * x) - log_n
            x = x - f / (1.0 + 2.0 / (1.0 + 2.0 * x))
        sc = tl.sqrt(x) * inv_sqrt_d
    elif LOGN:
        factor = tl.log(nf) * inv_log_train
        if CLIP:
            factor = tl.maximum(factor, 1.0)
        sc = base * factor
    else:
        sc = tl.zeros_like(nf) + base
    return sc


@triton.jit
def allowed(rows, cols, b, Lq, Lk, mask_ptr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(rows, cols) bool: key ``cols`` is visible to query ``rows``. Only the tests asked for are
    built: ``BOUNDS`` (cols < Lk), ``CAUSAL`` (the diagonal), ``HAS_MASK`` (the padding mask)."""
    ok = tl.full([rows.shape[0], cols.shape[0]], 1, tl.int1)
    if BOUNDS:
        ok = ok & (cols[None, :] < Lk)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
    if HAS_MASK:
        pad = tl.load(mask_ptr + b * Lk + cols, mask=cols < Lk, other=1)
        ok = ok & (pad[None, :] == 0)
    return ok


# Integer arguments that are 1 in ordinary use (Hkv = 1: multi-query models; Hq = 1; Lq = 1 and
# the lse head stride Lq in the backward of a one-token step; Lk = 1, a one-key cache) and that no
# AOT form compiles as multiples of 16 (the packed forms pass Lq, Lk and the lse batch stride as 0
# and never read them). Triton's JIT would compile a 1 as a constant, code the static check never
# compiled: the forward with Hkv the constant 1 kept an 8-byte stack in the sm_80 TF32 d=64
# padding-mask form, and dQ with Lq the constant 1 one in the sm_80 TF32 d=64 form (triton 3.9).
# So the kernels keep them runtime values (``do_not_specialize``), at the cost of a few integer
# operations a program, and of the 16-divisibility hint a length that is a multiple of 16 used
# to get (the lse rows' accesses may be narrower; k/v/q loads are masked by rows only and keep
# their width).
# The AOT lists compile exactly these as runtime ints (``unaligned_ints``), dense and packed alike;
# D and the row strides are multiples of 16 (:func:`row_length`) and keep the JIT's hint.
RUNTIME_INTS = ("Hq", "Hkv", "Lq", "Lk", "stride_lb", "stride_lh")


def gpu_targets(configs: list[dict]) -> list[dict]:
    """The AOT list with every float32 IEEE configuration marked interpreter-only (no GPU target).

    On a GPU the op does not send float32 without ``allow_tf32`` here
    (python/kexue/ops/_logn_attention_backends.py, ``_triton_serves``): without tensor cores its
    FMA-dot tiles keep a stack frame on sm_80/sm_90 (8-64 bytes; the decode kernel's 64-row tile
    several KB), which tests/gpu_compile.py refuses. The interpreter still runs them on CPU
    tensors, so they stay listed for the coverage test. The TF32 configurations (``tf32`` in
    their names) are launched on GPUs and keep their targets.
    """
    return [dict(c, archs=()) if c.get("constexprs", {}).get("IEEE") == FP32_IEEE else c for c in configs]
