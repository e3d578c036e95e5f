"""Log-n attention: ``kexue.ops.logn_attention`` and its custom ops.

``kexue::logn_attention`` and ``kexue::logn_attention_backward`` are ``torch.library`` custom ops
over contiguous ``(B, H, L, D)`` tensors; ``kexue::logn_attention_varlen`` and its backward take
packed variable-length sequences ``(T, H, D)`` with cumulative offsets (the flash-attn varlen
layout). Each dispatches to the backend that :mod:`kexue._backend` picks. The math is in
docs/logn_attention.md, csrc/include/kexue/logn_attention.h and
:mod:`kexue.reference.logn_attention` (which also states the edge-case definitions).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops._checks import check_floating_tensor
from kexue.reference import logn_attention as reference

OP = "logn_attention"
OP_VARLEN = "logn_attention_varlen"
MAX_HEAD_DIM = 256
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Backends. Each takes contiguous q, k, v, an optional contiguous bool mask and the scale rule
# as plain scalars: (q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax).


def _ref_scale(scale: float, gradmax: bool):
    return reference.GRADMAX if gradmax else scale


def _torch_forward(q, k, v, mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    return reference.logn_attention_forward(
        q, k, v, mask, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_backward(grad_out, grad_lse, q, k, v, out, lse, mask, causal, scale, train_len, logn, clip, min_n, gradmax):
    return reference.logn_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, mask, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_varlen_forward(q, k, v, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax):
    return reference.logn_attention_varlen_forward(
        q, k, v, cu_q, cu_k, causal, _ref_scale(scale, gradmax), train_len, logn, clip, min_n
    )


def _torch_varlen_backward(
    grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax
):
    return reference.logn_attention_varlen_backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        cu_q,
        cu_k,
        causal,
        _ref_scale(scale, gradmax),
        train_len,
        logn,
        clip,
        min_n,
    )


def _triton_module():
    from kexue.triton_kernels import logn_attention

    return logn_attention


def _triton(name: str):
    """The ``triton`` backend's ``name``, imported on first use (importing triton is slow)."""

    def call(*args):
        return getattr(_triton_module(), name)(*args)

    return call


def _triton_serves(q: Tensor, *args) -> str | None:
    """What the Triton kernels cannot take on a GPU; the dispatcher then picks the CUDA C++ kernel
    or the reference. Under the interpreter (CPU tensors) they take everything."""
    if not q.is_cuda:
        return None
    if q.shape[-1] > _triton_module().MAX_HEAD_DIM:
        return f"heads wider than {_triton_module().MAX_HEAD_DIM} (the wider Triton tiles spill on a GPU)"
    if q.dtype == torch.float32:
        return "float32 on a GPU (its FMA-dot tiles keep a stack frame; fp16/bf16 run on tensor cores)"
    return None


def _register_backends() -> None:
    _backend.register(OP, "torch", (_torch_forward, _torch_backward), _FLOATS + (torch.float64,))
    native = _backend.native()
    if native is not None and hasattr(native, "logn_attention_forward_cpu"):
        _backend.register(
            OP,
            "cpu",
            (native.logn_attention_forward_cpu, native.logn_attention_backward_cpu),
            _FLOATS + (torch.float64,),
        )
    _backend.register(OP, "triton", (_triton("forward"), _triton("backward")), _FLOATS, supports=_triton_serves)
    if native is not None and hasattr(native, "logn_attention_forward_cuda"):  # built with CUDA; dense inputs only
        _backend.register(
            OP,
            "cuda",
            (native.logn_attention_forward_cuda, native.logn_attention_backward_cuda),
            _FLOATS + (torch.float64,),
        )
    # Packed sequences: (q, k, v, cu_q, cu_k, max_seqlen, rule...); only Triton reads max_seqlen.
    _backend.register(OP_VARLEN, "torch", (_torch_varlen_forward, _torch_varlen_backward), _FLOATS + (torch.float64,))
    if native is not None and hasattr(native, "logn_attention_varlen_forward_cpu"):

        def cpu_forward(q, k, v, cu_q, cu_k, max_seqlen, *rule):
            return native.logn_attention_varlen_forward_cpu(q, k, v, cu_q, cu_k, *rule)

        def cpu_backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_seqlen, *rule):
            return native.logn_attention_varlen_backward_cpu(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *rule)

        _backend.register(OP_VARLEN, "cpu", (cpu_forward, cpu_backward), _FLOATS + (torch.float64,))
    _backend.register(
        OP_VARLEN, "triton", (_triton("varlen_forward"), _triton("varlen_backward")), _FLOATS, supports=_triton_serves
    )


