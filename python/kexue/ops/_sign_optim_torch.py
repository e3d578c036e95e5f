"""The ``torch`` backend of ``kexue::sign_optim_step``: the step table interpreted in PyTorch.

Line for line the C++ loop (csrc/cpu/sign_optim.cpp), in float32 for 16/32-bit tensors (float64
for float64 ones), with the table layout of :mod:`kexue._sign_table`. It serves devices and
dtypes no kernel serves, and it is the second, independent reading of the table contract that
the tests hold the kernels to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue._sign_random import element_bits, to_bf16_stochastic
from kexue._sign_table import (
    C_G,
    C_M,
    CENTRE,
    D_GSCALE,
    D_LR,
    D_M_M,
    D_MASK_K0,
    D_MASK_K1,
    D_ROUND_K0,
    D_ROUND_K1,
    D_SKIP,
    D_UPDATE,
    DYNAMIC,
    FLAGS,
    FREEZE_ABSENT,
    GSCALE,
    LAZY_ROWS,
    LR,
    M_G,
    M_M,
    MASK_D,
    MASK_F,
    MASK_K0,
    MASK_K1,
    MASK_THRESHOLD,
    MASK_UPDATE,
    NAN_GROUP,
    RMS_CARRIED,
    RMS_ROW,
    RMS_TENSOR,
    ROUND_K0,
    ROUND_K1,
    ROW_LEN,
    SHRINK,
    SHRINK_NOW,
    SSQ_OUT,
    STOCHASTIC_ROUND,
    UPDATE,
    USE_NEW_MOMENTUM,
    WD,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_squares(x: Tensor, row_len: int | None) -> Tensor:
    """Sum of squares in float64 (as the C++ kernel): of the whole tensor (shape (1,)), or of
    each row of ``row_len`` elements (shape (rows,)). The RMS factor is sqrt(ssq / count)."""
    x64 = x.detach().reshape(-1).double()
    if row_len is None:
        return x64.pow(2).sum().reshape(1)
    return x64.reshape(-1, row_len).pow(2).sum(-1)


def sign(c: Tensor) -> Tensor:
    """The step's sign: +-1 (+-inf included), 0 for +-0, and NaN for NaN (torch.sign gives 0 there,
    which would silently freeze an element whose momentum has become NaN)."""
    return torch.where(torch.isnan(c), c, torch.sign(c))


def any_non_finite(g: Tensor) -> bool:
    """The NaN guard's test: any NaN or +-inf in a gradient."""
    return not bool(torch.isfinite(g).all())


def _store_param(p: Tensor, value: Tensor, flags: int, keys: tuple[int, int]) -> None:
    if flags & STOCHASTIC_ROUND and p.dtype == torch.bfloat16:
        p.copy_(to_bf16_stochastic(value, keys).view(p.shape))
    else:
        p.copy_(value.view(p.shape))


def apply_dynamic(hyper_row: list[float], int_row: list[int], dyn_row: list[float]) -> bool:
    """A DYNAMIC row's values for this step from its dynamic-table row (as apply_dynamic() in C++),
    in place on the host rows; returns whether the row is to be skipped."""
    hyper_row[LR], hyper_row[M_M], hyper_row[GSCALE] = dyn_row[D_LR], dyn_row[D_M_M], dyn_row[D_GSCALE]
    if dyn_row[D_UPDATE] == 0.0:
        int_row[FLAGS] &= ~UPDATE
    for slot, d_slot in ((MASK_K0, D_MASK_K0), (MASK_K1, D_MASK_K1), (ROUND_K0, D_ROUND_K0), (ROUND_K1, D_ROUND_K1)):
        int_row[slot] = int(dyn_row[d_slot])
    return dyn_row[D_SKIP] != 0.0


def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    masks: list[Tensor | None],
    row_seen: list[Tensor],
    ssq: list[Tensor],
    hyper: Tensor,
    ints: Tensor,
    dyn: Tensor | None = None,
) -> None:
    """``kexue::sign_optim_step`` in PyTorch: same table, same arithmetic as the C++ kernel.

    Unlike the kernels, this backend reads device values on the host (the dynamic table, the NaN
    checks, the carried sums of squares): correct in capturable mode but not free of
    synchronisation.
    """
    h, iv = hyper.tolist(), ints.tolist()
    skip = [False] * len(params)
    if dyn is not None:
        d = dyn.tolist()
        for i in range(len(params)):
            if iv[i][FLAGS] & DYNAMIC:
                skip[i] = apply_dynamic(h[i], iv[i], d[i])
    bad_found: dict[int, bool] = {}
    for i, g in enumerate(grads):
        group = iv[i][NAN_GROUP]
        if group >= 0 and not skip[i]:
            bad_found[group] = bad_found.get(group, False) or any_non_finite(g)
    for i in range(len(params)):
        flags = iv[i][FLAGS]
        by_rows = iv[i][ROW_LEN] > 0 and flags & (RMS_ROW | LAZY_ROWS)
        row_len = iv[i][ROW_LEN] if by_rows and flags & RMS_ROW else None
        if not skip[i] and params[i].numel() > 0:
            shrink = (iv[i][NAN_GROUP] >= 0 and bad_found[iv[i][NAN_GROUP]]) or bool(flags & SHRINK_NOW)
            _one_tensor(params[i], grads[i], exp_avgs[i], masks[i], row_seen[i], ssq[i], h[i], iv[i], shrink)
        if flags & SSQ_OUT and params[i].numel() > 0:
            # Whatever happened (update, shrink, skip, no update): the sums of what theta now holds.
            ssq[i].copy_(sum_squares(params[i], row_len).to(ssq[i].device))


