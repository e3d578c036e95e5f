"""Lion and Tiger in plain PyTorch: the oracle, and the ``torch`` backend of the fused step.

Two layers, kept apart on purpose so that each checks the other:

- :func:`lion_step` and :func:`tiger_step` are the oracle. They follow shared/spec/sign_optim.md
  in its own terms (beta1/beta2, beta and the accumulation counter, alpha * RMS, tensor kinds,
  the NaN guard, lazy embedding rows, ChildTuning masks) one tensor at a time, in the dtype of the
  tensors given: pass float64 copies for the oracle. They update their arguments in place.
- :func:`fused_step` is the ``torch`` backend of ``kexue::sign_optim_step``: the kernel's table
  contract (csrc/include/kexue/sign_optim.h) written in PyTorch, line for line as the C++ loop,
  in float32 for 16/32-bit tensors (float64 for float64 ones).

The random bits of ChildTuning-F and of stochastic rounding come from a counter-based hash of
(seed, parameter index, step, stream) and the element index (:func:`stream_keys`,
:func:`element_bits`), computed here with exact integer arithmetic so that every backend draws
the very same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# The step table (mirrors csrc/include/kexue/sign_optim.h).

LR, WD, C_M, C_G, M_M, M_G, GSCALE, SHRINK, CENTRE = range(9)
NUM_FLOATS = 9
FLAGS, NAN_GROUP, ROW_LEN, MASK_K0, MASK_K1, MASK_THRESHOLD, ROUND_K0, ROUND_K1 = range(8)
NUM_INTS = 8

USE_NEW_MOMENTUM = 1 << 0
UPDATE = 1 << 1
RMS_TENSOR = 1 << 2
RMS_ROW = 1 << 3
LAZY_ROWS = 1 << 4
FREEZE_ABSENT = 1 << 5
MASK_F = 1 << 6
MASK_D = 1 << 7
MASK_UPDATE = 1 << 8
STOCHASTIC_ROUND = 1 << 9
SHRINK_NOW = 1 << 10  # the NaN guard was decided on the host (sharded tensors)
DYNAMIC = 1 << 11  # capturable mode: the per-step values come from the dynamic table

# Columns of the dynamic table (float64, on the tensors' device; mirrors sign_optim.h).
D_LR, D_M_M, D_GSCALE, D_UPDATE, D_SKIP, D_MASK_K0, D_MASK_K1, D_ROUND_K0, D_ROUND_K1 = range(9)
NUM_DYN = 9

# Streams of random bits drawn from one (seed, parameter, step).
MASK_STREAM = 1
ROUND_STREAM = 2

TIGER_KINDS = ("matrix", "embedding", "bias", "gamma")

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


# ---------------------------------------------------------------------------------------------
# Counter-based random bits.


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al.): a well-mixed 64-bit function of a 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_prefix(seed: int, param_index: int) -> int:
    """The part of :func:`stream_keys` that does not depend on the step (64 bits)."""
    return splitmix64(splitmix64(seed & _M64) ^ (param_index & _M64))


def stream_keys(seed: int, param_index: int, step: int, stream: int) -> tuple[int, int]:
    """The two 32-bit keys of one parameter's random bits at one step, for one stream."""
    x = stream_prefix(seed, param_index)
    for word in (step, stream):
        x = splitmix64(x ^ (word & _M64))
    return x & _M32, x >> 32


# The same keys computed by torch ops on the device from a step counter held in a tensor
# (capturable mode: the host never reads the step). A 64-bit word is a pair (hi, lo) of int64
# tensors holding uint32 values, so that no intermediate overflows int64.


def _add64(x: tuple[Tensor, Tensor], c: int) -> tuple[Tensor, Tensor]:
    hi, lo = x
    lo = lo + (c & _M32)
    return (hi + (c >> 32) + (lo >> 32)) & _M32, lo & _M32


