"""Log-n attention's input checks: the public function's (the user's arguments, with errors that
name them) and the custom ops' own (:func:`check_raw_dense`, :func:`check_raw_packed`), which run
again inside the op bodies because those are also reached raw (``torch.ops.kexue.*``) and from graphs
that torch.compile traced, where nothing else stands between a wrong shape or offset and a kernel.
Also the two input rewrites the ops make: padded keys zeroed, trusted offsets clamped.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from kexue.ops._checks import check_floating_tensor
from kexue.reference import logn_attention as reference

MAX_HEAD_DIM = 256
FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what every backend takes (torch and cpu: float64 too)


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
        check_floating_tensor(name, t, allowed=FLOATS + (torch.float64,))
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
