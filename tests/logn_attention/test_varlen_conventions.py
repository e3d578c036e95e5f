"""The packed variable-length log-n attention op as a PyTorch op: torch.compile, offsets checked inside
the compiled op, opcheck, and clear errors for bad offsets and layouts.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close
from tests.logn_attention.helpers import _packed, attn, ops_mod

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


@pytest.mark.parametrize("max_seqlen", [None, 9])
def test_torch_compile_fullgraph(max_seqlen):
    q, k, v, cu, _ = _packed([4, 0, 9], dtype=torch.float32)
    q.requires_grad_()

    def f(q, k, v, cu):
        return attn(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, causal=True, train_len=8).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, cu)
    (g_got,) = torch.autograd.grad(got, q)
    want = f(q, k, v, cu)
    (g_want,) = torch.autograd.grad(want, q)
    assert_close(got, want, torch.float32)
    assert_close(g_got, g_want, torch.float32)


def test_offsets_checked_inside_the_op_when_compiled():
    q, k, v, _, _ = _packed([4, 5], dtype=torch.float32)
    bad = torch.tensor([0, 6, 4, 9], dtype=torch.int32)
    compiled = torch.compile(lambda q, k, v, cu: attn(q, k, v, cu_seqlens=cu), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="non-decreasing"):
        compiled(q, k, v, bad)


@pytest.mark.parametrize("max_seqlen", [None, 6])
def test_opcheck(max_seqlen):
    q, k, v, cu_q, cu_k = _packed([2, 0, 5], [3, 1, 6], d=8, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, cu_q, cu_k, max_seqlen, True, 0.35, 4.0, True, False, 1.0, False)
    torch.library.opcheck(ops_mod.logn_attention_varlen_op, args)
    out, lse = ops_mod.logn_attention_varlen_op(*args)
    bargs = (
        torch.randn_like(out),
        torch.randn_like(lse),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        cu_q,
        cu_k,
        max_seqlen,
        True,
        0.35,
        4.0,
        True,
        False,
        1.0,
        False,
    )
    torch.library.opcheck(ops_mod.logn_attention_varlen_backward_op, bargs)


def test_bad_offsets_and_layouts():
    q, k, v, cu, _ = _packed([4, 5], dtype=torch.float32)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32 or int64"):
        attn(q, k, v, cu_seqlens=cu.float())
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        attn(q, k, v, cu_seqlens=[0, 4, 9])
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-d"):
        attn(q, k, v, cu_seqlens=cu[None])
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-d"):
        attn(q, k, v, cu_seqlens=cu[:0])
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        attn(q, k, v, cu_seqlens=torch.tensor([1, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the number of q rows \(9\)"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="is on meta but q is on cpu"):
        attn(q, k, v, cu_seqlens=cu.to("meta"))
    with pytest.raises(ValueError, match="key_padding_mask cannot be combined with cu_seqlens"):
        attn(q, k, v, cu_seqlens=cu, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q must be 3-d \(total, heads, head_dim\)"):
        attn(q[None], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k needs cu_seqlens"):
        attn(q[None], k[None], v[None], cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="max_seqlen goes with cu_seqlens"):
        attn(q[None], k[None], v[None], max_seqlen=4)
    with pytest.raises(ValueError, match="cu_seqlens_k must have one entry per cu_seqlens entry"):
        attn(q, k, v, cu_seqlens=cu, cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must end at the number of k rows \(9\)"):
        attn(q, k, v, cu_seqlens=cu, cu_seqlens_k=torch.tensor([0, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the number of k rows \(8\)"):
        attn(q, k[:8], v[:8], cu_seqlens=cu)  # shared offsets: k needs as many rows as q
    with pytest.raises(ValueError, match=r"max_seqlen \(3\) is below the longest sequence \(5\)"):
        attn(q, k, v, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        attn(q, k, v, cu_seqlens=cu, max_seqlen=4.0)
    with pytest.raises(ValueError, match="multiple"):
        attn(q[:, :3], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="head_dim"):
        attn(q, k[..., :4], v[..., :4], cu_seqlens=cu)