def _xor_shift64(x: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
    """``x ^ (x >> n)`` for 0 < n < 32."""
    hi, lo = x
    return hi ^ (hi >> n), lo ^ (((lo >> n) | (hi << (32 - n))) & _M32)


def _mul64(x: tuple[Tensor, Tensor], c: int) -> tuple[Tensor, Tensor]:
    """``x * c mod 2^64``: the low word's full 64-bit product from 16-bit halves of c, the cross
    terms mod 2^32 (:func:`_mul32`)."""
    hi, lo = x
    c_lo, c_hi = c & _M32, c >> 32
    p0, p1 = lo * (c_lo & 0xFFFF), lo * (c_lo >> 16)  # each < 2^48
    low = p0 + ((p1 & 0xFFFF) << 16)
    high = (p1 >> 16) + (low >> 32) + _mul32(lo, c_hi) + _mul32(hi, c_lo)
    return high & _M32, low & _M32


def _splitmix64_words(x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`splitmix64` on (hi, lo) words."""
    x = _add64(x, 0x9E3779B97F4A7C15)
    x = _mul64(_xor_shift64(x, 30), 0xBF58476D1CE4E5B9)
    x = _mul64(_xor_shift64(x, 27), 0x94D049BB133111EB)
    return _xor_shift64(x, 31)


def stream_keys_from_step(prefix: Tensor, step: Tensor, stream: int) -> tuple[Tensor, Tensor]:
    """:func:`stream_keys` for a batch of parameters with torch ops on the step tensors' device.

    ``prefix``: int64 (N, 2) tensor of the (hi, lo) words of :func:`stream_prefix`; ``step``: (N,)
    step counters (float or int, whole numbers below 2^32). Returns the two int64 key tensors (N,).
    """
    t = step.to(torch.int64) & _M32
    x = _splitmix64_words((prefix[:, 0], prefix[:, 1] ^ t))
    hi, lo = _splitmix64_words((x[0], x[1] ^ (stream & _M32)))
    return lo, hi


def keep_threshold(p: float) -> int:
    """ChildTuning-F keeps an element iff ``(bits >> 8) < threshold``: probability threshold/2^24 ~ p."""
    return max(0, min(1 << 24, round(p * (1 << 24))))


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 tensors holding uint32 values, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: Tensor) -> Tensor:
    """The "lowbias32" hash of sign_optim.h on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def element_bits(keys: tuple[int, int], numel: int, device=None) -> Tensor:
    """32 random bits for each element index 0..numel-1 (int64 tensor), as the kernels draw them."""
    k0, k1 = keys
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return _mix32(_mix32((index & _M32) ^ k0) ^ (index >> 32) ^ k1)


def child_tuning_f_gate(keys: tuple[int, int], p: float, numel: int, device=None) -> Tensor:
    """ChildTuning-F's Bernoulli(p) keep mask (bool, flat) for one parameter at one step."""
    return (element_bits(keys, numel, device) >> 8) < keep_threshold(p)


def to_bf16_stochastic(x: Tensor, keys: tuple[int, int]) -> Tensor:
    """Stochastic rounding of float32 ``x`` to bfloat16 with the kernels' random bits."""
    x = x.float().contiguous()
    bits = x.view(torch.int32).to(torch.int64) & _M32
    noise = element_bits(keys, x.numel(), x.device).view(x.shape) & 0xFFFF
    top = ((bits + noise) >> 16) & 0xFFFF
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as int16 two's complement
    rounded = top.to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# The oracle.


def _sign(c: Tensor) -> Tensor:
    return torch.sign(c)  # sign(0) = 0, sign(NaN) = NaN


def _row_present(grad: Tensor) -> Tensor:
    """For an embedding table: which rows (vectors along the last dim) have any nonzero gradient."""
    return (grad != 0).reshape(-1, grad.shape[-1]).any(-1)


def _rowwise(mask_rows: Tensor, like: Tensor) -> Tensor:
    """A per-row bool broadcast to the element shape of ``like``."""
    return mask_rows[:, None].expand(-1, like.shape[-1]).reshape(like.shape)


def _per_tensor(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per tensor ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def _masked_grad(grad: Tensor, maximize: bool, grad_mask: Tensor | None, mask_scale: float):
    """The gradient the momentum sees: negated for maximize, ChildTuning-masked and rescaled."""
    g = -grad if maximize else grad
    if grad_mask is None:
        return g
    return torch.where(grad_mask.reshape(g.shape), g * mask_scale, torch.zeros_like(g))


def _movable(param: Tensor, grad_mask: Tensor | None, mask_update: bool, row_live: Tensor | None) -> Tensor | None:
    """Which elements may move this step (None: all of them)."""
    ok = None
    if grad_mask is not None and mask_update:
        ok = grad_mask.reshape(param.shape)
    if row_live is not None:
        rows = _rowwise(row_live, param)
        ok = rows if ok is None else ok & rows
    return ok


def lion_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_masks: Sequence[Tensor | None] | None = None,
    mask_scale: float | Sequence[float] = 1.0,
    mask_update: bool = True,
    lazy_rows: bool | Sequence[bool] = False,
    freeze_absent: bool = False,
) -> None:
    r"""One Lion step (Chen et al. 2023) over a list of tensors, in place.

    c = beta1 m + (1 - beta1) g;  theta <- theta - lr (sign(c) + wd theta);  m <- beta2 m + (1 - beta2) g.

    ``grad_masks`` (bool, per tensor or None): ChildTuning keep masks; kept gradients are multiplied
    by ``mask_scale`` (1/p for ChildTuning-F), dropped ones are zero, and with ``mask_update``
    dropped elements are not stepped. ``lazy_rows`` (per tensor): embedding tables whose rows with
    an all-zero gradient are not stepped (their momentum still decays unless ``freeze_absent``).
    """
    n = len(params)
    masks = _per_tensor(grad_masks, n, "grad_masks")
    scales = _per_tensor(mask_scale, n, "mask_scale")
    lazy = _per_tensor(lazy_rows, n, "lazy_rows")
    for p, grad, m, mask, scale, is_lazy in zip(params, grads, exp_avgs, masks, scales, lazy, strict=True):
        g = _masked_grad(grad, maximize, mask, scale)
        present = _row_present(grad) if is_lazy else None
        c = beta1 * m + (1 - beta1) * g
        new_p = p - lr * (_sign(c) + weight_decay * p)
        ok = _movable(p, mask, mask_update, present)
        p.copy_(new_p if ok is None else torch.where(ok, new_p, p))
        new_m = beta2 * m + (1 - beta2) * g
        if is_lazy and freeze_absent:
            new_m = torch.where(_rowwise(present, m), new_m, m)
        m.copy_(new_m)


def tiger_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta: float = 0.965,
    step: int | Sequence[int] = 0,
    grad_accum_steps: int = 1,
    kinds: str | Sequence[str] = "matrix",
    weight_decay: float = 0.01,
    elementwise_lr: float = 0.5,
    rms_scale: bool | float = True,
    nan_guard: str | None = "tensor",
    shrink_ratio: float = 0.99,
    maximize: bool = False,
    grad_masks: Sequence[Tensor | None] | None = None,
    mask_scale: float | Sequence[float] = 1.0,
    mask_update: bool = True,
    lazy_rows: bool | Sequence[bool] = False,
    freeze_absent: bool = False,
    row_seen: Sequence[Tensor | None] | None = None,
) -> None:
    r"""One Tiger micro-step (Su 2023, bojone/tiger ``tiger.py``) over a list of tensors, in place.

    With t = ``step`` (0-based, counting micro-steps) and k = ``grad_accum_steps``:

        b1 = beta if t % k == 0 else 1;   m <- b1 m + (1 - beta)/k g
        if (t + 1) % k == 0:  theta <- theta - eta (sign(m) + wd theta)

    eta = ``lr`` * RMS(theta) over the tensor ("matrix"), over each row along the last dim
    ("embedding"), or ``elementwise_lr * lr`` with wd = 0 for "bias" and "gamma" (norm gains).
    ``rms_scale`` = a float replaces RMS(theta) by that constant (Su: 1/sqrt(hidden)).

    NaN guard: a tensor whose gradient holds a NaN ("tensor"), or every tensor when any gradient
    does ("global"), keeps its momentum and shrinks theta <- (theta - c) s + c (c = 1 for "gamma",
    else 0), on every micro-step. ``lazy_rows``/``row_seen``: an embedding row moves on the update
    micro-step iff it had a nonzero gradient in some micro-step of the window (``row_seen`` holds
    that flag between micro-steps and is updated in place).
    """
    n = len(params)
    steps = _per_tensor(step, n, "step")
    kinds_ = _per_tensor(kinds, n, "kinds")
    masks = _per_tensor(grad_masks, n, "grad_masks")
    scales = _per_tensor(mask_scale, n, "mask_scale")
    lazy = _per_tensor(lazy_rows, n, "lazy_rows")
    seen = _per_tensor(row_seen, n, "row_seen")
    k = grad_accum_steps
    has_nan = [bool(torch.isnan(g).any()) for g in grads]
    if nan_guard == "global":
        has_nan = [any(has_nan)] * n
    elif nan_guard is None:
        has_nan = [False] * n

    for i, (p, grad, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        kind, t = kinds_[i], steps[i]
        if kind not in TIGER_KINDS:
            raise ValueError(f"kind must be one of {TIGER_KINDS}, got {kind!r}")
        if has_nan[i]:
            centre = 1.0 if kind == "gamma" else 0.0
            p.copy_((p - centre) * shrink_ratio + centre)
            continue
        g = _masked_grad(grad, maximize, masks[i], scales[i])
        b1 = beta if t % k == 0 else 1.0
        new_m = b1 * m + (1 - beta) / k * g
        live = None
        if lazy[i]:
            present = _row_present(grad)
            if freeze_absent:
                new_m = torch.where(_rowwise(present, m), new_m, m)
            live = present if seen[i] is None else present | seen[i].bool()
        m.copy_(new_m)
        if (t + 1) % k != 0:
            if seen[i] is not None and live is not None:
                seen[i].copy_(live)
            continue
        if seen[i] is not None:
            seen[i].zero_()
        if kind in ("bias", "gamma"):
            eta, wd = elementwise_lr * lr, 0.0
        elif not isinstance(rms_scale, bool):
            eta, wd = lr * rms_scale, weight_decay
        elif rms_scale and kind == "embedding":
            eta, wd = lr * p.pow(2).mean(-1, keepdim=True).sqrt(), weight_decay
        elif rms_scale:
            eta, wd = lr * p.pow(2).mean().sqrt(), weight_decay
        else:
            eta, wd = lr, weight_decay
        new_p = p - eta * (_sign(m) + wd * p)
        ok = _movable(p, masks[i], mask_update, live)
        p.copy_(new_p if ok is None else torch.where(ok, new_p, p))


# ---------------------------------------------------------------------------------------------
# The torch backend: the kernel's table, interpreted in PyTorch.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms(x: Tensor, rows: int | None) -> Tensor:
    """RMS accumulated in float64 (as the C++ kernel): whole tensor, or per row of length ``rows``."""
    x64 = x.double()
    if rows is None:
        return x64.pow(2).mean().sqrt()
    return x64.reshape(-1, rows).pow(2).mean(-1, keepdim=True).sqrt()


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
    hyper: Tensor,
    ints: Tensor,
    dyn: Tensor | None = None,
) -> None:
    """``kexue::sign_optim_step`` in PyTorch: same table, same arithmetic as the C++ kernel.

    Unlike the kernels, this backend reads device values on the host (the dynamic table, the NaN
    checks): it is correct in capturable mode but not free of synchronisation.
    """
    h, iv = hyper.tolist(), ints.tolist()
    skip = [False] * len(params)
    if dyn is not None:
        d = dyn.tolist()
        for i in range(len(params)):
            if iv[i][FLAGS] & DYNAMIC:
                skip[i] = apply_dynamic(h[i], iv[i], d[i])
    nan_found: dict[int, bool] = {}
    for i, g in enumerate(grads):
        group = iv[i][NAN_GROUP]
        if group >= 0 and not skip[i]:
            nan_found[group] = nan_found.get(group, False) or bool(torch.isnan(g).any())

    for i, (p, grad, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        if p.numel() == 0 or skip[i]:
            continue
        hr, ir = h[i], iv[i]
        flags, row_len = ir[FLAGS], ir[ROW_LEN]
        ct = _compute_dtype(p.dtype)
        round_keys = (ir[ROUND_K0], ir[ROUND_K1])
        theta = p.detach().reshape(-1).to(ct)
        if (ir[NAN_GROUP] >= 0 and nan_found[ir[NAN_GROUP]]) or flags & SHRINK_NOW:
            shrink, centre = (torch.tensor(hr[j], dtype=ct) for j in (SHRINK, CENTRE))
            _store_param(p, (theta - centre) * shrink + centre, flags, round_keys)
            continue

        def coef(j, hr=hr, ct=ct):  # a table value rounded to the compute dtype, as the kernel does
            return torch.tensor(hr[j], dtype=ct)

        g = grad.reshape(-1).to(ct)
        mom = m.reshape(-1).to(ct)
        gscale = coef(GSCALE)
        gate = None
        if flags & MASK_F:
            bits = element_bits((ir[MASK_K0], ir[MASK_K1]), p.numel(), p.device)
            gate = (bits >> 8) < ir[MASK_THRESHOLD]
        elif flags & MASK_D and masks[i] is not None:
            gate = masks[i].reshape(-1).bool()
        g_eff = g * gscale if gate is None else torch.where(gate, g * gscale, torch.zeros_like(g))

        by_rows = row_len > 0 and flags & (RMS_ROW | LAZY_ROWS)
        update = bool(flags & UPDATE)
        # The learning rate: per tensor, or per row (a column vector broadcast over each row).
        lr = torch.tensor(hr[LR], dtype=torch.float64)
        if update and flags & RMS_TENSOR:
            lr = lr * _rms(theta, None)
        elif update and by_rows and flags & RMS_ROW:
            lr = lr * _rms(theta, row_len)
        decay = (1.0 - lr * hr[WD]).to(ct)
        lr = lr.to(ct)

        movable = gate if (gate is not None and flags & MASK_UPDATE) else None
        keep_m = None
        if by_rows:
            rows = p.numel() // row_len
            present = (g.reshape(rows, row_len) != 0).any(-1)
            live = present
            if flags & LAZY_ROWS:
                seen = row_seen[i]
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
            new_theta = (theta_rows * decay - lr * torch.sign(c)).reshape(-1)
            if movable is not None:
                new_theta = torch.where(movable, new_theta, theta)
            _store_param(p, new_theta, flags, round_keys)
        new_m = new_m.reshape(-1)
        if keep_m is not None:
            new_m = torch.where(keep_m, mom, new_m)
        m.copy_(new_m.view(m.shape))
