"""``allow_tf32``: float32 log-n attention with TF32 tensor-core dots, against a derived error bound.

A TF32 operand keeps 10 of float32's 23 mantissa bits. Triton hands float32 registers to the
tensor cores unrounded, and the hardware reads the top 19 bits: truncation, so each operand has a
relative error below ``u = 2**-10`` (round-to-nearest would give half that; the bound covers both).
Under the interpreter, which ignores ``input_precision``, the kernels truncate the operands
themselves (dot mode 4 in triton_kernels/logn_attention_rules.py), so these tests see the error a
GPU would give.

The bound, first written for the forward, per query row ``i`` (``p`` the float64 probabilities, ``sc_i``
the row's scale, ``|x|`` elementwise absolute values):

* a logit ``sc_i q_i.k_j`` computed from truncated operands is off by at most
  ``e_ij = sc_i (2u + u^2 + g) (|q_i|.|k_j|)`` (each product by ``(1+d1)(1+d2)``, ``|d| < u``; ``g``
  covers the float32 accumulation, see below);
* a softmax whose logits move by at most ``e`` moves each probability by a factor within
  ``exp(+-2 max_j e_ij)``, so ``|p'_ij - p_ij| <= rho_i p_ij`` with ``rho_i = exp(2 max_j e_ij) - 1``;
* ``out_i = sum_j p_ij v_j`` with ``p`` and ``v`` truncated again adds ``(2u + u^2 + g) p_ij |v_j|``.

So ``|out'_i - out_i| <= (rho_i (1 + 2u + u^2) + 2u + u^2 + g) sum_j p_ij ||v_j||``. The gradients follow
the kernels' steps the same way (``dP = dO V^T``, ``delta = rowsum(out * dO)``, ``dS = P (dP - delta)``,
``dV = P^T dO``, ``dQ = sc dS K``, ``dK = (sc dS)^T Q``), each dot adding ``2u + u^2 + g`` relative
to the sum of the absolute values of its terms, each perturbed factor carried by its own bound.
``g = (Lk + D + 8) 2^-24`` allows float32 rounding of sums of at most ``Lk + D`` terms and a few
elementwise operations (exp2, the scale, the normalisation): ``n 2^-24`` is the classic bound of a
float32 sum of ``n`` terms relative to the sum of their absolute values. These are rigorous to the
order of ``u^2`` terms, which the ``u^2`` terms above carry. The error in practice is far below the
bound (random signs cancel); the tests also check that it is well above the IEEE float32 error, so
a path that silently dropped TF32 would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.reference import logn_attention as ref

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs read as NaN

U = 2.0**-10  # TF32 truncation: relative error of one operand


def _inputs(b, hq, hkv, lq, lk, d, mask_p, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64) * 1.5).float()
    k = (torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64) * 1.5).float()
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).float()
    go = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64).float()
    mask = None if mask_p is None else torch.rand(b, lk, generator=gen) < mask_p
    return q, k, v, go, mask


def _run(device, backend, q, k, v, go, mask, causal, allow_tf32, **kw):
    """``[out, dq, dk, dv]`` in float64 on the CPU, from ``backend``."""
    qd, kd, vd = (t.detach().clone().to(device).requires_grad_() for t in (q, k, v))
    maskd = None if mask is None else mask.to(device)
    with kexue.use_backend(backend):
        out = kexue.ops.logn_attention(qd, kd, vd, causal=causal, key_padding_mask=maskd, allow_tf32=allow_tf32, **kw)
        out.backward(go.to(device))
    return [t.detach().cpu().double() for t in (out, qd.grad, kd.grad, vd.grad)]


def _bounds(q, k, v, go, mask, causal, scale=None):
    """Per-row bounds (see the module docstring) on ||out' - out||, ||dq' - dq||, ||dk' - dk||,
    ||dv' - dv|| (rows of dk, dv summed over the query heads of each key/value head)."""
    q, k, v, go = (t.double() for t in (q, k, v, go))
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    n = ref.visible_keys(b, lq, lk, causal, mask, q.device)
    sc = ref.row_scales(n, d, scale, 512, True, False, 1, torch.float64)[:, None, :, None]  # (B, 1, Lq, 1)
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    s = torch.where(allowed, sc * (q @ kk.transpose(-1, -2)), -math.inf)
    empty = ~allowed.any(-1, keepdim=True)
    p = torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, s), -1))
    out = p @ vv
    g = (lk + d + 8) * 2.0**-24
    w = 2 * U + U * U + g  # one dot's relative error, with respect to the sum of |terms|
    e = torch.where(allowed, sc * w * (q.abs() @ kk.abs().transpose(-1, -2)), 0.0)
    rho = torch.expm1(2 * e.amax(-1, keepdim=True))  # |p' - p| <= rho p
    vn, don = vv.norm(dim=-1), go.norm(dim=-1)
    b_out = (rho * (1 + w) + w) * (p @ vn[..., None])  # (B, Hq, Lq, 1)
    # backward
    dp = go @ vv.transpose(-1, -2)
    delta = (out * go).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    f = w * (go.abs() @ vv.abs().transpose(-1, -2))  # |dP' - dP|
    gd = b_out * don[..., None] + g * ((out.abs() * go.abs()).sum(-1, keepdim=True))  # |delta' - delta|
    h = p * (rho * ((dp - delta).abs() + f + gd) + f + gd)  # |dS' - dS|
    b_dv = ((p * (rho * (1 + w) + w)).transpose(-1, -2) @ don[..., None]).unflatten(1, (hkv, -1)).sum(2)
    term = sc * (h * (1 + w) + w * ds.abs())  # what each (i, j) may add, before the norm of k_j or q_j
    b_dq = term @ kk.norm(dim=-1)[..., None]
    b_dk = (term.transpose(-1, -2) @ q.norm(dim=-1)[..., None]).unflatten(1, (hkv, -1)).sum(2)
    return [t.squeeze(-1) for t in (b_out, b_dq, b_dk, b_dv)]


