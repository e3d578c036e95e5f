"""What Lion and Tiger share: validation, state, the step table, and the one fused call per device.

A step runs in four phases so that a bad input never leaves the model half-updated:

1. check every group's hyperparameters and every parameter, gradient and state tensor, raising
   a ``ValueError``/``TypeError`` that names ``param_groups[i]['params'][j]``;
2. create the missing state (momentum, step counter, per-row flags);
3. build one table row per parameter (coefficients and flags, see
   csrc/include/kexue/sign_optim.h) -- the subclass says how its algorithm fills it;
4. call ``kexue::sign_optim_step`` once per (device, backend) with all the tensors.

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

import functools
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from kexue import _sign_table as table
from kexue._sign_random import stream_keys, stream_prefix
from kexue.ops import sign_optim as ops
from kexue.optim._capturable import DeviceConstants, DynRow, dynamic_table
from kexue.optim._carried_rms import CarriedRms
from kexue.optim._sharded import complete_reductions, local, sharded_last_dim

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

_STATE_TENSORS = ("exp_avg", "child_tuning_mask", "row_seen", "rms_ssq")
_PARAM_DTYPES = ops.PARAM_DTYPES + (torch.float64,)  # float64: the torch backend only

# NaN-guard markers an algorithm puts in the NaN_GROUP column; _run turns them into group ids
# (table row indices) once the tensors of a call are known.
NAN_OWN = -2  # this tensor's own gradient decides (Tiger's default)
NAN_SHARED = -3  # one flag for every tensor of the call marked so (Tiger's "global" guard)


@dataclass
class _Entry:
    """One parameter that takes part in this step."""

    group_index: int
    param_index: int  # index within the group
    flat_index: int  # index over all groups, as in state_dict(): keys the random streams
    group: dict
    param: Tensor
    grad: Tensor
    backend: str


def _no_rows() -> Tensor:
    """The kernel's "no row_seen" placeholder (a fresh one each time: mutated lists must not alias)."""
    return torch.empty(0, dtype=torch.uint8)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class SignOptimizer(torch.optim.Optimizer):
    """Base of :class:`kexue.optim.Lion` and :class:`kexue.optim.Tiger` (not used directly)."""

    def __init__(self, params, defaults: dict[str, Any], options: dict[str, Any], seed: int | None):
        unknown = sorted(set(options) - set(_COMMON_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {unknown}; "
                            f"the shared options are {sorted(_COMMON_DEFAULTS)}")
        if seed is None:
            # Drawn from torch's generator, so torch.manual_seed() makes runs repeatable; kept in
            # the groups (and in state_dict) so a resumed run draws the same masks.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        full = {**_COMMON_DEFAULTS, **options, **defaults, "seed": int(seed)}
        self._device_constants = DeviceConstants()
        self._carried = CarriedRms()
        super().__init__(params, full)

    # -----------------------------------------------------------------------------------------
    # Validation.

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1, read_tensors=True)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _group_error(self, gi: int, message: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: param_groups[{gi}]: {message}")

    def _check_group(self, group: dict[str, Any], gi: int, read_tensors: bool = False) -> None:
        """Raise ValueError naming the group for any bad hyperparameter.

        A 1-element tensor value is read (a host synchronisation) unless the group is capturable
        and ``read_tensors`` is False, as at every step of a capturable optimizer.
        """
        if not isinstance(group["capturable"], bool):
            raise self._group_error(gi, f"capturable must be a bool, got {group['capturable']!r}")
        read = read_tensors or not group["capturable"]

        def real(key, low=-math.inf, high=math.inf, low_open=False, high_open=False):
            value = group[key]
            if isinstance(value, Tensor) and value.numel() == 1:
                if not read:
                    return
                value = value.item()
            ok = _is_real(value) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                lo = f"{'(' if low_open else '['}{low}"
                hi = f"{high}{')' if high_open else ']'}"
                raise self._group_error(gi, f"{key} must be a real number in {lo}, {hi}, got {value!r}")

        real("lr", 0.0)
        real("weight_decay", 0.0)
        for key in ("maximize", "embedding", "drift_guard", "freeze_absent_momentum", "mask_update",
                    "child_tuning_rescale", "stochastic_rounding"):
            if not isinstance(group[key], bool):
                raise self._group_error(gi, f"{key} must be a bool, got {group[key]!r}")
        if group["momentum_dtype"] not in ops.MOMENTUM_DTYPES:
            raise self._group_error(gi, f"momentum_dtype must be torch.float32 or torch.bfloat16, "
                                        f"got {group['momentum_dtype']!r}")
        if group["child_tuning"] not in (None, "F", "D"):
            raise self._group_error(gi, f"child_tuning must be None, 'F' or 'D', got {group['child_tuning']!r}")
        real("reserve_p", 0.0, 1.0, low_open=True)
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise self._group_error(gi, f"seed must be an int, got {group['seed']!r}")
        self._check_algorithm_group(group, gi, real)

    def _check_algorithm_group(self, group: dict[str, Any], gi: int, real) -> None:
        raise NotImplementedError

    def _where(self, gi: int, pi: int, group: dict) -> str:
        names = group.get("param_names")
        name = f" ({names[pi]!r})" if names is not None and pi < len(names) else ""
        return f"{type(self).__name__}: param_groups[{gi}]['params'][{pi}]{name}"

    def _check_state(self, where: Callable[[], str], p: Tensor, state: Mapping[str, Any], devices: bool = True) -> None:
        """Shapes, dtypes and (unless ``devices`` is False, as when loading) devices of the state."""
        m = state.get("exp_avg")
        if m is None:
            pass  # not created yet (the state may hold only a ChildTuning-D mask)
        elif not isinstance(m, Tensor):
            raise ValueError(f"{where()}: state 'exp_avg' must be a tensor, got {type(m).__name__}")
        elif m.shape != p.shape:
            raise ValueError(f"{where()}: state 'exp_avg' has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        elif devices and m.device != p.device:
            raise ValueError(f"{where()}: state 'exp_avg' is on {m.device}, the parameter on {p.device}")
        elif m.dtype not in ops.MOMENTUM_DTYPES:
            raise TypeError(f"{where()}: state 'exp_avg' has dtype {m.dtype}; expected float32 or bfloat16")
        mask = state.get("child_tuning_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != p.shape
                                 or (devices and mask.device != p.device)):
            raise ValueError(f"{where()}: state 'child_tuning_mask' must be a tensor shaped and placed like the "
                             f"parameter {tuple(p.shape)} on {p.device}")
        seen = state.get("row_seen")
        if seen is not None:
            rows = local(p).numel() // p.shape[-1] if p.dim() >= 1 and p.shape[-1] > 0 else 0
            if not isinstance(seen, Tensor) or seen.shape != (rows,) or (devices and seen.device != p.device):
                raise ValueError(f"{where()}: state 'row_seen' must be a tensor of shape ({rows},) on {p.device}")

    def _check_algorithm_param(self, where: Callable[[], str], group: dict, pi: int, p: Tensor) -> None:
        """Algorithm-specific checks of one parameter (raise ValueError/TypeError)."""

    def _check_param(self, gi: int, pi: int, group: dict, p: Tensor, backends: dict) -> str:
        """Check one parameter, its gradient and state; returns the backend that will serve it.

        ``backends`` caches the backend per (device, dtype) within a step. Messages are formatted
        only on failure: this runs for every parameter at every step.
        """
        g = p.grad
        problem = None
        if g.layout != torch.strided:
            problem = TypeError(f"{type(self).__name__} does not support sparse gradients "
                                f"(layout {g.layout}); use a dense embedding (sparse=False)")
        elif p.is_complex() or g.is_complex():
            problem = TypeError("complex parameters/gradients are not supported "
                                "(view them as real with torch.view_as_real)")
        elif p.dtype not in _PARAM_DTYPES:
            problem = TypeError(f"parameter dtype {p.dtype} is not supported; expected float32, bfloat16 or float16")
        elif g.dtype != p.dtype:
            problem = TypeError(f"gradient dtype {g.dtype} differs from the parameter dtype {p.dtype}")
        elif g.shape != p.shape:
            problem = ValueError(f"gradient shape {tuple(g.shape)} differs from the parameter {tuple(p.shape)}")
        elif g.device != p.device:
            problem = ValueError(f"gradient is on {g.device}, the parameter on {p.device}")
        elif group["embedding"] and p.dim() < 2:
            problem = ValueError(f"an 'embedding' group holds tables of rows (at least 2 dims), "
                                 f"got shape {tuple(p.shape)}")
        elif group["embedding"] and sharded_last_dim(p):
            problem = ValueError("an 'embedding' table must not be sharded along its last dimension "
                                 "(its rows would straddle ranks); shard it along dim 0")
        if problem is not None:
            raise type(problem)(f"{self._where(gi, pi, group)}: {problem}")
        where = functools.partial(self._where, gi, pi, group)
        self._check_algorithm_param(where, group, pi, p)
        state = self.state.get(p)
        if state:
            self._check_state(where, p, state)
        key = (p.device, p.dtype)
        if key not in backends:
            try:
                backends[key] = ops.select_backend(p)
            except Exception as exc:
                raise type(exc)(f"{where()}: {exc}") from None
        return backends[key]

    def _collect(self) -> list[_Entry]:
        """Phase 1: validate everything; the parameters that take part in this step."""
        entries = []
        backends: dict = {}
        flat = 0
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            for pi, p in enumerate(group["params"]):
                index, flat = flat, flat + 1
                if p.grad is None:
                    continue
                backend = self._check_param(gi, pi, group, p, backends)
                entries.append(_Entry(gi, pi, index, group, p, p.grad, backend))
        return entries

    # -----------------------------------------------------------------------------------------
    # State.

    def _needs_row_seen(self, group: dict) -> bool:
        """Whether lazy rows must remember rows seen earlier in an accumulation window."""
        return False

    @staticmethod
    def _step_value(step, capturable: bool, device: torch.device):
        """The step counter as the group keeps it: an int, or (capturable) a float32 tensor on the
        parameter's device. Converting a counter from the other kind reads or copies it once."""
        if not capturable:
            return int(step)
        if isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == device and step.dim() == 0:
            return step
        return torch.as_tensor(step, dtype=torch.float32).reshape(()).to(device)

    def _init_state(self, e: _Entry) -> None:
        """Phase 2: create or adapt the state of one parameter (nothing can fail here)."""
        state = self.state[e.param]
        group, p = e.group, e.param
        if "exp_avg" not in state:
            state["step"] = 0
            # zeros_like: a DTensor parameter gets a DTensor momentum sharded like it
            state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"], memory_format=torch.contiguous_format)
        elif state["exp_avg"].dtype != group["momentum_dtype"] or not local(state["exp_avg"]).is_contiguous():
            state["exp_avg"] = state["exp_avg"].to(group["momentum_dtype"]).contiguous()
        state["step"] = self._step_value(state.get("step", 0), group["capturable"], local(p).device)
        if group["embedding"] and group["drift_guard"] and self._needs_row_seen(group):
            if "row_seen" not in state:
                rows = local(p).numel() // p.shape[-1]  # the rows of this rank's shard
                state["row_seen"] = torch.zeros(rows, dtype=torch.uint8, device=p.device)
        else:
            state.pop("row_seen", None)

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

    def _table_row(self, e: _Entry, t: int | None) -> tuple[list[float], list[int], Tensor | None, Tensor | None,
                                                          DynRow]:
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
                    group["seed"], e.flat_index, t, table.ROUND_STREAM)
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

    # -----------------------------------------------------------------------------------------
    # ChildTuning-D masks and state_dict.

    def set_child_tuning_masks(self, masks: Mapping[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]) -> None:
        """Fixed ChildTuning-D masks: ``{param: bool mask shaped like it}`` (True = trainable).

        Parameters of groups with ``child_tuning="D"`` that have no mask are updated normally (as
        the official code does for parameters outside its mask dict). Masks are saved in the state.
        """
        items = list(masks.items() if isinstance(masks, Mapping) else masks)
        known = {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        checked = []
        for p, mask in items:
            if id(p) not in known:
                raise ValueError(f"{type(self).__name__}: set_child_tuning_masks got a tensor of shape "
                                 f"{tuple(p.shape)} that is not a parameter of this optimizer")
            gi, pi = known[id(p)]
            if not isinstance(mask, Tensor) or mask.shape != p.shape:
                where = self._where(gi, pi, self.param_groups[gi])
                raise ValueError(f"{where}: the ChildTuning-D mask must be a tensor of shape {tuple(p.shape)}")
            checked.append((p, mask.to(device=p.device, dtype=torch.bool).contiguous()))
        for p, mask in checked:
            self.state[p]["child_tuning_mask"] = mask

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but state tensors keep their own dtypes (torch casts all to the param's).

        Checked first, so that a state of the wrong shape is an error naming the parameter and
        nothing is loaded. ``capturable`` is an execution mode of this optimizer, not part of the
        saved run: each group keeps its own (torch.optim takes the saved one), and the step
        counters become what it keeps -- ints, or float32 tensors on the parameters' devices for
        capturable groups -- whichever kind was saved.
        """
        self._check_saved(state_dict)
        self._carried.forget()  # the params may be restored from anywhere: recompute the sums once
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        same_layout = len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups, strict=True))
        if not same_layout:
            return super().load_state_dict(state_dict)  # torch raises its own clear error
        where_of = {}
        id_map = {}
        for gi, (g, s) in enumerate(zip(groups, saved_groups, strict=True)):
            for pi, (p, k) in enumerate(zip(g["params"], s["params"], strict=True)):
                id_map[k] = p
                where_of[k] = self._where(gi, pi, g)
        capturable = [g["capturable"] for g in groups]
        saved_state = {k: dict(v) for k, v in state_dict["state"].items()}
        for k, v in saved_state.items():
            if k in id_map:
                self._check_state(functools.partial(str, where_of[k]), id_map[k], v, devices=False)
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, capturable, strict=True):
            group["capturable"] = mode
        capturable_of = {id(p): g["capturable"] for g in self.param_groups for p in g["params"]}
        for k, v in saved_state.items():
            if k not in id_map:
                continue
            p = id_map[k]
            state = self.state[p]
            for key in _STATE_TENSORS:
                if isinstance(v.get(key), Tensor):
                    state[key] = v[key].to(device=p.device, copy=True).contiguous()
            if "step" in state:
                state["step"] = self._step_value(state["step"], capturable_of[id(p)], local(p).device)

    # Keys every saved group of this algorithm holds (a Lion state has no 'beta', a Tiger one no 'betas').
    _ALGORITHM_KEYS: tuple[str, ...] = ()

    def _check_saved(self, state_dict: Any) -> None:
        """The shape of a state_dict, checked before anything is loaded: both keys, groups saved by
        this algorithm, and no parameter whose step count survived without its momentum."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{name}.load_state_dict expects a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"{name}.load_state_dict: the state_dict has no {key!r} entry (an optimizer's "
                                 f"state_dict() has 'state' and 'param_groups'; was a model's state_dict passed?)")
        for gi, saved in enumerate(state_dict["param_groups"]):
            missing = [k for k in self._ALGORITHM_KEYS if k not in saved]
            if missing:
                raise ValueError(f"{name}.load_state_dict: saved param_groups[{gi}] has no {missing} (it was not "
                                 f"saved by {name}; Lion and Tiger states do not convert into each other)")
        for key, saved in state_dict["state"].items():
            if isinstance(saved, Mapping) and "step" in saved and "exp_avg" not in saved:
                raise ValueError(f"{name}.load_state_dict: the state of parameter {key!r} has a step count but no "
                                 f"'exp_avg' (momentum); refusing to restart it from zero silently")

    def forget_carried_rms(self, param: Tensor | None = None) -> None:
        """Tell Tiger that ``param`` (every parameter when None) was written through ``.data``:
        its next step recomputes RMS(theta) from the params instead of the carried sum
        (kexue/optim/_carried_rms.py). Writes through the parameter itself are detected."""
        self._carried.forget(param)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._device_constants = DeviceConstants()  # not pickled: a cache
        self._carried = CarriedRms()  # nothing is trusted after unpickling
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = defaultdict(list)
    for t in tensors:
        out[t.device].append(t)
    return out


def flat_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters in state_dict order (their flat index keys ChildTuning-F and rounding streams)."""
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
