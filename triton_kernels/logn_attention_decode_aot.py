"""The log-n attention decode kernels' configurations (:mod:`.logn_attention_decode`), as
``AOT_CONFIGS`` for tests/gpu_compile.py: the two tile heights the launcher picks, 16 packed rows
(e.g. one token with GQA groups up to 16) and 64 (every larger row count, in row blocks of 64), per
dtype, dot mode and head dim, and the merge at both heights; heads of 256 (16-bit) in 16-row
blocks only. The kernels never see a head count,
length or split count as the constant 1 (``do_not_specialize``), so one form serves Lq = 1 and
multi-query models too."""

from __future__ import annotations

import torch

from .logn_attention_decode import (
    BLOCK_N,
    COMBINE_RUNTIME_INTS,
    MAX_ROWS,
    _block_d,
    _block_rows,
    _num_stages,
    _num_warps,
    logn_decode_combine_kernel,
    logn_decode_split_kernel,
)
from .logn_attention_rules import (
    FP32_IEEE,
    NATIVE,
    RUNTIME_INTS,
    TF32,
    WIDE_HEAD_DIM,
    gpu_targets,
    max_head_dim,
    row_length,
)

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_MODES = ((torch.float16, NATIVE), (torch.bfloat16, NATIVE), (torch.float32, FP32_IEEE), (torch.float32, TF32))
_INTS = ("Hq", "Hkv", "Lq", "Lk", "D", "chunk")
_STRIDES = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn")
_ARCHS = {80: (80,), 86: (86, 89), 90: (90,)}  # target family (arch_family) -> the targets it serves


def _split_config(family: int, dtype, mode: int, head: int, block_r: int, causal: bool, has_mask: bool) -> dict:
    """The split kernel for one case on one target family (``head``: the head size; the kernel
    sees it padded). Head counts and lengths are
    compiled as runtime values, as the kernel asks (``do_not_specialize``)."""
    d = _block_d(row_length(head))
    consts = dict(
        CAUSAL=causal,
        HAS_MASK=has_mask,
        LOGN=True,
        CLIP=False,
        GRADMAX=has_mask,
        IEEE=mode,
        EVEN_D=row_length(head) == d,
        BLOCK_R=block_r,
        BLOCK_N=BLOCK_N,
        BLOCK_D=d,
    )
    ptr = _PTR[dtype]
    sig = dict(
        q_ptr=ptr,
        k_ptr=ptr,
        v_ptr=ptr,
        mask_ptr="*u8",
        prefix_ptr="*i32",
        part_o_ptr="*fp32",
        part_lse_ptr="*fp32",
        **dict.fromkeys(_INTS + _STRIDES, "i32"),
        **dict.fromkeys(("base", "inv_log_train", "min_n", "inv_sqrt_d"), "fp32"),
    )
    sig.update(dict.fromkeys(consts, "constexpr"))
    sig = {name: sig[name] for name in logn_decode_split_kernel.arg_names}  # in the kernel's order
    warps = _num_warps(block_r, d, dtype.itemsize, family)  # as the launcher: by the padded width
    kind = str(dtype)[6:] + (" tf32" if mode == TF32 else "")
    # demanded of every configuration a GPU runs: a table change that replicates a dot fails
    expect = () if mode == FP32_IEEE else ("tensor_cores", "no_replication") + (("tf32",) if mode == TF32 else ())
    target = "any-sm" if mode == FP32_IEEE else f"sm{family}"
    return dict(
        name=(
            f"logn_decode {target} {kind} d{head} rows{block_r} "
            f"{'causal' if causal else 'full'}{' mask gradmax' if has_mask else ''} w{warps}"
        ),
        kernel=logn_decode_split_kernel,
        signature=sig,
        constexprs=consts,
        num_warps=warps,
        num_stages=_num_stages(d, dtype.itemsize, family, block_r),
        archs=_ARCHS[family],
        # chunk is a multiple of BLOCK_N; Lk, and the head counts of the GQA packing, are arbitrary
        unaligned_ints=tuple(n for n in RUNTIME_INTS if n in sig),
        aligned_only=True,  # q, k, v aligned by the launchers; the partials are fresh allocations
        expect=expect,
    )


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, mode in _MODES:
        # 40 and 72: rows padded to 48 / 80, EVEN_D off; 256 where max_head_dim allows
        for head in (16, 32, 64, 128, 40, 72, WIDE_HEAD_DIM):
            if head > max_head_dim(mode):
                continue
            d = _block_d(row_length(head))
            # 16 rows: one token with GQA groups up to 16, or a few tokens of a small group;
            # 64 rows: every larger count, e.g. one token of 17..64 query heads a KV head or 16
            # draft tokens with groups of 4 (the launcher's _block_rows: 16 only at d=256)
            heights = sorted({_block_rows(n, d) for n in (1, MAX_ROWS)})
            for block_r in heights:
                for causal, has_mask in ((True, False), (True, True)):
                    # float32 IEEE: interpreter only (gpu_targets), which runs the sm_80 choices
                    for family in (80,) if mode == FP32_IEEE else _ARCHS:
                        configs.append(_split_config(family, dtype, mode, head, block_r, causal, has_mask))
            if mode == TF32 or head != d:
                continue  # the merge has no dots: the float32 entry serves both modes
            for block_r in heights:
                configs.append(_combine_config(dtype, d, block_r))
    return configs


def _combine_config(dtype, d: int, block_r: int) -> dict:
    """The merge of the splits for one dtype, padded head size and tile height."""
    consts = dict(BLOCK_R=block_r, BLOCK_D=d)
    ints = ("Hq", "Hkv", "Lq", "D", "splits", "stride_qb", "stride_qh", "stride_qm", "stride_lb", "stride_lh")
    sig = dict(
        part_o_ptr="*fp32",
        part_lse_ptr="*fp32",
        out_ptr=_PTR[dtype],
        lse_ptr="*fp32",
        **dict.fromkeys(ints, "i32"),
        **dict.fromkeys(consts, "constexpr"),
    )
    return dict(
        name=f"logn_decode_combine {str(dtype)[6:]} d{d} rows{block_r}",
        kernel=logn_decode_combine_kernel,
        signature=sig,
        constexprs=consts,
        num_warps=4,
        unaligned_ints=tuple(n for n in COMBINE_RUNTIME_INTS if n in sig),
        aligned_only=True,
    )


AOT_CONFIGS = gpu_targets(_aot_configs())
