"""Log-n attention: the public function ``kexue.ops.logn_attention``.

It checks the user's arguments and calls the custom ops of :mod:`kexue.ops._logn_attention_ops`
(``kexue::logn_attention`` over dense ``(B, H, L, D)`` tensors, ``kexue::logn_attention_varlen`` over
packed sequences, each with its backward), which dispatch to the backend that :mod:`kexue._backend`
picks (:mod:`kexue.ops._logn_attention_backends`). The checks live in
:mod:`kexue.ops._logn_attention_inputs`. The math is in docs/logn_attention.md,
csrc/include/kexue/logn_attention.h and :mod:`kexue.reference.logn_attention` (which also states the
edge-case definitions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kexue.ops._logn_attention_inputs import (
    MAX_HEAD_DIM,
    _check_bool,
    _check_cu_seqlens,
    _check_mask,
    _check_offsets,
    _check_qkv,
    _check_real,
)
from kexue.ops._logn_attention_ops import logn_attention_op, logn_attention_varlen_op
from kexue.reference import logn_attention as reference

__all__ = ["MAX_HEAD_DIM", "logn_attention"]


def _packed(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, *rule) -> tuple[Tensor, Tensor]:
    cu_q = _check_cu_seqlens("cu_seqlens", cu_seqlens, q.device)
    cu_k = cu_q if cu_seqlens_k is None else _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_k must have one entry per cu_seqlens entry ({cu_q.numel()}), got {cu_k.numel()}")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    # One read of the offsets to the host, to check them (and size the Triton grid), unless the
    # caller gave max_seqlen for CUDA tensors or torch.compile traces this (the op checks then).
    if not torch.compiler.is_compiling() and (max_seqlen is None or q.device.type == "cpu"):
        longest = _check_offsets(cu_q, cu_k, q.shape[0], k.shape[0])
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen ({max_seqlen}) is below the longest sequence ({longest})")
        max_seqlen = longest if max_seqlen is None else max_seqlen
    return logn_attention_varlen_op(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_seqlen, *rule)


def logn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | str | None = None,
    train_len: float = 512,
    logn: bool = True,
    clip: bool = False,
    min_n: float = 1,
    key_padding_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    allow_tf32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Scaled dot-product attention whose per-query scale grows with log of the keys it sees.

    ``out_i = softmax_j(scale_i q_i.k_j) v_j`` with ``scale_i = base * ln(n_i) / ln(train_len)``
    (Su Jianlin, "Entropy invariance of attention", kexue.fm/archives/8823), ``n_i`` being the
    number of keys query ``i`` may see: unpadded keys, and when causal only those up to its
    absolute position (a KV cache of ``Lk - Lq`` keys comes first). Flash-style: no ``(Lq, Lk)``
    matrix is kept; the backward recomputes from the saved log-sum-exp.

    Args:
        q: ``(B, Hq, Lq, D)``; ``k``, ``v``: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (grouped-query
            or multi-query attention), ``D <= 256``. float16, bfloat16, float32 or float64, one dtype.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq``.
        scale: the base scale (default ``1/sqrt(D)``), or ``"gradmax"`` for the gradient-maximising
            scale ``alpha*(n_i)/sqrt(D)`` of kexue.fm/archives/9812 (``exp(a^2)(1+2a^2) = n``), per
            query; ``train_len``, ``logn`` and ``clip`` then play no part.
        train_len: the training length ``m`` of the factor ``log_m n`` (> 1). 512 recovers the
            post's Attention-E; use the model's pretraining length with ``clip=True``.
        logn: ``False`` gives plain scaled dot-product attention (the same kernel).
        clip: use ``max(1, ln n / ln train_len)``, for models not trained with log-n.
        min_n: ``n`` is clamped to at least ``max(1, min_n)`` (bert4keras uses 16).
        key_padding_mask: ``(B, Lk)`` bool, True marks a padding key (as in ``nn.MultiheadAttention``).
        cu_seqlens: packed variable-length sequences, the flash-attn ``varlen`` layout: ``q``
            ``(total_q, Hq, D)``, ``k``, ``v`` ``(total_k, Hkv, D)``, and ``(num_seqs + 1,)`` int32 or
            int64 offsets on q's device, 0 first, ``total_q`` last, non-decreasing: sequence ``s``
            holds rows ``cu_seqlens[s]:cu_seqlens[s + 1]``. Each sequence attends only within itself
            and ``n_i`` is counted in it (causal: the query's position in its sequence, plus the
            sequence's ``Lk - Lq`` when k rows differ, plus one). Empty sequences are allowed.
            Excludes ``key_padding_mask``. Output ``(total_q, Hq, D)``, ``lse (Hq, total_q)`` (as
            flash-attn's varlen functions).
        cu_seqlens_k: the offsets of the k / v rows when they differ from those of q (same
            number of sequences, ``total_k`` last); default ``cu_seqlens``.
        max_seqlen: an upper bound on every sequence length (q and k), which the Triton kernels
            size their grid by. Without it the offsets are read to the host once per call (they
            are checked then too): on CUDA that is one synchronisation, which passing
            ``max_seqlen`` avoids (the offsets are then trusted on CUDA).
        return_lse: also return ``lse (B, Hq, Lq)``, the natural log-sum-exp of each query's scaled
            logits, in float32 (float64 for float64 inputs); it is differentiable.
        allow_tf32: let float32 inputs run their dots on tensor cores with TF32 operands (10
            mantissa bits, as ``torch.backends.cuda.matmul.allow_tf32``): much faster on a GPU,
            with errors of order 1e-3 relative instead of 1e-6 (docs/logn_attention.md states the
            bound). Only the Triton kernels use it; every other backend, and 16-bit or float64
            inputs, compute as without it. Default False: float32 stays IEEE float32.

    On CUDA devices the Triton backend runs a FlashAttention-2 style kernel; a dense call with at
    most 16 queries (generation with a KV cache) takes a split-K decode kernel that reads the cache
    once per key/value head. Heads wider than 128, and float32 inputs without ``allow_tf32``, leave
    Triton there for the CUDA C++ kernel (or, without it or for packed sequences, the reference).

    Returns:
        ``out`` shaped and typed like ``q``, and ``lse`` if ``return_lse``. A query that sees no
        key gets zeros and ``lse = 0``, and no gradient. NaN in a query, or in a key or value it
        sees, propagates to its output (a NaN value may reach queries that a causal mask hides it
        from). Padded keys may hold anything (NaN, inf): they are zeroed before the kernels run.
    """
    packed = cu_seqlens is not None
    if cu_seqlens_k is not None and not packed:
        raise ValueError("cu_seqlens_k needs cu_seqlens (the offsets of the q rows)")
    if max_seqlen is not None and not packed:
        raise ValueError("max_seqlen goes with cu_seqlens (packed sequences)")
    _check_qkv(q, k, v, packed)
    causal = _check_bool("causal", causal)
    logn = _check_bool("logn", logn)
    clip = _check_bool("clip", clip)
    return_lse = _check_bool("return_lse", return_lse)
    allow_tf32 = _check_bool("allow_tf32", allow_tf32)
    gradmax = False
    if isinstance(scale, str):
        if scale != reference.GRADMAX:
            raise ValueError(f"scale must be a positive number, None or 'gradmax', got {scale!r}")
        gradmax, base = True, 1.0 / math.sqrt(q.shape[-1])
    elif scale is None:
        base = 1.0 / math.sqrt(q.shape[-1])
    else:
        base = _check_real("scale", scale, low=0.0, strict=True)
    train_len = _check_real("train_len", train_len, low=1.0, strict=True)
    min_n = _check_real("min_n", min_n, low=0.0, strict=False)
    if packed:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be combined with cu_seqlens: packed sequences have no padding")
        out, lse = _packed(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens_k,
            max_seqlen,
            causal,
            base,
            train_len,
            logn,
            clip,
            min_n,
            gradmax,
            allow_tf32,
        )
        return (out, lse) if return_lse else out
    mask = _check_mask(key_padding_mask, q, k)
    out, lse = logn_attention_op(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        mask,
        causal,
        base,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        allow_tf32,
    )
    return (out, lse) if return_lse else out
