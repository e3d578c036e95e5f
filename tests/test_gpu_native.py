"""Each op family's GPU kernels, natively on a CUDA device, at production sizes.

The interpreter tests cover the kernels' logic at small shapes; these run what a user runs: the
tile configurations picked for real head sizes, lengths past one tile, tens of optimizer tensors.
Each compares against the reference computed in float32/float64 on the same device (or, for
integer outputs, against the C++ CPU kernel bit for bit). They take seconds each and are skipped
without a GPU; `.ci/gpu-check` runs them first, family by family (``-k logn``, ``-k sign_optim``,
``-k global_pointer``, ``-k biohash``, ``-k entropy_norm``).
"""

from __future__ import annotations

import math

import pytest
import torch

import kexue
from kexue.reference import logn_attention as logn_reference
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOW = (torch.bfloat16, torch.float16)
# A low-precision kernel may err at most this much relative to the float64 reference (bf16's
# 8-bit mantissa: one rounding of inputs and outputs is ~4e-3; fp16 is tighter).
BUDGET = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3}


def _cpu_backend() -> str:
    """The C++ CPU kernels when kexue._C is built, else the torch reference (.ci/gpu-check runs the
    Triton stages while the native module is still building)."""
    return "cpu" if kexue.backends()["cpu"]["available"] else "torch"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# log-n attention


def _attention_inputs(b, hq, hkv, lq, lk, d, dtype, seed=0):
    g = _gen(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, device="cuda", generator=g).to(dtype)
    do = torch.randn(b, hq, lq, d, device="cuda", generator=g).to(dtype)
    return q, k, v, do


def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out, grads


# Each combination compiles its own kernels (seconds each), so a spread of them, not the product.
ATTENTION_CASES = [
    (torch.bfloat16, 128, 2, True),
    (torch.bfloat16, 128, 8, False),
    (torch.bfloat16, 64, 2, True),
    (torch.bfloat16, 64, 8, False),
    (torch.float16, 128, 2, True),
    (torch.float16, 64, 8, False),
    (torch.bfloat16, 256, 2, True),  # split into 128-column programs on sm_80 / sm_90
]


@pytest.mark.parametrize(
    ("dtype", "d", "hkv", "causal"),
    ATTENTION_CASES,
    ids=[f"{str(c[0])[6:]}-d{c[1]}-hkv{c[2]}-{'causal' if c[3] else 'full'}" for c in ATTENTION_CASES],
)
def test_logn_attention_forward_backward(dtype, d, hkv, causal):
    q, k, v, do = _attention_inputs(2, 8, hkv, 1000, 1000, d, dtype)  # 1000: not a multiple of a tile
    options = dict(causal=causal, train_len=512)
    out, grads = _grads(lambda q, k, v: kexue.ops.logn_attention(q, k, v, **options), q, k, v, do)
    ref, ref_grads = _grads(
        lambda q, k, v: logn_reference.logn_attention(q, k, v, **options), q.double(), k.double(), v.double(), do
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) <= BUDGET[dtype]
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * BUDGET[dtype], f"d{name}"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_logn_attention_padding_and_cache_offset(dtype):
    # Cross attention over a longer key sequence (a KV cache of 300 keys before 700 queries), with
    # padded keys: n_i counts only visible, unpadded keys.
    q, k, v, do = _attention_inputs(2, 8, 4, 700, 1000, 128, dtype, seed=1)
    pad = torch.zeros(2, 1000, dtype=torch.bool, device="cuda")
    pad[1, 870:] = True
    options = dict(causal=True, train_len=512, key_padding_mask=pad)
    out, grads = _grads(lambda q, k, v: kexue.ops.logn_attention(q, k, v, **options), q, k, v, do)
    ref, ref_grads = _grads(
        lambda q, k, v: logn_reference.logn_attention(q, k, v, **options), q.double(), k.double(), v.double(), do
    )
    assert rel_err(out, ref) <= BUDGET[dtype]
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * BUDGET[dtype]


