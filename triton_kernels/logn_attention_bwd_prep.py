"""Log-n attention backward, preprocess: ``delta`` and the per-row softmax scale.

One program per (batch or sequence x query head, block of rows): ``delta = rowsum(o * dO) - dlse``
and the row's scale (the rule of :func:`.logn_attention_rules.row_scale`, 30 Newton steps under
gradmax), both float32 in the layout of ``lse``, so that the dK/dV and dQ kernels read them per
row instead of recomputing the scale per tile. See :mod:`.logn_attention_bwd_tiles` for the split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logn_attention_bwd_tiles import PTR
from .logn_attention_rules import RUNTIME_INTS, WIDE_HEAD_DIM, gpu_targets, row_scale, sequence_start, visible

PREP_ROWS = 64  # query rows a program


@triton.jit(do_not_specialize=RUNTIME_INTS)
def logn_bwd_prep_kernel(
    out_ptr,
    do_ptr,
    dlse_ptr,
    delta_ptr,
    sc_ptr,
    mask_ptr,
    prefix_ptr,
    cu_q_ptr,
    cu_k_ptr,
    Hq,
    Lq,
    Lk,
    D,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_lb,
    stride_lh,
    base,
    inv_log_train,
    min_n,
    inv_sqrt_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    LOGN: tl.constexpr,
    CLIP: tl.constexpr,
    GRADMAX: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta, sc (and dlse, lse) at strides (lb, lh, 1); out, do at (qb, qh, qm).
    bh = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    b = (bh // Hq).to(tl.int64)  # 32-bit division, then widen
    h = (bh % Hq).to(tl.int64)
    if VARLEN:
        q_start, Lq = sequence_start(cu_q_ptr, b)
        k_start, Lk = sequence_start(cu_k_ptr, b)
        if pid_m * BLOCK_M >= Lq:
            return
        q_off = q_start * stride_qm + h * stride_qh
        l_off = q_start + h * stride_lh
    else:
        q_off = b * stride_qb + h * stride_qh
        l_off = b * stride_lb + h * stride_lh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    io_mask = row_ok[:, None] & (dcol[None, :] < D)
    at = q_off + rows[:, None] * stride_qm + dcol[None, :]
    o = tl.load(out_ptr + at, mask=io_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + at, mask=io_mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + l_off + rows, mask=row_ok, other=0.0)
    n = visible(rows, b, Lq, Lk, prefix_ptr, CAUSAL, HAS_MASK)
    sc = row_scale(n, base, inv_log_train, min_n, inv_sqrt_d, LOGN, CLIP, GRADMAX)
    tl.store(delta_ptr + l_off + rows, delta, mask=row_ok)
    tl.store(sc_ptr + l_off + rows, sc, mask=row_ok)


def _aot_configs() -> list[dict]:
    """No dots: per dtype and padded head size the GPUs take (16 to 128, and 256 for 16-bit
    inputs: :func:`.logn_attention_rules.max_head_dim`), the dense form with every switch on and
    the packed one."""
    configs = []
    for dtype, ptr in PTR.items():
        wide = (WIDE_HEAD_DIM,) if dtype != torch.float32 else ()
        for d in (16, 32, 64, 128) + wide:
            for varlen in (False, True):
                consts = dict(
                    CAUSAL=True,
                    HAS_MASK=not varlen,
                    LOGN=True,
                    CLIP=False,
                    GRADMAX=True,
                    VARLEN=varlen,
                    HAS_DLSE=True,
                    BLOCK_M=PREP_ROWS,
                    BLOCK_D=d,
                )
                ints = ("Hq", "Lq", "Lk", "D", "stride_qb", "stride_qh", "stride_qm", "stride_lb", "stride_lh")
                sig = dict(
                    out_ptr=ptr,
                    do_ptr=ptr,
                    dlse_ptr="*fp32",
                    delta_ptr="*fp32",
                    sc_ptr="*fp32",
                    mask_ptr="*u8",
                    prefix_ptr="*i32",
                    cu_q_ptr="*i32",
                    cu_k_ptr="*i32",
                    **dict.fromkeys(ints, "i32"),
                    **dict.fromkeys(("base", "inv_log_train", "min_n", "inv_sqrt_d"), "fp32"),
                    **dict.fromkeys(consts, "constexpr"),
                )
                configs.append(
                    dict(
                        name=f"logn_bwd_prep {str(dtype)[6:]} d{d} causal {'varlen' if varlen else 'mask'} gradmax",
                        kernel=logn_bwd_prep_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=4,
                        unaligned_ints=tuple(n for n in RUNTIME_INTS if n in ints),
                        aligned_only=True,  # the launcher aligns out, dO and dlse too
                    )
                )
    return configs


AOT_CONFIGS = gpu_targets(_aot_configs())
