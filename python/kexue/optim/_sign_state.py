"""Lion and Tiger state: creating it (phase 2 of a step), ChildTuning-D masks, and state_dict
loading with checks that refuse a state saved by the other algorithm or missing its momentum.

A mixin of :class:`kexue.optim._sign_base.SignOptimizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from kexue.optim._capturable import DeviceConstants
from kexue.optim._carried_rms import CarriedRms
from kexue.optim._sharded import local
from kexue.optim._sign_checks import _Entry

_STATE_TENSORS = ("exp_avg", "child_tuning_mask", "row_seen", "rms_ssq")


class StateIO:
    """The optimizer state of a sign optimizer: creation, masks, load and unpickle."""

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
                raise ValueError(
                    f"{type(self).__name__}: set_child_tuning_masks got a tensor of shape "
                    f"{tuple(p.shape)} that is not a parameter of this optimizer"
                )
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
            len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups, strict=True)
        )
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
                raise ValueError(
                    f"{name}.load_state_dict: the state_dict has no {key!r} entry (an optimizer's "
                    f"state_dict() has 'state' and 'param_groups'; was a model's state_dict passed?)"
                )
        for gi, saved in enumerate(state_dict["param_groups"]):
            missing = [k for k in self._ALGORITHM_KEYS if k not in saved]
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: saved param_groups[{gi}] has no {missing} (it was not "
                    f"saved by {name}; Lion and Tiger states do not convert into each other)"
                )
        for key, saved in state_dict["state"].items():
            if isinstance(saved, Mapping) and "step" in saved and "exp_avg" not in saved:
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {key!r} has a step count but no "
                    f"'exp_avg' (momentum); refusing to restart it from zero silently"
                )

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
