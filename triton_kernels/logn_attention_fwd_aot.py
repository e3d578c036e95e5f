"""Every configuration the log-n attention forward launcher (:mod:`.logn_attention_fwd`) can pick,
as ``AOT_CONFIGS`` for tests/gpu_compile.py: each (family, head dim, dtype) with the lightest
switches (non-causal, no mask: the unmasked path alone), the heaviest dense ones (causal + mask +
gradmax) and the packed ones (causal + gradmax + varlen), for every tile candidate the launcher
may time (``candidates``: the default tile and its alternates; an alternate also in the dense
causal form without a mask, as some have no masked form). Head dims that are not multiples of 16
(40, 72) are listed with D unaligned and aligned row strides: the launchers copy such inputs into
rows of a multiple of 16 elements."""

from __future__ import annotations

import torch

from .logn_attention_fwd import candidates, logn_fwd_kernel
from .logn_attention_rules import (
    FP32_IEEE,
    NATIVE,
    RUNTIME_INTS,
    TF32,
    aot_head_dims,
    block_d,
    gpu_targets,
    value_block,
)

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SWITCHES = ((False, False, False, False), (True, True, True, False), (True, False, True, True))
_ARCHS = {90: (90,), 80: (80,), 86: (86, 89)}
# (dtype, dot mode) pairs listed: 16-bit, float32 IEEE (interpreter only), float32 with allow_tf32
_MODES = ((torch.float16, NATIVE), (torch.bfloat16, NATIVE), (torch.float32, FP32_IEEE), (torch.float32, TF32))


def signature(ptr: str) -> dict:
    ints = (
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
    return dict(
        q_ptr=ptr,
        k_ptr=ptr,
        v_ptr=ptr,
        mask_ptr="*u8",
        prefix_ptr="*i32",
        out_ptr=ptr,
        lse_ptr="*fp32",
        cu_q_ptr="*i32",
        cu_k_ptr="*i32",
        **dict.fromkeys(ints, "i32"),
        **dict.fromkeys(("base", "inv_log_train", "min_n", "inv_sqrt_d"), "fp32"),
    )


def _expect(family: int, mode: int) -> tuple:
    """Tensor cores everywhere but float32 IEEE, TF32 operands with allow_tf32, wgmma on sm_90, and
    no replicated score tile."""
    if mode == FP32_IEEE:
        return ()
    need = ("tensor_cores", "no_replication") + (("tf32",) if mode == TF32 else ())
    return need + (("wgmma",) if family == 90 else ())


def _config(family, archs, dtype, mode, d, t, causal, has_mask, gradmax, varlen) -> dict:
    bd = block_d(d)
    consts = dict(
        CAUSAL=causal,
        HAS_MASK=has_mask,
        LOGN=True,
        CLIP=False,
        GRADMAX=gradmax,
        IEEE=mode,
        VARLEN=varlen,
        EVEN_D=d == bd,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_D=bd,
        BLOCK_DV=value_block(d),
    )
    switches = (
        ("causal" if causal else "full")
        + (" mask" if has_mask else "")
        + (" gradmax" if gradmax else "")
        + (" varlen" if varlen else "")
    )
    kind = str(dtype)[6:] + (" tf32" if mode == TF32 else "")
    return dict(
        name=(
            f"logn_fwd {'any-sm' if mode == FP32_IEEE else f'sm{family}'} {kind} d{d} {switches} "
            f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}"
        ),
        kernel=logn_fwd_kernel,
        signature=dict(**signature(_PTR[dtype]), **dict.fromkeys(consts, "constexpr")),
        constexprs=consts,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        archs=archs if mode != FP32_IEEE else (80, 86, 89, 90),
        unaligned_ints=RUNTIME_INTS,
        # the launchers align every pointer (_aligned / _rows there): no plain form
        aligned_only=True,
        expect=_expect(family, mode),
    )


def _aot_configs() -> list[dict]:
    configs = []
    for family, archs in _ARCHS.items():
        for dtype, mode in _MODES:
            if mode == FP32_IEEE and family != 80:
                continue  # the IEEE tiles do not depend on the family: compiled once, for every target
            for d in aot_head_dims(mode):
                for causal, has_mask, gradmax, varlen in _SWITCHES:
                    default, *alternates = candidates(family, d, mode, has_mask)  # d itself: 96 is padded
                    configs.append(_config(family, archs, dtype, mode, d, default, causal, has_mask, gradmax, varlen))
                    # an alternate without a mask is also listed in the dense causal form, which the
                    # default's masked form covers for the default (the same tile, more registers)
                    both = ((causal, has_mask, gradmax, varlen),) + (
                        ((True, False, True, False),) if not causal else ()
                    )
                    for t in alternates:
                        for sw in both:
                            configs.append(_config(family, archs, dtype, mode, d, t, *sw))
    return configs


AOT_CONFIGS = gpu_targets(_aot_configs())
