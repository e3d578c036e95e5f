"""``kexue.nn.LogNAttention``: a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import kexue
import kexue.reference.logn_attention  # noqa: F401
from tests.helpers import assert_close

ref = sys.modules["kexue.reference.logn_attention"]


def _mha(batch_first, kdim=None):
    torch.manual_seed(0)
    return nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).double()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_logn_off_matches_multihead_attention(batch_first, kdim):
    mha = _mha(batch_first, kdim)
    mod = kexue.nn.LogNAttention.from_multihead_attention(mha, logn=False)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 7, 32, generator=gen, dtype=torch.float64)
    kv = torch.randn(3, 9, kdim or 32, generator=gen, dtype=torch.float64)
    pad = torch.rand(3, 9, generator=gen) < 0.3
    pad[:, 0] = False
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    want, _ = mha(q, kv, kv, key_padding_mask=pad, need_weights=False)
    got, weights = mod(q, kv, kv, key_padding_mask=pad)
    assert weights is None
    assert_close(got, want, torch.float64)


def test_logn_on_matches_reference_and_backward_flows():
    mod = kexue.nn.LogNAttention(32, 4, num_kv_heads=2, causal=True, train_len=4)
    x = torch.randn(2, 11, 32, requires_grad=True)
    out, _ = mod(x)
    q = mod.q_proj(x).view(2, 11, 4, 8).transpose(1, 2)
    k = mod.k_proj(x).view(2, 11, 2, 8).transpose(1, 2)
    v = mod.v_proj(x).view(2, 11, 2, 8).transpose(1, 2)
    inner = ref.logn_attention(q.double(), k.double(), v.double(), causal=True, train_len=4)
    want = mod.out_proj(inner.float().transpose(1, 2).reshape(2, 11, 32))
    assert_close(out, want.double(), torch.float32)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert mod.k_proj.weight.grad.abs().sum() > 0


def test_logn_differs_from_plain_beyond_train_len():
    mod = kexue.nn.LogNAttention(16, 2, train_len=4)
    x = torch.randn(1, 32, 16)
    plain = kexue.nn.LogNAttention(16, 2, logn=False)
    plain.load_state_dict(mod.state_dict())
    assert (mod(x)[0] - plain(x)[0]).abs().max() > 1e-3 * math.sqrt(16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        kexue.nn.LogNAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kexue.nn.LogNAttention(32, 4, num_kv_heads=3)
    mod = kexue.nn.LogNAttention(32, 4)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="need_weights"):
        mod(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        mod(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-d"):
        mod(x, cu_seqlens=torch.tensor([0, 5]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_packed_rows_equal_each_sequence_alone(causal, cross):
    """Packed input (cu_seqlens): each sequence gives what the module gives it on its own, batch
    of one, with its own n; an empty sequence in the middle changes nothing; gradients flow."""
    torch.manual_seed(3)
    mod = kexue.nn.LogNAttention(
        24, 4, num_kv_heads=2, causal=causal, train_len=4, kdim=16 if cross else None, vdim=16 if cross else None
    ).double()
    q_lens, k_lens = [5, 0, 9, 1], ([7, 0, 9, 3] if cross else [5, 0, 9, 1])
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()])
    query = torch.randn(int(cu_q[-1]), 24, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(int(cu_k[-1]), 16 if cross else 24, dtype=torch.float64) if cross else query
    out, weights = mod(
        query, kv, kv, cu_seqlens=cu_q, cu_seqlens_k=cu_k if cross else None, max_seqlen=max(q_lens + k_lens)
    )
    assert weights is None and out.shape == query.shape
    for s in range(len(q_lens)):
        if q_lens[s] == 0:
            continue
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        alone, _ = mod(query[qs][None], kv[ks][None], kv[ks][None])
        assert_close(out[qs], alone[0], torch.float64, f"sequence {s}")
    out.square().sum().backward()
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
