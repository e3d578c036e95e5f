"""Log-n attention: ``kexue.ops.logn_attention`` and its custom ops.

``kexue::logn_attention`` and ``kexue::logn_attention_backward`` are ``torch.library`` custom ops
over contiguous ``(B, H, L, D)`` tensors; each dispatches to the backend that :mod:`kexue._backend`
picks. The math is in shared/spec/logn_attention.md, csrc/include/kexue/logn_attention.h and
:mod:`kexue.reference.logn_attention` (which also states the edge-case definitions).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._checks import check_floating_tensor
from kexue.reference import logn_attention as reference

OP = "logn_attention"
MAX_HEAD_DIM = 256
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Backends. Each takes contiguous q, k, v, an optional contiguous bool mask and the scale rule
# as plain scalars: (q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax).


def _ref_scale(scale: float, gradmax: bool):
    return reference.GRADMAX if gradmax else scale


def _torch_forward(q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    return reference.logn_attention_forward(q, k, v, mask, causal, _ref_scale(scale, gradmax), train_len, logn, clip,
                                            min_n)


def _torch_backward(grad_out, grad_lse, q, k, v, out, lse, mask, causal, scale, train_len, logn, clip, min_n,
                    gradmax):
    return reference.logn_attention_backward(grad_out, grad_lse, q, k, v, out, lse, mask, causal,
                                             _ref_scale(scale, gradmax), train_len, logn, clip, min_n)


def _triton_module():
    from kexue.triton_kernels import logn_attention

    return logn_attention


def _register_backends() -> None:
    _backend.register(OP, "torch", (_torch_forward, _torch_backward), _FLOATS + (torch.float64,))
    native = _backend.native()
    if native is not None and hasattr(native, "logn_attention_forward_cpu"):
        _backend.register(OP, "cpu", (native.logn_attention_forward_cpu, native.logn_attention_backward_cpu),
                          _FLOATS + (torch.float64,))
    _backend.register(OP, "triton",
                      (lambda *a: _triton_module().forward(*a), lambda *a: _triton_module().backward(*a)),
                      _FLOATS)


_register_backends()


# --------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("kexue::logn_attention", mutates_args=())
def logn_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
    train_len: float, logn: bool, clip: bool, min_n: float, gradmax: bool,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Lq, D), lse (B, Hq, Lq))`` for contiguous, validated inputs."""
    _, (forward, _) = _backend.select(OP, q)
    return forward(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax)


@logn_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    ct = reference.compute_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=ct)


@torch.library.custom_op("kexue::logn_attention_backward", mutates_args=())
def logn_attention_backward_op(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], causal: bool, scale: float, train_len: float, logn: bool, clip: bool,
    min_n: float, gradmax: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)``, recomputing the attention weights from ``lse``."""
    _, (_, backward) = _backend.select(OP, q)
    return backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, train_len, logn, clip,
                    min_n, gradmax)


@logn_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_RULE_ARGS = ("causal", "scale", "train_len", "logn", "clip", "min_n", "gradmax")


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
    return dq, dk, dv, None, None, None, None, None, None, None, None


logn_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function.


def _check_real(name: str, value, *, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = (value > low if strict else value >= low) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating_tensor(name, t, allowed=_FLOATS + (torch.float64,))
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)}: "
                         "expected the same batch and head_dim")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a positive multiple of the number of k/v heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if lq == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k must hold at least one position, got seq lengths {lq} (q) and {k.shape[2]} (k)")


def _check_mask(mask, q: Tensor, k: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype bool (True marks padding), got {mask.dtype}")
    expected = (k.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"key_padding_mask must have shape (batch, k_len) = {expected}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    return mask.contiguous()


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
    return_lse: bool = False,
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
        cu_seqlens: packed variable-length sequences; not implemented yet.
        return_lse: also return ``lse (B, Hq, Lq)``, the natural log-sum-exp of each query's scaled
            logits, in float32 (float64 for float64 inputs); it is differentiable.

    Returns:
        ``out`` shaped and typed like ``q``, and ``lse`` if ``return_lse``. A query that sees no
        key gets zeros and ``lse = 0``, and no gradient. NaN in a query, or in a key or value it
        sees, propagates to its output (a NaN value may reach queries that do not see it).
    """
    _check_qkv(q, k, v)
    if cu_seqlens is not None:
        raise NotImplementedError("logn_attention: packed variable-length input (cu_seqlens) is not implemented yet; "
                                  "pad the batch and pass key_padding_mask instead")
    causal = _check_bool("causal", causal)
    logn = _check_bool("logn", logn)
    clip = _check_bool("clip", clip)
    return_lse = _check_bool("return_lse", return_lse)
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
    mask = _check_mask(key_padding_mask, q, k)
    out, lse = logn_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), mask, causal, base, train_len, logn,
                                 clip, min_n, gradmax)
    return (out, lse) if return_lse else out
