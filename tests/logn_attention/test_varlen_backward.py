"""Packed variable-length log-n attention backward: gradcheck of the reference and the C++ kernel, and
the reference's backward formula against autograd.
"""

from __future__ import annotations

import pytest
import torch

import kexue
from tests.helpers import assert_close
from tests.logn_attention.helpers import CPU_BACKENDS, _packed, attn, ref

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


def test_reference_gradcheck():
    q, k, v, cu_q, cu_k = _packed([2, 0, 3], [3, 1, 2], hq=2, hkv=1, d=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for causal in (False, True):

        def f(q, k, v, causal=causal):
            return ref.logn_attention_varlen(
                q, k, v, cu_q, cu_seqlens_k=cu_k, causal=causal, train_len=4, return_lse=True
            )

        assert torch.autograd.gradcheck(f, (q, k, v))


def test_reference_backward_formula_matches_autograd():
    q, k, v, cu_q, cu_k = _packed([4, 0, 6], [5, 2, 6], d=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ref.logn_attention_varlen_forward(q, k, v, cu_q, cu_k, True, None, 8, True, False, 1)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    got = ref.logn_attention_varlen_backward(
        go, gl, q, k, v, out.detach(), lse.detach(), cu_q, cu_k, True, None, 8, True, False, 1
    )
    for g, w, name in zip(got, want, "qkv", strict=False):
        assert_close(g, w, torch.float64, f"grad {name}")


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="kexue._C is not built")
def test_cpu_kernel_gradcheck_float64():
    q, k, v, cu_q, cu_k = _packed([2, 3], [3, 2], hq=2, hkv=1, d=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return attn(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, causal=True, train_len=4, return_lse=True)

    with kexue.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, (q, k, v))
