"""The Triton kernels of log-n attention against the float64 reference.

Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes are small but cross the 64-row / 64-key / 32-row tile
edges, include a single position, grouped heads, causal attention after a KV cache (Lq < Lk) and
before it (Lq > Lk, queries that see nothing), padding masks with a fully padded batch row, each
scale rule, and packed variable-length sequences (cu_seqlens) with lengths 0, 1 and tile edges. Outputs come from torch.empty, which deterministic mode fills with NaN, so an
element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import sys

import kexue
import pytest
import torch

import kexue.reference.logn_attention  # noqa: F401
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import logn_attention as K  # noqa: E402  (after the skip)

ref = sys.modules["kexue.reference.logn_attention"]


pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


def _check(device, b, hq, hkv, lq, lk, d, dtype, causal, mask_p=None, full_row=False, **kw):
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    q = (torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).to(dtype)
    mask = None
    if mask_p is not None:
        mask = torch.rand(b, lk, generator=gen) < mask_p
        if full_row:
            mask[0] = True
    go = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    gl = torch.randn(b, hq, lq, generator=gen)
    qd, kd, vd, god, gld = (t.to(device) for t in (q, k, v, go, gl))
    maskd = None if mask is None else mask.to(device)
    qd, kd, vd = (t.requires_grad_() for t in (qd, kd, vd))
    with kexue.use_backend("triton"):
        out, lse = kexue.ops.logn_attention(qd, kd, vd, causal=causal, key_padding_mask=maskd, return_lse=True, **kw)
        grads = torch.autograd.grad((out.float() * god.float()).sum() + (lse * gld).sum(), (qd, kd, vd))

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.logn_attention(q64, k64, v64, causal=causal, key_padding_mask=mask, return_lse=True, **kw)
    r_grads = torch.autograd.grad((r_out * go.double()).sum() + (r_lse * gl.double()).sum(), (q64, k64, v64))
    low = dtype in (torch.float16, torch.bfloat16)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.cpu(), r_out, dtype, "out")
    assert_close(lse.cpu(), r_lse, torch.float32 if not low else dtype, "lse")
    for g, w, name in zip(grads, r_grads, "qkv"):
        assert g.dtype == dtype
        assert_close(g.cpu(), w, dtype, f"grad {name}", factor=2.0 if low else 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_block_edges_gqa_mask(triton_device, dtype, causal):
    _check(triton_device, 2, 4, 2, 70, 67, 16, dtype, causal, mask_p=0.2, full_row=True)


@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 70), (70, 5)])
def test_odd_lengths_kv_cache(triton_device, lq, lk):
    _check(triton_device, 1, 2, 1, lq, lk, 8, torch.float32, True)


@pytest.mark.parametrize("kw", [dict(scale="gradmax"), dict(clip=True, train_len=16, min_n=8), dict(logn=False)])
def test_scale_rules(triton_device, kw):
    _check(triton_device, 1, 2, 2, 33, 40, 16, torch.float16, True, mask_p=0.3, **kw)


def test_head_dim_not_power_of_two(triton_device):
    _check(triton_device, 1, 1, 1, 9, 9, 24, torch.float32, False)


def _check_packed(device, lengths_q, lengths_k, hq, hkv, d, dtype, causal, **kw):
    """Packed sequences (cu_seqlens) through the Triton backend against the float64 reference."""
    gen = torch.Generator().manual_seed(sum(lengths_q) * 7 + sum(lengths_k))
    tq, tk = sum(lengths_q), sum(lengths_k)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = (torch.randn(tq, hq, d, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    k = (torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    v = torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64).to(dtype)
    go = torch.randn(tq, hq, d, generator=gen).to(dtype)
    gl = torch.randn(hq, tq, generator=gen)
    qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
    with kexue.use_backend("triton"):
        out, lse = kexue.ops.logn_attention(qd, kd, vd, causal=causal, cu_seqlens=cu_q.to(device),
                                            cu_seqlens_k=cu_k.to(device), return_lse=True, **kw)
        grads = torch.autograd.grad((out.float() * go.to(device).float()).sum() + (lse * gl.to(device)).sum(),
                                    (qd, kd, vd))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.logn_attention_varlen(q64, k64, v64, cu_q, cu_seqlens_k=cu_k, causal=causal, return_lse=True,
                                             **kw)
    r_grads = torch.autograd.grad((r_out * go.double()).sum() + (r_lse * gl.double()).sum(), (q64, k64, v64))
    low = dtype in (torch.float16, torch.bfloat16)
    assert out.shape == q.shape and lse.shape == (hq, tq) and lse.dtype == torch.float32
    assert_close(out.cpu(), r_out, dtype, "out")
    assert_close(lse.cpu(), r_lse, torch.float32 if not low else dtype, "lse")
    for g, w, name in zip(grads, r_grads, "qkv"):
        assert g.dtype == dtype
        assert_close(g.cpu(), w, dtype, f"grad {name}", factor=2.0 if low else 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_block_edges_gqa(triton_device, dtype, causal):
    # lengths 1, 0 and the 32 / 64-row tile edges +- 1, in one packed batch
    lengths = [1, 0, 65, 31, 33]
    _check_packed(triton_device, lengths, lengths, 4, 2, 16, dtype, causal)


def test_packed_separate_key_offsets(triton_device):
    # per-sequence KV caches longer and shorter than the queries, and a sequence without keys
    _check_packed(triton_device, [3, 9, 4, 0], [10, 2, 0, 5], 2, 1, 8, torch.float16, True, scale="gradmax")


def test_aot_configs_cover_head_dims_and_dtypes():
    names = [c["name"] for c in K.AOT_CONFIGS]
    for part in ("float16", "bfloat16", "float32", "d32", "d64", "d128", "logn_fwd", "logn_bwd_dkdv", "logn_bwd_dq",
                 "varlen"):
        assert any(part in n for n in names), part
