"""Capturable mode of Lion and Tiger: the per-step values computed on the device.

With ``capturable=True`` the step counter is a float32 tensor on the parameter's device, the
learning rate may be a tensor (``group['lr']``, e.g. written in place by a scheduler), and
GradScaler's ``found_inf``/``grad_scale`` stay on the device. Nothing of a step may then be read
on the host, so the host table of each tensor (csrc/include/kexue/sign_optim.h) holds only what
does not change from step to step, and what does -- the learning rate, Tiger's momentum
coefficient and update switch under gradient accumulation, the gradient scale with 1/scale, the
skip flag, the keys of the random bits -- is computed here by torch ops into the dynamic table,
a (T, NUM_DYN) float64 tensor that the kernels read from device memory.

Every value is formed by the same float64 operations as the host table's, so a capturable step
gives the same bits as a non-capturable one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from kexue import _sign_table as table
from kexue._sign_random import stream_keys_from_step


@dataclass
class DynRow:
    """What one tensor's dynamic row is computed from (``capturable`` False: a placeholder row)."""

    capturable: bool
    lr: Tensor | float = 0.0  # the group's lr (alpha for Tiger)
    lr_factor: float = 0.0  # the row's lr is lr * lr_factor, as the host table forms it
    momentum_coef: float = 0.0  # the momentum coefficient at the start of an accumulation window
    accum_steps: int = 1  # k: the window starts at steps t with k | t, ends (updates) where k | t + 1
    gscale: float = 0.0  # the gradient multiplier before GradScaler's 1/scale
    step: Tensor | None = None  # float32 0-d on the device
    mask_prefix: int | None = None  # stream_prefix() of ChildTuning-F keys, or None
    round_prefix: int | None = None  # stream_prefix() of stochastic-rounding keys, or None


class DeviceConstants:
    """Small constant tensors kept on their device, so that a step after the first copies nothing
    from the host (a copy from pageable host memory cannot be captured in a CUDA graph)."""

    def __init__(self, limit: int = 64):
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._limit = limit

    def __call__(self, values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (device, dtype, tuple(values))
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = torch.tensor(values, dtype=dtype).to(device)
            if len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return value


def _words(prefixes: list[int]) -> list[tuple[int, int]]:
    """(hi, lo) 32-bit words of 64-bit values, as stream_keys_from_step takes them."""
    return [(x >> 32, x & 0xFFFFFFFF) for x in prefixes]


def dynamic_table(
    rows: list[DynRow],
    device: torch.device,
    consts: DeviceConstants,
    found_inf: Tensor | None,
    grad_scale: Tensor | None,
) -> Tensor:
    """The (T, NUM_DYN) float64 dynamic table of one call, by torch ops on ``device`` only."""
    f64 = torch.float64
    zero = consts([0.0], torch.float32, device)[0]
    lrs: dict[int, Tensor] = {}  # one device tensor per distinct lr object (groups share theirs)
    alpha = []
    for r in rows:
        if not r.capturable:
            alpha.append(zero.to(f64))
            continue
        if id(r.lr) not in lrs:
            lr = r.lr
            lrs[id(r.lr)] = (
                lr.to(device=device, dtype=f64)
                if isinstance(lr, Tensor)
                else torch.full((), float(lr), dtype=f64, device=device)
            )
        alpha.append(lrs[id(r.lr)].reshape(()))
    lr = torch.stack(alpha) * consts([r.lr_factor for r in rows], f64, device)
    t = torch.stack([r.step if r.capturable else zero for r in rows]).to(f64)
    k = consts([float(r.accum_steps) for r in rows], f64, device)
    m_m = torch.where(torch.remainder(t, k) == 0, consts([r.momentum_coef for r in rows], f64, device), 1.0)
    update = (torch.remainder(t + 1, k) == 0).to(f64)
    gscale = consts([r.gscale for r in rows], f64, device)
    if grad_scale is not None:
        gscale = gscale * (1.0 / grad_scale.to(device=device, dtype=f64).reshape(()))
    skip = torch.zeros_like(t) if found_inf is None else found_inf.to(device=device, dtype=f64).reshape(()).expand_as(t)
    keys = []
    for attr, stream in (("mask_prefix", table.MASK_STREAM), ("round_prefix", table.ROUND_STREAM)):
        prefixes = [getattr(r, attr) for r in rows]
        if all(x is None for x in prefixes):
            keys += [torch.zeros_like(t), torch.zeros_like(t)]
            continue
        words = consts(_words([x or 0 for x in prefixes]), torch.int64, device)
        k0, k1 = stream_keys_from_step(words, t, stream)
        keys += [k0.to(f64), k1.to(f64)]
    columns = [lr, m_m, gscale, update, skip] + keys
    assert len(columns) == table.NUM_DYN
    return torch.stack(columns, dim=1).contiguous()
