"""GlobalPointer in Triton: launchers of the fused multilabel loss and of the dense scores op.

The kernels are in :mod:`global_pointer_loss_kernels` and :mod:`global_pointer_score_kernels`
(tile helpers in :mod:`global_pointer_tile_ops`), the choice of tile and what Triton serves in
:mod:`global_pointer_configs`, the ahead-of-time list in :mod:`global_pointer_aot`. The arithmetic follows
csrc/include/kexue/global_pointer.h and the float64 oracle python/kexue/reference/global_pointer.py.
Canonical layout: q, k ``(B, H, L, d)`` with ``H = 1`` (one pair shared by the T types) or
``H = T``; biases ``(B, T, L)``; mask ``(B, L)``; positives as CSR over the rows (b, t, i)
(``row_ptr (B*T*L + 1,)``, ``cols (N,)``): never a dense ``(B, T, L, L)`` tensor.

The loss: a forward kernel leaves per-row log-sum-exp states that :func:`loss_forward` merges
with the implicit extra logit 0; two backward passes (rows: d_start_bias and dq; columns:
d_end_bias and dk, no atomics). The scores op: a forward that writes each tile for every type of
its head, and a backward in the same two passes reading dScores. In every kernel a tile's
``Q K^T`` is computed once for all the types of its head (see :mod:`global_pointer_loss_kernels`).

The launcher rotates q and k once (RoPE in float32 from float64 angles, O(L d)), folds 1/sqrt(d)
into q, zero-pads the rows to the tile's head block (64 or 128 channels: the row loads need no
channel mask and vectorize for any head size) and stores them in the input dtype: bf16/fp16 dots
run on tensor cores, fp32 dots in IEEE unless ``torch.backends.cuda.matmul.allow_tf32`` opts in to TF32 (the loss sums
exponentials of the scores: TF32's 1e-3 relative error on a score of 20 moves e^s by 2%). The
kernels accumulate in fp32 and write gradients in the rotated frame, rotated back here (R^T).

Positives on masked spans (padding, or start > end with tril) are found here from the CSR rows
in O(N) and make the loss of their (b, t) +inf, as in the dense formula.
"""

from __future__ import annotations

import math

import torch
import triton

from .global_pointer_configs import (  # noqa: F401  (re-exported: the backends and tests ask this module)
    MAX_HEAD_SIZE,
    MAX_SERVED_HEAD,
    Tile,
    device_arch,
    dot_precision,
    operand_dtype,
    scores_tile_for,
    supports,
    tile_for,
)
from .global_pointer_loss_kernels import _gp_loss_bwd_cols_kernel, _gp_loss_bwd_rows_kernel, _gp_loss_fwd_kernel
from .global_pointer_score_kernels import (
    _gp_scores_bwd_cols_kernel,
    _gp_scores_bwd_rows_kernel,
    _gp_scores_fwd_kernel,
)

# ---------------------------------------------------------------------------------------------
# Rotation of the rows around the kernels (RoPE in float32 from float64 angles, O(L d)).