def test_logn_attention_varlen_packed():
    lengths = [513, 1, 0, 1200, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    total, hq, hkv, d = sum(lengths), 8, 2, 128
    g = _gen(2)
    q = torch.randn(total, hq, d, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(total, hkv, d, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(total, hkv, d, device="cuda", generator=g).to(torch.bfloat16)
    do = torch.randn(total, hq, d, device="cuda", generator=g).to(torch.bfloat16)
    options = dict(causal=True, train_len=512)
    out, grads = _grads(
        lambda q, k, v: kexue.ops.logn_attention(q, k, v, cu_seqlens=cu, max_seqlen=1200, **options), q, k, v, do
    )
    ref, ref_grads = _grads(
        lambda q, k, v: logn_reference.logn_attention_varlen(q, k, v, cu, **options),
        q.double(),
        k.double(),
        v.double(),
        do,
    )
    assert rel_err(out, ref) <= BUDGET[torch.bfloat16]
    for g_, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g_, r) <= 2 * BUDGET[torch.bfloat16]


@pytest.mark.parametrize("lq", [1, 4])
def test_logn_attention_decode_against_a_long_cache(lq):
    q, k, v, _ = _attention_inputs(2, 32, 8, lq, 8192, 128, torch.bfloat16, seed=3)
    options = dict(causal=True, train_len=512)
    with torch.no_grad():
        out = kexue.ops.logn_attention(q, k, v, **options)
        ref = logn_reference.logn_attention(q.double(), k.double(), v.double(), **options)
    assert rel_err(out, ref) <= BUDGET[torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Lion / Tiger


def _params(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1536, 512), (512,), (4096, 64), (3, 5, 7), (1,), (50257 // 16, 96), (1000,), (17, 129)] * 4
    return [(torch.randn(s, generator=g) * 0.02).to(dtype) for s in shapes]


@pytest.mark.parametrize("algo", ["lion", "tiger"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sign_optim_triton_step_equals_the_cpu_step(algo, dtype):
    cls = kexue.optim.Lion if algo == "lion" else kexue.optim.Tiger
    init = _params(4, dtype)
    g = torch.Generator().manual_seed(5)
    grads = [[(torch.randn(p.shape, generator=g) * 1e-2).to(dtype) for p in init] for _ in range(3)]
    finals = {}
    for device, backend in (("cpu", _cpu_backend()), ("cuda", "triton")):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in init]
        opt = cls(params, lr=1e-3, weight_decay=0.1)
        with kexue.use_backend(backend):
            for step in grads:
                for p, gr in zip(params, step, strict=True):
                    p.grad = gr.to(device)
                opt.step()
        finals[device] = [p.detach().cpu().float() for p in params]
    for i, (a, b) in enumerate(zip(finals["cpu"], finals["cuda"], strict=True)):
        # The same formula in the same precision: equal up to one rounding of the update.
        assert torch.allclose(a, b, rtol=0, atol=4e-3 if dtype == torch.bfloat16 else 1e-6), f"tensor {i}"


# ---------------------------------------------------------------------------------------------
# GlobalPointer


def test_global_pointer_loss_forward_backward_bf16():
    b, length, types, d = 16, 512, 16, 64
    g = _gen(6)
    q, k = (torch.randn(b, length, d, device="cuda", generator=g) for _ in range(2))
    sb, eb = (torch.randn(b, length, types, device="cuda", generator=g) for _ in range(2))
    lengths = torch.randint(length // 2, length + 1, (b,), device="cuda", generator=g)
    mask = torch.arange(length, device="cuda")[None] < lengths[:, None]
    n = 4 * b * types
    bi = torch.randint(0, b, (n,), device="cuda", generator=g)
    start = (torch.rand(n, device="cuda", generator=g) * (lengths[bi] - 4)).long()
    labels = torch.stack([bi, torch.randint(0, types, (n,), device="cuda", generator=g), start, start + 2], 1)

    def loss_and_grads(dtype, backend):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, sb, eb)]
        with kexue.use_backend(backend):
            loss = kexue.ops.global_pointer_loss(*leaves, labels, mask, reduction="none")
        grads = torch.autograd.grad(loss.sum(), leaves)
        return loss, grads

    loss, grads = loss_and_grads(torch.bfloat16, "triton")
    ref, ref_grads = loss_and_grads(torch.float64, "torch")
    assert rel_err(loss, ref) <= BUDGET[torch.bfloat16]
    for name, g_, r in zip(("q", "k", "start_bias", "end_bias"), grads, ref_grads, strict=True):
        assert rel_err(g_, r) <= 2 * BUDGET[torch.bfloat16], name


# ---------------------------------------------------------------------------------------------
# BioHash


def test_biohash_codes_equal_the_cpu_codes_bit_for_bit():
    g = torch.Generator().manual_seed(7)
    synapses = kexue.ops.new_synapses(400, 40_000, generator=g)
    ids = torch.randint(0, 40_000, (5000, 10), generator=g)
    codes = {}
    for device, backend in (("cpu", _cpu_backend()), ("cuda", "triton")):
        with kexue.use_backend(backend):
            codes[device] = kexue.ops.biohash(ids.to(device), None, None, synapses.to(device), 32).cpu()
    assert codes["cpu"].shape == (5000, 50)
    assert torch.equal(codes["cpu"], codes["cuda"])


# ---------------------------------------------------------------------------------------------
# Entropy normalization


@pytest.mark.parametrize("n", [131072, 50257])
def test_entropy_norm_rows_longer_than_a_tile(n):
    g = _gen(8)
    x = (torch.randn(16, n, device="cuda", generator=g) * 2).to(torch.bfloat16)
    target = (0.1 + 0.8 * torch.rand(16, device="cuda", generator=g)) * math.log(n)
    y, gamma = kexue.ops.entropy_normalize(x, target, logits=True, return_gamma=True)
    with kexue.use_backend("torch"):
        ref, ref_gamma = kexue.ops.entropy_normalize(x.double(), target.double(), logits=True, return_gamma=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= BUDGET[torch.bfloat16]
    assert rel_err(gamma, ref_gamma) <= 1e-3
