"""Sign optimizers, Triton side: the launch plan (work items, pre-pass spans, device tables).

A plan says which programs each launch runs: work items of at most CHUNK elements (whole rows for
tensors updated row by row), one launch per (param dtype, momentum dtype), the pre-pass items of
the tensors that need one, and each tensor's span of partial sums for the finishing kernels.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch

from .sign_optim_layout import (
    _CODES,
    CHUNK,
    DYNAMIC,
    FLAGS,
    LAZY_ROWS,
    NAN_GROUP,
    RMS_CARRIED,
    RMS_ROW,
    RMS_TENSOR,
    ROW_LEN,
    SSQ_OUT,
    UPDATE,
)


def _items(tensors: list[int], numels: list[int], row_lens: list[int]) -> tuple[list[tuple], list[tuple]]:
    """Work items ``[tensor, begin, end]`` of CHUNK elements (whole rows where ``row_lens[t]``),
    and for each tensor ``(tensor, first item, item count, numel)``."""
    items, spans = [], []
    for t in tensors:
        n, row_len = numels[t], row_lens[t]
        step = max(1, CHUNK // row_len) * row_len if row_len > 0 else CHUNK
        spans.append((t, len(items), -(-n // step), n))
        items.extend((t, b, min(n, b + step)) for b in range(0, n, step))
    return items, spans


def _table(rows: list[tuple], width: int, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, width).to(device)


@dataclass
class _Plan:
    """The device tables of one call: addresses, the host tables, and the launches' work items."""

    addr: torch.Tensor
    hyper: torch.Tensor
    ints: torch.Tensor
    prepass: list[tuple[int, int, torch.Tensor]]  # (param code, first slot, items) per launch
    prepass_slots: int
    spans: torch.Tensor | None  # per tensor: (tensor, first slot, slot count, numel), for _finish_kernel
    steps: list[tuple[int, int, int, torch.Tensor]]  # (param code, momentum code, first slot, items) per launch
    step_slots: int
    outs: torch.Tensor | None  # per whole-tensor SSQ_OUT tensor: its span of step slots, for _ssq_out_kernel


# Plans of capturable calls, by everything a plan depends on. A capturable step's host tables do not
# change from step to step, so after the first step the plan is found here and the call copies
# nothing from the host (a copy from pageable host memory is not allowed in CUDA graph capture).
_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_MAX_PLANS = 16


def _plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints) -> _Plan:
    device = params[0].device
    T = len(params)
    iv = ints.tolist()
    for t, r in enumerate(iv):
        if r[FLAGS] & DYNAMIC and r[FLAGS] & (SSQ_OUT | RMS_CARRIED):
            raise ValueError(
                f"sign_optim_step (triton): tensor {t}: carried sums of squares are not served "
                f"in capturable mode (DYNAMIC rows)"
            )
    numels = [p.numel() for p in params]
    # Row-wise work items only where the kernel goes row by row (as by_rows() in C++).
    row_lens = [r[ROW_LEN] if r[ROW_LEN] > 0 and r[FLAGS] & (RMS_ROW | LAZY_ROWS) else 0 for r in iv]
    addr = torch.tensor(
        [
            [
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                0 if mk is None else mk.data_ptr(),
                s.data_ptr() if s.numel() > 0 else 0,
                q.data_ptr() if q.numel() > 0 else 0,
            ]
            for p, g, m, mk, s, q in zip(params, grads, exp_avgs, masks, row_seen, ssq, strict=True)
        ],
        dtype=torch.int64,
    ).to(device)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for t in range(T):
        if numels[t] > 0:
            buckets[(_CODES[params[t].dtype], _CODES[exp_avgs[t].dtype])].append(t)

    def needs_rms(t: int) -> bool:
        flags = iv[t][FLAGS]
        return bool(flags & RMS_TENSOR and flags & UPDATE)

    def wants_prepass(t: int) -> bool:
        return (needs_rms(t) and not iv[t][FLAGS] & RMS_CARRIED) or iv[t][NAN_GROUP] >= 0

    # One partial sum and NaN flag per pre-pass item, all buckets in one buffer; each bucket writes
    # its slice, then _finish_kernel reads every tensor's span of it (an empty span for a tensor whose
    # sum of squares is carried and that has no NaN guard).
    spans, prepass, total = [], [], 0
    for (pcode, _), ts in buckets.items():
        pre = [t for t in ts if wants_prepass(t)]
        if pre:
            items, bucket_spans = _items(pre, numels, [0] * T)
            spans += [(t, total + first, count, n) for t, first, count, n in bucket_spans]
            prepass.append((pcode, total, _table(items, 3, device)))
            total += len(items)
        spans += [(t, total, 0, numels[t]) for t in ts if needs_rms(t) and not wants_prepass(t)]
    # One partial sum per step item likewise, for the tensors that hand on a whole-tensor sum.
    steps, outs, slots = [], [], 0
    for (pcode, mcode), ts in buckets.items():
        items, bucket_spans = _items(ts, numels, row_lens)
        outs += [
            (t, slots + first, count, n)
            for t, first, count, n in bucket_spans
            if iv[t][FLAGS] & SSQ_OUT and not row_lens[t]
        ]
        steps.append((pcode, mcode, slots, _table(items, 3, device)))
        slots += len(items)
    return _Plan(
        addr,
        hyper.to(device=device, dtype=torch.float64),
        ints.to(device=device, dtype=torch.int64),
        prepass,
        total,
        _table(spans, 4, device) if spans else None,
        steps,
        slots,
        _table(outs, 4, device) if outs else None,
    )


def _cached_plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints) -> _Plan:
    key = (
        params[0].device,
        hyper.numpy().tobytes(),
        ints.numpy().tobytes(),
        tuple(
            (
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                0 if mk is None else mk.data_ptr(),
                s.data_ptr() if s.numel() > 0 else 0,
                q.data_ptr() if q.numel() > 0 else 0,
                p.numel(),
                p.dtype,
                m.dtype,
            )
            for p, g, m, mk, s, q in zip(params, grads, exp_avgs, masks, row_seen, ssq, strict=True)
        ),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints)
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan
