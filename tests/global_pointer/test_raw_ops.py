"""The raw GlobalPointer custom ops refuse a wrong canonical layout on every backend.

``torch.ops.kexue.global_pointer_*`` (and compiled graphs) reach the op bodies without the public
functions' checks; the Triton launchers take shapes as given, so before the op bodies checked
them a short mask, bias or key tensor was read past its end there. Each case must raise
ValueError or TypeError on cpu, torch and triton (under the interpreter when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue.ops import _global_pointer_inputs as inputs
from tests.conftest import triton_unavailable_reason

BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []


def _canonical(dtype):
    g = torch.Generator().manual_seed(0)
    b, length, types, d = 2, 10, 3, 4
    q, k = (torch.randn(b, length, types, d, generator=g).to(dtype) for _ in range(2))
    sb, eb = (torch.randn(b, length, types, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(b, length, dtype=torch.bool)
    return inputs.canonical(q, k, sb, eb, mask, True, 10000.0)


def _cases(q, k, sb, eb, m, code, base):
    ops = torch.ops.kexue
    lab = torch.tensor([[0, 0, 1, 3]])
    short = {"mask": m[:, :3].contiguous(), "k": k[:, :, :4].contiguous(), "sb": sb[:, :, :4].contiguous()}
    loss = (torch.zeros(2, 3), torch.zeros(2, 3, 2))  # grad, lse of the loss (float32)
    return {
        "loss_mask_short": lambda: ops.global_pointer_loss(q, k, sb, eb, short["mask"], lab, code, base, True),
        "loss_k_short": lambda: ops.global_pointer_loss(q, short["k"], sb, eb, m, lab, code, base, True),
        "loss_bias_short": lambda: ops.global_pointer_loss(q, k, short["sb"], eb, m, lab, code, base, True),
        "loss_dense_labels_short": lambda: ops.global_pointer_loss(
            q, k, sb, eb, m, torch.zeros(2, 3, 4, 4, dtype=torch.bool), code, base, True
        ),
        "loss_label_out_of_range": lambda: ops.global_pointer_loss(
            q, k, sb, eb, m, torch.tensor([[0, 0, 1, 12]]), code, base, True
        ),
        "loss_rope_code": lambda: ops.global_pointer_loss(q, k, sb, eb, m, lab, 7, base, True),
        "loss_backward_lse_short": lambda: ops.global_pointer_loss_backward(
            loss[0], q, k, sb, eb, m, lab, loss[1][:, :1].contiguous(), code, base, True
        ),
        "loss_backward_grad_short": lambda: ops.global_pointer_loss_backward(
            loss[0][:1].contiguous(), q, k, sb, eb, m, lab, loss[1], code, base, True
        ),
        "scores_mask_short": lambda: ops.global_pointer_scores(q, k, sb, eb, short["mask"], code, base, True),
        "scores_k_short": lambda: ops.global_pointer_scores(q, short["k"], sb, eb, m, code, base, True),
        "scores_backward_grad_short": lambda: ops.global_pointer_scores_backward(
            torch.zeros(2, 3, 4, 4, dtype=q.dtype), q, k, sb, eb, m, code, base, True
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_ops_refuse_a_wrong_layout(backend):
    # bf16, which every backend serves, keeps one problem for all backends
    canonical = _canonical(torch.bfloat16)
    for name, case in _cases(*canonical).items():
        with kexue.use_backend(backend), pytest.raises((ValueError, TypeError)):
            case()
            pytest.fail(f"{name}: no error on {backend}")
