"""Log-n attention: the launchers of the Triton kernels (what the ``triton`` backend calls).

Layout: contiguous ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``, or packed variable-length
sequences (``VARLEN``, the flash-attn varlen layout) ``q (Tq, Hq, D)``, ``k, v (Tk, Hkv, D)`` with
``(nseq + 1,)`` offsets ``cu_q``, ``cu_k``; the kernels take strides, so one body serves both.
Query head ``h`` reads key/value head ``h // (Hq // Hkv)``. A packed program looks its sequence's
rows up in the offsets and returns at once when its block lies past the sequence's end (the grid
is sized by the longest sequence). Each query row's scale is computed in the kernels from the
number of keys it sees (the rule of csrc/include/kexue/logn_attention.h): from its position when
there is no padding mask, from a per-batch prefix count of unpadded keys otherwise. The scale
multiplies the fp32 scores, not q, so 16-bit q is never rounded after scaling. Scores are kept in
base 2 (``exp2``); ``lse`` is returned in natural log.

The kernels: :mod:`.logn_attention_fwd` (forward), :mod:`.logn_attention_bwd_launch` (backward, split by job),
:mod:`.logn_attention_decode` (short queries against a long KV cache); shared pieces in
:mod:`.logn_attention_rules`. Tiles are fixed per target family and head dim in each, not
autotuned. float32 inputs use IEEE dots (no TF32), so they meet the float32 error budget, unless
the caller passes ``allow_tf32=True``: then every dot reads its float32 operands as TF32 on tensor
cores (the ``allow_tf32`` argument of each launcher, the ``IEEE`` dot mode of the kernels).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import logn_attention_bwd_launch as _bwd
from . import logn_attention_decode as _decode
from . import logn_attention_fwd as _fwd
from ._aligned import aligned as _aligned
from .logn_attention_rules import arch_family, block_d, dot_mode, max_head_dim, row_length  # noqa: F401 (max_head_dim: the dispatcher's)


def _rows(t: torch.Tensor, row: int) -> torch.Tensor:
    """``t`` (last dim d) as the kernels read it (:func:`.logn_attention_rules.row_length`):
    contiguous and aligned when ``row == d``, else a view ``buf[..., :d]`` of a buffer whose rows
    are ``row`` elements long, the columns past d zero."""
    d = t.shape[-1]
    if row == d:
        return _aligned(t)
    buf = t.new_empty(*t.shape[:-1], row)
    buf[..., d:] = 0
    buf[..., :d] = t
    return buf[..., :d]


def _empty_rows(like: torch.Tensor, row: int) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like``, laid out as :func:`_rows` lays inputs out."""
    d = like.shape[-1]
    if row == d:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return like.new_empty(*like.shape[:-1], row)[..., :d]


def _common(q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen=False, allow_tf32=False):
    """The padding mask as bytes and its prefix counts, the scale rule's scalars, the switches."""
    d = q.shape[-1]
    if mask is not None:
        b, lk = mask.shape
        prefix = torch.zeros(b, lk + 1, dtype=torch.int32, device=q.device)
        prefix[:, 1:] = torch.cumsum((~mask).to(torch.int32), dim=1)
        mask_u8 = mask.to(torch.uint8).contiguous()
    else:
        prefix = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read
        mask_u8 = torch.zeros(1, dtype=torch.uint8, device=q.device)
    scalars = (float(scale), 1.0 / math.log(train_len), max(1.0, float(min_n)), 1.0 / math.sqrt(d))
    flags = dict(
        CAUSAL=bool(causal),
        HAS_MASK=mask is not None,
        LOGN=bool(logn),
        CLIP=bool(clip),
        GRADMAX=bool(gradmax),
        IEEE=dot_mode(q.dtype, allow_tf32),
        VARLEN=bool(varlen),
        BLOCK_D=block_d(d),
    )
    return mask_u8, prefix, scalars, flags


class _Problem(NamedTuple):
    """What the kernels need to find rows: the number of (batch or sequence) x heads programs,
    the longest q and k, the Lq / Lk arguments, the offsets, and the strides of q-like tensors
    (q, out, dO, dQ), k-like ones (k, v) and lse-like ones (lse, delta), each (batch, head, row)."""

    nseq: int
    max_q: int
    max_k: int
    lq: int
    lk: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    q_strides: tuple
    k_strides: tuple
    l_strides: tuple


