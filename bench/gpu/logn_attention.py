"""Log-n attention on a GPU: prefill forward / forward+backward, and decode against a long cache.

Prefill: bf16 q ``(B, Hq, L, D)``, k/v ``(B, Hkv, L, D)``, log-n scale with ``train_len = 512``.
The peers compute the same function: SDPA with q multiplied row by row by its log-n scale first
(that multiplication is timed: it is part of the function), pinned to each backend with
``torch.nn.attention.sdpa_kernel`` (``enable_gqa`` for Hkv < Hq); FlexAttention compiled, with a
``score_mod`` that scales each score by its row's factor (and a causal block mask); flash-attn's
``flash_attn_func`` on pre-scaled q when it is installed.

FLOPs: ``4 * B * Hq * L^2 * D`` forward, halved when causal; forward+backward is 3.5x the forward
(the backward's five matrix products against the forward's two), the convention of flash-attn's
benchmarks.

float32 with ``allow_tf32=True`` (one shape): kexue's TF32 tensor-core dots against SDPA's
memory-efficient backend and FlexAttention on the same float32 inputs, each under torch's TF32
matmul setting.

Decode: one query per sequence against a cache of 32k keys (q ``(B, 32, 1, 128)``, cache
``(B, 8, 32768, 128)`` bf16): memory-bound, so the goal is a fraction of the copy floor for
reading the cache once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

import kexue
from bench._case import Case, Headline, Peer, Thunk, Unavailable
from bench.logn_attention import TRAIN_LEN, _in_mode, row_scale

BF16 = torch.bfloat16
# (B, Hq, Hkv, L, D, causal)
DEFAULT_SHAPES = [
    (4, 16, 4, 4096, 128, True),
    (4, 16, 4, 8192, 128, True),
    (4, 16, 4, 4096, 64, True),
    (4, 16, 4, 4096, 128, False),
    (4, 16, 16, 4096, 128, True),
    (2, 16, 4, 4096, 256, True),  # heads of 256 (two 128-column programs a row block on sm_80 / sm_90)
]
FULL_SHAPES = [
    (4, 16, hkv, length, d, causal)
    for hkv in (4, 16)
    for length in (4096, 8192)
    for d in (64, 128)
    for causal in (True, False)
]
SMOKE_SHAPES = [(1, 4, 2, 80, 32, True), (1, 2, 2, 64, 16, False)]
# float32 inputs with allow_tf32 (B, Hq, Hkv, L, D, causal), per plan
TF32_SHAPE = {"smoke": (1, 2, 2, 64, 32, True), "default": (4, 16, 4, 4096, 128, True)}
TF32_PEERS = ("kexue", "sdpa-efficient", "flex")
# (B, Hq, Hkv, cache length, D)
DECODE_SHAPE, SMOKE_DECODE_SHAPE = (8, 32, 8, 32768, 128), (2, 4, 2, 300, 32)
DECODE_FLOOR_GOAL = 0.8
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}

HEADLINES = [
    Headline("forward", "kexue", "sdpa-flash", "<=", 1.0),
    Headline("full", "kexue", "sdpa-flash", "<=", 1 / 0.9),
    Headline("forward", "kexue", "flex", "<=", 1 / 1.5),
    Headline("full", "kexue", "flex", "<=", 1 / 1.5),
]


def _inputs(b, hq, hkv, lq, lk, d, causal, mode, device, dtype=BF16) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, lq, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, device=device, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, "causal": causal, "mode": mode, "scale": row_scale(lq, lk, d, causal, device)}
    inputs["allow_tf32"] = dtype == torch.float32  # kexue's switch; the peers follow torch's setting
    if mode == "full":
        for t in (q, k, v):
            t.requires_grad_()
        inputs["grad_out"] = torch.randn_like(q)
    return inputs


def _checked(inputs: dict, attend) -> Thunk:
    """One call outside the timings (compilation, and the reason if this peer cannot run here).
    float32 cases run every peer under torch's TF32 matmul setting, as kexue runs with allow_tf32."""

    def call():
        if not inputs["allow_tf32"]:
            return _in_mode(inputs, attend)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return _in_mode(inputs, attend)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    try:
        call()
    except Exception as exc:
        raise Unavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None
    return call


def _kexue(inputs: dict) -> Thunk:
    causal, tf32 = inputs["causal"], inputs["allow_tf32"]
    return _checked(
        inputs,
        lambda q, k, v: kexue.ops.logn_attention(q, k, v, causal=causal, train_len=TRAIN_LEN, allow_tf32=tf32),
    )


def _causal_sdpa(inputs: dict) -> bool:
    # SDPA's is_causal aligns the mask to the top-left corner: right for Lq == Lk; a single decode
    # query that sees the whole cache is non-causal there.
    return inputs["causal"] and inputs["q"].shape[2] == inputs["k"].shape[2]


