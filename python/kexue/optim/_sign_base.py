"""What Lion and Tiger share: the options, the step table, and the one fused call per device.

A step runs in four phases so that a bad input never leaves the model half-updated:

1. check every group's hyperparameters and every parameter, gradient and state tensor, raising
   a ``ValueError``/``TypeError`` that names ``param_groups[i]['params'][j]``
   (kexue/optim/_sign_checks.py);
2. create the missing state (momentum, step counter, per-row flags; kexue/optim/_sign_state.py,
   which also loads state_dicts);
3. build one table row per parameter (coefficients and flags, layout in kexue/_sign_table.py)
   -- the subclass says how its algorithm fills it; this module;
4. call ``kexue::sign_optim_step`` once per (device, backend) with all the tensors; this module.

Options common to both optimizers (each may differ per param group):

- ``momentum_dtype``: float32 (default) or bfloat16 (half the state, 2 bytes less traffic per
  parameter and step; the arithmetic stays float32).
- ``embedding`` (marks a group of embedding tables: rows along the last dim are tokens) with
  ``drift_guard`` (default True): rows whose gradient is all zero this step are not moved by
  their stale momentum (kexue.fm/archives/9736, "lazy" updates). As in bert4keras
  their momentum keeps decaying; ``freeze_absent_momentum=True`` keeps it unchanged instead.
  :func:`kexue.optim.embedding_param_groups` builds such groups for a model's ``nn.Embedding``s.
- ``child_tuning``: None, ``"F"`` (a fresh Bernoulli(``reserve_p``) gradient mask each step,
  kept gradients scaled by 1/p, drawn in the kernel from ``seed``, the parameter's index and its
  step) or ``"D"`` (fixed masks set with :meth:`set_child_tuning_masks`, e.g. from
  :class:`kexue.optim.FisherInformation`; no rescaling unless ``child_tuning_rescale``, as the
  official code). With ``mask_update=True`` (default) masked elements do not move at all;
  ``False`` masks only the gradient (momentum and weight decay still move them), as the official
  ChildTuning code does with AdamW.
- ``stochastic_rounding``: bfloat16 params are stored with stochastic rounding (keys from
  ``seed``), so updates smaller than half a bfloat16 ulp still move them on average.
- ``maximize``, ``weight_decay`` (decoupled), ``lr`` (a float, or a 1-element tensor).
- ``capturable`` (default False; as torch.optim's): the step makes no host synchronisation, so
  it can be captured in a CUDA graph. The step counter is a float32 tensor on the parameter's
  device (exact up to 2^24 steps, as torch's), ``lr`` may be a tensor that a scheduler writes in
  place (``group['lr'].fill_(...)``), GradScaler's inf flag and scale are read on the device, and
  everything that depends on them is computed there (kexue/optim/_capturable.py) and read by the
  kernel from device memory. The results are bitwise those of ``capturable=False``. Unlike
  torch.optim, CPU parameters are accepted (the C++ kernel reads the same tables there; useful
  for testing). A tensor ``lr`` of a capturable group is checked when the group is added, not at
  every step (that would read it). Not free of synchronisation: the ``torch`` backend (the
  float64 fallback) and Tiger's cross-rank reductions of sharded DTensor parameters, which
  capturable groups reject.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from kexue import _sign_table as table
from kexue._sign_random import stream_keys, stream_prefix
from kexue.ops import sign_optim as ops
from kexue.optim._capturable import DeviceConstants, DynRow, dynamic_table
from kexue.optim._carried_rms import CarriedRms
from kexue.optim._sharded import complete_reductions, local
from kexue.optim._sign_checks import ParamChecks, _Entry
from kexue.optim._sign_state import StateIO

_COMMON_DEFAULTS: dict[str, Any] = {
    "maximize": False,
    "momentum_dtype": torch.float32,
    "embedding": False,
    "drift_guard": True,
    "freeze_absent_momentum": False,
    "child_tuning": None,
    "reserve_p": 0.3,
    "mask_update": True,
    "child_tuning_rescale": False,
    "stochastic_rounding": False,
    "capturable": False,
}


# NaN-guard markers an algorithm puts in the NaN_GROUP column; _run turns them into group ids
# (table row indices) once the tensors of a call are known.
NAN_OWN = -2  # this tensor's own gradient decides (Tiger's default)
NAN_SHARED = -3  # one flag for every tensor of the call marked so (Tiger's "global" guard)


def _no_rows() -> Tensor:
    """The kernel's "no row_seen" placeholder (a fresh one each time: mutated lists must not alias)."""
    return torch.empty(0, dtype=torch.uint8)


