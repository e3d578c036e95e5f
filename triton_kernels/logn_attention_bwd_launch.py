"""Log-n attention backward: the launches of the preprocess, dK/dV and dQ kernels (what the
launchers in :mod:`.logn_attention` call). See :mod:`.logn_attention_bwd_tiles` for the split.
"""

from __future__ import annotations

import torch
import triton

from . import _tile_tuner
from .logn_attention_bwd_dkdv import logn_bwd_dkdv_kernel
from .logn_attention_bwd_dq import logn_bwd_dq_kernel
from .logn_attention_bwd_prep import PREP_ROWS, logn_bwd_prep_kernel
from .logn_attention_bwd_tiles import candidates, value_width
from .logn_attention_rules import block_d, row_length, tuning_key, value_slices


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
    common = dict(
        CAUSAL=flags["CAUSAL"],
        HAS_MASK=flags["HAS_MASK"],
        IEEE=flags["IEEE"],
        VARLEN=flags["VARLEN"],
        EVEN_D=even_d,
        BLOCK_D=bd,
    )
    args = (q, k, v, grad_out, lse, delta, sc, mask_u8)
    shape = (pb.cu_q, pb.cu_k, hq, hkv, pb.lq, pb.lk, d, *pb.q_strides, *pb.k_strides, *pb.l_strides)
    switches = {key: flags[key] for key in ("CAUSAL", "HAS_MASK", "IEEE", "VARLEN")}

    def tuned(name, kernel, outs, programs, length):
        """Launches ``kernel`` over ``programs`` x (``length`` / its rows a program) with the tile
        :func:`._tile_tuner.pick` gives its own key. Both kernels store each element of their
        outputs once (no accumulation into dk, dv or dq, no atomics) and read only inputs and the
        prep kernel's delta and sc, so a timing launch leaves nothing that the winner's launch,
        last, does not overwrite."""

        def run(t):
            per_program = t.block_n if name == "dkdv" else t.block_m  # keys (dK/dV) or queries (dQ)
            block_dv = value_width(name, family, d)
            kernel[(programs, triton.cdiv(length, per_program), value_slices(d, block_dv))](
                *args,
                *outs,
                *shape,
                **common,
                BLOCK_DV=block_dv,
                BLOCK_M=t.block_m,
                BLOCK_N=t.block_n,
                num_warps=t.num_warps,
                num_stages=t.num_stages,
            )

        key = tuning_key(f"logn_bwd_{name}", family, d, q.dtype, switches, max(pb.max_q, pb.max_k))
        _tile_tuner.pick(key, candidates(name, family, d, flags["IEEE"]), run, q.device)

    if pb.max_k > 0:
        tuned("dkdv", logn_bwd_dkdv_kernel, (dk, dv), pb.nseq * hkv, pb.max_k)
    if pb.max_q > 0:
        tuned("dq", logn_bwd_dq_kernel, (dq,), pb.nseq * hq, pb.max_q)
