"""Lion and Tiger, phase 1 of a step: every hyperparameter, parameter, gradient and state tensor
checked before anything moves, with errors that name ``param_groups[i]['params'][j]``.

A mixin of :class:`kexue.optim._sign_base.SignOptimizer`; the algorithms add their own checks
through ``_check_algorithm_group`` / ``_check_algorithm_param``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kexue.ops import sign_optim as ops
from kexue.optim._sharded import local, sharded_last_dim

_PARAM_DTYPES = ops.PARAM_DTYPES + (torch.float64,)  # float64: the torch backend only


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


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class ParamChecks:
    """Validation of a sign optimizer's groups, parameters and state (phase 1 of a step)."""

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
            if isinstance(value, Tensor) and value.is_meta:
                raise self._group_error(
                    gi, f"{key} is a tensor on the meta device (it has no value); give a float or a tensor with data"
                )
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
        for key in (
            "maximize",
            "embedding",
            "drift_guard",
            "freeze_absent_momentum",
            "mask_update",
            "child_tuning_rescale",
            "stochastic_rounding",
        ):
            if not isinstance(group[key], bool):
                raise self._group_error(gi, f"{key} must be a bool, got {group[key]!r}")
        if group["momentum_dtype"] not in ops.MOMENTUM_DTYPES:
            raise self._group_error(
                gi, f"momentum_dtype must be torch.float32 or torch.bfloat16, got {group['momentum_dtype']!r}"
            )
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
        if mask is not None and (
            not isinstance(mask, Tensor) or mask.shape != p.shape or (devices and mask.device != p.device)
        ):
            raise ValueError(
                f"{where()}: state 'child_tuning_mask' must be a tensor shaped and placed like the "
                f"parameter {tuple(p.shape)} on {p.device}"
            )
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
        if p.is_meta or g.is_meta:
            problem = ValueError(
                f"the {'parameter' if p.is_meta else 'gradient'} is on the meta device (no data "
                f"to update); materialize the model first, e.g. module.to_empty(device=...)"
            )
        elif g.layout != torch.strided:
            problem = TypeError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(layout {g.layout}); use a dense embedding (sparse=False)"
            )
        elif p.is_complex() or g.is_complex():
            problem = TypeError(
                "complex parameters/gradients are not supported (view them as real with torch.view_as_real)"
            )
        elif p.dtype not in _PARAM_DTYPES:
            problem = TypeError(f"parameter dtype {p.dtype} is not supported; expected float32, bfloat16 or float16")
        elif g.dtype != p.dtype:
            problem = TypeError(f"gradient dtype {g.dtype} differs from the parameter dtype {p.dtype}")
        elif g.shape != p.shape:
            problem = ValueError(f"gradient shape {tuple(g.shape)} differs from the parameter {tuple(p.shape)}")
        elif g.device != p.device:
            problem = ValueError(f"gradient is on {g.device}, the parameter on {p.device}")
        elif group["embedding"] and p.dim() < 2:
            problem = ValueError(
                f"an 'embedding' group holds tables of rows (at least 2 dims), got shape {tuple(p.shape)}"
            )
        elif group["embedding"] and sharded_last_dim(p):
            problem = ValueError(
                "an 'embedding' table must not be sharded along its last dimension "
                "(its rows would straddle ranks); shard it along dim 0"
            )
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