def _check_bound(device, b, hq, hkv, lq, lk, d, causal, mask_p=None, seed=0, **kw):
    q, k, v, go, mask = _inputs(b, hq, hkv, lq, lk, d, mask_p, seed)
    exact = _run("cpu", "torch", q.double(), k.double(), v.double(), go.double(), mask, causal, False, **kw)
    tf32 = _run(device, "triton", q, k, v, go, mask, causal, True, **kw)
    # the IEEE float32 path: the kernels under the interpreter; on a GPU Triton refuses float32
    # without TF32, so the float32 reference stands in
    ieee = _run(device, "triton" if device.type == "cpu" else "torch", q, k, v, go, mask, causal, False, **kw)
    bounds = _bounds(q, k, v, go, mask, causal, **kw)
    for name, got, want, base, bound in zip(("out", "dq", "dk", "dv"), tf32, exact, ieee, bounds, strict=True):
        err = (got - want).norm(dim=-1)
        assert torch.all(err <= bound), f"{name}: worst error / bound {(err / bound.clamp_min(1e-300)).max():.3g}"
        # TF32 is in effect: its error is far above float32's (2^-24 a rounding, 2^13 times smaller)
        assert (got - want).norm() > 20 * (base - want).norm(), name


@pytest.mark.parametrize(
    "b,hq,hkv,lq,lk,d,causal,mask_p",
    [
        (1, 4, 2, 70, 90, 64, True, 0.2),  # GQA, KV-cache offset, padding, tile edges (64 x 16 tiles)
        (2, 2, 2, 50, 50, 40, False, None),  # head dim padded to rows of 48
        (1, 2, 1, 33, 40, 128, True, None),  # the widest GPU head (128 x 16 forward tiles on sm_80)
        (1, 8, 2, 3, 150, 64, True, 0.1),  # decode: 3 queries, 4 heads a KV head packed, split-K
    ],
)
def test_tf32_errors_within_the_derived_bound(triton_device, b, hq, hkv, lq, lk, d, causal, mask_p):
    _check_bound(triton_device, b, hq, hkv, lq, lk, d, causal, mask_p)


