"""The dense log-n attention op as a PyTorch op: clear errors on bad input, torch.compile full graph,
and opcheck.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close
from tests.logn_attention.helpers import _inputs, attn, ops_mod

# Every torch.empty (at::empty in C++ too) is NaN-filled: an output element a kernel forgets fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


def test_bad_inputs():
    q, k, v, _ = _inputs(2, 4, 2, 5, 7, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attn(q.numpy(), k, v)
    with pytest.raises(TypeError, match="dtype"):
        attn(q.long(), k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        attn(q, k.half(), v)
    with pytest.raises(ValueError, match="4-d"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        attn(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="head_dim"):
        attn(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="multiple"):
        attn(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8))
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\]"):
        big = torch.randn(1, 1, 2, 257)
        attn(big, big, big)
    with pytest.raises(ValueError, match="at least one position"):
        attn(q[:, :, :0], k, v)
    with pytest.raises(ValueError, match="at least one position"):
        attn(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="key_padding_mask must have dtype bool"):
        attn(q, k, v, key_padding_mask=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, k_len\)"):
        attn(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="train_len"):
        attn(q, k, v, train_len=1)
    with pytest.raises(ValueError, match="scale"):
        attn(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="gradmax"):
        attn(q, k, v, scale="max")
    with pytest.raises(TypeError, match="causal must be a bool"):
        attn(q, k, v, causal=1)
    with pytest.raises(ValueError, match="min_n"):
        attn(q, k, v, min_n=-1)
    with pytest.raises(ValueError, match="3-d"):  # packed sequences (tests/logn_attention/test_varlen_*.py)
        attn(q, k, v, cu_seqlens=torch.tensor([0, 5]))


def test_torch_compile_fullgraph():
    q, k, v, mask = _inputs(2, 4, 2, 9, 13, 8, dtype=torch.float32, mask_p=0.2)
    q.requires_grad_()

    def f(q, k, v, mask):
        return attn(q, k, v, causal=True, key_padding_mask=mask, train_len=8).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, mask)
    (g_got,) = torch.autograd.grad(got, q)
    want = f(q, k, v, mask)
    (g_want,) = torch.autograd.grad(want, q)
    assert_close(got, want, torch.float32)
    assert_close(g_got, g_want, torch.float32)


@pytest.mark.parametrize("mask_p", [None, 0.3])
def test_opcheck(mask_p):
    q, k, v, mask = _inputs(1, 4, 2, 5, 6, 8, dtype=torch.float32, mask_p=mask_p)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, mask, True, 0.35, 4.0, True, False, 1.0, False)
    torch.library.opcheck(ops_mod.logn_attention_op, args)
    out, lse = ops_mod.logn_attention_op(*args)
    bargs = (
        torch.randn_like(out),
        torch.randn_like(lse),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        mask,
        True,
        0.35,
        4.0,
        True,
        False,
        1.0,
        False,
    )
    torch.library.opcheck(ops_mod.logn_attention_backward_op, bargs)
