"""Log-n attention: the reference against an independent naive formula, gradcheck, and every
backend (C++ CPU, torch) against the float64 reference, forward and backward."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import kexue
import kexue.ops._logn_attention_ops  # noqa: F401  (the module of the custom ops)
import kexue.reference.logn_attention  # noqa: F401
from tests.helpers import DTYPES, assert_close

ops_mod = sys.modules["kexue.ops._logn_attention_ops"]
ref = sys.modules["kexue.reference.logn_attention"]
attn = kexue.ops.logn_attention

# Every torch.empty (at::empty in C++ too) is NaN-filled: an output element a kernel forgets fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


# Backends that run on this machine's CPU tensors (triton is tested in test_triton.py).
CPU_BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float64, seed=0, mask_p=None, full_row=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64) * 1.5
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    mask = None
    if mask_p is not None:
        mask = torch.rand(b, lk, generator=gen) < mask_p
        if full_row and b > 0:
            mask[0] = True  # batch 0: every key padded, every query row empty
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


# --------------------------------------------------------------------------------------------
# The reference.


def _naive(q, k, v, causal, mask, scale, train_len, logn, clip, min_n):
    """Row by row, with Python floats for the scale: independent of the reference's tensor code."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.zeros(b, hq, lq, dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(lq):
                keys = [j for j in range(lk) if (not causal or j <= i + lk - lq) and (mask is None or not mask[bi, j])]
                if not keys:
                    continue
                n = max(len(keys), min_n, 1)
                if scale == "gradmax":
                    # bisection on exp(a^2)(1 + 2a^2) = n
                    lo, hi = 0.0, 10.0
                    for _ in range(200):
                        mid = (lo + hi) / 2
                        lo, hi = (mid, hi) if math.exp(mid * mid) * (1 + 2 * mid * mid) < n else (lo, mid)
                    sc = lo / math.sqrt(d)
                else:
                    sc = 1 / math.sqrt(d) if scale is None else scale
                    if logn:
                        f = math.log(n) / math.log(train_len)
                        sc *= max(1.0, f) if clip else f
                s = torch.stack([sc * torch.dot(q[bi, h, i], k[bi, kh, j]) for j in keys])
                p = torch.softmax(s, 0)
                out[bi, h, i] = (p[:, None] * v[bi, kh, keys]).sum(0)
                lse[bi, h, i] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize(
    "case",
    [
        dict(causal=False, mask_p=None, scale=None, train_len=512, logn=True, clip=False, min_n=1),
        dict(causal=True, mask_p=None, scale=0.3, train_len=16, logn=True, clip=False, min_n=1),
        dict(causal=True, mask_p=0.3, scale=None, train_len=4, logn=True, clip=True, min_n=1),
        dict(causal=False, mask_p=0.4, scale=None, train_len=512, logn=True, clip=False, min_n=16),
        dict(causal=False, mask_p=None, scale=None, train_len=512, logn=False, clip=False, min_n=1),
        dict(causal=True, mask_p=0.2, scale="gradmax", train_len=512, logn=True, clip=False, min_n=1),
    ],
)
@pytest.mark.parametrize("lq,lk", [(6, 9), (9, 6), (1, 7)])
def test_reference_matches_naive_formula(case, lq, lk):
    case = dict(case)
    q, k, v, mask = _inputs(2, 4, 2, lq, lk, 8, mask_p=case.pop("mask_p"), seed=lq * 10 + lk)
    out, lse = ref.logn_attention(q, k, v, key_padding_mask=mask, return_lse=True, **case)
    want_out, want_lse = _naive(
        q, k, v, case["causal"], mask, case["scale"], case["train_len"], case["logn"], case["clip"], case["min_n"]
    )
    assert_close(out, want_out, torch.float64, "out")
    assert_close(lse, want_lse, torch.float64, "lse")