@pytest.mark.parametrize("family", [90, 86])
def test_tf32_tiles_of_other_targets(triton_device, monkeypatch, family):
    # the interpreter runs the sm_80 tables; this runs sm_90's (dK/dV 128 keys x 16 query rows on
    # 8 warps, forward 128 x 32) and sm_86's (dK/dV 32 keys on 2 warps) at a head padded to 128
    # columns (EVEN_D off), with GQA, the causal diagonal, ragged last blocks and padding
    from kexue.triton_kernels import logn_attention as launchers
    from kexue.triton_kernels import logn_attention_bwd_tiles

    monkeypatch.setattr(launchers, "arch_family", lambda device: family)
    assert logn_attention_bwd_tiles.tiles(family, 96, 3).dkdv.block_n == {90: 128, 86: 32}[family]
    _check_bound(triton_device, 1, 4, 2, 131, 140, 96, True, 0.1)


@pytest.mark.parametrize("lq,lk", [(31, 65), (64, 33)])
def test_tf32_sm80_dkdv_tile_at_d128(triton_device, lq, lk):
    # sm_80's dK/dV tile from 128 padded columns (the interpreter runs it): 32 keys x 32 query rows
    # on 4 warps; query and key blocks ragged on either side of 32 and 64, GQA, causal, padding
    from kexue.triton_kernels import logn_attention_bwd_tiles

    assert logn_attention_bwd_tiles.tiles(80, 96, 3).dkdv == (32, 32, 4, 2)
    _check_bound(triton_device, 1, 4, 2, lq, lk, 96, True, 0.1)


def test_tf32_decode_with_the_sm90_choices(triton_device, monkeypatch):
    # the decode launcher asks arch_family for its warps and stages: on sm_90, 64 packed rows of
    # TF32 at d=128 take one warpgroup (4 warps, 2 stages), elsewhere 8 warps (1 stage)
    from kexue.triton_kernels import logn_attention_decode as dec

    monkeypatch.setattr(dec, "arch_family", lambda device: 90)
    assert (dec._num_warps(64, 128, 4, 90), dec._num_stages(128, 4, 90)) == (4, 2)
    assert (dec._num_warps(64, 128, 4, 86), dec._num_stages(128, 4, 86)) == (8, 1)
    _check_bound(triton_device, 1, 8, 2, 16, 150, 128, True, 0.1)  # 4 heads x 16 tokens: 64 rows


def test_tf32_gradmax_within_the_derived_bound(triton_device):
    _check_bound(triton_device, 1, 2, 1, 40, 60, 32, True, scale="gradmax")


def test_tf32_packed_sequences(triton_device):
    # the varlen kernels take the flag too: packed TF32 equals the dense TF32 result per sequence
    # (the same tiles over the same rows), and differs from the IEEE one
    q, k, v, _, _ = _inputs(1, 2, 1, 45, 45, 32, None, 3)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous().to(triton_device) for t in (q, k, v))
    cu = torch.tensor([0, 45], dtype=torch.int32, device=triton_device)
    with kexue.use_backend("triton"):
        dense = kexue.ops.logn_attention(*(t.to(triton_device) for t in (q, k, v)), causal=True, allow_tf32=True)
        packed = kexue.ops.logn_attention(qp, kp, vp, cu_seqlens=cu, causal=True, allow_tf32=True)
    ieee = kexue.ops.logn_attention(qp, kp, vp, cu_seqlens=cu, causal=True)  # full float32, any backend
    assert torch.equal(packed.transpose(0, 1).cpu(), dense[0].cpu())
    assert not torch.equal(packed.cpu(), ieee.cpu())