def _rope(x: torch.Tensor, layout: int, base: float, inverse: bool = False) -> torch.Tensor:
    """``R x`` (or ``R^T x``) along the positions of ``x (..., L, d)`` in x's dtype: pairs (2c, 2c+1)
    for layout 1, (c, c + d/2) for layout 2; angles ``p * base**(-2c/d)`` computed in float64."""
    length, d = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(ang).to(x), torch.sin(ang).to(x)
    if inverse:
        sin = -sin
    a, b = (x[..., 0::2], x[..., 1::2]) if layout == 1 else (x[..., : d // 2], x[..., d // 2 :])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if layout == 1:
        return torch.stack((ra, rb), dim=-1).flatten(-2)
    return torch.cat((ra, rb), dim=-1)


def _rotated(x: torch.Tensor, rope: int, base: float, scale: float, width: int) -> torch.Tensor:
    """``scale * R x`` computed in float32, zero-padded to ``width`` channels (the tile's head
    block: the kernels read rows of that stride with no channel mask), stored contiguous in
    :func:`operand_dtype`."""
    out = x.float()
    if rope:
        out = _rope(out, rope, base)
    out = torch.nn.functional.pad(out * scale, (0, width - x.shape[-1]))
    return out.to(operand_dtype(x.dtype, x.device)).contiguous()


def _unrotated(g: torch.Tensor, d: int, rope: int, base: float, scale: float, dtype) -> torch.Tensor:
    """Gradient wrt the un-rotated rows from the kernel's padded ``g``: ``scale * R^T g[..., :d]``."""
    g = g[..., :d]
    if rope:
        g = _rope(g, rope, base, inverse=True)
    return (g * scale).to(dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous on a 16-byte boundary (a copy if not): the kernels are compiled and
    checked for aligned pointers only (``aligned_only`` in :mod:`global_pointer_aot`)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# ---------------------------------------------------------------------------------------------
# Launchers.


def _common(q, k, sb, mask, rope, base, tile):
    batch, heads, length, d = q.shape
    tile = tile or tile_for(d, q.dtype, device_arch(q.device))
    if d > tile.block_h:
        raise ValueError(f"the tile's head block {tile.block_h} is narrower than the head size {d}")
    scale = 1.0 / max(d, 1) ** 0.5
    qr, kr = _rotated(q, rope, base, scale, tile.block_h), _rotated(k, rope, base, 1.0, tile.block_h)
    m8 = _aligned(mask.contiguous().view(torch.uint8))
    return (batch, heads, sb.shape[1], length, d, qr, kr, scale, tile, m8)


def _meta(tile: Tile, dtype: torch.dtype) -> dict:
    return dict(
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_H=tile.block_h,
        DOT_PREC=dot_precision(dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        **({} if tile.maxnreg is None else dict(maxnreg=tile.maxnreg)),
    )


def misplaced_positives(row_ptr, cols, mask, types: int, tril: bool) -> torch.Tensor:
    """``(B, T)`` bool: (b, t) holds a positive on a span that is not a candidate (a padded token,
    or start > end with tril). O(N) on the CSR rows, no sync."""
    batch, length = mask.shape
    rows_total = batch * types * length
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(rows_total, device=cols.device), counts, output_size=cols.numel())
    b, i = rows // (types * length), rows % length
    ok = mask[b, i] & mask[b, cols]
    if tril:
        ok = ok & (cols >= i)
    bad = torch.zeros(batch * types, dtype=torch.int32, device=cols.device)
    bad.index_add_(0, rows // length, (~ok).to(torch.int32))
    return (bad > 0).view(batch, types)


def loss_forward(q, k, sb, eb, mask, row_ptr, cols, rope, base, tril, *, tile: Tile | None = None):
    """``(loss (B, T), lse (B, T, 2))`` in float32; positives as CSR."""
    batch, heads, types, length, d, qr, kr, _, tile, m8 = _common(q, k, sb, mask, rope, base, tile)
    if batch == 0 or types == 0 or length == 0:
        lse = torch.zeros(batch, types, 2, dtype=torch.float32, device=q.device)
        return lse.sum(-1), lse
    state = torch.tensor([-math.inf, 0.0, -math.inf, 0.0], device=q.device).repeat(batch, types, length, 1)
    _gp_loss_fwd_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        qr,
        kr,
        _aligned(sb),
        _aligned(eb),
        m8,
        _aligned(row_ptr),
        _aligned(cols),
        state,
        heads,
        types,
        length,
        d,
        int(bool(tril)),
        **_meta(tile, q.dtype),
    )
    lse = torch.stack((_finish(state[..., 0], state[..., 1]), _finish(state[..., 2], state[..., 3])), -1)
    bad = misplaced_positives(row_ptr, cols, mask, types, tril)
    lse[..., 1] = torch.where(bad, math.inf, lse[..., 1])
    return lse.sum(-1), lse


def _finish(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_rows e^m s) over the last dim, with empty rows (m = -inf, s = 0)."""
    m = torch.cat((m, torch.zeros_like(m[..., :1])), -1)
    s = torch.cat((s, torch.ones_like(s[..., :1])), -1)
    top = m.amax(-1, keepdim=True)
    return (top + torch.log((s * torch.exp(m - top)).sum(-1, keepdim=True))).squeeze(-1)


def loss_backward(grad, q, k, sb, eb, mask, row_ptr, cols, lse, rope, base, tril, *, tile: Tile | None = None):
    """``(dq, dk, d_start_bias, d_end_bias)`` in the inputs' dtypes."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8 = _common(q, k, sb, mask, rope, base, tile)
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.to(sb.dtype), deb.to(eb.dtype)
    grad = _aligned(grad.float())
    lse = _aligned(lse.float())
    dqr = torch.empty(qr.shape, dtype=torch.float32, device=q.device)
    dkr = torch.empty_like(dqr)
    args = (heads, types, length, d, int(bool(tril)))
    inputs = (qr, kr, _aligned(sb), _aligned(eb), m8, _aligned(row_ptr), _aligned(cols), grad, lse)
    _gp_loss_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        *inputs, dqr, dsb, *args, **_meta(tile, q.dtype)
    )
    _gp_loss_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        *inputs, dkr, deb, *args, **_meta(tile, q.dtype)
    )
    # s = <scale R q, R k>: dq = scale R^T dqr, dk = R^T dkr (dkr already carries the scale via qr)
    return (
        _unrotated(dqr, d, rope, base, scale, q.dtype),
        _unrotated(dkr, d, rope, base, 1.0, k.dtype),
        dsb.to(sb.dtype),
        deb.to(eb.dtype),
    )


def scores_forward(q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """Masked ``(B, T, L, L)`` scores in q's dtype (``-inf`` where masked)."""
    batch, heads, types, length, d, qr, kr, _, tile, m8 = _common(
        q, k, sb, mask, rope, base, tile or scores_tile_for(q.shape[-1], q.dtype, device_arch(q.device))
    )
    out = torch.empty(batch, types, length, length, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(length, tile.block_m) * triton.cdiv(length, tile.block_n), batch * heads)
    _gp_scores_fwd_kernel[grid](
        qr,
        kr,
        _aligned(sb),
        _aligned(eb),
        m8,
        out,
        heads,
        types,
        length,
        d,
        int(bool(tril)),
        **_meta(tile, q.dtype),
    )
    return out


def scores_backward(grad, q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * scores)`` over the unmasked spans,
    in the inputs' dtypes. ``grad``: ``(B, T, L, L)`` of q's dtype."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8 = _common(
        q, k, sb, mask, rope, base, tile or scores_tile_for(q.shape[-1], q.dtype, device_arch(q.device))
    )
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.to(sb.dtype), deb.to(eb.dtype)
    grad = _aligned(grad)
    dqr = torch.empty(qr.shape, dtype=torch.float32, device=q.device)
    dkr = torch.empty_like(dqr)
    args = (heads, types, length, d, int(bool(tril)))
    _gp_scores_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        kr, m8, grad, dqr, dsb, *args, **_meta(tile, q.dtype)
    )
    _gp_scores_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        qr, m8, grad, dkr, deb, *args, **_meta(tile, q.dtype)
    )
    return (
        _unrotated(dqr, d, rope, base, scale, q.dtype),
        _unrotated(dkr, d, rope, base, 1.0, k.dtype),
        dsb.to(sb.dtype),
        deb.to(eb.dtype),
    )