def _one_tensor(
    p: Tensor,
    grad: Tensor,
    m: Tensor,
    mask: Tensor | None,
    seen: Tensor,
    ssq: Tensor,
    hr: list[float],
    ir: list[int],
    shrink: bool,
) -> None:
    flags, row_len = ir[FLAGS], ir[ROW_LEN]
    ct = _compute_dtype(p.dtype)
    round_keys = (ir[ROUND_K0], ir[ROUND_K1])
    theta = p.detach().reshape(-1).to(ct)

    def coef(j):  # a table value rounded to the compute dtype, as the kernel does
        return torch.tensor(hr[j], dtype=ct)

    if shrink:
        _store_param(p, (theta - coef(CENTRE)) * coef(SHRINK) + coef(CENTRE), flags, round_keys)
        return
    g = grad.reshape(-1).to(ct)
    mom = m.reshape(-1).to(ct)
    gscale = coef(GSCALE)
    gate = None
    if flags & MASK_F:
        bits = element_bits((ir[MASK_K0], ir[MASK_K1]), p.numel(), p.device)
        gate = (bits >> 8) < ir[MASK_THRESHOLD]
    elif flags & MASK_D and mask is not None:
        gate = mask.reshape(-1).bool()
    # A masked element never sees its gradient, whatever it holds (NaN, inf).
    g_eff = g * gscale if gate is None else torch.where(gate, g * gscale, torch.zeros_like(g))

    by_rows = row_len > 0 and flags & (RMS_ROW | LAZY_ROWS)
    update = bool(flags & UPDATE)
    carried = bool(flags & RMS_CARRIED)
    # The learning rate: per tensor, or per row (a column vector broadcast over each row).
    lr = torch.tensor(hr[LR], dtype=torch.float64)
    if update and flags & RMS_TENSOR:
        s = ssq.double().cpu() if carried else sum_squares(theta, None)
        lr = lr * (s / p.numel()).sqrt().reshape(())
    elif update and by_rows and flags & RMS_ROW:
        s = ssq.double().cpu() if carried else sum_squares(theta, row_len)
        lr = lr * (s / row_len).sqrt().reshape(-1, 1)
    decay = (1.0 - lr * hr[WD]).to(ct)
    lr = lr.to(ct)

    movable = gate if (gate is not None and flags & MASK_UPDATE) else None
    keep_m = None
    if by_rows:
        rows = p.numel() // row_len
        present = (g.reshape(rows, row_len) != 0).any(-1)  # NaN counts as present
        live = present
        if flags & LAZY_ROWS:
            if seen.numel() > 0:  # empty: none
                live = present | (seen != 0)
                seen.copy_(torch.zeros_like(seen) if update else live.to(seen.dtype))
            row_ok = live[:, None].expand(rows, row_len).reshape(-1)
            movable = row_ok if movable is None else movable & row_ok
            if flags & FREEZE_ABSENT:
                keep_m = ~present[:, None].expand(rows, row_len).reshape(-1)
        theta_rows = theta.reshape(rows, row_len)
        mom_rows, g_rows = mom.reshape(rows, row_len), g_eff.reshape(rows, row_len)
    else:
        theta_rows, mom_rows, g_rows = theta, mom, g_eff

    new_m = coef(M_M) * mom_rows + coef(M_G) * g_rows
    if update:
        c = new_m if flags & USE_NEW_MOMENTUM else coef(C_M) * mom_rows + coef(C_G) * g_rows
        new_theta = (theta_rows * decay - lr * sign(c)).reshape(-1)
        if movable is not None:
            new_theta = torch.where(movable, new_theta, theta)
        _store_param(p, new_theta, flags, round_keys)
    new_m = new_m.reshape(-1)
    if keep_m is not None:
        new_m = torch.where(keep_m, mom, new_m)
    m.copy_(new_m.view(m.shape))
