"""Sign optimizers: the fused multi-tensor step ``kexue::sign_optim_step`` and its backends.

``kexue.optim.Lion`` and ``kexue.optim.Tiger`` validate everything, then hand one list of tensors
per device to :func:`sign_optim_step` together with a per-tensor table of coefficients and flags
(layout: :mod:`kexue._sign_table`, spelled again for C++ in csrc/include/kexue/sign_optim.h). The
op updates params, momenta, the per-row "seen" flags and the carried sums of squares in place and
returns nothing.

Backends: ``cuda`` (csrc/cuda/sign_optim.cu: one launch per dtype pair over a table of tensor
addresses; tried first on CUDA tensors, see :func:`_register_backends`), ``triton``
(triton_kernels/sign_optim.py, the same structure), ``cpu`` (the C++
kernel, csrc/cpu/sign_optim.cpp) and ``torch`` (the table interpreted in PyTorch,
kexue/ops/_sign_optim_torch.py). The element arithmetic is csrc/include/kexue/sign_optim.h.
Never autotune the kernels: the step writes its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kexue import _backend
from kexue.ops import _sign_optim_torch
from kexue.ops._sign_optim_inputs import check_step

OP = "sign_optim"
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MOMENTUM_DTYPES = (torch.float32, torch.bfloat16)
# Backends that implement the RMS_CARRIED / SSQ_OUT flags (one-pass Tiger): all of them; a backend
# left out of this set would be asked for the pre-pass over the params instead.
CARRIES_SSQ = frozenset({"torch", "cpu", "triton", "cuda"})


def _register_backends() -> None:
    _backend.register(OP, "torch", _sign_optim_torch.fused_step, PARAM_DTYPES + (torch.float64,))
    native = _backend.native()
    # The *_dyn_* entry points take the dynamic table of capturable mode (None otherwise).
    if native is not None and hasattr(native, "sign_optim_step_dyn_cpu"):
        _backend.register(OP, "cpu", native.sign_optim_step_dyn_cpu, PARAM_DTYPES)
        if getattr(native, "WITH_CUDA", False):
            _backend.register(OP, "cuda", native.sign_optim_step_dyn_cuda, PARAM_DTYPES)
    _backend.register(OP, "triton", lambda *args: _triton_module().fused_step(*args), PARAM_DTYPES)
    # On CUDA tensors the C++ step goes first: on an H200, Lion over 531M params in 195 tensors
    # took 4.69 ms a step with the CUDA C++ kernel against 13.3 ms with the Triton one (that
    # Triton step predates its 16-byte vector accesses, which are not measured on a GPU). Both
    # carry Tiger's sums of squares (one-pass Tiger) and keep their launch plans between steps.
    _backend.prefer(OP, "cuda", ("cuda", "triton"))


def _triton_module():
    from kexue.triton_kernels import sign_optim

    return sign_optim


_register_backends()


def select_backend(param: Tensor) -> str:
    """The backend that will serve ``param`` (raises :class:`kexue.BackendUnavailableError`)."""
    name, _ = _backend.select(OP, param)
    return name


@torch.library.custom_op("kexue::sign_optim_step", mutates_args=("params", "exp_avgs", "row_seen", "ssq"))
def sign_optim_step(
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
    """One Lion/Tiger step over all tensors of one device, in place.

    ``params``, ``grads``, ``exp_avgs``: contiguous, same numel per index; grads in the param's
    dtype, momenta float32 or bfloat16. ``masks``: ChildTuning-D keep masks (bool) or None.
    ``row_seen``: uint8 per row for Tiger's lazy rows under gradient accumulation, or an empty
    tensor for none (a mutated ``Tensor?[]`` holding None is not supported by torch's
    functionalization, so "none" is spelled as numel 0).
    ``ssq``: float64 on the tensors' device, one value per tensor (or per row, for RMS_ROW), or
    numel 0 for none: the sum of squares of theta carried from the previous call (RMS_CARRIED)
    and left for the next (SSQ_OUT), so that Tiger's RMS needs no pre-pass over the params.
    ``hyper`` (T, 9) float64 and ``ints`` (T, 8) int64 on the CPU: the per-tensor table.
    ``dyn`` (T, 9) float64 on the tensors' device, or None: the per-step values (lr, momentum
    coefficient, gradient scale, update switch, skip flag, random keys) of the rows flagged
    DYNAMIC (capturable mode), read by the kernels from device memory.
    """
    if not params:
        return
    check_step(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)
    _, fn = _backend.select(OP, params[0])
    fn(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)


@sign_optim_step.register_fake
def _(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn=None) -> None:
    return None


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
    """What optimizers call: :func:`sign_optim_step`, with a shortcut in eager mode.

    The custom op's Python dispatch costs ~10 us per tensor argument (0.6 ms for a step over 50
    parameters), which is a large share of a step over small models. In eager mode the backend is
    called directly and the version counters of the mutated tensors are bumped as the custom op
    would (so autograd still sees the in-place update); under torch.compile the custom op is used.
    """
    if not params:
        return
    if torch.compiler.is_compiling():
        sign_optim_step(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)
        return
    _, fn = _backend.select(OP, params[0])
    fn(params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, dyn)
    torch.autograd.graph.increment_version(params + exp_avgs + [s for s in row_seen + ssq if s.numel() > 0])
