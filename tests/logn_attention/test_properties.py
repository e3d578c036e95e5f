"""Property-based checks of log-n attention on every available backend (hypothesis, seeded).

Each example draws a dense problem: batch (0 included), grouped query heads, query and key
lengths (a KV cache: Lq < Lk; queries before the first key: Lq > Lk), head size, dtype, causal,
a random key padding mask (sometimes a fully padded batch row), a scale rule, non-finite values
(NaN, +-inf, huge) in the padded keys and values, and non-contiguous inputs. On each backend (cpu,
torch, and triton under the interpreter when present) the output, lse and gradients must equal
the float64 reference computed on the CLEAN inputs (padded keys zero), be finite, and give padded
keys exactly zero gradient; the same problem with other padding contents must give bitwise the
same result, and permuting the batch permutes the result. Packed problems (cu_seqlens, empty
sequences included) are held to the float64 reference the same way.

A few examples run in the default suite; ``-m slow`` runs many more. Hostile input through the raw
ops is in tests/logn_attention/test_hostile_inputs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kexue
from kexue.reference import logn_attention as ref
from tests.helpers import assert_close
from tests.logn_attention.helpers import BACKENDS, _filled

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


FAST = {"torch": 5, "cpu": 8, "triton": 2}


SLOW = {"torch": 200, "cpu": 300, "triton": 40}


POISONS = [math.nan, math.inf, -math.inf, 1e30]


RULES = [
    {},
    {"scale": 0.3, "train_len": 8.0},
    {"clip": True, "train_len": 4.0},
    {"min_n": 6.0},
    {"logn": False},
    {"scale": "gradmax"},
]


LOW = (torch.float16, torch.bfloat16)


def _settings(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _dtypes(backend):
    if backend == "triton":  # the interpreter runs every Triton dtype; float64 is not one
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def dense_problems(draw, backend):
    dtype = draw(st.sampled_from(_dtypes(backend)))
    b = draw(st.integers(0, 3))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    lq, lk = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    d = draw(st.sampled_from([1, 3, 8, 16, 20]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    mask_p = draw(st.sampled_from([None, 0.3, 0.7]))
    mask = None if mask_p is None else torch.rand(b, lk, generator=g) < mask_p
    if mask is not None and b and draw(st.booleans()):
        mask[draw(st.integers(0, b - 1))] = True  # a batch row whose queries see no key
    return dict(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        mask=mask,
        dtype=dtype,
        causal=draw(st.booleans()),
        rule=draw(st.sampled_from(RULES)),
        poison=draw(st.sampled_from(POISONS)),
        transposed=draw(st.booleans()),
        go=torch.randn(b, hq, lq, d, generator=g).to(dtype),
        gl=torch.randn(b, hq, lq, generator=g),
    )


def _laid_out(t, transposed):
    """The same values; with ``transposed`` as a non-contiguous view (the strides of (B, L, H, D))."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if transposed else t


def _dense_run(backend, p, q, k, v):
    q, k, v = (_laid_out(t, p["transposed"]).detach().requires_grad_() for t in (q, k, v))
    with kexue.use_backend(backend):
        out, lse = kexue.ops.logn_attention(
            q, k, v, causal=p["causal"], key_padding_mask=p["mask"], return_lse=True, **p["rule"]
        )
        loss = (out.double() * p["go"].double()).sum() + (lse.double() * p["gl"].double()).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads


def check_dense(backend, p):
    mask, dtype = p["mask"], p["dtype"]
    clean = [p["q"], _filled(p["k"], mask, 0.0), _filled(p["v"], mask, 0.0)]
    dirty = [clean[0], _filled(clean[1], mask, p["poison"]), _filled(clean[2], mask, -p["poison"])]
    out, lse, grads = _dense_run(backend, p, *dirty)
    q64, k64, v64 = (t.double().requires_grad_() for t in clean)
    r_out, r_lse = ref.logn_attention(
        q64, k64, v64, causal=p["causal"], key_padding_mask=mask, return_lse=True, **p["rule"]
    )
    r_loss = (r_out * p["go"].double()).sum() + (r_lse * p["gl"].double()).sum()
    r_grads = torch.autograd.grad(r_loss, (q64, k64, v64))

    assert out.dtype == dtype and out.shape == p["q"].shape
    assert lse.dtype == ref.compute_dtype(dtype) and lse.shape == p["q"].shape[:3]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "non-finite output from finite visible inputs"
    low = dtype in LOW
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, dtype if low or dtype == torch.float64 else torch.float32, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"grad {name}: non-finite"
        assert_close(g, w, dtype, f"grad {name}", factor=2.0 if low else 1.0)
    if mask is not None:
        for g, name in zip(grads[1:], "kv", strict=True):
            padded = g.transpose(1, 2)[mask]
            assert torch.equal(padded, torch.zeros_like(padded)), f"grad {name}: nonzero at a padded key"
        # other padding contents: bitwise the same result (the kernels never see them)
        other = [clean[0], _filled(clean[1], mask, 7.0), _filled(clean[2], mask, 1e4)]
        out2, lse2, grads2 = _dense_run(backend, p, *other)
        assert torch.equal(out2, out) and torch.equal(lse2, lse), "padding contents changed the output"
        assert all(torch.equal(a, b) for a, b in zip(grads2, grads, strict=True)), "padding changed a gradient"
    b = p["q"].shape[0]
    if b > 1:  # the batch rows are independent: permuting them permutes the result
        perm = torch.randperm(b, generator=torch.Generator().manual_seed(b))
        with kexue.use_backend(backend):
            out_p, lse_p = kexue.ops.logn_attention(
                *(t[perm] for t in dirty),
                causal=p["causal"],
                key_padding_mask=None if mask is None else mask[perm],
                return_lse=True,
                **p["rule"],
            )
        assert_close(out_p, out[perm], dtype, "permuted batch")
        assert_close(lse_p, lse[perm], dtype if low or dtype == torch.float64 else torch.float32, "permuted lse")


