"""Log-n attention on the C++ CPU and torch backends against the reference: every dtype, scale rules,
KV-cache decoding, masked rows, NaN, empty and non-contiguous inputs, the returned log-sum-exp.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from tests.helpers import DTYPES, assert_close
from tests.logn_attention.helpers import CPU_BACKENDS, _inputs, attn, ref

# Every torch.empty (at::empty in C++ too) is NaN-filled: an output element a kernel forgets fails.
pytestmark = pytest.mark.usefixtures("nan_empty")
SHAPES = [  # (b, hq, hkv, lq, lk, d)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 5, 123, 16),
    (1, 2, 1, 130, 600, 32),  # crosses query and key block edges (128, 512)
    (1, 3, 3, 600, 130, 24),  # lq > lk: with causal, the first queries see nothing
    (2, 4, 1, 129, 129, 64),  # multi-query
]


def _run(backend, q, k, v, mask, causal, with_lse=True, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with kexue.use_backend(backend):
        out, lse = attn(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True, **kw)
        gen = torch.Generator().manual_seed(1)
        go = torch.randn(out.shape, generator=gen).to(out.dtype)
        gl = torch.randn(lse.shape, generator=gen).to(lse.dtype) if with_lse else None
        loss = (out.float() * go.float()).sum() + ((lse * gl).sum() if with_lse else 0)
        grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads, go, gl


def _reference(q, k, v, mask, causal, go, gl, **kw):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = ref.logn_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True, **kw)
    loss = (out * go.double()).sum() + ((lse * gl.double()).sum() if gl is not None else 0)
    return out, lse, torch.autograd.grad(loss, (q, k, v))


# The C++ kernel on every dtype; the torch backend (the reference itself, in the input's compute
# dtype) on float32 and bfloat16 only, to keep the suite fast.
BACKEND_DTYPES = [
    (b, dt)
    for b in CPU_BACKENDS
    for dt in (DTYPES + (torch.float64,) if b != "torch" else (torch.float32, torch.bfloat16))
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference(backend, dtype, shape, causal):
    q, k, v, mask = _inputs(*shape, dtype=dtype, mask_p=0.2, seed=sum(shape))
    out, lse, grads, go, gl = _run(backend, q, k, v, mask, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == ref.compute_dtype(dtype) and lse.shape == q.shape[:3]
    r_out, r_lse, r_grads = _reference(q, k, v, mask, causal, go, gl)
    # bf16/fp16: the rounding of the output and of the gradients to the input dtype dominates.
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, torch.float32 if dtype != torch.float64 else dtype, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=False):
        assert g.dtype == dtype
        assert_close(g, w, dtype, f"grad {name}", factor=2.0 if dtype in (torch.float16, torch.bfloat16) else 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [dict(scale="gradmax"), dict(clip=True, train_len=16), dict(min_n=16, train_len=64), dict(logn=False, scale=0.2)],
)
def test_backend_scale_rules(backend, kw):
    q, k, v, mask = _inputs(2, 4, 2, 70, 70, 16, dtype=torch.float32, mask_p=0.3)
    for causal in (False, True):
        out, lse, grads, go, gl = _run(backend, q, k, v, mask, causal, **kw)
        r_out, r_lse, r_grads = _reference(q, k, v, mask, causal, go, gl, **kw)
        assert_close(out, r_out, torch.float32, f"out {kw}")
        for g, w in zip(grads, r_grads, strict=False):
            assert_close(g, w, torch.float32, f"grads {kw}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decoding_step(backend):
    # One new query after a cache of 37 keys sees all 38: n = 38 for it.
    q, k, v, _ = _inputs(1, 2, 2, 1, 38, 16, dtype=torch.float32)
    with kexue.use_backend(backend):
        step = attn(q, k, v, causal=True, train_len=16)
        full = attn(torch.cat([torch.zeros(1, 2, 37, 16), q], 2), k, v, causal=True, train_len=16)
    assert_close(step, full[:, :, -1:], torch.float32)
    assert_close(step, ref.logn_attention(q.double(), k.double(), v.double(), train_len=16), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_give_zeros_and_finite_lse(backend):
    q, k, v, mask = _inputs(2, 2, 2, 5, 7, 8, dtype=torch.float32, mask_p=0.0, full_row=True)
    out, lse, grads, _, _ = _run(backend, q, k, v, mask, causal=False)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(lse[0], torch.zeros_like(lse[0]))
    assert torch.isfinite(lse).all()
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
    assert all(torch.isfinite(g).all() for g in grads)
    assert out[1].abs().sum() > 0
    # causal, lq > lk: queries before the first key see nothing
    q, k, v, _ = _inputs(1, 1, 1, 6, 2, 4, dtype=torch.float32)
    out, lse, grads, _, _ = _run(backend, q, k, v, None, causal=True)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4])) and out[:, :, 4:].abs().sum() > 0
    assert torch.equal(lse[:, :, :4], torch.zeros_like(lse[:, :, :4]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    q, k, v, _ = _inputs(1, 2, 2, 6, 9, 8, dtype=torch.float32)
    q[0, 1, 3, 2] = float("nan")
    v[0, 0, 4, 0] = float("nan")
    with kexue.use_backend(backend):
        out = attn(q, k, v, causal=True)
    assert torch.isnan(out[0, 1, 3]).all() and not torch.isnan(out[0, 1, :3]).any()
    # the NaN value at key 4 reaches queries that see key 4 (i >= 4 - (9 - 6) = 1), in column 0
    # (it may reach query 0 too, through 0 * NaN in the P V product, as in the reference), and
    # no other column.
    assert torch.isnan(out[0, 0, 1:, 0]).all() and not torch.isnan(out[0, 0, :, 1:]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    q, k, v, _ = _inputs(0, 2, 1, 5, 7, 8, dtype=torch.float32)
    q.requires_grad_()
    with kexue.use_backend(backend):
        out, lse = attn(q, k, v, causal=True, return_lse=True)
        (g,) = torch.autograd.grad(out.sum(), q)
    assert out.shape == q.shape and lse.shape == (0, 2, 5) and g.shape == q.shape


def test_non_contiguous_inputs():
    qb = torch.randn(1, 7, 2, 8).transpose(1, 2)  # (1, 2, 7, 8), non-contiguous
    kb = torch.randn(1, 9, 2, 8).transpose(1, 2)
    vb = torch.randn(1, 9, 2, 8).transpose(1, 2)
    assert not qb.is_contiguous()
    out = attn(qb, kb, vb, causal=True)
    assert_close(out, ref.logn_attention(qb.double(), kb.double(), vb.double(), causal=True), torch.float32)


def test_lse_is_log_sum_exp_of_scaled_logits():
    q, k, v, _ = _inputs(1, 2, 2, 4, 10, 8, dtype=torch.float32)
    _, lse = attn(q, k, v, return_lse=True)
    sc = math.log(10) / math.log(512) / math.sqrt(8)
    assert_close(lse, torch.logsumexp(sc * q.double() @ k.double().transpose(-1, -2), -1), torch.float32)
