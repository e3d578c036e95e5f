"""Log-n attention: ``kexue.ops.logn_attention`` against its peers.

Inputs: ``q, k, v (1, 8, L, 64)`` standard normal (the issue's case), causal and not; the log-n
scale with ``train_len = 512``.

Peers, in the same process:
- ``kexue``: the native backend of the device (C++ on CPU, Triton on CUDA), forced.
- ``sdpa``: ``F.scaled_dot_product_attention`` computing the same function, q multiplied row by
  row by its log-n scale beforehand (that multiplication is timed too: it is part of the function).
- ``flex``: FlexAttention under ``torch.compile`` with a ``score_mod`` that multiplies each score
  by its row's scale (forward only on CPU: FlexAttention has no CPU backward).
- ``reference``: the plain-PyTorch reference (O(L^2) memory: left out above L = 4096).
- ``reference-compiled``: ``torch.compile`` of the reference forward (autograd through it for
  the backward); left out under --quick and above L = 4096.

One packed case (``varlen``): sequences of mixed lengths (:data:`VARLEN_LENGTHS`), causal, packed
with ``cu_seqlens`` (``kexue``) against the same sequences right-padded to the longest with a key
mask (``padded``, the dense kexue call on inputs padded beforehand: the padding copy is not
timed), both on the native backend.

Bytes the op must move: forward reads q, k, v and writes out, ``4 * B*H*L*D * elem``; forward
and backward add reading dO (and out) and writing dq, dk, dv: ``9 * B*H*L*D * elem``. Attention
is compute-bound (``4 * B*H*L^2*D`` flops forward, half that when causal; about 2.5x that for the
backward), so the bandwidth columns say little here.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

import kexue
import kexue.reference.logn_attention  # noqa: F401
from bench import Case, Headline, Peer, Skipped, Unavailable
from bench._case import Thunk
from bench._memory import mib, peak_bytes_cpu, rss_growth

reference = sys.modules["kexue.reference.logn_attention"]

TRAIN_LEN = 512
MODES = ("forward", "full")
# (L, causal); the first is the headline case (the orientation figure: causal, L = 2048).
LENGTHS = [
    (2048, True),
    (2048, False),
    (512, True),
    (512, False),
    (1024, True),
    (4096, True),
    (4096, False),
    (8192, True),
    (8192, False),
]
QUICK_LENGTHS = [(1024, True), (512, False)]
BATCH, HEADS, HEAD_DIM = 1, 8, 64
MAX_REFERENCE_LEN = 4096
BYTES_PER_ELEMENT_MOVED = {"forward": 4, "full": 9}

HEADLINES = [
    Headline("full", "kexue", "sdpa", "<=", 1.0),
    Headline("forward", "kexue", "flex", "<=", 1 / 1.2),
]


def row_scale(lq: int, lk: int, d: int, causal: bool, device) -> torch.Tensor:
    """(Lq, 1) float32: each query's log-n scale ``ln(n_i) / ln(train_len) / sqrt(D)`` without padding;
    ``n_i`` keys visible to query i (causal: up to its absolute position, a cache of Lk - Lq first)."""
    n = torch.arange(lk - lq + 1, lk + 1) if causal else torch.full((lq,), lk)
    return (torch.log(n.double()) / math.log(TRAIN_LEN) / math.sqrt(d)).float().to(device)[:, None]


def _inputs(length: int, causal: bool, dtype, device, mode: str, quick: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    inputs: dict[str, Any] = {
        "q": q,
        "k": k,
        "v": v,
        "causal": causal,
        "mode": mode,
        "quick": quick,
        "length": length,
        "row_scale": row_scale(length, length, HEAD_DIM, causal, device),
    }
    if mode == "full":
        for t in (q, k, v):
            t.requires_grad_()
        inputs["grad_out"] = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return inputs


def _in_mode(inputs: dict, forward) -> Any:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if inputs["mode"] == "forward":
        with torch.no_grad():
            return forward(q, k, v)
    out = forward(q, k, v)
    return torch.autograd.grad(out, (q, k, v), inputs["grad_out"])


def _kexue_peer(name: str, backend: str) -> Peer:
    def build(inputs: dict) -> Thunk:
        causal = inputs["causal"]
        if backend == "torch" and inputs["length"] > MAX_REFERENCE_LEN:
            raise Skipped(f"the reference holds (L, L) scores: left out above L = {MAX_REFERENCE_LEN}")
        try:
            with kexue.use_backend(backend):
                q = inputs["q"][:, :, :1].detach()
                kexue.ops.logn_attention(q, q, q)
        except kexue.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None

        def attend(q, k, v):
            return kexue.ops.logn_attention(q, k, v, causal=causal, train_len=TRAIN_LEN)

        def call():
            with kexue.use_backend(backend):
                return _in_mode(inputs, attend)

        return call

    return Peer(name, build)


def _sdpa(inputs: dict) -> Thunk:
    causal, scale = inputs["causal"], inputs["row_scale"]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q * scale.to(q.dtype), k, v, is_causal=causal, scale=1.0)

    return lambda: _in_mode(inputs, attend)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    torch._logging.set_logs(dynamo=logging.ERROR)
    return torch.compile(flex_attention)


def _flex(inputs: dict) -> Thunk:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Unavailable(f"FlexAttention is not in this torch: {exc}") from None
    q = inputs["q"]
    if inputs["mode"] == "full" and q.device.type == "cpu":
        raise Unavailable("FlexAttention has no backward on CPU (NotImplementedError)")
    causal, scale = inputs["causal"], inputs["row_scale"][:, 0]
    flex = _compiled_flex()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale[q_idx]

    block_mask = None
    if causal:
        block_mask = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, q.shape[2], q.shape[2], device=q.device
        )

    def attend(q, k, v):
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)

    return lambda: _in_mode(inputs, attend)


@functools.cache
def _compiled_reference():
    torch._logging.set_logs(dynamo=logging.ERROR)
    return torch.compile(reference.logn_attention_forward)


def _reference_compiled(inputs: dict) -> Thunk:
    if inputs["quick"]:
        raise Skipped("left out under --quick: compiling takes tens of seconds per shape")
    if inputs["length"] > MAX_REFERENCE_LEN:
        raise Skipped(f"the reference holds (L, L) scores: left out above L = {MAX_REFERENCE_LEN}")
    forward, causal = _compiled_reference(), inputs["causal"]
    return lambda: _in_mode(inputs, lambda q, k, v: forward(q, k, v, None, causal, None, TRAIN_LEN, True, False, 1)[0])


def _peers(device: torch.device) -> list[Peer]:
    native = [_kexue_peer("kexue", "triton" if device.type == "cuda" else "cpu")]
    return [
        *native,
        Peer("sdpa", _sdpa),
        Peer("flex", _flex),
        _kexue_peer("reference", "torch"),
        Peer("reference-compiled", _reference_compiled),
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    peers = _peers(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elem = torch.empty((), dtype=dtype).element_size()
    out = []
    for i, (length, causal) in enumerate(QUICK_LENGTHS if quick else LENGTHS):
        for mode in MODES:
            out.append(
                Case(
                    name=f"L={length} {'causal' if causal else 'full'} {str(dtype).removeprefix('torch.')}",
                    mode=mode,
                    bytes=BYTES_PER_ELEMENT_MOVED[mode] * BATCH * HEADS * length * HEAD_DIM * elem,
                    setup=functools.partial(_inputs, length, causal, dtype, device, mode, quick),
                    peers=peers,
                    headline=i == 0,
                    params={
                        "batch": BATCH,
                        "heads": HEADS,
                        "seq": length,
                        "head_dim": HEAD_DIM,
                        "causal": causal,
                        "train_len": TRAIN_LEN,
                    },
                )
            )
    from bench._logn_attention_varlen import varlen_cases  # imports this module's shapes

    return out + varlen_cases(device)


# --------------------------------------------------------------------------------------------
# Peak extra memory over the length (CPU): ``python -m bench.logn_attention --memory``.

MEMORY_LENGTHS = (1024, 2048, 4096, 8192, 16384)
MEMORY_PEERS = {
    "kexue": lambda inputs: _kexue_peer("kexue", "cpu").build(inputs),
    "sdpa": _sdpa,
    "reference": lambda inputs: _kexue_peer("reference", "torch").build(inputs),
}


def _peak_in_this_process(peer: str, length: int, mode: str) -> int:
    torch.set_num_threads(1)  # per-thread buffers would scale the figure with the core count
    inputs = _inputs(length, True, torch.float32, torch.device("cpu"), mode, False)
    return rss_growth(MEMORY_PEERS[peer](inputs))


def memory_report(lengths=MEMORY_LENGTHS) -> list[dict]:
    """Peak extra memory of one causal forward+backward (B=1, 8 heads, d=64, fp32, 1 thread) per
    length and peer: everything the call allocates counts, its outputs too (out, dq, dk, dv: four
    tensors of 2 MiB per 1k of L), so a flash-style path shows about that and the reference adds
    its (L, L) scores. n/a: the call stayed under an earlier high-water mark (nothing measured)."""
    print(f"peak extra memory, causal forward+backward, B={BATCH} H={HEADS} d={HEAD_DIM} fp32, 1 thread:")
    print(f"{'L':>6} " + " ".join(f"{p:>12}" for p in MEMORY_PEERS))
    rows = []
    for length in lengths:
        row = {"length": length}
        for peer in MEMORY_PEERS:
            skip = peer == "reference" and length > MAX_REFERENCE_LEN  # O(L^2): 8 GiB of scores at 16k
            row[peer] = None if skip else peak_bytes_cpu("bench.logn_attention", [peer, length, "full"])
        rows.append(row)
        print(f"{length:>6} " + " ".join(f"{mib(row[p]):>12}" for p in MEMORY_PEERS), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.logn_attention")
    parser.add_argument("--memory", action="store_true", help="peak extra memory over L = 1k .. 16k")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(MEMORY_LENGTHS))
    parser.add_argument("--peak", nargs=3, metavar=("PEER", "L", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak:
        peer, length, mode = args.peak
        print(_peak_in_this_process(peer, int(length), mode))
        return 0
    if args.memory:
        memory_report(args.lengths)
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