@st.composite
def packed_problems(draw, backend):
    dtype = draw(st.sampled_from(_dtypes(backend)))
    nseq = draw(st.integers(1, 4))
    lengths_q = draw(st.lists(st.integers(0, 7), min_size=nseq, max_size=nseq))
    separate = draw(st.booleans())
    lengths_k = draw(st.lists(st.integers(0, 9), min_size=nseq, max_size=nseq)) if separate else lengths_q
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([2, 8, 17]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tq, tk = sum(lengths_q), sum(lengths_k)

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=draw(st.sampled_from(INTS)))

    return dict(
        q=(torch.randn(tq, hq, d, generator=g, dtype=torch.float64) * 1.5).to(dtype),
        k=(torch.randn(tk, hkv, d, generator=g, dtype=torch.float64) * 1.5).to(dtype),
        v=torch.randn(tk, hkv, d, generator=g, dtype=torch.float64).to(dtype),
        cu_q=offsets(lengths_q),
        cu_k=offsets(lengths_k) if separate else None,
        dtype=dtype,
        causal=draw(st.booleans()),
        rule=draw(st.sampled_from(RULES)),
        max_seqlen=draw(st.sampled_from([None, max([*lengths_q, *lengths_k, 0]) + draw(st.integers(0, 3))])),
        go=torch.randn(tq, hq, d, generator=g).to(dtype),
        gl=torch.randn(hq, tq, generator=g),
    )


INTS = [torch.int32, torch.int64]


def check_packed(backend, p):
    dtype = p["dtype"]
    q, k, v = (p[n].detach().requires_grad_() for n in ("q", "k", "v"))
    with kexue.use_backend(backend):
        out, lse = kexue.ops.logn_attention(
            q,
            k,
            v,
            causal=p["causal"],
            cu_seqlens=p["cu_q"],
            cu_seqlens_k=p["cu_k"],
            max_seqlen=p["max_seqlen"],
            return_lse=True,
            **p["rule"],
        )
        loss = (out.double() * p["go"].double()).sum() + (lse.double() * p["gl"].double()).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (p[n].double().requires_grad_() for n in ("q", "k", "v"))
    r_out, r_lse = ref.logn_attention_varlen(
        q64, k64, v64, p["cu_q"], cu_seqlens_k=p["cu_k"], causal=p["causal"], return_lse=True, **p["rule"]
    )
    r_loss = (r_out * p["go"].double()).sum() + (r_lse * p["gl"].double()).sum()
    if r_loss.requires_grad:
        r_grads = torch.autograd.grad(r_loss, (q64, k64, v64), allow_unused=True, materialize_grads=True)
    else:  # no query rows at all: the reference's loss does not depend on the inputs
        r_grads = tuple(torch.zeros_like(t) for t in (q64, k64, v64))
    low = dtype in LOW
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, dtype if low or dtype == torch.float64 else torch.float32, "lse")
    for g, w, name in zip(grads, r_grads, "qkv", strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"grad {name}: non-finite"
        assert_close(g, w, dtype, f"grad {name}", factor=2.0 if low else 1.0)


def _property(strategy, check, backend, examples):
    @_settings(examples)
    @given(p=strategy(backend))
    def prop(p):
        check(backend, p)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_matches_reference_on_random_problems(backend):
    _property(dense_problems, check_dense, backend, FAST[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_reference_on_random_problems(backend):
    _property(packed_problems, check_packed, backend, max(1, FAST[backend] // 2 - 1))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_matches_reference_on_many_random_problems(backend):
    _property(dense_problems, check_dense, backend, SLOW[backend])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_reference_on_many_random_problems(backend):
    _property(packed_problems, check_packed, backend, SLOW[backend] // 2)
