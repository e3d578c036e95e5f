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

The raw custom ops (forward, backward, packed) and torch.compile(fullgraph=True) get bad shapes,
masks and offsets: a ValueError or TypeError on every backend, checked in a subprocess so that a
crash shows as a signal instead of killing the test run. A few examples run in the default
suite; ``-m slow`` runs many more.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kexue
from kexue.reference import logn_attention as ref
from tests.conftest import triton_unavailable_reason
from tests.helpers import assert_close

BACKENDS = [b for b in ("cpu", "torch") if kexue.backends()[b]["available"]]
BACKENDS += ["triton"] if triton_unavailable_reason() is None else []
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

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN


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


def _filled(t, mask, value):
    """``t`` with every padded key (mask True) set to ``value`` (a huge one: the dtype's largest)."""
    if mask is None:
        return t
    if math.isfinite(value):
        value = max(-torch.finfo(t.dtype).max, min(value, torch.finfo(t.dtype).max))
    return t.masked_fill(mask[:, None, :, None], value)


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


# --------------------------------------------------------------------------------------------
# The case: NaN in a padded key or value, every backend, eager and compiled.


# Compiled, every backend goes through the same op body: one backend by default, all under -m slow.
NAN_CASES = [(b, False) for b in BACKENDS] + [
    (b, True) if i == 0 else pytest.param(b, True, marks=pytest.mark.slow) for i, b in enumerate(BACKENDS)
]


@pytest.mark.parametrize("backend,compiled", NAN_CASES)
def test_nan_in_padded_keys_does_not_reach_the_output(backend, compiled):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[0, :, 3], v_nan[0, :, 4] = math.nan, math.inf

    def f(q, k, v, mask):
        return kexue.ops.logn_attention(q, k, v, key_padding_mask=mask, return_lse=True)

    run = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    with kexue.use_backend(backend):
        out, lse = run(q, k_nan, v_nan, mask)
    want, want_lse = ref.logn_attention(
        q.double(),
        _filled(k, mask, 0.0).double(),
        _filled(v, mask, 0.0).double(),
        key_padding_mask=mask,
        return_lse=True,
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, want, torch.float32)
    assert_close(lse, want_lse, torch.float32)


# --------------------------------------------------------------------------------------------
# Bad input through the raw custom ops and torch.compile: an exception on every backend, never a
# signal or a read past the end. One subprocess runs every case on every backend.

PRELUDE = """
import torch, kexue
torch._dynamo.config.suppress_errors = False
ops = torch.ops.kexue
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
rule = (False, 0.3, 512.0, True, False, 1.0, False)
out, lse = kexue.ops.logn_attention(q, k, v, return_lse=True)
pq, pk = torch.randn(5, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
cq, ck = torch.tensor([0, 3, 5]), torch.tensor([0, 2, 6])
pout, plse = kexue.ops.logn_attention(pq, pk, pk, cu_seqlens=cq, cu_seqlens_k=ck, return_lse=True)

def compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)

def outcome(case, backend):
    try:
        with kexue.use_backend(backend):
            case()
    except kexue.BackendUnavailableError:
        return "n/a"
    except (ValueError, TypeError) as e:
        return type(e).__name__
    except Exception as e:  # noqa: BLE001  (reported: the wrong type)
        return type(e).__name__ + ":" + str(e).splitlines()[0][:100].replace(" ", "_")
    return "no_error"
"""