@pytest.mark.parametrize("bad", [1, 0, "yes", None, torch.tensor(True)])
def test_allow_tf32_must_be_a_bool(bad):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="allow_tf32"):
        kexue.ops.logn_attention(q, q, q, allow_tf32=bad)
    with pytest.raises(TypeError, match="allow_tf32"):
        kexue.nn.LogNAttention(16, 2, allow_tf32=bad)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backends_without_tf32_compute_in_full_precision(backend):
    # allow_tf32 is a permission: the C++ CPU kernel and the reference ignore it (bit for bit)
    if backend not in kexue.backends():
        pytest.skip(f"{backend} is not installed here")
    q, k, v, go, mask = _inputs(1, 2, 1, 9, 13, 16, 0.2, 1)
    a = _run("cpu", backend, q, k, v, go, mask, True, True)
    b = _run("cpu", backend, q, k, v, go, mask, True, False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_allow_tf32_leaves_16_bit_inputs_alone(triton_device):
    q, k, v, go, mask = _inputs(1, 2, 1, 20, 30, 16, None, 2)
    q, k, v, go = (t.half() for t in (q, k, v, go))
    a = _run(triton_device, "triton", q, k, v, go, mask, True, True)
    b = _run(triton_device, "triton", q, k, v, go, mask, True, False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_module_passes_allow_tf32(triton_device):
    torch.manual_seed(0)
    m = kexue.nn.LogNAttention(32, 2, causal=True, allow_tf32=True).to(triton_device)
    x = torch.randn(1, 20, 32, device=triton_device)
    with kexue.use_backend("triton"):
        y_tf32, _ = m(x, x, x)
    m.allow_tf32 = False
    y_ieee, _ = m(x, x, x)  # full float32 on whichever backend serves it
    assert "allow_tf32=False" in repr(m)
    err = (y_tf32 - y_ieee).norm() / y_ieee.norm()
    assert 1e-6 < err < 1e-2  # TF32 rounding reached the kernel, and only that


def test_compiled_and_raw_ops_take_allow_tf32(triton_device):
    # a non-tensor op argument (bool, default False in the schema): compiled graphs and opcheck
    from kexue.ops import _logn_attention_ops as ops_mod

    schema = str(torch.ops.kexue.logn_attention.default._schema)
    assert "bool allow_tf32=False" in schema
    for op in ("logn_attention_backward", "logn_attention_varlen", "logn_attention_varlen_backward"):
        assert "bool allow_tf32=False" in str(getattr(torch.ops.kexue, op).default._schema), op
    q, k, v, go, _ = _inputs(1, 2, 1, 9, 13, 16, None, 4)
    q, k, v = (t.to(triton_device).requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return kexue.ops.logn_attention(q, k, v, causal=True, allow_tf32=True)

    with kexue.use_backend("triton"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        want = f(q, k, v)
        assert torch.equal(got, want)
        args = (q, k, v, None, True, 0.25, 512.0, True, False, 1.0, False, True)
        torch.library.opcheck(ops_mod.logn_attention_op, args)


def test_static_check_reads_and_demands_tf32():
    # tests/gpu_compile.py counts tensor-core dots with TF32 operands and fails a configuration
    # that demands them ("tf32" under expect, as every log-n float32 TF32 entry does) without them
    from tests import gpu_compile as gc

    ampere = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    hopper = "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, p, 1, 1;"
    half = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    assert gc.count_instructions(ampere)["tf32"] == 1 and gc.count_instructions(hopper)["tf32"] == 1
    assert gc.count_instructions(half)["tf32"] == 0
    base = dict(module="m", name="n", arch=80, num_warps=4, reg=100, stack=0, shared=0, dyn_shared=0, local=0)
    assert gc.Result(**base, instructions=gc.count_instructions(ampere), expect=["tf32"]).ok
    assert "TF32" in gc.Result(**base, instructions=gc.count_instructions(half), expect=["tf32"]).problem()
    from kexue.triton_kernels import logn_attention_bwd_dq, logn_attention_decode_aot, logn_attention_fwd_aot

    for module in (logn_attention_fwd_aot, logn_attention_bwd_dq, logn_attention_decode_aot):
        tf32 = [c for c in module.AOT_CONFIGS if " tf32 " in c["name"]]
        assert tf32 and all("tf32" in c["expect"] and c.get("archs", "every") != () for c in tf32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_tf32_within_the_derived_bound(d):
    # on a GPU: the real tensor cores (and the sm_80/sm_90 TF32 tiles) against the same bound
    _check_bound(torch.device("cuda"), 1, 4, 2, 300, 520, d, True, 0.1)
