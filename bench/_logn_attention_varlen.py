"""Log-n attention, packed sequences against padding: the varlen case of ``bench.logn_attention``.

Sequences of mixed lengths (:data:`VARLEN_LENGTHS`), causal, packed with ``cu_seqlens``
(``kexue``) against the same sequences right-padded to the longest with a key mask (``padded``:
the dense kexue call on inputs padded beforehand, the padding copy not timed), both on the
native backend, with the heads, head size and log-n setting of the dense cases.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import kexue
from bench import Case, Peer
from bench._case import Thunk
from bench.logn_attention import BYTES_PER_ELEMENT_MOVED, HEAD_DIM, HEADS, MODES, TRAIN_LEN

VARLEN_LENGTHS = (1800, 120, 700, 64, 1024, 300, 5, 33)  # 4046 rows; padded: 8 x 1800 = 14400


def _varlen_inputs(dtype, device, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    lengths = VARLEN_LENGTHS
    total, longest = sum(lengths), max(lengths)
    packed = [torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    padded = [torch.zeros(len(lengths), HEADS, longest, HEAD_DIM, device=device, dtype=dtype) for _ in range(3)]
    mask = torch.ones(len(lengths), longest, dtype=torch.bool, device=device)
    for s, n in enumerate(lengths):
        for p, t in zip(padded, packed, strict=False):
            p[s, :, :n] = t[cu[s] : cu[s + 1]].transpose(0, 1)
        mask[s, :n] = False
    inputs: dict[str, Any] = {
        "packed": packed,
        "padded": padded,
        "mask": mask,
        "cu": cu,
        "max_seqlen": longest,
        "mode": mode,
    }
    if mode == "full":
        for t in (*packed, *padded):
            t.requires_grad_()
        inputs["grad_packed"] = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
        inputs["grad_padded"] = torch.randn(padded[0].shape, generator=gen).to(device=device, dtype=dtype)
    return inputs


def _varlen_peer(name: str, backend: str, packed: bool) -> Peer:
    def build(inputs: dict) -> Thunk:
        q, k, v = inputs["packed" if packed else "padded"]
        grad = inputs.get("grad_packed" if packed else "grad_padded")
        kw = (
            dict(cu_seqlens=inputs["cu"], max_seqlen=inputs["max_seqlen"])
            if packed
            else dict(key_padding_mask=inputs["mask"])
        )

        def call():
            with kexue.use_backend(backend):
                if inputs["mode"] == "forward":
                    with torch.no_grad():
                        return kexue.ops.logn_attention(q, k, v, causal=True, train_len=TRAIN_LEN, **kw)
                out = kexue.ops.logn_attention(q, k, v, causal=True, train_len=TRAIN_LEN, **kw)
                return torch.autograd.grad(out, (q, k, v), grad)

        return call

    return Peer(name, build)


def varlen_cases(device: torch.device) -> list[Case]:
    backend = "triton" if device.type == "cuda" else "cpu"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elem = torch.empty((), dtype=dtype).element_size()
    peers = [_varlen_peer("kexue", backend, True), _varlen_peer("padded", backend, False)]
    total = sum(VARLEN_LENGTHS)
    return [
        Case(
            name=f"varlen {len(VARLEN_LENGTHS)} seqs, {total} rows, causal {str(dtype).removeprefix('torch.')}",
            mode=mode,
            bytes=BYTES_PER_ELEMENT_MOVED[mode] * HEADS * total * HEAD_DIM * elem,
            setup=functools.partial(_varlen_inputs, dtype, device, mode),
            peers=peers,
            params={
                "lengths": list(VARLEN_LENGTHS),
                "heads": HEADS,
                "head_dim": HEAD_DIM,
                "causal": True,
                "train_len": TRAIN_LEN,
            },
        )
        for mode in MODES
    ]
