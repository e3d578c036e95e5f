"""The log-n attention decode kernels' configurations (:mod:`.logn_attention_decode`), as
``AOT_CONFIGS`` for tests/gpu_compile.py: the packed row counts of Lq = 1 with GQA groups 1..8
(16 rows) and of 16 draft tokens with groups of 4 (64 rows), per dtype and head dim."""

from __future__ import annotations

import torch

from .logn_attention_decode import (
    BLOCK_N,
    _num_stages,
    _num_warps,
    logn_decode_combine_kernel,
    logn_decode_split_kernel,
)
from .logn_attention_rules import gpu_targets

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _aot_configs() -> list[dict]:
    configs = []
    for dtype, ptr in _PTR.items():
        mode = int(dtype == torch.float32)
        for d in (64, 128):  # GPUs stop at 128 (MAX_HEAD_DIM in the launchers)
            for block_r in (16, 64):
                for causal, has_mask, gradmax in ((True, False, False), (True, True, True)):
                    consts = dict(
                        CAUSAL=causal,
                        HAS_MASK=has_mask,
                        LOGN=True,
                        CLIP=False,
                        GRADMAX=gradmax,
                        IEEE=mode,
                        EVEN_D=True,
                        BLOCK_R=block_r,
                        BLOCK_N=BLOCK_N,
                        BLOCK_D=d,
                    )
                    ints = (
                        "Hq",
                        "Hkv",
                        "Lq",
                        "Lk",
                        "D",
                        "chunk",
                        "stride_qb",
                        "stride_qh",
                        "stride_qm",
                        "stride_kb",
                        "stride_kh",
                        "stride_kn",
                    )
                    sig = dict(
                        q_ptr=ptr,
                        k_ptr=ptr,
                        v_ptr=ptr,
                        mask_ptr="*u8",
                        prefix_ptr="*i32",
                        part_o_ptr="*fp32",
                        part_lse_ptr="*fp32",
                        **dict.fromkeys(ints, "i32"),
                        **dict.fromkeys(("base", "inv_log_train", "min_n", "inv_sqrt_d"), "fp32"),
                        **dict.fromkeys(consts, "constexpr"),
                    )
                    warps = _num_warps(block_r)
                    configs.append(
                        dict(
                            name=(
                                f"logn_decode {str(dtype)[6:]} d{d} rows{block_r} {'causal' if causal else 'full'}"
                                f"{' mask gradmax' if has_mask else ''} w{warps}"
                            ),
                            kernel=logn_decode_split_kernel,
                            signature=sig,
                            constexprs=consts,
                            num_warps=warps,
                            num_stages=_num_stages(d),
                            unaligned_ints=("Lq", "Lk", "chunk"),
                            expect=("no_replication", "tensor_cores") if mode == 0 else (),
                        )
                    )
            consts = dict(BLOCK_R=16, BLOCK_D=d)
            ints = ("Hq", "Hkv", "Lq", "D", "splits", "stride_qb", "stride_qh", "stride_qm", "stride_lb", "stride_lh")
            sig = dict(
                part_o_ptr="*fp32",
                part_lse_ptr="*fp32",
                out_ptr=ptr,
                lse_ptr="*fp32",
                **dict.fromkeys(ints, "i32"),
                **dict.fromkeys(consts, "constexpr"),
            )
            configs.append(
                dict(
                    name=f"logn_decode_combine {str(dtype)[6:]} d{d}",
                    kernel=logn_decode_combine_kernel,
                    signature=sig,
                    constexprs=consts,
                    num_warps=4,
                    unaligned_ints=("Lq", "splits"),
                )
            )
    return configs


AOT_CONFIGS = gpu_targets(_aot_configs())