_register_backends()


# --------------------------------------------------------------------------------------------
# Custom ops.


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
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Lq, D), lse (B, Hq, Lq))`` for contiguous inputs (checked here again: the op
    is also reached raw, ``torch.ops.kexue.logn_attention``, and from compiled graphs)."""
    _check_raw_dense(q, k, v, key_padding_mask, scale, train_len, min_n)
    k, v = _zero_padded(k, v, key_padding_mask)
    _, (forward, _) = _backend.select(OP, q)
    return forward(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax)


@logn_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax):
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)``, recomputing the attention weights from ``lse``."""
    _check_raw_dense(q, k, v, key_padding_mask, scale, train_len, min_n)
    _check_raw_grads(grad_out, grad_lse, q, out, lse, q.shape[:3])
    k, v = _zero_padded(k, v, key_padding_mask)
    _, (_, backward) = _backend.select(OP, q)
    return backward(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, causal, scale, train_len, logn, clip, min_n, gradmax
    )


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
) -> tuple[Tensor, Tensor]:
    """``(out (Tq, Hq, D), lse (Hq, Tq))`` for contiguous packed inputs (checked here again)."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen = _check_raw_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, scale, train_len, min_n
    )
    _, (forward, _) = _backend.select(OP_VARLEN, q)
    return forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax
    )


@logn_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, causal, scale, train_len, logn, clip, min_n, gradmax):
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)`` of :func:`logn_attention_varlen_op`."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen = _check_raw_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen, scale, train_len, min_n
    )
    _check_raw_grads(grad_out, grad_lse, q, out, lse, (q.shape[1], q.shape[0]))
    _, (_, backward) = _backend.select(OP_VARLEN, q)
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
    return (dq, dk, dv) + (None,) * 10


logn_attention_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_context_varlen)


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


def _check_qkv(q, k, v, packed: bool = False) -> None:
    """Dense ``(batch, heads, seq, head_dim)`` or, ``packed``, ``(total, heads, head_dim)``."""
    layout = "(total, heads, head_dim) with cu_seqlens" if packed else "(batch, heads, seq, head_dim)"
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating_tensor(name, t, allowed=_FLOATS + (torch.float64,))
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-d {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, d = q.shape[1], q.shape[-1]
    if (not packed and k.shape[0] != q.shape[0]) or k.shape[-1] != d:
        raise ValueError(
            f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)}: "
            f"expected the same {'head_dim' if packed else 'batch and head_dim'}"
        )
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a positive multiple of the number of k/v heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if not packed and (q.shape[2] == 0 or k.shape[2] == 0):
        raise ValueError(
            f"q and k must hold at least one position, got seq lengths {q.shape[2]} (q) and {k.shape[2]} (k)"
        )


def _check_cu_seqlens(name: str, cu, device: torch.device) -> Tensor:
    """The structure of an offsets tensor (its values: :func:`_check_offsets`)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64 offsets, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() == 0:
        raise ValueError(f"{name} must be 1-d (num_sequences + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    return cu.contiguous()


def _check_offsets(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int) -> int:
    """Checks the offsets' values and returns the longest sequence, q or k (what the Triton grid
    needs). Both tensors travel to the host together: one synchronisation on CUDA."""
    n = cu_q.numel()
    values = (cu_q if cu_k is cu_q else torch.cat((cu_q, cu_k.to(cu_q.dtype)))).tolist()
    longest = 0
    name_k = "cu_seqlens" if cu_k is cu_q else "cu_seqlens_k"  # shared offsets: k must have as many rows
    for name, offsets, total, what in (
        ("cu_seqlens", values[:n], total_q, "q"),
        (name_k, values[n:] or values[:n], total_k, "k"),
    ):
        if offsets[0] != 0:
            raise ValueError(f"{name} must start at 0, got {offsets[0]}")
        if offsets[-1] != total:
            raise ValueError(f"{name} must end at the number of {what} rows ({total}), got {offsets[-1]}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
        if any(length < 0 for length in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {offsets}")
        longest = max([longest, *lengths])
    return longest


def _check_mask(mask, q: Tensor, k: Tensor) -> Tensor | None:
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


# Checks inside the op bodies. The public function checks the user's arguments; the custom ops
# check again because they are reached without it: raw (torch.ops.kexue.*) and from graphs that
# torch.compile traced, where the kernels would otherwise take a wrong shape, a short mask or an
# offset past the end as given and read out of bounds. Metadata only, except the offsets (below).


def _check_layout(name: str, t, like: Tensor, shape, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {like.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the custom ops take the canonical layout)")


def _check_rule(scale: float, train_len: float, min_n: float) -> None:
    _check_real("scale", scale, low=0.0, strict=True)
    _check_real("train_len", train_len, low=1.0, strict=True)
    _check_real("min_n", min_n, low=0.0, strict=False)


def _check_raw_dense(q, k, v, mask, scale, train_len, min_n) -> None:
    _check_qkv(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the custom ops take the canonical layout)")
    if mask is not None:
        _check_mask(mask, q, k)
        if not mask.is_contiguous():
            raise ValueError("key_padding_mask must be contiguous (the custom ops take the canonical layout)")
    _check_rule(scale, train_len, min_n)


def _check_raw_grads(grad_out, grad_lse, q: Tensor, out, lse, lse_shape) -> None:
    """The backward ops' extra inputs: shaped and typed as the forward returned them."""
    _check_layout("grad_out", grad_out, q, q.shape, q.dtype)
    _check_layout("out", out, q, q.shape, q.dtype)
    ct = reference.compute_dtype(q.dtype)
    _check_layout("lse", lse, q, lse_shape, ct)
    if grad_lse is not None:
        _check_layout("grad_lse", grad_lse, q, lse_shape, ct)


def _check_raw_packed(q, k, v, cu_q, cu_k, max_seqlen, scale, train_len, min_n):
    """``(cu_q, cu_k, max_seqlen)`` safe to hand to a kernel. The offsets' values are read to the
    host and checked on CPU tensors (no synchronisation there) and whenever ``max_seqlen`` is None
    (it must be computed anyway). With ``max_seqlen`` on CUDA the offsets are trusted, as
    documented, but clamped on the device into ``[0, total]`` and made non-decreasing, so that
    wrong offsets give wrong rows, never a read past the end."""
    _check_qkv(q, k, v, packed=True)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the custom ops take the canonical layout)")
    cu_q = _check_cu_seqlens("cu_seqlens", cu_q, q.device)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_k, q.device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_k must have one entry per cu_seqlens entry ({cu_q.numel()}), got {cu_k.numel()}")
    _check_rule(scale, train_len, min_n)
    if max_seqlen is not None and max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if max_seqlen is None or q.device.type == "cpu":
        longest = _check_offsets(cu_q, cu_k, q.shape[0], k.shape[0])
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen ({max_seqlen}) is below the longest sequence ({longest})")
        return cu_q, cu_k, longest if max_seqlen is None else max_seqlen
    return _clamped_offsets(cu_q, q.shape[0]), _clamped_offsets(cu_k, k.shape[0]), max_seqlen


def _clamped_offsets(cu: Tensor, total: int) -> Tensor:
    """Offsets forced into ``[0, total]`` and non-decreasing, on the device (no synchronisation)."""
    return torch.cummax(cu.clamp(0, total), 0).values


def _zero_padded(k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """k and v with their padded keys set to 0. A padded key's weight is 0, but the kernels still
    load it, and 0 * NaN (or q . NaN masked after the product) is NaN: without this, a NaN or inf
    in padding reached every query of its batch row. One pass over k and v, only with a mask."""
    if mask is None:
        return k, v
    pad = mask[:, None, :, None]
    return k.masked_fill(pad, 0), v.masked_fill(pad, 0)


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

    On CUDA devices the Triton backend runs a FlashAttention-2 style kernel; a dense call with at
    most 16 queries (generation with a KV cache) takes a split-K decode kernel that reads the cache
    once per key/value head. Heads wider than 128, and float32 inputs, leave Triton there for the
    CUDA C++ kernel (or, without it or for packed sequences, the reference).

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
            q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, causal, base, train_len, logn, clip, min_n, gradmax
        )
        return (out, lse) if return_lse else out
    mask = _check_mask(key_padding_mask, q, k)
    out, lse = logn_attention_op(
        q.contiguous(), k.contiguous(), v.contiguous(), mask, causal, base, train_len, logn, clip, min_n, gradmax
    )
    return (out, lse) if return_lse else out
