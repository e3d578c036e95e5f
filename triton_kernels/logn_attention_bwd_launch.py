"""Log-n attention backward: the launches of the preprocess, dK/dV and dQ kernels (what the
launchers in :mod:`.logn_attention` call). See :mod:`.logn_attention_bwd_tiles` for the split.
"""

from __future__ import annotations

import torch
import triton

from .logn_attention_bwd_dkdv import logn_bwd_dkdv_kernel
from .logn_attention_bwd_dq import logn_bwd_dq_kernel
from .logn_attention_bwd_prep import PREP_ROWS, logn_bwd_prep_kernel
from .logn_attention_bwd_tiles import tiles
from .logn_attention_rules import block_d, row_length


def launch(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, pb, mask_u8, prefix, scalars, flags, family: int):
    """dq like q, dk / dv like k / v (input dtype), over problem ``pb`` (see the launchers)."""
    d, hq, hkv = row_length(q.shape[-1]), q.shape[1], k.shape[1]  # rows padded by the launchers
    even_d, bd = d == block_d(d), block_d(d)
    delta = torch.empty_like(lse)
    sc = torch.empty_like(lse)
    dlse = lse if grad_lse is None else grad_lse  # never read without HAS_DLSE
    rule = {key: flags[key] for key in ("CAUSAL", "HAS_MASK", "LOGN", "CLIP", "GRADMAX", "VARLEN")}
    logn_bwd_prep_kernel[(pb.nseq * hq, triton.cdiv(pb.max_q, PREP_ROWS))](
        out,
        grad_out,
        dlse,
        delta,
        sc,
        mask_u8,
        prefix,
        pb.cu_q,
        pb.cu_k,
        hq,
        pb.lq,
        pb.lk,
        d,
        *pb.q_strides,
        *pb.l_strides,
        *scalars,
        **rule,
        HAS_DLSE=grad_lse is not None,
        BLOCK_M=PREP_ROWS,
        BLOCK_D=bd,
        num_warps=4,
    )
    t = tiles(family, d, flags["IEEE"])
    common = dict(
        CAUSAL=flags["CAUSAL"],
        HAS_MASK=flags["HAS_MASK"],
        IEEE=flags["IEEE"],
        VARLEN=flags["VARLEN"],
        EVEN_D=even_d,
        BLOCK_D=bd,
    )
    if pb.max_k > 0:
        logn_bwd_dkdv_kernel[(pb.nseq * hkv, triton.cdiv(pb.max_k, t.dkdv.block_n))](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            sc,
            mask_u8,
            dk,
            dv,
            pb.cu_q,
            pb.cu_k,
            hq,
            hkv,
            pb.lq,
            pb.lk,
            d,
            *pb.q_strides,
            *pb.k_strides,
            *pb.l_strides,
            **common,
            BLOCK_M=t.dkdv.block_m,
            BLOCK_N=t.dkdv.block_n,
            num_warps=t.dkdv.num_warps,
            num_stages=t.dkdv.num_stages,
        )
    if pb.max_q > 0:
        logn_bwd_dq_kernel[(pb.nseq * hq, triton.cdiv(pb.max_q, t.dq.block_m))](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            sc,
            mask_u8,
            dq,
            pb.cu_q,
            pb.cu_k,
            hq,
            hkv,
            pb.lq,
            pb.lk,
            d,
            *pb.q_strides,
            *pb.k_strides,
            *pb.l_strides,
            **common,
            BLOCK_M=t.dq.block_m,
            BLOCK_N=t.dq.block_n,
            num_warps=t.dq.num_warps,
            num_stages=t.dq.num_stages,
        )
