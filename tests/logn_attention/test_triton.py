"""The Triton kernels of log-n attention against the float64 reference.

Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) with the sm_80 tile table, which is slow: shapes are small but cross the tile
edges (128 and 64 query rows, 128, 64 and 32 keys; 16 / 32 in float32), include a single position,
grouped heads (GQA ratios 1, 2, 4, 8), every head-dim class up to 256, causal attention after a KV
cache (Lq < Lk) and before it (Lq > Lk, queries that see nothing), padding masks with a fully
padded batch row, each scale rule, packed variable-length sequences (cu_seqlens) with lengths 0,
1 and tile edges, and the decode kernel (Lq <= 16: split-K, heads packed) with cache offsets.
Outputs come from torch.empty, which deterministic mode fills with NaN, so an element a kernel
forgets to write fails the comparison.

The tests at the end need CUDA (production sizes, bf16) and are skipped without it.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kexue
import kexue.reference.logn_attention  # noqa: F401
from tests.helpers import assert_close

pytest.importorskip("triton")
from kexue.triton_kernels import logn_attention as K  # noqa: E402  (after the skip)
from kexue.triton_kernels import logn_attention_bwd_tiles, logn_attention_decode  # noqa: E402
from kexue.triton_kernels.logn_attention_rules import value_block, value_slices  # noqa: E402

ref = sys.modules["kexue.reference.logn_attention"]


pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


def _check(device, b, hq, hkv, lq, lk, d, dtype, causal, mask_p=None, full_row=False, **kw):
    """Forward and backward against the float64 reference; returns (out, lse, dq, dk, dv)."""
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
    for g, w, name in zip(grads, r_grads, "qkv", strict=True):
        assert g.dtype == dtype
        assert_close(g.cpu(), w, dtype, f"grad {name}", factor=2.0 if low else 1.0)
    return (out, lse, *grads)


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
        out, lse = kexue.ops.logn_attention(
            qd, kd, vd, causal=causal, cu_seqlens=cu_q.to(device), cu_seqlens_k=cu_k.to(device), return_lse=True, **kw
        )
        grads = torch.autograd.grad(
            (out.float() * go.to(device).float()).sum() + (lse * gl.to(device)).sum(), (qd, kd, vd)
        )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = ref.logn_attention_varlen(
        q64, k64, v64, cu_q, cu_seqlens_k=cu_k, causal=causal, return_lse=True, **kw
    )
    r_grads = torch.autograd.grad((r_out * go.double()).sum() + (r_lse * gl.double()).sum(), (q64, k64, v64))
    low = dtype in (torch.float16, torch.bfloat16)
    assert out.shape == q.shape and lse.shape == (hq, tq) and lse.dtype == torch.float32
    assert_close(out.cpu(), r_out, dtype, "out")
    assert_close(lse.cpu(), r_lse, torch.float32 if not low else dtype, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=True):
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


# ---------------------------------------------------------------------------------------------
# The restructured kernels: the two-stage causal split, head dims, GQA ratios, decode.


@pytest.mark.parametrize("lq,lk", [(128, 128), (129, 129), (130, 200), (200, 130), (64, 191)])
def test_causal_split_at_tile_edges(triton_device, lq, lk):
    # 16-bit inputs take the 128-row x 64-key tiles: the diagonal of a block falls on, just past
    # and between tile edges, with the KV-cache offset Lk - Lq positive and negative
    _check(triton_device, 1, 2, 1, lq, lk, 16, torch.float16, True)


@pytest.mark.parametrize("d", [8, 40, 64, 96, 128, 256])
def test_head_dims(triton_device, d):
    # 40 and 96 are padded to 64 / 128 columns (EVEN_D off), 256 the widest the API accepts
    _check(triton_device, 1, 2, 1, 37, 70, d, torch.float16, True, mask_p=0.2)


@pytest.mark.parametrize("family", [80, 86, 90])
def test_wide_heads_split_their_columns(triton_device, monkeypatch, family):
    # d=256 (each family's table): two programs per row block, each owning 128 of the output
    # columns (dQ likewise; dK and dV too, but in four 64-column programs on sm_86) and computing
    # the scores over all 256; GQA, a 128-row tile edge crossed, padding
    monkeypatch.setattr(K, "arch_family", lambda device: family)
    assert (value_block(256), value_slices(256)) == (128, 2)
    assert (value_block(128), value_slices(128)) == (128, 1)
    assert value_slices(256, 64) == 4
    _check(triton_device, 1, 4, 2, 130, 130, 256, torch.bfloat16, True, mask_p=0.1)


@pytest.mark.parametrize("lq,hq,hkv", [(1, 4, 2), (3, 16, 2)])
def test_wide_heads_decode(triton_device, lq, hq, hkv):
    # the decode kernel at d=256: 16-row blocks only, so 3 tokens of 8 query heads a KV head (24
    # rows) take two row blocks; a cache offset and padding
    assert logn_attention_decode._block_rows(hq // hkv * lq, 256) == 16
    _check(triton_device, 1, hq, hkv, lq, 150, 256, torch.bfloat16, True, mask_p=0.1)


def test_wide_heads_packed(triton_device, monkeypatch):
    monkeypatch.setattr(K, "arch_family", lambda device: 90)
    _check_packed(triton_device, [130, 1, 0, 64], [130, 1, 0, 70], 4, 2, 256, torch.float16, True)


@pytest.mark.parametrize("d", [72, 96])
def test_sm90_tiles(triton_device, monkeypatch, d):
    # the interpreter runs the sm_80 table; this runs sm_90's: dK/dV 16 query rows x 128 keys with
    # EVEN_D off (d=96; d=72 also has its rows padded to 80 by the launcher), through the flat loop
    # over (query head, query block) with GQA, causal diagonal, ragged last blocks and padding
    monkeypatch.setattr(K, "arch_family", lambda device: 90)
    assert logn_attention_bwd_tiles.tiles(90, K.row_length(d), 0).dkdv.block_n == 128
    _check(triton_device, 1, 4, 2, 150, 150, d, torch.float16, True, mask_p=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(17, 129), (40, 127)])
def test_dkdv_128_keys_from_d128(triton_device, dtype, lq, lk):
    # the sm_80-family dK/dV tile from 128 padded columns (d=96: EVEN_D off), as on sm_90: 128 keys
    # on 8 warps, 16 query rows a step; key blocks ragged past 128 and short of it, GQA, the causal
    # diagonal, padding, a ragged last query block
    assert logn_attention_bwd_tiles.tiles(80, 96, 0).dkdv == (16, 128, 8, 2)
    assert logn_attention_bwd_tiles.tiles(86, 128, 0).dkdv == (16, 128, 8, 2)
    _check(triton_device, 1, 4, 2, lq, lk, 96, dtype, True, mask_p=0.1)


@pytest.mark.parametrize("d", [8, 40, 72])
def test_rows_padded_to_16(d):
    # a head dim that is not a multiple of 16 reaches the kernels as a view of rows padded with
    # zeros to the next multiple of 16 (aligned strides, D a multiple of 16; see row_length)
    t = torch.randn(2, 3, 5, d)
    row = K.row_length(d)
    view = K._rows(t, row)
    assert row % 16 == 0 and row - 16 < d <= row
    assert view.stride() == (3 * 5 * row, 5 * row, row, 1) and torch.equal(view, t)
    base = view.as_strided((2, 3, 5, row), view.stride())
    assert torch.count_nonzero(base[..., d:]) == 0
    assert K._rows(torch.randn(2, 3, 5, 64), 64).stride() == (3 * 5 * 64, 5 * 64, 64, 1)


@pytest.mark.parametrize("hkv", [8, 4, 2, 1])
def test_gqa_ratios(triton_device, hkv):
    _check(triton_device, 1, 8, hkv, 33, 65, 16, torch.bfloat16, False, mask_p=0.1)


@pytest.mark.parametrize("lq,lk,hq,hkv", [(1, 200, 4, 1), (3, 131, 8, 2), (16, 70, 4, 1), (16, 9, 2, 2), (4, 1, 2, 1)])
def test_decode_cache_offsets(triton_device, lq, lk, hq, hkv):
    # Lq <= 16 takes the split-K decode kernel; row i sees keys up to i + Lk - Lq. (16, 9): queries
    # before the cache's start see nothing; (4, 1): a one-key cache. The merge of splits is
    # exercised: the interpreter cuts the cache into up to 4 chunks.
    assert lq <= logn_attention_decode.MAX_Q
    _check(triton_device, 1, hq, hkv, lq, lk, 16, torch.float16, True)


@pytest.mark.parametrize("kw", [dict(), dict(scale="gradmax"), dict(clip=True, train_len=32)])
def test_decode_padding_and_rules(triton_device, kw):
    _check(triton_device, 2, 4, 2, 2, 150, 24, torch.float32, True, mask_p=0.3, full_row=True, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_narrow_heads_take_32_columns(triton_device, dtype):
    # heads of up to 16 columns run the decode tiles 32 wide (_block_d: 16 x 16 output tiles would
    # be replicated across the 4 warps), the extra columns zero; eight query heads on one KV head
    assert logn_attention_decode._block_d(K.row_length(8)) == 32
    _check(triton_device, 1, 8, 1, 1, 150, 8, dtype, True, mask_p=0.2)


@pytest.mark.parametrize("lq,hq,hkv", [(8, 8, 2), (1, 72, 1), (16, 8, 1), (3, 48, 2)])
def test_decode_row_blocks(triton_device, lq, hq, hkv):
    # Hq / Hkv x Lq packed rows: 32 run in one 64-row tile, half of it empty; 72 with Lq = 1 take
    # two row blocks; 128 two full ones; 72 with Lq = 3 cut the rows inside a head's queries
    rows = hq // hkv * lq
    assert logn_attention_decode._block_rows(rows) == 64
    _check(triton_device, 1, hq, hkv, lq, 90, 16, torch.bfloat16, True, mask_p=0.2)


def test_decode_splits_cover_the_cache():
    # each split is at least one key tile, and there are enough of them to use the device
    assert logn_attention_decode.num_splits(2, 1, torch.device("cpu")) == 1
    assert logn_attention_decode.num_splits(1, 10_000, torch.device("cpu")) == 4


# ---------------------------------------------------------------------------------------------
# CUDA only: production sizes in bf16 (seconds each).

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,mask_p", [(True, None), (False, 0.1), (True, 0.1)])
def test_cuda_production_sizes(d, causal, mask_p):
    _check(torch.device("cuda"), 2, 8, 2, 1024, 1024, d, torch.bfloat16, causal, mask_p=mask_p, train_len=256)


@cuda_only
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_production_packed(d):
    _check_packed(torch.device("cuda"), [1000, 17, 0, 513, 129], [1000, 17, 0, 513, 129], 8, 2, d, torch.bfloat16, True)


@cuda_only
@pytest.mark.parametrize("lq", [1, 16])
def test_cuda_production_decode(lq):
    # one token (or 16 draft tokens) against a 32k cache, Hq=32 over Hkv=8, d=128
    _check(torch.device("cuda"), 1, 32, 8, lq, 32768, 128, torch.bfloat16, True, train_len=4096, clip=True)


@cuda_only
def test_cuda_wide_heads():
    # d=256: the Triton kernels on sm_80 / sm_90 (two 128-column programs), CUDA C++ elsewhere
    _check(torch.device("cuda"), 1, 4, 2, 300, 300, 256, torch.bfloat16, True, mask_p=0.1)
