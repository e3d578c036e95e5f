"""The checks the ``kexue::sign_optim_step`` op body makes before any backend runs.

The optimizers build the step table correctly by construction and, in eager mode, call the backend
directly (:func:`kexue.ops.sign_optim.fused_step`). The custom op is also reached raw
(``torch.ops.kexue.sign_optim_step``) and from compiled graphs, and there the Triton kernel trusts
every length it is given: a short gradient or momentum would be read or written past its end. So the
op checks what the C++ launcher checks (csrc/include/kexue/sign_optim_host.h), in the same order and
with the same rules, and raises a ValueError/TypeError that names the argument. Metadata only: the
tables are CPU tensors, so nothing here synchronises with a device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _sign_table as table


def _by_rows(flags: int, row_len: int) -> bool:
    return row_len > 0 and bool(flags & (table.RMS_ROW | table.LAZY_ROWS))


def _check_table(name: str, t, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device or t.dtype != dtype or not t.is_contiguous() or tuple(t.shape) != (rows, cols):
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape ({rows}, {cols}) on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def check_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    masks: list[Tensor | None],
    row_seen: list[Tensor],
    ssq: list[Tensor],
    hyper: Tensor,
    ints: Tensor,
    dyn: Tensor | None,
) -> None:
    """Raise unless the step's tensors and table agree (see the module docstring)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(masks) == len(row_seen) == n):
        raise ValueError(
            "params, grads, exp_avgs, masks and row_seen must have the same length, got "
            f"{n}, {len(grads)}, {len(exp_avgs)}, {len(masks)}, {len(row_seen)}"
        )
    if len(ssq) not in (0, n):
        raise ValueError(f"ssq must be empty or have one entry per tensor ({n}), got {len(ssq)}")
    device = params[0].device
    cpu = torch.device("cpu")
    _check_table("hyper", hyper, n, table.NUM_FLOATS, torch.float64, cpu)
    _check_table("ints", ints, n, table.NUM_INTS, torch.int64, cpu)
    if dyn is not None:
        _check_table("dyn", dyn, n, table.NUM_DYN, torch.float64, device)
    rows = ints.tolist()
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        if p.device != device or g.device != device or m.device != device:
            raise ValueError(f"tensor {i}: param, grad and momentum must all be on {device}")
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()):
            raise ValueError(f"tensor {i}: param, grad and momentum must be contiguous")
        if g.numel() != p.numel() or m.numel() != p.numel():
            raise ValueError(
                f"tensor {i}: grad ({g.numel()}) and momentum ({m.numel()}) must have as many elements "
                f"as the param ({p.numel()})"
            )
        if g.dtype != p.dtype:
            raise TypeError(f"tensor {i}: grad dtype {g.dtype} must equal the param dtype {p.dtype}")
        if m.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"tensor {i}: momentum must be float32 or bfloat16, got {m.dtype}")
        flags, nan_group, row_len = rows[i][table.FLAGS], rows[i][table.NAN_GROUP], rows[i][table.ROW_LEN]
        if flags & table.DYNAMIC and dyn is None:
            raise ValueError(f"tensor {i} is flagged dynamic but no dyn table was given")
        if nan_group >= n:
            raise ValueError(f"tensor {i}: NaN group {nan_group} out of range for {n} tensors")
        by_rows = _by_rows(flags, row_len)
        if by_rows and p.numel() % row_len != 0:
            raise ValueError(f"tensor {i}: numel {p.numel()} is not a multiple of row_len {row_len}")
        mask = masks[i]
        if mask is not None and (
            mask.device != device
            or not mask.is_contiguous()
            or mask.numel() != p.numel()
            or mask.dtype not in (torch.bool, torch.uint8)
        ):
            raise ValueError(f"mask {i} must be a contiguous bool tensor shaped like its param on {device}")
        seen = row_seen[i]
        if (
            seen.numel() > 0
            and by_rows
            and (
                seen.device != device
                or not seen.is_contiguous()
                or seen.dtype != torch.uint8
                or seen.numel() != p.numel() // row_len
            )
        ):
            raise ValueError(f"row_seen {i} must be a contiguous uint8 tensor with one entry per row on {device}")
        if flags & (table.RMS_CARRIED | table.SSQ_OUT):
            per_row = by_rows and bool(flags & table.RMS_ROW)
            if by_rows and not per_row:
                raise ValueError(f"tensor {i}: carried sums of squares need a whole-tensor job or a row-wise RMS")
            if not ssq:
                raise ValueError(f"tensor {i} asks for carried sums of squares but no ssq was given")
            want = p.numel() // row_len if per_row else 1
            sq = ssq[i]
            if sq.device != device or not sq.is_contiguous() or sq.dtype != torch.float64 or sq.numel() != want:
                raise ValueError(f"ssq {i} must be a contiguous float64 tensor of {want} element(s) on {device}")