def _sdpa(backend_name: str):
    def build(inputs: dict) -> Thunk:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        scale, causal = inputs["scale"], _causal_sdpa(inputs)
        gqa = inputs["q"].shape[1] != inputs["k"].shape[1]

        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q * scale.to(q.dtype), k, v, is_causal=causal, scale=1.0, enable_gqa=gqa
                )

        return _checked(inputs, attend)

    return build


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(inputs: dict) -> Thunk:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Unavailable(f"FlexAttention: {exc}") from None
    if inputs["q"].device.type != "cuda":
        raise Unavailable("FlexAttention's compiled kernels need a GPU here")
    scale = inputs["scale"][:, 0]
    lq, lk = inputs["q"].shape[2], inputs["k"].shape[2]
    offset = lk - lq

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale[q_idx]

    block_mask = None
    if inputs["causal"]:

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        block_mask = create_block_mask(causal, None, None, lq, lk, device=inputs["q"].device)
    flex = _compiled_flex()
    gqa = inputs["q"].shape[1] != inputs["k"].shape[1]
    return _checked(
        inputs, lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, enable_gqa=gqa)
    )


def _flash_attn(inputs: dict) -> Thunk:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise Unavailable("flash-attn is not installed") from None
    scale, causal = inputs["scale"], inputs["causal"]

    def attend(q, k, v):  # flash-attn takes (B, L, H, D); its causal mask is bottom-right aligned
        qs = (q * scale.to(q.dtype)).transpose(1, 2)
        out = flash_attn_func(qs, k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0, causal=causal)
        return out.transpose(1, 2)

    return _checked(inputs, attend)


def _peers(decode: bool) -> list[Peer]:
    peers = [Peer("kexue", _kexue)] + [Peer(name, _sdpa(b)) for name, b in SDPA_BACKENDS.items()]
    if not decode:
        peers.append(Peer("flex", _flex))
    return peers + [Peer("flash-attn", _flash_attn)]


def _flops(b, hq, lq, lk, d, causal, mode) -> float:
    forward = 4 * b * hq * lq * lk * d * (0.5 if causal and lq == lk else 1.0)
    return forward * (3.5 if mode == "full" else 1.0)


def cases(device: torch.device, plan: str) -> list[Case]:
    shapes = {"smoke": SMOKE_SHAPES, "default": DEFAULT_SHAPES, "full": FULL_SHAPES}[plan]
    out = []
    peers = _peers(decode=False)
    for i, shape in enumerate(shapes):
        out += [_prefill_case(shape, mode, device, BF16, peers, headline=i == 0) for mode in ("forward", "full")]
    tf32_peers = [p for p in peers if p.name in TF32_PEERS]  # those that take float32 (not flash)
    tf32_shape = TF32_SHAPE.get(plan, TF32_SHAPE["default"])
    out += [_prefill_case(tf32_shape, mode, device, torch.float32, tf32_peers) for mode in ("forward", "full")]
    b, hq, hkv, cache, d = SMOKE_DECODE_SHAPE if plan == "smoke" else DECODE_SHAPE
    cache_bytes = 2 * b * hkv * cache * d * 2
    out.append(
        Case(
            name=f"decode B{b} H{hq}/{hkv} cache {cache} d{d}",
            mode="forward",
            bytes=cache_bytes + 2 * 2 * b * hq * d,
            peers=_peers(decode=True),
            setup=functools.partial(_inputs, b, hq, hkv, 1, cache, d, True, "forward", device),
            params={
                "batch": b,
                "heads_q": hq,
                "heads_kv": hkv,
                "cache": cache,
                "head_dim": d,
                "dtype": "bf16",
                "flops": _flops(b, hq, 1, cache, d, True, "forward"),
                "floor_goal": DECODE_FLOOR_GOAL,
            },
        )
    )
    return out


def _prefill_case(shape, mode: str, device, dtype, peers, headline: bool = False) -> Case:
    """One prefill case: bf16, or float32 run with allow_tf32 (and the peers under torch's TF32 setting)."""
    b, hq, hkv, length, d, causal = shape
    elems = (2 * b * hq + 2 * b * hkv) * length * d  # q, out; k, v
    size = torch.empty((), dtype=dtype).element_size()
    label = "bf16" if dtype == BF16 else "fp32-tf32"
    return Case(
        name=f"B{b} H{hq}/{hkv} L{length} d{d} {'causal' if causal else 'full'}"
        + ("" if dtype == BF16 else " fp32 tf32"),
        mode=mode,
        bytes=size * elems * (2 if mode == "full" else 1),
        peers=peers,
        headline=headline,
        setup=functools.partial(_inputs, b, hq, hkv, length, length, d, causal, mode, device, dtype),
        params={
            "batch": b,
            "heads_q": hq,
            "heads_kv": hkv,
            "length": length,
            "head_dim": d,
            "causal": causal,
            "dtype": label,
            "flops": _flops(b, hq, length, length, d, causal, mode),
        },
    )
