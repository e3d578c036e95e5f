"""One-pass Tiger: when the sum of squares of theta carried in the state may stand in for theta.

Tiger's learning rate at step t+1 needs RMS(theta_t), per tensor or per row. The step that writes
theta_t holds every element of it, so the kernel sums the squares there (table flag SSQ_OUT) into
``state['rms_ssq']`` (float64: one value, or one per row), and the next step reads that sum
(RMS_CARRIED) instead of reading the params once more in a pre-pass: 20 bytes per parameter and
step, as Lion. The sum is bit for bit what the pre-pass would compute from the same theta (the
kernel sums the same tiles in the same order), so the carried step is exactly the two-pass one.

The sum is trusted only while theta is provably what the step left. After each step the tensor's
version counter and data pointer are recorded; the next step carries the sum only if both are
unchanged. Any in-place write to the parameter (``p.copy_``, ``p.mul_``, ``model.load_state_dict``,
``torch.nn.init``...) bumps its version, and ``p.data = other`` moves its data pointer; either
sends the step back to the pre-pass for that tensor, which then recomputes the sum. Not
detectable: writes through ``p.data`` (``p.data.copy_(...)``, ``p.data.mul_(...)``), whose
tensor has its own version counter; after such a write call :meth:`forget` (or
``optimizer.load_state_dict``, which forgets everything) before the next step.

Where the sum is not carried at all: backends without the flags (``kexue.ops.sign_optim.
CARRIES_SSQ``), capturable groups (a CUDA graph replays the step without this host check),
sharded DTensor parameters (their RMS is completed across ranks from the params), and a
whole-tensor RMS of a table updated row by row (a "matrix" kind in an embedding group).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from kexue import _sign_table as table
from kexue.ops import sign_optim as ops
from kexue.optim._sharded import local, shard_groups


def _no_sums() -> Tensor:
    """The "no carried sums" placeholder (a fresh one each time: mutated lists must not alias)."""
    return torch.empty(0, dtype=torch.float64)


class CarriedRms:
    """The per-parameter proofs that ``state['rms_ssq']`` still describes the parameter."""

    def __init__(self) -> None:
        self._token: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> (version, data_ptr)

    def forget(self, param: Tensor | None = None) -> None:
        """Distrust the carried sums of ``param`` (all parameters when None)."""
        if param is None:
            self._token = WeakIdKeyDictionary()
        else:
            self._token.pop(param, None)

    @staticmethod
    def _token_of(param: Tensor) -> tuple[int, int]:
        p = local(param)
        return p._version, p.data_ptr()

    def prepare(self, param: Tensor, state: dict, ints: list[int], backend: str, capturable: bool) -> Tensor:
        """Set SSQ_OUT (and RMS_CARRIED when the sum is trusted) in one table row; returns the
        tensor's ``ssq`` argument of the fused op (a placeholder when nothing is carried)."""
        flags = ints[table.FLAGS]
        by_rows = ints[table.ROW_LEN] > 0 and flags & (table.RMS_ROW | table.LAZY_ROWS)
        per_row = bool(by_rows and flags & table.RMS_ROW)
        eligible = (
            (per_row or (flags & table.RMS_TENSOR and not by_rows))
            and backend in ops.CARRIES_SSQ
            and not capturable
            and shard_groups(param) is None
        )
        if not eligible:
            state.pop("rms_ssq", None)
            self._token.pop(param, None)
            return _no_sums()
        p = local(param)
        count = p.numel() // ints[table.ROW_LEN] if per_row else 1
        sums = state.get("rms_ssq")
        if (
            not isinstance(sums, Tensor)
            or sums.dtype != torch.float64
            or sums.numel() != count
            or sums.device != p.device
            or not sums.is_contiguous()
        ):
            sums = state["rms_ssq"] = torch.zeros(count, dtype=torch.float64, device=p.device)
            self._token.pop(param, None)
        flags |= table.SSQ_OUT
        if self._token.get(param) == self._token_of(param):
            flags |= table.RMS_CARRIED
        ints[table.FLAGS] = flags
        return sums

    def record(self, param: Tensor, ints: list[int]) -> None:
        """After the step: the sums now describe the parameter as it stands."""
        if ints[table.FLAGS] & table.SSQ_OUT:
            self._token[param] = self._token_of(param)