def _dense_problem(q, k, lse) -> _Problem:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), lse (B, Hq, Lq), all contiguous."""
    none = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read
    return _Problem(
        q.shape[0],
        q.shape[2],
        k.shape[2],
        q.shape[2],
        k.shape[2],
        none,
        none,
        q.stride()[:3],
        k.stride()[:3],
        lse.stride()[:2],
    )


def _packed_problem(q, k, lse, cu_q, cu_k, max_seqlen) -> _Problem:
    """q (Tq, Hq, D), k (Tk, Hkv, D), lse (Hq, Tq), all contiguous; rows of sequence s at
    cu[s] .. cu[s + 1]. Lq / Lk are unused (read from the offsets): 0."""
    return _Problem(
        cu_q.numel() - 1,
        max_seqlen,
        max_seqlen,
        0,
        0,
        cu_q,
        cu_k,
        (0, q.stride(1), q.stride(0)),
        (0, k.stride(1), k.stride(0)),
        (0, lse.stride(0)),
    )


def _forward(
    q, k, v, out, lse, pb: _Problem, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen, allow_tf32
):
    if out.numel() == 0 or pb.max_q == 0:
        return
    mask_u8, prefix, scalars, flags = _common(
        q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen, allow_tf32
    )
    if not varlen and q.shape[2] <= _decode.MAX_Q:  # a few queries against a KV cache: split-K, heads packed
        _decode.launch(q, k, v, out, lse, mask_u8, prefix, scalars, flags)
        return
    _fwd.launch(q, k, v, out, lse, pb, mask_u8, prefix, scalars, flags, arch_family(q.device))


def _backward(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    pb: _Problem,
    mask,
    causal,
    scale,
    train_len,
    logn,
    clip,
    min_n,
    gradmax,
    varlen,
    allow_tf32,
):
    """dq like q; dk, dv like k, v."""
    mask_u8, prefix, scalars, flags = _common(
        q, k, mask, causal, scale, train_len, logn, clip, min_n, gradmax, varlen, allow_tf32
    )
    _bwd.launch(
        grad_out,
        None if grad_lse is None else _aligned(grad_lse),
        q,
        k,
        v,
        out,
        _aligned(lse.float()),
        dq,
        dk,
        dv,
        pb,
        mask_u8,
        prefix,
        scalars,
        flags,
        arch_family(q.device),
    )


def forward(q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False):
    """``(out like q, lse (B, Hq, Lq) float32)`` for ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``."""
    row = row_length(q.shape[-1])
    q, k, v = _rows(q, row), _rows(k, row), _rows(v, row)
    b, hq, lq, d = q.shape
    out = _empty_rows(q, row)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    _forward(
        q,
        k,
        v,
        out,
        lse,
        _dense_problem(q, k, lse),
        mask,
        causal,
        scale,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        False,
        allow_tf32,
    )
    return out.contiguous(), lse


def backward(
    grad_out, grad_lse, q, k, v, out, lse, mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False
):
    """``(grad_q, grad_k, grad_v)`` typed like the inputs."""
    if q.numel() == 0:
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    row = row_length(q.shape[-1])
    q, k, v, out = _rows(q, row), _rows(k, row), _rows(v, row), _rows(out, row)
    grad_out = _rows(grad_out.to(q.dtype), row)
    dq, dk, dv = _empty_rows(q, row), _empty_rows(k, row), _empty_rows(v, row)
    _backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        _dense_problem(q, k, lse),
        mask,
        causal,
        scale,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        False,
        allow_tf32,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def varlen_forward(
    q, k, v, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False
):
    """``(out like q, lse (Hq, Tq) float32)`` for packed ``q (Tq, Hq, D)``, ``k, v (Tk, Hkv, D)``,
    offsets ``cu_q``, ``cu_k`` (nseq + 1,) and ``max_seqlen`` >= every sequence length."""
    row = row_length(q.shape[-1])
    q, k, v = _rows(q, row), _rows(k, row), _rows(v, row)
    out = _empty_rows(q, row)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    pb = _packed_problem(q, k, lse, _aligned(cu_q), _aligned(cu_k), max_seqlen)
    _forward(q, k, v, out, lse, pb, None, causal, scale, train_len, logn, clip, min_n, gradmax, True, allow_tf32)
    return out.contiguous(), lse


def varlen_backward(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    cu_q,
    cu_k,
    max_seqlen,
    causal,
    scale,
    train_len,
    logn,
    clip,
    min_n,
    gradmax,
    allow_tf32=False,
):
    """``(grad_q, grad_k, grad_v)`` of :func:`varlen_forward`, typed like the inputs."""
    row = row_length(q.shape[-1])
    q, k, v, out = _rows(q, row), _rows(k, row), _rows(v, row), _rows(out, row)
    grad_out = _rows(grad_out.to(q.dtype), row)
    # keys of a sequence without queries are still written (zeros) by their program
    dq, dk, dv = _empty_rows(q, row), _empty_rows(k, row), _empty_rows(v, row)
    pb = _packed_problem(q, k, lse, _aligned(cu_q), _aligned(cu_k), max_seqlen)
    _backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        pb,
        None,
        causal,
        scale,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        True,
        allow_tf32,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