def test_gradmax_alpha_matches_spec_values():
    # docs/logn_attention.md, the gradmax table: normal-logit optimum alpha*(n)
    n = torch.tensor([64.0, 512, 1024, 4096, 20000], dtype=torch.float64)
    want = torch.tensor([1.549, 2.008, 2.147, 2.406, 2.678], dtype=torch.float64)
    assert torch.allclose(ref.gradmax_alpha(n), want, atol=1e-3)
    assert ref.gradmax_alpha(torch.tensor([1.0], dtype=torch.float64)).item() == 0.0


def test_logn_off_is_sdpa():
    q, k, v, mask = _inputs(2, 4, 4, 7, 11, 16, mask_p=0.3)
    mask[:, 0] = False  # SDPA gives NaN on fully masked rows; keep one key visible
    out = ref.logn_attention(q, k, v, key_padding_mask=mask, logn=False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    assert_close(out, want, torch.float64)


def test_factor_is_one_at_train_len():
    # n = train_len keys: log-n scale equals the plain scale (Attention-E calibration)
    q, k, v, _ = _inputs(1, 2, 2, 5, 64, 8)
    assert_close(ref.logn_attention(q, k, v, train_len=64), ref.logn_attention(q, k, v, logn=False), torch.float64)


@pytest.mark.parametrize("causal,mask_p", [(False, None), (True, 0.3)])
def test_reference_gradcheck(causal, mask_p):
    q, k, v, mask = _inputs(1, 2, 1, 4, 6, 3, mask_p=mask_p)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = ref.logn_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True, train_len=4)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_formula_matches_autograd(causal):
    q, k, v, mask = _inputs(2, 4, 2, 7, 9, 5, mask_p=0.3, full_row=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ref.logn_attention_forward(q, k, v, mask, causal, None, 8, True, False, 1)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    got = ref.logn_attention_backward(
        go, gl, q, k, v, out.detach(), lse.detach(), mask, causal, None, 8, True, False, 1
    )
    for g, w, name in zip(got, want, "qkv", strict=False):
        assert_close(g, w, torch.float64, f"grad {name}")


def _entropy(q, k, logn):
    n = k.shape[2]
    s = ref.row_scales(torch.full((1, q.shape[2]), n), q.shape[-1], None, 512, logn, False, 1, torch.float64)
    p = torch.softmax(s[:, None, :, None] * (q @ k.transpose(-1, -2)), -1)
    return float(-(p * torch.log(p)).sum(-1).mean())


def test_entropy_stays_nearly_constant_with_logn():
    # Random q, k whose logits have standard deviation 3 (a peaked regime, as in trained models).
    # With the plain 1/sqrt(d) scale the entropy grows with the number of keys; with log-n it
    # barely moves. (With unit-variance logits neither is constant: H ~ log n - s^2/2 there.)
    gen = torch.Generator().manual_seed(0)
    d, lengths = 64, (64, 256, 1024, 4096)
    h = {True: [], False: []}
    for n in lengths:
        q = torch.randn(1, 4, 64, d, generator=gen, dtype=torch.float64) * math.sqrt(3)
        k = torch.randn(1, 4, n, d, generator=gen, dtype=torch.float64) * math.sqrt(3)
        for logn in (True, False):
            h[logn].append(_entropy(q, k, logn))
    plain_growth = h[False][-1] - h[False][0]
    logn_range = max(h[True]) - min(h[True])
    assert plain_growth > 2.0, h
    assert logn_range < 0.25 * plain_growth, h


# --------------------------------------------------------------------------------------------
# Backends against the reference.

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


# --------------------------------------------------------------------------------------------
# Bad input.


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
    with pytest.raises(ValueError, match="3-d"):  # packed sequences (tests/logn_attention/test_varlen.py)
        attn(q, k, v, cu_seqlens=torch.tensor([0, 5]))


# --------------------------------------------------------------------------------------------
# torch.compile and opcheck.


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