class SignOptimizer(ParamChecks, StateIO, torch.optim.Optimizer):
    """Base of :class:`kexue.optim.Lion` and :class:`kexue.optim.Tiger` (not used directly)."""

    def __init__(self, params, defaults: dict[str, Any], options: dict[str, Any], seed: int | None):
        unknown = sorted(set(options) - set(_COMMON_DEFAULTS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected option(s) {unknown}; "
                f"the shared options are {sorted(_COMMON_DEFAULTS)}"
            )
        if seed is None:
            # Drawn from torch's generator, so torch.manual_seed() makes runs repeatable; kept in
            # the groups (and in state_dict) so a resumed run draws the same masks.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        full = {**_COMMON_DEFAULTS, **options, **defaults, "seed": int(seed)}
        self._device_constants = DeviceConstants()
        self._carried = CarriedRms()
        super().__init__(params, full)

    # -----------------------------------------------------------------------------------------
    # The table.

    def _algorithm_row(self, e: _Entry, t: int | None, floats: list[float], ints: list[int]) -> None:
        """Fill the algorithm's columns (wd, coefficients, flags, NaN group) of one row.

        The LR column gets the factor of the group's lr (the caller multiplies). ``t`` is the
        step, or None in capturable mode: then nothing may depend on it (the UPDATE flag means
        "may update"), and :meth:`_accumulation` says how the step enters.
        """
        raise NotImplementedError

    def _accumulation(self, group: dict) -> tuple[float, int]:
        """(momentum coefficient at the start of a window, steps k per window): with t the step,
        the momentum coefficient is that at k | t, else 1, and theta moves iff k | t + 1."""
        raise NotImplementedError

    def _table_row(
        self, e: _Entry, t: int | None
    ) -> tuple[list[float], list[int], Tensor | None, Tensor | None, DynRow]:
        """One tensor's host-table row, its masks, and (capturable mode, ``t`` None) its dynamic row."""
        group, p, state = e.group, e.param, self.state[e.param]
        dyn = DynRow(capturable=t is None)
        floats = [0.0] * table.NUM_FLOATS
        ints = [0] * table.NUM_INTS
        ints[table.NAN_GROUP] = -1
        floats[table.SHRINK], floats[table.CENTRE] = 1.0, 0.0
        gscale = -1.0 if group["maximize"] else 1.0
        flags = 0
        if group["embedding"] and group["drift_guard"]:
            flags |= table.LAZY_ROWS
            if group["freeze_absent_momentum"]:
                flags |= table.FREEZE_ABSENT
        if group["embedding"]:
            ints[table.ROW_LEN] = p.shape[-1]
        mask = None
        if group["child_tuning"] == "F":
            flags |= table.MASK_F
            if dyn.capturable:
                dyn.mask_prefix = stream_prefix(group["seed"], e.flat_index)
            else:
                k0, k1 = stream_keys(group["seed"], e.flat_index, t, table.MASK_STREAM)
                ints[table.MASK_K0], ints[table.MASK_K1] = k0, k1
            ints[table.MASK_THRESHOLD] = table.keep_threshold(group["reserve_p"])
            gscale /= group["reserve_p"]
        elif group["child_tuning"] == "D" and state.get("child_tuning_mask") is not None:
            flags |= table.MASK_D
            mask = state["child_tuning_mask"]
            if group["child_tuning_rescale"]:
                gscale /= group["reserve_p"]
        if group["child_tuning"] is not None and group["mask_update"]:
            flags |= table.MASK_UPDATE
        if group["stochastic_rounding"] and p.dtype == torch.bfloat16:
            flags |= table.STOCHASTIC_ROUND
            if dyn.capturable:
                dyn.round_prefix = stream_prefix(group["seed"], e.flat_index)
            else:
                ints[table.ROUND_K0], ints[table.ROUND_K1] = stream_keys(
                    group["seed"], e.flat_index, t, table.ROUND_STREAM
                )
        ints[table.FLAGS] = flags
        self._algorithm_row(e, t, floats, ints)
        if dyn.capturable:
            # The host row holds what does not change from step to step; the dynamic row the rest.
            ints[table.FLAGS] |= table.DYNAMIC
            floats[table.GSCALE] = gscale
            dyn.lr, dyn.lr_factor, dyn.gscale, dyn.step = group["lr"], floats[table.LR], gscale, state["step"]
            dyn.momentum_coef, dyn.accum_steps = self._accumulation(group)
        else:
            floats[table.GSCALE] = gscale * self._unscale
            floats[table.LR] = floats[table.LR] * float(group["lr"])
        return floats, ints, mask, state.get("row_seen"), dyn

    # -----------------------------------------------------------------------------------------
    # The step.

    # torch.amp.GradScaler hands the step its scale and inf flag (``grad_scale``/``found_inf``
    # attributes) instead of unscaling the gradients itself: the 1/scale is fused into the kernel's
    # gradient multiplier, so the gradients are read once.
    _step_supports_amp_scaling = True
    _unscale = 1.0
    _found_inf: Tensor | None = None  # capturable mode: GradScaler's flag and scale, on the device
    _grad_scale: Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (one micro-step for Tiger with gradient accumulation).

        Under ``torch.amp.GradScaler.step(optimizer)`` the gradients are unscaled inside the fused
        kernel, and a step whose scaled gradients held an inf or NaN is skipped entirely (params,
        momenta and step counters unchanged), as torch's fused optimizers do. Reading the scaler's
        flag costs one host synchronisation per step on CUDA, except when every group is
        capturable: then the kernels read the flag and the scale from device memory, and a skipped
        step leaves the step counters unchanged by adding 1 - found_inf to them.
        """
        self._accelerator_graph_capture_health_check()  # torch's: capturing a non-capturable step fails
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        on_device = all(group["capturable"] for group in self.param_groups)
        if found_inf is not None and not on_device and bool(found_inf.item()):
            return loss
        if on_device:
            self._found_inf, self._grad_scale = found_inf, grad_scale
        else:
            self._unscale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        try:
            self._fused_step()
        finally:
            self._unscale, self._found_inf, self._grad_scale = 1.0, None, None
        return loss

    def _fused_step(self) -> None:
        entries = self._collect()
        for e in entries:
            self._init_state(e)
        buckets: dict[tuple[torch.device, str], list[_Entry]] = defaultdict(list)
        for e in entries:
            buckets[(e.param.device, e.backend)].append(e)
        for bucket in buckets.values():
            self._run(bucket)
        counters = []
        for e in entries:
            state = self.state[e.param]
            if isinstance(state["step"], Tensor):
                counters.append(state["step"])
            else:
                state["step"] += 1
        if counters:  # capturable: + 1, or + 1 - found_inf on the device (a skipped step is not counted)
            for device, device_counters in _by_device(counters).items():
                if self._found_inf is None:
                    torch._foreach_add_(device_counters, 1.0)
                else:
                    inc = 1.0 - self._found_inf.to(device=device, dtype=torch.float32).reshape(())
                    torch._foreach_add_(device_counters, [inc] * len(device_counters))

    def _run(self, bucket: list[_Entry]) -> None:
        params, grads, moms, masks, seen, sums, rows_f, rows_i, rows_d = [], [], [], [], [], [], [], [], []
        for e in bucket:
            state = self.state[e.param]
            t = None if e.group["capturable"] else state["step"]
            floats, ints, mask, row_seen, dyn_row = self._table_row(e, t)
            rows_d.append(dyn_row)
            rows_f.append(floats)
            rows_i.append(ints)
            # The kernel needs contiguous memory; an odd parameter is updated through a copy.
            # DTensors (FSDP2) are updated through their local shards.
            param = local(e.param)
            params.append(param if param.is_contiguous() else param.contiguous())
            grads.append(local(e.grad).contiguous())
            moms.append(local(state["exp_avg"]))
            masks.append(None if mask is None else local(mask).contiguous())
            seen.append(_no_rows() if row_seen is None else row_seen)
            sums.append(self._carried.prepare(e.param, state, ints, e.backend, e.group["capturable"]))
        self._link_nan_groups(rows_i)
        complete_reductions([e.param for e in bucket], [e.grad for e in bucket], rows_f, rows_i)
        hyper = torch.tensor(rows_f, dtype=torch.float64).reshape(len(bucket), table.NUM_FLOATS)
        ints = torch.tensor(rows_i, dtype=torch.int64).reshape(len(bucket), table.NUM_INTS)
        dyn = None
        if any(r.capturable for r in rows_d):
            dyn = dynamic_table(rows_d, params[0].device, self._device_constants, self._found_inf, self._grad_scale)
        ops.fused_step(params, grads, moms, masks, seen, sums, hyper, ints, dyn)
        for e, work, row in zip(bucket, params, rows_i, strict=True):
            if work is not local(e.param):
                local(e.param).copy_(work)
            self._carried.record(e.param, row)

    @staticmethod
    def _link_nan_groups(rows_i: list[list[int]]) -> None:
        """Replace the NaN-guard markers by group ids: the row itself, or the first shared row."""
        shared = next((i for i, r in enumerate(rows_i) if r[table.NAN_GROUP] == NAN_SHARED), -1)
        for i, row in enumerate(rows_i):
            if row[table.NAN_GROUP] == NAN_OWN:
                row[table.NAN_GROUP] = i
            elif row[table.NAN_GROUP] == NAN_SHARED:
                row[table.NAN_GROUP] = shared


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = defaultdict(list)
    for t in tensors:
        out[t.device].append(t)
    return out


def flat_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters in state_dict order (their flat index keys ChildTuning-F and rounding streams)."""
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
