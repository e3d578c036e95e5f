"""The CUDA C++ backend's tiled kernels (csrc/cuda/logn_attention_tiled.cu) against the float64
reference, on a GPU only (skipped without one, like tests/test_cuda_backends.py).

The tiled kernels take float16, bfloat16 and float32 with a head size that is a multiple of 8 and
at most 128 on sm_80+ (the warp-per-row kernels serve the rest), so every case here runs them:
sequence lengths at the edges of their 64-row tiles (and of the 32-row query steps of dK/dV at
head sizes above 64), head sizes padded to 32, 64, 96 and 128 columns (80 is padded to 96), GQA
groups of 1, 2 and 4, causal with Lq != Lk, key padding, every scale rule, forward (out, lse) and
backward (dq, dk, dv, with a gradient flowing into lse too), with the budgets of the other
backends' tests.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kexue
from tests.helpers import assert_close
from tests.logn_attention.helpers import _inputs, attn, ref

pytestmark = pytest.mark.skipif(
    not kexue.backends()["cuda"]["available"], reason=str(kexue.backends()["cuda"]["reason"])
)

CUDA = torch.device("cuda")
TILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EDGES = (1, 63, 64, 65, 127, 200)  # around the 64-row tiles (and the 32-row dK/dV query steps)
HEADS = (32, 64, 80, 96, 128)
GROUPS = (1, 2, 4)


@pytest.fixture(autouse=True)
def _poisoned_empty():
    """torch.empty returns NaN-filled memory during each test (deterministic mode, warnings only),
    so an output element the kernels forget to write fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _check(shape, dtype, causal, mask_p=0.25, full_row=False, seed=0, **kw):
    """Forward and backward on the cuda backend in `dtype` against the float64 reference."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v, mask = _inputs(*shape, dtype=dtype, mask_p=mask_p, seed=seed, full_row=full_row)
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    gl = torch.randn(b, hq, lq, generator=gen)  # float32, the dtype of lse
    leaves = [t.to(CUDA).requires_grad_() for t in (q, k, v)]
    with kexue.use_backend("cuda"):
        out, lse = attn(
            *leaves, causal=causal, key_padding_mask=None if mask is None else mask.to(CUDA), return_lse=True, **kw
        )
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    loss = (out.float() * go.to(CUDA).float()).sum() + (lse * gl.to(CUDA)).sum()
    grads = torch.autograd.grad(loss, leaves)

    # The reference in float64, on the GPU too (only for speed).
    r_leaves = [t.to(CUDA, torch.float64).requires_grad_() for t in (q, k, v)]
    r_mask = None if mask is None else mask.to(CUDA)
    r_out, r_lse = ref.logn_attention(*r_leaves, causal=causal, key_padding_mask=r_mask, return_lse=True, **kw)
    r_loss = (r_out * go.to(CUDA, torch.float64)).sum() + (r_lse * gl.to(CUDA, torch.float64)).sum()
    r_grads = torch.autograd.grad(r_loss, r_leaves)

    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, torch.float32, "lse")
    half = dtype in (torch.float16, torch.bfloat16)
    for g, w, name in zip(grads, r_grads, "qkv", strict=True):
        assert g.dtype == dtype
        assert_close(g, w, dtype, f"grad {name}", factor=2.0 if half else 1.0)
    return out, lse, grads


# Every (Lq, Lk) pair of tile edges; head size and group cycle through their values.
EDGE_CASES = [
    (lq, lk, HEADS[n % len(HEADS)], GROUPS[n % len(GROUPS)])
    for n, (lq, lk) in enumerate(itertools.product(EDGES, EDGES))
]


@pytest.mark.parametrize("dtype", TILED_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,d,groups", EDGE_CASES)
def test_tile_edges(dtype, causal, lq, lk, d, groups):
    _check((2, 2 * groups, 2, lq, lk, d), dtype, causal, seed=lq + 7 * lk + d)


@pytest.mark.parametrize("dtype", TILED_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("d", HEADS)
def test_head_sizes_and_groups(dtype, causal, groups, d):
    # Lq < Lk: a KV cache of 62 keys; Lq > Lk: causal queries before the first key see nothing.
    _check((1, 4 * groups, 4, 65, 127, d), dtype, causal, seed=d + groups)
    _check((1, groups, 1, 130, 70, d), dtype, causal, seed=d + groups + 1)


@pytest.mark.parametrize("dtype", TILED_DTYPES)
@pytest.mark.parametrize(
    "kw",
    [dict(scale="gradmax"), dict(clip=True, train_len=16), dict(min_n=16, train_len=64), dict(logn=False, scale=0.2)],
)
def test_scale_rules(dtype, kw):
    for causal in (False, True):
        _check((2, 4, 2, 70, 133, 64), dtype, causal, mask_p=0.3, seed=3, **kw)


@pytest.mark.parametrize("dtype", TILED_DTYPES)
def test_fully_masked_rows_and_unseen_queries(dtype):
    # Batch 0: every key padded, so every query row is empty: zeros, lse 0, zero gradients.
    out, lse, grads = _check((2, 2, 1, 70, 90, 32), dtype, False, mask_p=0.0, full_row=True, seed=5)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(lse[0], torch.zeros_like(lse[0]))
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    assert torch.equal(grads[1][0], torch.zeros_like(grads[1][0]))
    # Causal with Lq = Lk + 66: the first 66 queries (more than a tile) see no key.
    out, lse, grads = _check((1, 2, 2, 100, 34, 64), dtype, True, mask_p=None, seed=6)
    assert torch.equal(out[:, :, :66], torch.zeros_like(out[:, :, :66])) and out[:, :, 66:].abs().sum() > 0
    assert torch.equal(lse[:, :, :66], torch.zeros_like(lse[:, :, :66]))
    assert torch.equal(grads[0][:, :, :66], torch.zeros_like(grads[0][:, :, :66]))


@pytest.mark.parametrize("dtype", TILED_DTYPES)
def test_empty_batch(dtype):
    q, k, v, _ = _inputs(0, 2, 1, 5, 7, 32, dtype=dtype)
    q = q.to(CUDA).requires_grad_()
    with kexue.use_backend("cuda"):
        out, lse = attn(q, k.to(CUDA), v.to(CUDA), causal=True, return_lse=True)
        (g,) = torch.autograd.grad(out.float().sum(), q)
    assert out.shape == q.shape and lse.shape == (0, 2, 5) and g.shape == q.shape