CASES = {
    "mask_too_short": "ops.logn_attention(q, k, v, torch.zeros(1, 3, dtype=torch.bool), *rule)",
    "mask_not_bool": "ops.logn_attention(q, k, v, torch.zeros(1, 5, dtype=torch.uint8), *rule)",
    "heads_not_a_multiple": "ops.logn_attention(torch.randn(1, 3, 5, 8), k, v, None, *rule)",
    "v_shorter_than_k": "ops.logn_attention(q, k, v[:, :, :2].contiguous(), None, *rule)",
    "batch_mismatch": "ops.logn_attention(q, k.expand(2, 2, 5, 8).contiguous(), v.expand(2, 2, 5, 8).contiguous(), "
    "None, *rule)",
    "head_dim_mismatch": "ops.logn_attention(q, k[..., :4].contiguous(), v[..., :4].contiguous(), None, *rule)",
    "non_contiguous": "ops.logn_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, *rule)",
    "mixed_dtypes": "ops.logn_attention(q, k.double(), v, None, *rule)",
    "three_d": "ops.logn_attention(q, k, v[0], None, *rule)",
    "scale_nan": "ops.logn_attention(q, k, v, None, False, float('nan'), 512.0, True, False, 1.0, False)",
    "train_len_one": "ops.logn_attention(q, k, v, None, False, 0.3, 1.0, True, False, 1.0, False)",
    "backward_lse_short": "ops.logn_attention_backward(out, None, q, k, v, out, lse[:, :, :2].contiguous(), None, "
    "*rule)",
    "backward_grad_out_short": "ops.logn_attention_backward(out[:, :, :2].contiguous(), None, q, k, v, out, lse, "
    "None, *rule)",
    "backward_grad_lse_short": "ops.logn_attention_backward(out, lse[:, :1].contiguous(), q, k, v, out, lse, None, "
    "*rule)",
    "backward_mask_short": "ops.logn_attention_backward(out, None, q, k, v, out, lse, "
    "torch.zeros(1, 2, dtype=torch.bool), *rule)",
    "varlen_offset_past_the_end": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 3, 100]), None, *rule)",
    "varlen_offset_past_the_end_with_max": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 3, 100]), 4, "
    "*rule)",
    "varlen_offsets_decreasing": "ops.logn_attention_varlen(pq, pk, pk, torch.tensor([0, 4, 2, 5]), "
    "torch.tensor([0, 2, 3, 6]), None, *rule)",
    "varlen_negative_start": "ops.logn_attention_varlen(pq, pk, pk, torch.tensor([-3, 3, 5]), ck, 9, *rule)",
    "varlen_max_seqlen_too_small": "ops.logn_attention_varlen(pq, pk, pk, cq, ck, 1, *rule)",
    "varlen_float_offsets": "ops.logn_attention_varlen(pq, pk, pk, cq.float(), ck, None, *rule)",
    "varlen_offsets_count_differ": "ops.logn_attention_varlen(pq, pk, pk, cq, torch.tensor([0, 6]), None, *rule)",
    "varlen_backward_bad_offsets": "ops.logn_attention_varlen_backward(pout, None, pq, pk, pk, pout, plse, cq, "
    "torch.tensor([0, 50, 6]), 3, *rule)",
    "varlen_backward_lse_short": "ops.logn_attention_varlen_backward(pout, None, pq, pk, pk, pout, "
    "plse[:, :2].contiguous(), cq, ck, None, *rule)",
    "compiled_mask_too_short": "compiled(lambda q, k, v, m: ops.logn_attention(q, k, v, m, *rule))"
    "(q, k, v, torch.zeros(1, 2, dtype=torch.bool))",
    "compiled_varlen_offset_past_the_end": "compiled(lambda q, k, c: kexue.ops.logn_attention(q, k, k, "
    "cu_seqlens=c))(pk, pk, torch.tensor([0, 3, 60]))",
    "compiled_varlen_max_seqlen_too_small": "compiled(lambda q, k, c: kexue.ops.logn_attention(q, k, k, "
    "cu_seqlens=c, max_seqlen=1))(pk, pk, torch.tensor([0, 3, 6]))",
}


def _bad_input_script(names) -> str:
    cases = ", ".join(f"{n!r}: lambda: {CASES[n]}" for n in names)
    lines = [PRELUDE, f"for name, case in {{{cases}}}.items():"]
    lines.append(f"    print(name, *(outcome(case, b) for b in {BACKENDS!r}), flush=True)")
    return textwrap.dedent("\n".join(lines))


def _assert_refused(stdout: str, names) -> None:
    seen = {}
    for line in stdout.strip().splitlines():
        name, *outcomes = line.split()
        seen[name] = outcomes
    assert sorted(seen) == sorted(names), stdout
    for name, outcomes in seen.items():
        assert len(outcomes) == len(BACKENDS), (name, outcomes)
        for backend, outcome in zip(BACKENDS, outcomes, strict=True):
            assert outcome in ("ValueError", "TypeError"), f"{name} on {backend}: {outcome}"


def test_raw_ops_refuse_bad_input(capsys):
    """The raw cases in this process (the checks run before any kernel; the subprocess test below
    is the one that would survive a crash)."""
    names = [n for n in CASES if not n.startswith("compiled")]
    exec(_bad_input_script(names), {})  # noqa: S102  (the same script as the subprocess's)
    _assert_refused(capsys.readouterr().out, names)


@pytest.mark.slow
def test_raw_ops_and_compiled_graphs_refuse_bad_input_without_a_signal():
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # conftest's setting, for the subprocess too
    proc = subprocess.run(
        [sys.executable, "-c", _bad_input_script(CASES)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, (
        f"the subprocess ended with {proc.returncode} (a negative code is a signal)\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    )
    _assert_refused(proc.stdout, CASES)


def test_trusted_offsets_are_clamped_into_range():
    """With max_seqlen on CUDA the op trusts the offsets without reading them; it clamps them on
    the device instead, so wrong ones select wrong rows but never rows past the end. (The path
    itself needs CUDA; the clamp is checked here on CPU tensors.)"""
    inputs_mod = sys.modules["kexue.ops._logn_attention_inputs"]
    for dtype in (torch.int32, torch.int64):
        cu = torch.tensor([-4, 3, 100, 2, 6], dtype=dtype)
        clamped = inputs_mod._clamped_offsets(cu, 6)
        assert clamped.dtype == dtype and clamped.tolist() == [0, 3, 6, 6, 6]
