"""Property-based checks of GlobalPointer on every available backend (hypothesis, seeded).

Each example draws a problem: batch (0 included), length, types, head size, shared or per-type
q/k, dtype, RoPE layout, tril, a random padding mask, non-finite values (NaN, +-inf, huge) at the
padded positions of q, k and the biases, non-contiguous or expanded inputs, dense or sparse labels,
and sometimes a bad label (out of range, or on a masked span). On each backend (cpu, torch and
triton under the interpreter when present) the loss, the scores and every gradient must equal the
float64 reference computed on the CLEAN inputs (padded positions zero), or the call must raise
the reference's exception type. A few examples run in the default suite; many more under -m slow.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kexue
from kexue import _backend
from kexue.ops import global_pointer_loss, global_pointer_scores
from tests.helpers import assert_close

BACKENDS = ["torch"] + (["cpu"] if _backend.native() is not None else [])
if importlib.util.find_spec("triton") is not None and _backend.interpreting():
    BACKENDS.append("triton")
FAST = {"torch": 12, "cpu": 12, "triton": 4}
SLOW = {"torch": 300, "cpu": 300, "triton": 40}
POISONS = [math.nan, math.inf, -math.inf, 1e30]


@st.composite
def problems(draw, backend):
    # the Triton kernels take no float64
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([] if backend == "triton" else [torch.float64])
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.integers(0, 3))
    length = draw(st.integers(1, 20))
    types = draw(st.integers(1, 3))
    shared = draw(st.booleans())
    rope = draw(st.sampled_from([True, "half", False]))
    d = draw(st.integers(1, 12)) * (2 if rope else 1)
    tril = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    heads_shape = (batch, length, d) if shared else (batch, length, types, d)
    q = torch.randn(heads_shape, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(heads_shape, generator=g, dtype=torch.float64).to(dtype)
    sb = torch.randn(batch, length, types, generator=g, dtype=torch.float64).to(dtype)
    eb = torch.randn(batch, length, types, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(batch, length, generator=g) < draw(st.sampled_from([1.0, 0.8, 0.4]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    if layout == "expanded" and batch:  # one sample repeated: the inputs can be stride-0 views
        q, k, sb, eb, mask = (t[:1].expand_as(t).clone() for t in (q, k, sb, eb, mask))
    ok = mask[:, None, :, None] & mask[:, None, None, :]
    if tril:
        ok = ok & torch.ones(length, length, dtype=torch.bool).triu()
    labels = (torch.rand(batch, types, length, length, generator=g) < 0.1) & ok
    bad = draw(st.sampled_from([None, None, None, "range", "masked"]))
    sparse = draw(st.booleans()) or bad == "range"
    labels = labels.nonzero() if sparse else labels
    if bad == "range" and batch:
        labels = torch.cat((labels, torch.tensor([[0, 0, 0, length + draw(st.integers(0, 5))]])))
    elif bad == "masked" and batch and not bool(ok.all()):
        b, i, j = (~ok[:, 0]).nonzero()[0].tolist()
        if sparse:
            labels = torch.cat((labels, torch.tensor([[b, 0, i, j]])))
        else:
            labels = labels.clone()
            labels[b, 0, i, j] = True
    poison = draw(st.sampled_from(POISONS))
    return dict(
        q=q,
        k=k,
        sb=sb,
        eb=eb,
        mask=mask,
        labels=labels,
        rope=rope,
        tril=tril,
        dtype=dtype,
        poison=poison,
        layout=layout,
    )


def _poisoned(t, mask, value):
    out = t.clone()
    out[~mask] = value
    return out


def _laid_out(t, layout):
    if layout == "transposed":  # same values, strides of a (..., L) tensor transposed
        return t.transpose(1, -1).contiguous().transpose(1, -1)
    if layout == "expanded" and t.shape[0]:
        return t[:1].expand_as(t)  # stride 0 over the batch (the problem repeats one sample)
    return t


def _run(backend, p, inputs):
    """(loss, scores, grads) or the exception type."""
    leaves = [_laid_out(t, p["layout"]).detach().requires_grad_() for t in inputs]
    try:
        with kexue.use_backend(backend):
            loss = global_pointer_loss(*leaves, p["labels"], p["mask"], p["rope"], p["tril"], reduction="none")
            scores = global_pointer_scores(*leaves, p["mask"], p["rope"], p["tril"])
            weight = torch.linspace(-1, 1, scores.numel(), dtype=torch.float64).reshape(scores.shape)
            total = loss.double().sum() + (scores.double().masked_fill(torch.isinf(scores), 0) * weight).sum()
            grads = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad else [None] * 4
    except Exception as exc:  # noqa: BLE001  (the type is what is compared)
        return type(exc)
    return loss, scores, grads


def check(backend, p):
    clean = [p[name] for name in ("q", "k", "sb", "eb")]
    mask = p["mask"]
    dirty = [_poisoned(t, mask, p["poison"]) for t in clean]
    expected = _run("torch", p, [_poisoned(t, mask, 0.0).double() for t in clean])
    got = _run(backend, p, dirty)
    if isinstance(expected, type):
        assert got is expected or (isinstance(got, type) and issubclass(got, expected)), (got, expected)
        return
    assert not isinstance(got, type), f"{backend} raised {got.__name__}, the reference did not"
    loss, scores, grads = got
    loss64, scores64, grads64 = expected
    dtype = p["dtype"]
    factor = 4.0 if dtype in (torch.float16, torch.bfloat16) else 1.0  # the loss sums exps of rounded scores
    assert loss.dtype == dtype and scores.dtype == dtype
    assert_close(loss, loss64, dtype, "loss", factor)
    assert_close(scores, scores64, dtype, "scores", factor)
    for name, a, b in zip(("dq", "dk", "d_start_bias", "d_end_bias"), grads, grads64, strict=True):
        if b is None:
            continue
        assert a.dtype == dtype
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        assert torch.equal(a[~mask], torch.zeros_like(a[~mask])), f"{name}: gradient at a padded position"
        assert_close(a, b, dtype, name, factor)


def _property(backend, examples):
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(p=problems(backend))
    def prop(p):
        check(backend, p)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_random_problems(backend):
    _property(backend, FAST[backend])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_many_random_problems(backend):
    _property(backend, SLOW[backend])
