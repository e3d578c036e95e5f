"""Log-n attention's custom ops: ``kexue::logn_attention`` and ``kexue::logn_attention_backward``
over contiguous ``(B, H, L, D)`` tensors, ``kexue::logn_attention_varlen`` and its backward over
packed ``(T, H, D)`` sequences with cumulative offsets (the flash-attn varlen layout), their fake
(meta) implementations and autograd. Each op body checks its inputs again and dispatches to the
backend that :mod:`kexue._backend` picks (:mod:`kexue.ops._logn_attention_backends`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._logn_attention_backends import OP, OP_VARLEN
from kexue.ops._logn_attention_inputs import (
    _check_raw_dense,
    _check_raw_grads,
    _check_raw_packed,
    _zero_padded,
)
from kexue.reference import logn_attention as reference


@torch.library.custom_op("kexue::logn_attention", mutates_args=())
def logn_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
    gradmax: bool,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Lq, D), lse (B, Hq, Lq))`` for contiguous inputs (checked here again: the op
    is also reached raw, ``torch.ops.kexue.logn_attention``, and from compiled graphs)."""
    _check_raw_dense(q, k, v, key_padding_mask, scale, train_len, min_n)
    k, v = _zero_padded(k, v, key_padding_mask)
    _, (forward, _) = _backend.select(OP, q, allow_tf32)
    return forward(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32)


@logn_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32=False):
    ct = reference.compute_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=ct)


@torch.library.custom_op("kexue::logn_attention_backward", mutates_args=())
def logn_attention_backward_op(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
    gradmax: bool,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)``, recomputing the attention weights from ``lse``."""
    _check_raw_dense(q, k, v, key_padding_mask, scale, train_len, min_n)
    _check_raw_grads(grad_out, grad_lse, q, out, lse, q.shape[:3])
    k, v = _zero_padded(k, v, key_padding_mask)
    _, (_, backward) = _backend.select(OP, q, allow_tf32)
    return backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        key_padding_mask,
        causal,
        scale,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        allow_tf32,
    )


@logn_attention_backward_op.register_fake
def _(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    key_padding_mask,
    causal,
    scale,
    train_len,
    logn,
    clip,
    min_n,
    gradmax,
    allow_tf32=False,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_RULE_ARGS = ("causal", "scale", "train_len", "logn", "clip", "min_n", "gradmax", "allow_tf32")


def _setup_context(ctx, inputs, output):
    q, k, v, mask = inputs[:4]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.rule = inputs[4:]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv = logn_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, mask, *ctx.rule)
    return (dq, dk, dv) + (None,) * (len(ctx.rule) + 1)  # no gradient for the mask and the rule


logn_attention_op.register_autograd(_backward, setup_context=_setup_context)


# Packed variable-length sequences. The offsets' values are checked on the host once per call
# (:func:`_check_offsets`): by the public function in eager mode, or here when it could not
# (under torch.compile, where reading them would break the graph) and no max_seqlen was given.


@torch.library.custom_op("kexue::logn_attention_varlen", mutates_args=())
def logn_attention_varlen_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen: int | None,
    causal: bool,
    scale: float,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
    gradmax: bool,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(out (Tq, Hq, D), lse (Hq, Tq))`` for contiguous packed inputs (checked here again)."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen = _check_raw_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, scale, train_len, min_n
    )
    _, (forward, _) = _backend.select(OP_VARLEN, q, allow_tf32)
    rule = (causal, scale, train_len, logn, clip, min_n, gradmax, allow_tf32)
    return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, *rule)


@logn_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, *rule):
    ct = reference.compute_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=ct)


@torch.library.custom_op("kexue::logn_attention_varlen_backward", mutates_args=())
def logn_attention_varlen_backward_op(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen: int | None,
    causal: bool,
    scale: float,
    train_len: float,
    logn: bool,
    clip: bool,
    min_n: float,
    gradmax: bool,
    allow_tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)`` of :func:`logn_attention_varlen_op`."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen = _check_raw_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, scale, train_len, min_n
    )
    _check_raw_grads(grad_out, grad_lse, q, out, lse, (q.shape[1], q.shape[0]))
    _, (_, backward) = _backend.select(OP_VARLEN, q, allow_tf32)
    return backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen,
        causal,
        scale,
        train_len,
        logn,
        clip,
        min_n,
        gradmax,
        allow_tf32,
    )


@logn_attention_varlen_backward_op.register_fake
def _(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
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
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.rest = inputs[5:]  # max_seqlen and the scale rule


def _backward_varlen(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv = logn_attention_varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.rest)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.rest))  # offsets, max_seqlen, the rule


logn_attention_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_context_varlen)
