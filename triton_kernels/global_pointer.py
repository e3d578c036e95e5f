"""GlobalPointer in Triton: launchers of the fused multilabel loss and of the dense scores op.

The kernels are in :mod:`global_pointer_loss_kernels` and :mod:`global_pointer_score_kernels`
(tile helpers in :mod:`global_pointer_tile_ops`, RoPE in :mod:`global_pointer_rope`), the choice
of tile and what Triton serves in :mod:`global_pointer_configs`, the ahead-of-time list in
:mod:`global_pointer_aot`. The arithmetic follows csrc/include/kexue/global_pointer.h and the
float64 oracle python/kexue/reference/global_pointer.py.
Canonical layout: q, k ``(B, H, L, d)`` with ``H = 1`` (one pair shared by the T types) or
``H = T``; biases ``(B, T, L)``; mask ``(B, L)``; positives as CSR over the rows (b, t, i)
(``row_ptr (B*T*L + 1,)``, ``cols (N,)``): never a dense ``(B, T, L, L)`` tensor.

The loss: a forward kernel leaves per-row log-sum-exp states that :func:`loss_forward` merges
with the implicit extra logit 0; two backward passes (rows: d_start_bias and dq; columns:
d_end_bias and dk, no atomics). The scores op: a forward that writes each tile for every type of
its head, and a backward in the same two passes reading dScores. In every kernel a tile's
``Q K^T`` is computed once for all the types of its head (see :mod:`global_pointer_loss_kernels`).

RoPE runs in the kernels (:mod:`global_pointer_rope`): the q/k tiles are rotated as they are
loaded, 1/sqrt(d) folded into q's, and rounded to the operand dtype; dq/dk are rotated back as
they are stored. The launcher only hands the rows over in that dtype, zero-padded to the tile's
head block (64 or 128 channels: the row loads need no channel mask and vectorize for any head
size; no copy when d is 64 or 128), with a cached float32 table of cos/sin computed in float64.
bf16/fp16 dots run on tensor cores, fp32 dots in IEEE unless
``torch.backends.cuda.matmul.allow_tf32`` opts in to TF32 (the loss sums exponentials of the
scores: TF32's 1e-3 relative error on a score of 20 moves e^s by 2%); all accumulate in fp32.

Positives on masked spans (padding, or start > end with tril) are found here from the CSR rows
in O(N) and make the loss of their (b, t) +inf, as in the dense formula.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton

from ._aligned import aligned as _aligned
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
# The rows as the kernels read them (RoPE itself is applied in the kernels: global_pointer_rope).


@functools.lru_cache(maxsize=16)
def _rope_table_cached(
    positions: int, d: int, width: int, base: float, interleaved: bool, device: torch.device
) -> torch.Tensor:
    # the formula's one definition, shared with the oracle; imported here, as this module is also
    # imported without kexue (tests/gpu_compile.py's source-tree fallback)
    from kexue._rope import rope_angles

    ang = rope_angles(positions, d, base)
    table = torch.zeros(positions, 2, width // 2, dtype=torch.float64)
    table[:, 0] = 1.0
    table[:, 0, : d // 2] = torch.cos(ang)
    table[:, 1, : d // 2] = torch.sin(ang)
    if interleaved:  # per channel: each pair's cos twice, its sin signed -, + (see global_pointer_rope)
        table = table.repeat_interleave(2, dim=-1)
        table[:, 1, 0::2] *= -1.0
    return table.to(device=device, dtype=torch.float32)


def _rope_table(length: int, d: int, width: int, base: float, rope: int, device: torch.device) -> torch.Tensor:
    """float32 cos and sin of the angles ``p * base**(-2c/d)`` for at least ``length`` positions
    (computed in float64; 1 and 0 on the padded pairs): ``(positions, 2, width/2)``, one per pair,
    for rotate-half; ``(positions, 2, width)``, one per channel (cos_c, -sin_c, cos_c, sin_c for
    pair c), for the interleaved layout, so that its kernels read them in vector loads. An empty
    tensor without RoPE. Cached for a power-of-two number of positions, so that calls of varying
    length share one table per (head size, base, layout, device)."""
    if not rope:
        return torch.empty(0, dtype=torch.float32, device=device)
    positions = max(64, 1 << max(length - 1, 0).bit_length())
    return _rope_table_cached(positions, d, width, base, rope == 1, device)


def _rows(x: torch.Tensor, rope: int, width: int) -> torch.Tensor:
    """``x (..., L, d)`` as the kernels read it: in :func:`operand_dtype`, ``width`` channels (the
    tile's head block: rows of that stride, no channel mask), zero-padded; with rotate-half each
    half is padded to ``width / 2``, so the pair of channel p sits at p + width/2. Contiguous and
    16-byte aligned; no copy when ``x`` already is all that (d = 64 or 128 in the input dtype)."""
    d = x.shape[-1]
    x = x.to(operand_dtype(x.dtype, x.device))
    if d < width and rope == 2:
        pad = (0, width // 2 - d // 2)
        x = torch.cat((F.pad(x[..., : d // 2], pad), F.pad(x[..., d // 2 :], pad)), -1)
    elif d < width:
        x = F.pad(x, (0, width - d))
    return _aligned(x)


def _unpadded(g: torch.Tensor, d: int, rope: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient rows the kernels wrote in :func:`_rows`' layout, back to ``d`` channels."""
    width = g.shape[-1]
    if d < width and rope == 2:
        g = torch.cat((g[..., : d // 2], g[..., width // 2 : width // 2 + d // 2]), -1)
    else:
        g = g[..., :d]
    return g.to(dtype)


# ---------------------------------------------------------------------------------------------
# Launchers.


def _common(q, k, sb, mask, rope, base, tile):
    batch, heads, length, d = q.shape
    tile = tile or tile_for(d, q.dtype, device_arch(q.device))
    if d > tile.block_h:
        raise ValueError(f"the tile's head block {tile.block_h} is narrower than the head size {d}")
    scale = 1.0 / max(d, 1) ** 0.5
    qr, kr = _rows(q, rope, tile.block_h), _rows(k, rope, tile.block_h)
    m8 = _aligned(mask.view(torch.uint8))
    table = _rope_table(length, d, tile.block_h, float(base), int(rope), q.device)
    return (batch, heads, sb.shape[1], length, d, qr, kr, scale, tile, m8, table)


def _meta(tile: Tile, dtype: torch.dtype, rope: int) -> dict:
    return dict(
        ROPE=int(rope),
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
    batch, heads, types, length, d, qr, kr, scale, tile, m8, table = _common(q, k, sb, mask, rope, base, tile)
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
        table,
        _aligned(row_ptr),
        _aligned(cols),
        state,
        heads,
        types,
        length,
        d,
        int(bool(tril)),
        scale,
        **_meta(tile, q.dtype, rope),
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
    batch, heads, types, length, d, qr, kr, scale, tile, m8, table = _common(q, k, sb, mask, rope, base, tile)
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.to(sb.dtype), deb.to(eb.dtype)
    grad = _aligned(grad.float())
    lse = _aligned(lse.float())
    dqr = torch.empty(qr.shape, dtype=torch.float32, device=q.device)
    dkr = torch.empty_like(dqr)
    args = (heads, types, length, d, int(bool(tril)), scale)
    inputs = (qr, kr, _aligned(sb), _aligned(eb), m8, table, _aligned(row_ptr), _aligned(cols), grad, lse)
    _gp_loss_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        *inputs, dqr, dsb, *args, **_meta(tile, q.dtype, rope)
    )
    _gp_loss_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        *inputs, dkr, deb, *args, **_meta(tile, q.dtype, rope)
    )
    # s = <scale R q, R k>: the kernels stored dq = scale R^T (G R k) and dk = R^T (G^T scale R q)
    return _unpadded(dqr, d, rope, q.dtype), _unpadded(dkr, d, rope, k.dtype), dsb.to(sb.dtype), deb.to(eb.dtype)


def scores_forward(q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """Masked ``(B, T, L, L)`` scores in q's dtype (``-inf`` where masked)."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8, table = _common(
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
        table,
        out,
        heads,
        types,
        length,
        d,
        int(bool(tril)),
        scale,
        **_meta(tile, q.dtype, rope),
    )
    return out


def scores_backward(grad, q, k, sb, eb, mask, rope, base, tril, *, tile: Tile | None = None):
    """``(dq, dk, d_start_bias, d_end_bias)`` of ``sum(grad * scores)`` over the unmasked spans,
    in the inputs' dtypes. ``grad``: ``(B, T, L, L)`` of q's dtype."""
    batch, heads, types, length, d, qr, kr, scale, tile, m8, table = _common(
        q, k, sb, mask, rope, base, tile or scores_tile_for(q.shape[-1], q.dtype, device_arch(q.device))
    )
    dsb = torch.zeros(batch, types, length, dtype=torch.float32, device=q.device)
    deb = torch.zeros_like(dsb)
    if batch == 0 or types == 0 or length == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dsb.to(sb.dtype), deb.to(eb.dtype)
    grad = _aligned(grad)
    dqr = torch.empty(qr.shape, dtype=torch.float32, device=q.device)
    dkr = torch.empty_like(dqr)
    args = (heads, types, length, d, int(bool(tril)), scale)
    _gp_scores_bwd_rows_kernel[(triton.cdiv(length, tile.block_m), batch * heads)](
        kr, m8, table, grad, dqr, dsb, *args, **_meta(tile, q.dtype, rope)
    )
    _gp_scores_bwd_cols_kernel[(triton.cdiv(length, tile.block_n), batch * heads)](
        qr, m8, table, grad, dkr, deb, *args, **_meta(tile, q.dtype, rope)
    )
    return _unpadded(dqr, d, rope, q.dtype), _unpadded(dkr, d, rope, k.dtype), dsb.to(sb.dtype), deb.to(eb.dtype)
