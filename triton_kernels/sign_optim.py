"""Lion / Tiger: the fused multi-tensor step in Triton (CUDA tensors; CPU tensors in the interpreter).

The contract is the one of ``kexue::sign_optim_step`` (python/kexue/ops/sign_optim.py): lists of
params, grads, momenta, optional ChildTuning-D masks and per-row "seen" flags, and a per-tensor
table of coefficients and flags (csrc/include/kexue/sign_optim.h). Every tensor of a call is
served by one launch per (param dtype, momentum dtype, vector width), not one per tensor: the
kernels read the tensors' addresses from a table, as ATen's multi_tensor_apply does, and each
program takes one work item of at most ``CHUNK`` elements (whole rows for tensors updated row by
row).

Up to four launches, because two reductions must finish before the update that reads them:

1. ``_prepass_kernel`` (only if a tensor needs it): per work item, the sum of squares of theta
   (Tiger's whole-tensor RMS, unless carried from the previous step) and whether the gradient
   holds a NaN or inf (Tiger's guard);
2. ``_finish_kernel``: per tensor, adds its items' partial sums in a fixed order (so that two runs
   give identical bits: no float atomics) into the effective learning rate, and raises the NaN
   flag of the tensor's guard group (an integer atomic max, which is order-independent);
3. ``_step_kernel``: the update. Per-row quantities (row RMS, whether a row of an embedding table
   has any gradient) are computed by the program that owns the row, in a first sweep over it,
   right before the row is updated;
4. ``_ssq_out_kernel`` (one-pass Tiger): each tensor's sum of squares of theta as stored, for the
   next step.

Each element is read and written once by the update (param, grad, momentum in; param, momentum
out), plus the pre-pass reads of theta / grad where Tiger asks for them. The arithmetic is in
float32 registers whatever the storage dtype; per-tensor coefficients are formed in float64 and
rounded once, as the C++ kernel does. Never autotune these kernels: they write their inputs.

Modules: :mod:`.sign_optim_layout` (table columns, tile sizes, pointers), :mod:`.sign_optim_tiles`
(element arithmetic), :mod:`.sign_optim_reduce` (pre-pass and the sums),
:mod:`.sign_optim_step` (the update), :mod:`.sign_optim_plan` (the launch plan kept between
steps, and the one non-blocking upload of the per-step tables); this one launches.

Vector accesses: a tensor whose addresses are all 16-byte aligned is served with ``VEC`` = 4
(float32) or 8 (16-bit storage) elements per access, hinted to the compiler; others with VEC = 1.

Capturable mode: rows flagged DYNAMIC read their per-step values (lr, momentum coefficient,
gradient scale, update switch, skip flag, random keys) from the dynamic table ``dyn`` on the
device, so nothing on the host depends on the step; the host tables are then the same at every
step, and a step after the first copies nothing from the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .sign_optim_layout import _BF16, _F32, _TL_NAMES, BLOCK, NUM_WARPS, ROW_COLS, block_for, vector_width
from .sign_optim_plan import prepare
from .sign_optim_reduce import _finish_kernel, _prepass_kernel, _ssq_out_kernel
from .sign_optim_step import _step_kernel


def fused_step(
    params,
    grads,
    exp_avgs,
    masks,
    row_seen,
    ssq,
    hyper: torch.Tensor,
    ints: torch.Tensor,
    dyn: torch.Tensor | None = None,
) -> None:
    """``kexue::sign_optim_step`` on the tensors' device: in place on params, momenta, row_seen and
    the carried sums of squares ``ssq``.

    ``dyn``: the dynamic table of capturable mode (on the device), or None. Makes no host
    synchronisation on CUDA (see :mod:`.sign_optim_plan`).
    """
    T = len(params)
    if T == 0:
        return
    device = params[0].device
    plan, (addr, hyper_d, ints_d) = prepare(
        params, grads, exp_avgs, masks, row_seen, ssq, hyper, ints, capturable=dyn is not None
    )
    dyn_d = hyper_d if dyn is None else dyn  # without DYNAMIC rows the kernels never read it
    lr_eff = hyper_d  # not read unless a pre-pass ran
    group_nan = torch.zeros(T, dtype=torch.int32, device=device)
    if plan.spans is not None:
        partial = torch.empty(max(1, plan.prepass_slots), dtype=torch.float32, device=device)
        nan = torch.empty(max(1, plan.prepass_slots), dtype=torch.int32, device=device)
        for pcode, vec, offset, items in plan.prepass:
            _prepass_kernel[(items.shape[0],)](
                items,
                addr,
                ints_d,
                partial[offset:],
                nan[offset:],
                PARAM=pcode,
                BLOCK=block_for(vec),
                VEC=vec,
                num_warps=NUM_WARPS,
            )
        lr_eff = torch.empty(T, dtype=torch.float64, device=device)
        _finish_kernel[(plan.spans.shape[0],)](
            plan.spans,
            addr,
            hyper_d,
            ints_d,
            dyn_d,
            partial,
            nan,
            lr_eff,
            group_nan,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    parts = torch.empty(max(1, plan.step_slots), dtype=torch.float32, device=device)
    for pcode, mcode, vec, offset, items in plan.steps:
        _step_kernel[(items.shape[0],)](
            items,
            addr,
            hyper_d,
            ints_d,
            dyn_d,
            lr_eff,
            group_nan,
            parts[offset:],
            PARAM=pcode,
            MOM=mcode,
            BLOCK=block_for(vec),
            ROW_COLS=ROW_COLS,
            VEC=vec,
            num_warps=NUM_WARPS,
        )
    if plan.outs is not None:
        _ssq_out_kernel[(plan.outs.shape[0],)](
            plan.outs, addr, ints_d, group_nan, parts, BLOCK=BLOCK, num_warps=NUM_WARPS
        )


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for tests/gpu_compile.py. The vector forms (VEC > 1,
# what aligned tensors get) must compile to 16-byte global loads: ``expect`` makes the check fail
# when the PTX has no ld.global.v4.


def _vector_forms(pcode: int, mcode: int) -> tuple[int, ...]:
    return (1, vector_width(pcode, mcode))


def _expect(vec: int) -> list[str]:
    return ["vector_loads"] if vec > 1 else []


def _aot_configs() -> list[dict]:
    configs = []
    for pcode, pname in _TL_NAMES.items():
        # The pre-pass reads theta and the gradient (param storage): its width follows the bucket's.
        for vec in sorted({v for mcode in (_F32, _BF16) for v in _vector_forms(pcode, mcode)}):
            configs.append(
                {
                    "kernel": _prepass_kernel,
                    "name": f"sign_optim_prepass_{pname}_v{vec}",
                    "num_warps": NUM_WARPS,
                    "signature": {
                        "items_ptr": "*i64",
                        "addr_ptr": "*i64",
                        "ints_ptr": "*i64",
                        "ssq_ptr": "*fp32",
                        "nan_ptr": "*i32",
                        "PARAM": "constexpr",
                        "BLOCK": "constexpr",
                        "VEC": "constexpr",
                    },
                    "constexprs": {"PARAM": pcode, "BLOCK": block_for(vec), "VEC": vec},
                    "expect": _expect(vec),
                }
            )
        for mcode in (_F32, _BF16):
            for vec in _vector_forms(pcode, mcode):
                configs.append(
                    {
                        "kernel": _step_kernel,
                        "name": f"sign_optim_step_{pname}_m{_TL_NAMES[mcode]}_v{vec}",
                        "num_warps": NUM_WARPS,
                        "signature": {
                            "items_ptr": "*i64",
                            "addr_ptr": "*i64",
                            "hyper_ptr": "*fp64",
                            "ints_ptr": "*i64",
                            "dyn_ptr": "*fp64",
                            "lr_ptr": "*fp64",
                            "group_nan_ptr": "*i32",
                            "part_ptr": "*fp32",
                            "PARAM": "constexpr",
                            "MOM": "constexpr",
                            "BLOCK": "constexpr",
                            "ROW_COLS": "constexpr",
                            "VEC": "constexpr",
                        },
                        "constexprs": {
                            "PARAM": pcode,
                            "MOM": mcode,
                            "BLOCK": block_for(vec),
                            "ROW_COLS": ROW_COLS,
                            "VEC": vec,
                        },
                        "expect": _expect(vec),
                    }
                )
    configs.append(
        {
            "kernel": _finish_kernel,
            "name": "sign_optim_finish",
            "num_warps": NUM_WARPS,
            "signature": {
                "fin_ptr": "*i64",
                "addr_ptr": "*i64",
                "hyper_ptr": "*fp64",
                "ints_ptr": "*i64",
                "dyn_ptr": "*fp64",
                "ssq_ptr": "*fp32",
                "nan_ptr": "*i32",
                "lr_ptr": "*fp64",
                "group_nan_ptr": "*i32",
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": BLOCK},
        }
    )
    configs.append(
        {
            "kernel": _ssq_out_kernel,
            "name": "sign_optim_ssq_out",
            "num_warps": NUM_WARPS,
            "signature": {
                "fin_ptr": "*i64",
                "addr_ptr": "*i64",
                "ints_ptr": "*i64",
                "group_nan_ptr": "*i32",
                "part_ptr": "*fp32",
                "BLOCK": "constexpr",
            },
            "constexprs": {"BLOCK": BLOCK},
        }
    )
    return configs


AOT_CONFIGS = _aot_configs()
